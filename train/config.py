"""The run config: one YAML file (configs/*.yaml) with key=value overrides from the command line.

A config file may start from another with `base: other.yaml` (a path relative to the file); its
own keys then override the base's, section by section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mambaspin import configtools
from mambaspin.data import DEFAULT_TEXT, SHIPPED_DIR
from mambaspin.errors import UserError
from mambaspin.quant import ActQuantConfig, WeightQuantConfig
from mambaspin.quant_model import QuantScheme, preset
from rotations.config import RotationConfig

DEFAULT_MODEL = SHIPPED_DIR / "mamba-shakespeare"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class ModelSection:
    """Which checkpoint to quantize and how to hold it."""

    path: str = str(DEFAULT_MODEL)
    tokenizer: str | None = None
    dtype: str = "float32"
    device: str = "auto"

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path.strip():
            raise UserError(f"model.path={self.path!r} is invalid: expected a checkpoint directory or a hub id")
        if self.dtype not in DTYPES:
            raise UserError(f"model.dtype={self.dtype!r} is invalid: expected one of {', '.join(DTYPES)}")
        if self.device != "auto" and not any(self.device == kind or self.device.startswith(kind + ":")
                                             for kind in ("cpu", "cuda")):
            raise UserError(f"model.device={self.device!r} is invalid: expected auto, cpu, cuda or cuda:N")

    def torch_device(self) -> torch.device:
        """The device to run on: CUDA when `auto` finds a GPU, else CPU; UserError for a bad or missing one."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from mambaspin.loading import resolve_device

        return resolve_device(self.device, "model.device")


@dataclass(frozen=True)
class DataSection:
    """Text source and block packing. max_eval_tokens 0 evaluates the whole validation split."""

    text: str = str(DEFAULT_TEXT)
    block_size: int = 256
    train_fraction: float = 0.9
    text_column: str = "text"
    max_eval_tokens: int = 0

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size < 2:
            raise UserError(f"data.block_size={self.block_size!r} is invalid: expected an integer of at least 2")
        if not 0.0 < self.train_fraction < 1.0:
            raise UserError(f"data.train_fraction={self.train_fraction!r} is invalid: expected a number in (0, 1)")
        if self.max_eval_tokens < 0:
            raise UserError(f"data.max_eval_tokens={self.max_eval_tokens} is invalid: expected 0 (the whole "
                            "validation split) or a positive number of tokens")


@dataclass(frozen=True)
class CalibrationSection:
    """Calibration blocks drawn from the training split, and where the statistics are saved."""

    n_blocks: int = 64
    batch_size: int = 8
    seed: int = 0
    dir: str | None = None

    def __post_init__(self):
        for name in ("n_blocks", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"calibration.{name}={value!r} is invalid: expected a positive integer")


@dataclass(frozen=True)
class QuantSection:
    """A preset name (W8A8, W4A8, W4A4, W4A16), optionally overridden by explicit quantizers."""

    preset: str | None = "W4A4"
    weight: WeightQuantConfig | None = None
    act: ActQuantConfig | None = None
    lm_head: bool = False
    ssm_inputs: bool = False
    conv1d: bool = False

    def __post_init__(self):
        if self.preset is not None:
            preset(self.preset)

    def scheme(self) -> QuantScheme:
        base = preset(self.preset) if self.preset else QuantScheme()
        return QuantScheme(
            weight=self.weight or base.weight,
            act=self.act or base.act,
            lm_head=self.lm_head,
            ssm_inputs=self.ssm_inputs,
            conv1d=self.conv1d,
        )


@dataclass(frozen=True)
class LoraSection:
    """LoRA adapters trained jointly with the rotations; rank 0 trains rotations alone."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("in_proj", "x_proj", "dt_proj", "out_proj")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.dropout != 0.0:
            raise UserError(
                f"lora.dropout={self.dropout} is invalid in QAT: the trained weight Q(R·(W + s·B·A)·R) must be "
                "the merged weight that is shipped, and dropout on the LoRA input breaks that. Set lora.dropout=0."
            )

    def settings(self):
        from lora.adapters import LoraSettings

        if self.rank == 0:
            return None
        return LoraSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets)


@dataclass(frozen=True)
class TrainSection:
    """Optimizers, schedule and loss of quantization-aware training."""

    batch_size: int = 8
    grad_accum: int = 1
    lr_lora: float = 1e-3
    lr_rotation: float = 0.05
    rotation_optimizer: str = "sgd"
    momentum: float = 0.9
    warmup_steps: int = 20
    grad_clip: float = 1.0
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    stabilize: int = 10
    learnable_act_scales: bool = True

    def __post_init__(self):
        if self.rotation_optimizer not in ("sgd", "adam"):
            raise UserError(f"train.rotation_optimizer={self.rotation_optimizer!r} is invalid: expected sgd or adam")
        for name in ("batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"train.{name}={value!r} is invalid: expected a positive integer")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise UserError(f"train.distill_weight={self.distill_weight} is invalid: expected a number from 0 to 1")


@dataclass(frozen=True)
class RunConfig:
    """Everything one run depends on; see configs/default.yaml for each setting."""

    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 300
    save_every: int = 100
    eval_every: int = 100
    log_every: int = 10
    keep_checkpoints: int = 2
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    calibration: CalibrationSection = field(default_factory=CalibrationSection)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    quant: QuantSection = field(default_factory=QuantSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self):
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise UserError(f"output_dir={self.output_dir!r} is invalid: expected a directory path, e.g. runs/default")
        zero_means = {"max_steps": "no training steps", "save_every": "save only at the end",
                      "eval_every": "evaluate only at the end", "log_every": "no metric logs",
                      "keep_checkpoints": "keep all"}
        for name, meaning in zero_means.items():
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise UserError(f"{name}={value!r} is invalid: expected a non-negative integer (0: {meaning})")

    @property
    def calibration_dir(self) -> Path:
        return Path(self.calibration.dir) if self.calibration.dir else Path(self.output_dir) / "calibration"

    def to_dict(self) -> dict:
        return configtools.to_dict(self)


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def read_config_file(path: str | Path, seen: tuple = ()) -> dict:
    """Read a YAML config, resolving `base:` chains relative to each file."""
    path = Path(path).resolve()
    if path in seen:
        raise UserError(f"config {path} includes itself through `base:`")
    raw = configtools.load_yaml(path)
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise UserError(f"config {path}: base={base!r} is invalid: expected one file name, e.g. base: default.yaml")
    return _merge(read_config_file(path.parent / base, seen + (path,)), raw)


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Build a `RunConfig` from a YAML file (or the defaults) and key=value overrides."""
    raw = read_config_file(path) if path else {}
    raw = configtools.apply_overrides(raw, list(overrides))
    return configtools.build(RunConfig, raw)


def replace(config: RunConfig, **sections) -> RunConfig:
    return dataclasses.replace(config, **sections)
