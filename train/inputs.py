"""Load what every recipe starts from: the float model, its tokenizer, and the data splits."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mambaspin.data import calibration_blocks, load_text_splits, pack_blocks
from mambaspin.errors import UserError
from mambaspin.evaluate import check_vocab_fits
from mambaspin.export import is_quantized_dir
from mambaspin.loading import load_model, resolve_model_dir
from mambaspin.tokenizer import load_tokenizer
from rotations.calibration import Calibration, collect_statistics, data_fingerprint, model_fingerprint, read_key

from .config import DTYPES, RunConfig

logger = logging.getLogger(__name__)


@dataclass
class RunInputs:
    """The float model and the tokenized splits of one run.

    train_blocks, calibration_blocks: (n, block_size + 1) int64. validation_text: raw text,
    cut to about max_eval_tokens tokens when that is set.
    """

    model: torch.nn.Module
    tokenizer: object
    train_blocks: torch.Tensor
    calibration_blocks: torch.Tensor
    validation_text: str


def load_inputs(config: RunConfig) -> RunInputs:
    """Load model, tokenizer and splits as the config says; checks that they fit each other."""
    model_dir = resolve_model_dir(config.model.path)
    if is_quantized_dir(model_dir):
        raise UserError(f"model.path={config.model.path} is a quantized checkpoint written by `mambaspin merge`; "
                        "calibrate, train and benchmark from the float model it was made from")
    model = load_model(model_dir, dtype=DTYPES[config.model.dtype], device=config.model.torch_device())
    tokenizer = load_tokenizer(config.model.tokenizer or model_dir)
    splits = load_text_splits(config.data.text, config.data.train_fraction, config.data.text_column)
    train_ids = tokenizer.encode(splits.train)
    check_vocab_fits(tokenizer, model.config.vocab_size, train_ids)
    train_blocks = pack_blocks(train_ids, config.data.block_size, splits.source)
    calibration = calibration_blocks(train_blocks, config.calibration.n_blocks, config.calibration.seed)
    validation = splits.validation
    if config.data.max_eval_tokens:
        ids = tokenizer.encode(validation)[: config.data.max_eval_tokens + 1]
        validation = tokenizer.decode(ids)
    return RunInputs(model, tokenizer, train_blocks, calibration, validation)


def load_calibration_blocks(config: RunConfig, tokenizer) -> torch.Tensor:
    """The run's calibration blocks (n, block_size + 1), drawn as `load_inputs` draws them."""
    splits = load_text_splits(config.data.text, config.data.train_fraction, config.data.text_column)
    train_blocks = pack_blocks(tokenizer.encode(splits.train), config.data.block_size, splits.source)
    return calibration_blocks(train_blocks, config.calibration.n_blocks, config.calibration.seed)


def calibration_key(config: RunConfig, inputs: RunInputs, sites) -> dict:
    """Everything a calibration depends on: model, data, sites, token count, dtype."""
    blocks = inputs.calibration_blocks
    return {
        "model": model_fingerprint(inputs.model),
        "data": data_fingerprint(blocks),
        "sites": sorted(sites),
        "tokens": int(blocks[:, :-1].numel()),
        "dtype": config.model.dtype,
    }


def run_calibration(config: RunConfig, inputs: RunInputs, sites, progress: bool = True) -> Calibration:
    """Collect statistics for `sites` on the float model and key them."""
    stats = collect_statistics(inputs.model, inputs.calibration_blocks, sites, config.calibration.batch_size, progress)
    return Calibration(stats, calibration_key(config, inputs, sites))


def load_or_run_calibration(config: RunConfig, inputs: RunInputs, sites, progress: bool = True) -> Calibration | None:
    """Reuse the saved calibration when its key matches this run, else collect a new one."""
    if not sites:
        return None
    directory = config.calibration_dir
    expected = calibration_key(config, inputs, sites)
    if (directory / "calibration.safetensors").is_file():
        saved = read_key(directory)
        same_source = all(saved.get(name) == value for name, value in expected.items() if name != "sites")
        if not same_source or set(sites) <= set(saved.get("sites", [])):
            return Calibration.load(directory, expected)

        # Same model and data, but sites are missing: collect all of them anew (nothing is reused).
        sites = sorted(set(sites) | set(saved.get("sites", [])))
        logger.info("calibration in %s lacks sites %s; collecting sites %s again", directory,
                    sorted(set(expected["sites"]) - set(saved.get("sites", []))), sites)
    calibration = run_calibration(config, inputs, sites, progress)
    calibration.save(directory)
    return calibration
