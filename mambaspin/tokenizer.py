"""Tokenizers: load one beside a checkpoint, or train the byte-level BPE of the shipped model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import UserError

logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"


class TextTokenizer:
    """Encode and decode text with a `tokenizers.Tokenizer` or a transformers tokenizer."""

    def __init__(self, backend, source: str):
        self.backend = backend
        self.source = source

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (the highest id plus one)."""
        if isinstance(self.backend, Tokenizer):
            return self.backend.get_vocab_size(with_added_tokens=True)
        return len(self.backend)

    def encode(self, text: str) -> torch.Tensor:
        """Return the ids of `text` as a 1-D int64 tensor, without special tokens."""
        if isinstance(self.backend, Tokenizer):
            ids = self.backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self.backend(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if isinstance(self.backend, Tokenizer):
            return self.backend.decode(ids, skip_special_tokens=False)
        return self.backend.decode(ids)

    def save(self, directory: Path) -> None:
        """Write tokenizer.json (or the transformers files) into `directory`."""
        if isinstance(self.backend, Tokenizer):
            self.backend.save(str(Path(directory) / "tokenizer.json"))
        else:
            self.backend.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> TextTokenizer:
    """Load tokenizer.json from `directory`, else any tokenizer transformers can read there."""
    directory = Path(directory)
    tokenizer_file = directory / "tokenizer.json"
    if tokenizer_file.is_file():
        try:
            backend = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the tokenizers library raises a bare Exception for unreadable files
            raise UserError(f"cannot read {tokenizer_file}: {' '.join(str(error).split())}. Pass a working "
                            "tokenizer directory (--tokenizer DIR, or model.tokenizer=DIR in a run config)") from error
        return TextTokenizer(backend, str(tokenizer_file))
    from transformers import AutoTokenizer

    try:
        backend = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as error:
        raise UserError(
            f"no tokenizer found in {directory}: expected tokenizer.json or files that "
            "transformers.AutoTokenizer reads. Pass --tokenizer DIR to eval, or set model.tokenizer=DIR in a run config "
            "(original mamba_ssm checkpoints use the GPT-NeoX-20B tokenizer)."
        ) from error
    return TextTokenizer(backend, str(directory))


def train_byte_level_bpe(text: str, vocab_size: int) -> TextTokenizer:
    """Train a byte-level BPE tokenizer on `text` with `vocab_size` ids, one of them <|endoftext|>."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return TextTokenizer(backend, "trained byte-level BPE")
