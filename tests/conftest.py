"""Shared fixtures: small random Mamba-1 checkpoints, a sample text and a tokenizer trained on it.

Every model here is tiny (d_model 48, 2 layers) so that the whole suite runs on a few CPU cores.
Parameters are perturbed with seeded noise after construction, so A_log, D, the norm weights and
the biases are away from their initial values and a parity test can catch a swapped or ignored one.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
import transformers

from mambaspin.tokenizer import TextTokenizer, train_byte_level_bpe

SAMPLE_TEXT_FILE = Path(__file__).resolve().parent.parent / "shipped" / "tinyshakespeare.txt"
SAMPLE_TEXT_CHARS = 20_000

# A byte-level BPE always contains the 256 byte symbols and <|endoftext|>, so a model that
# uses the fixture tokenizer needs at least this many embedding rows.
MIN_TOKENIZER_VOCAB = 257
DEFAULT_VOCAB = 300
NOISE_SCALE = 0.1

# The models are tiny, so a second intra-op thread costs more in synchronization than it saves,
# and on a busy machine a waiting thread can slow a test down many times over.
torch.set_num_threads(1)


@functools.lru_cache(maxsize=1)
def sample_text() -> str:
    """Return the first 20,000 characters of the Tiny Shakespeare text shipped in the repository."""
    return SAMPLE_TEXT_FILE.read_text(encoding="utf-8")[:SAMPLE_TEXT_CHARS]


@functools.lru_cache(maxsize=None)
def trained_tokenizer(vocab: int) -> TextTokenizer:
    """Train (once per vocabulary size) a byte-level BPE on the sample text."""
    if vocab < MIN_TOKENIZER_VOCAB:
        raise ValueError(f"a byte-level BPE needs a vocabulary of at least {MIN_TOKENIZER_VOCAB}, got {vocab}")
    tokenizer = train_byte_level_bpe(sample_text(), vocab)
    assert tokenizer.vocab_size == vocab
    return tokenizer


def perturb_parameters(module: torch.nn.Module, seed: int, scale: float = NOISE_SCALE) -> None:
    """Add seeded Gaussian noise of standard deviation `scale` to every parameter, in place.

    Tied parameters appear once in `named_parameters`, so they get one noise draw.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(module.named_parameters()):
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.add_(scale * noise.to(parameter.dtype))


def make_hf_config(*, d_model=48, n_layer=2, d_state=8, dt_rank=3, vocab=DEFAULT_VOCAB, bias=False, tie=True):
    """Build a `transformers.MambaConfig` for a tiny model with expand 2 and a conv kernel of 4."""
    return transformers.MambaConfig(
        vocab_size=vocab,
        hidden_size=d_model,
        num_hidden_layers=n_layer,
        state_size=d_state,
        time_step_rank=dt_rank,
        expand=2,
        conv_kernel=4,
        use_bias=bias,
        use_conv_bias=True,
        tie_word_embeddings=tie,
    )


def make_hf_model(
    tmp_path: Path,
    *,
    d_model: int = 48,
    n_layer: int = 2,
    d_state: int = 8,
    dt_rank: int = 3,
    vocab: int = DEFAULT_VOCAB,
    bias: bool = False,
    tie: bool = True,
    seed: int = 0,
    tokenizer_vocab: int | None = None,
) -> Path:
    """Save a random `MambaForCausalLM` and a tokenizer.json into a new directory under `tmp_path`.

    The tokenizer has `tokenizer_vocab` tokens (default: `vocab`). Without an explicit
    `tokenizer_vocab`, a `vocab` below 257 gets no tokenizer because no byte-level BPE fits.
    Returns the checkpoint directory.
    """
    config = make_hf_config(
        d_model=d_model, n_layer=n_layer, d_state=d_state, dt_rank=dt_rank, vocab=vocab, bias=bias, tie=tie
    )
    torch.manual_seed(seed)
    model = transformers.MambaForCausalLM(config)
    perturb_parameters(model, seed)

    directory = Path(tempfile.mkdtemp(prefix="hf-mamba-", dir=tmp_path))
    model.save_pretrained(directory)
    if tokenizer_vocab is None and vocab >= MIN_TOKENIZER_VOCAB:
        tokenizer_vocab = vocab
    if tokenizer_vocab is not None:
        trained_tokenizer(tokenizer_vocab).save(directory)
    return directory


def load_hf_model(directory: Path) -> transformers.MambaForCausalLM:
    """Load a checkpoint with transformers' own loader, in float32 and eval mode."""
    model = transformers.MambaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def hf_logits(model: transformers.MambaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """Return transformers' logits for `ids` (b, l) without the recurrent cache."""
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return max |actual - expected| / max |expected|."""
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture
def text() -> str:
    """A deterministic English sample of 20,000 characters."""
    return sample_text()


@pytest.fixture
def model_factory(tmp_path):
    """`make_hf_model` bound to this test's `tmp_path`."""
    return functools.partial(make_hf_model, tmp_path)


@pytest.fixture
def hf_model_dir(tmp_path) -> Path:
    """A default tiny checkpoint (tied, no bias, vocabulary 300) with a matching tokenizer."""
    return make_hf_model(tmp_path)
