"""Perplexity evaluation: loss per token, perplexity and bits per character on a text."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import UserError


@dataclass(frozen=True)
class EvalResult:
    """Totals and averages of one evaluation. `chars` counts the characters of predicted tokens."""

    tokens: int
    chars: int
    loss_per_token: float
    perplexity: float
    nats_per_char: float
    bits_per_char: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_vocab_fits(tokenizer, vocab_size: int, ids: torch.Tensor | None = None) -> None:
    """Raise when the tokenizer can emit ids that the model's embedding has no row for."""
    largest = int(ids.max()) if ids is not None and ids.numel() else -1
    if tokenizer.vocab_size > vocab_size or largest >= vocab_size:
        raise UserError(
            f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens (largest id in this text: "
            f"{largest}) but the model's vocabulary has {vocab_size} rows. Use the tokenizer the model "
            "was trained with (--tokenizer DIR for eval, model.tokenizer=DIR in a run config)."
        )


def window_starts(n_tokens: int, block_size: int) -> list[int]:
    """Starts of the evaluation windows: every token after the first is a target exactly once."""
    return list(range(0, n_tokens - 1, block_size))


@torch.no_grad()
def evaluate_ids(model, ids: torch.Tensor, block_size: int, batch_size: int = 8, progress: bool = True):
    """Sum next-token cross-entropy over a 1-D token stream, in windows of `block_size` inputs.

    The context restarts at each window, and the last window may be shorter.
    Returns (total nats, number of predicted tokens).
    """
    if ids.numel() < block_size + 1:
        raise UserError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one block of {block_size} + 1. "
            "Use a longer text or a smaller block size (--block-size in eval, data.block_size in a run config)."
        )
    device = next(model.parameters()).device
    starts = window_starts(ids.numel(), block_size)
    total_nats, total_tokens = 0.0, 0
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    for batch_starts in tqdm(batches, desc="eval", disable=not progress, leave=False):
        for length in sorted({min(block_size, ids.numel() - 1 - s) for s in batch_starts}):
            group = [s for s in batch_starts if min(block_size, ids.numel() - 1 - s) == length]
            windows = torch.stack([ids[s : s + length + 1] for s in group]).to(device)  # (b, length + 1)
            logits = model(windows[:, :-1]).float()  # (b, length, v)
            nats = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
            total_nats += float(nats)
            total_tokens += windows[:, 1:].numel()
    return total_nats, total_tokens


def evaluate_text(model, tokenizer, text: str, block_size: int = 256, batch_size: int = 8, progress: bool = True) -> EvalResult:
    """Evaluate `model` on `text`: loss per token, perplexity, nats and bits per character."""
    ids = tokenizer.encode(text)  # (n_tokens,)
    check_vocab_fits(tokenizer, model.config.vocab_size, ids)
    was_training = model.training
    model.eval()
    try:
        nats, tokens = evaluate_ids(model, ids, block_size, batch_size, progress)
    finally:
        model.train(was_training)
    chars = len(text) - len(tokenizer.decode(ids[:1]))
    loss = nats / tokens
    return EvalResult(
        tokens=tokens,
        chars=chars,
        loss_per_token=loss,
        perplexity=math.exp(loss),
        nats_per_char=nats / chars,
        bits_per_char=nats / chars / math.log(2),
    )
