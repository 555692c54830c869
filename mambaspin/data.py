"""Text sources, tokenization and packing into fixed-length blocks.

A text source is either a local text file (split by characters: the first `train_fraction` is
train, the rest validation) or a `datasets` name or path with a text column (its own train and
validation splits are used). The calibration split is a seeded sample of training blocks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "shipped"
DEFAULT_TEXT = SHIPPED_DIR / "tinyshakespeare.txt"
PROJECT_ROOT = SHIPPED_DIR.parent


def resolve_path(path: str | os.PathLike) -> str:
    """Return `path` as given when it exists, else relative to the project root when it exists
    there (so configs can name shipped/... from any working directory)."""
    if Path(path).exists() or Path(path).is_absolute():
        return str(path)
    candidate = PROJECT_ROOT / path
    return str(candidate) if candidate.exists() else str(path)


@dataclass(frozen=True)
class TextSplits:
    """Raw text of the train and validation splits of one source."""

    train: str
    validation: str
    source: str


def load_text_splits(source: str | os.PathLike, train_fraction: float = 0.9, text_column: str = "text") -> TextSplits:
    """Read a local text file or a `datasets` dataset into train and validation text.

    A local file is split at `train_fraction` of its characters (first part train). A dataset
    must have a 'train' split and a 'validation' (or 'test') split; its rows are joined by newlines.
    """
    path = Path(resolve_path(source))
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise UserError(f"text file {path} is not UTF-8 ({error.reason} at byte {error.start}); convert it, "
                            f"e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix}") from error
        cut = int(len(text) * train_fraction)
        return TextSplits(train=text[:cut], validation=text[cut:], source=str(path))
    if path.suffix in {".txt", ".text", ".md"} or (not path.exists() and os.sep in str(source)):
        raise UserError(f"text file not found: {source}. Pass an existing text file or a datasets name.")
    return _load_dataset_splits(str(source), text_column)


def _load_dataset_splits(name: str, text_column: str) -> TextSplits:
    """Load a `datasets` dataset by name or local path and join its text column."""
    import datasets

    try:
        dataset = datasets.load_dataset(name)
    except Exception as error:  # datasets raises many types for a missing or unreachable dataset
        raise UserError(
            f"could not load text {name!r}: it is not a file, and loading it as a datasets dataset failed "
            f"({type(error).__name__}: {error}). Pass a local text file or a datasets name or path."
        ) from error
    validation_name = next((s for s in ("validation", "test") if s in dataset), None)
    if "train" not in dataset or validation_name is None:
        raise UserError(f"dataset {name!r} has splits {list(dataset)}; expected 'train' and 'validation' or 'test'")
    if text_column not in dataset["train"].column_names:
        raise UserError(
            f"dataset {name!r} has no column {text_column!r}; its columns are {dataset['train'].column_names}"
        )
    join = lambda split: "\n".join(dataset[split][text_column])  # noqa: E731
    return TextSplits(train=join("train"), validation=join(validation_name), source=name)


def pack_blocks(ids: torch.Tensor, block_size: int, source: str) -> torch.Tensor:
    """Cut a 1-D token stream into training blocks of block_size + 1 tokens.

    Consecutive blocks overlap by one token, so block[:, :-1] are inputs and block[:, 1:] targets
    and every token after the first is a target once. The tail shorter than a block is dropped.
    Returns (n_blocks, block_size + 1) int64.
    """
    n_blocks = (ids.numel() - 1) // block_size
    if n_blocks < 1:
        raise UserError(
            f"text from {source} has {ids.numel()} tokens, fewer than one block of {block_size} + 1. "
            "Use a longer text or a smaller block size (--block-size in eval, data.block_size in a run config)."
        )
    starts = torch.arange(n_blocks) * block_size  # (n_blocks,)
    offsets = torch.arange(block_size + 1)  # (block_size + 1,)
    return ids[starts[:, None] + offsets[None, :]]


def calibration_blocks(train_blocks: torch.Tensor, n_blocks: int, seed: int) -> torch.Tensor:
    """Draw `n_blocks` training blocks without replacement with a local seeded generator."""
    if n_blocks > train_blocks.shape[0]:
        raise UserError(
            f"calibration asks for {n_blocks} blocks but the training split has {train_blocks.shape[0]}; "
            "lower calibration.n_blocks or the block size."
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_blocks.shape[0], generator=generator)[:n_blocks]
    return train_blocks[order.sort().values]
