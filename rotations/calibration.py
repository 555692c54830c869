"""Streaming activation statistics at the rotation sites, for the KLT.

For each site and layer, `CovarianceAccumulator` keeps in float64 the sum of x·xᵀ, the sum of x,
the per-channel max |x| and the token count. Memory is O(d²) per site and layer whatever the
number of calibration tokens. Which activation each site reads (shapes per batch):

    R1  (b·l·(n_layer+1), d_model)  x / rms(x) at every block norm and at norm_f, one accumulator
                                    for the whole residual stream (R1 is shared by all layers)
    R2  (b·l, d_inner)              out_proj input, per layer
    R3  (b·l·d_state, d_inner)      SSM states h with d as the channel axis, per layer
    R4  (b·l·d_inner, d_state)      SSM states h with n as the channel axis, per layer
    R5  (b·l, dt_rank)              dt_proj input, per layer
    R6  (b·l, d_inner)              x_proj input, per layer
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from einops import rearrange
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mambaspin.errors import UserError
from mambaspin.io import write_json_atomic

logger = logging.getLogger(__name__)

LAYER_SITES = ("R2", "R3", "R4", "R5", "R6")


class CovarianceAccumulator:
    """Running float64 sums of x·xᵀ and x, per-channel max |x| and the sample count."""

    def __init__(self, dim: int):
        self.dim = dim
        self.sum_outer = torch.zeros(dim, dim, dtype=torch.float64)
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.absmax = torch.zeros(dim, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        """Add samples x: (..., dim); every leading index is one sample."""
        samples = x.detach().reshape(-1, self.dim).to("cpu", torch.float64)  # (samples, dim)
        self.sum_outer += samples.T @ samples
        self.sum += samples.sum(0)
        self.absmax = torch.maximum(self.absmax, samples.abs().amax(0))
        self.count += samples.shape[0]

    def covariance(self, centered: bool) -> torch.Tensor:
        """E[x xᵀ] (uncentred) or E[(x - m)(x - m)ᵀ] (centred), (dim, dim) float64."""
        if self.count == 0:
            raise UserError("no calibration samples were collected; check the calibration data")
        second_moment = self.sum_outer / self.count
        if not centered:
            return second_moment
        mean = self.sum / self.count
        return second_moment - torch.outer(mean, mean)

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.sum_outer": self.sum_outer,
            f"{prefix}.sum": self.sum,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64),
        }

    @classmethod
    def from_state(cls, tensors: dict, prefix: str) -> "CovarianceAccumulator":
        accumulator = cls(tensors[f"{prefix}.sum"].numel())
        accumulator.sum_outer = tensors[f"{prefix}.sum_outer"]
        accumulator.sum = tensors[f"{prefix}.sum"]
        accumulator.absmax = tensors[f"{prefix}.absmax"]
        accumulator.count = int(tensors[f"{prefix}.count"][0])
        return accumulator


def stat_key(site: str, layer: int | None) -> str:
    return site if layer is None else f"layers.{layer}.{site}"


class _StateObserver(nn.Module):
    """Identity at the `ssm_state` point that feeds h (b, l, d, n) to the R3 and R4 accumulators."""

    def __init__(self, r3: CovarianceAccumulator | None, r4: CovarianceAccumulator | None):
        super().__init__()
        self.r3, self.r4 = r3, r4

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.r3 is not None:
            self.r3.update(rearrange(h, "b l d n -> b l n d"))
        if self.r4 is not None:
            self.r4.update(h)
        return h


def _normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) as the folded RMSNorm feeds it to in_proj and lm_head (norm weight removed)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _attach_observers(model, sites, stats, make=CovarianceAccumulator) -> list:
    """Register hooks and state observers that fill `stats` with `make(dim)` objects (anything
    with an `update(x)` method); return the hook handles."""
    cfg, handles = model.config, []
    if "R1" in sites:
        stats["R1"] = make(cfg.d_model)
        norms = [layer.norm for layer in model.backbone.layers] + [model.backbone.norm_f]
        for norm in norms:
            hook = lambda module, args: stats["R1"].update(_normalized(args[0], module.eps))  # noqa: E731
            handles.append(norm.register_forward_pre_hook(hook))
    for layer, mixer in enumerate(model.mixers):
        for site, module, dim in (("R2", mixer.out_proj, cfg.d_inner), ("R5", mixer.dt_proj, cfg.dt_rank),
                                  ("R6", mixer.x_proj, cfg.d_inner)):
            if site in sites:
                accumulator = stats[stat_key(site, layer)] = make(dim)
                handles.append(module.register_forward_pre_hook(lambda m, args, acc=accumulator: acc.update(args[0])))
        if "R3" in sites or "R4" in sites:
            r3 = stats.setdefault(stat_key("R3", layer), make(cfg.d_inner)) if "R3" in sites else None
            r4 = stats.setdefault(stat_key("R4", layer), make(cfg.d_state)) if "R4" in sites else None
            mixer.points["ssm_state"] = _StateObserver(r3, r4)
    return handles


class SampleRecorder:
    """Keeps the first `max_samples` rows of x (..., dim), for plots of per-channel ranges."""

    def __init__(self, dim: int, max_samples: int = 4096):
        self.dim, self.max_samples = dim, max_samples
        self.rows: list[torch.Tensor] = []
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        if self.count >= self.max_samples:
            return
        samples = x.detach().reshape(-1, self.dim)[: self.max_samples - self.count].to("cpu", torch.float64)
        self.rows.append(samples)
        self.count += samples.shape[0]

    def samples(self) -> torch.Tensor:
        return torch.cat(self.rows)  # (count, dim)


@torch.no_grad()
def collect_statistics(model, blocks: torch.Tensor, sites, batch_size: int = 8, progress: bool = True,
                       make=CovarianceAccumulator) -> dict:
    """Run calibration blocks (n, l + 1) through the float model and accumulate per-site statistics.

    The model must carry no transforms at its points (no rotations, no quantizers): calibration
    always measures the float model. Returns {stat_key(site, layer): make(dim)}, by default
    `CovarianceAccumulator`s.
    """
    attached = model.attached_points()
    if attached:
        raise UserError(f"calibration needs the float model, but these points carry transforms: {attached}")
    stats: dict[str, CovarianceAccumulator] = {}
    handles = _attach_observers(model, set(sites), stats, make)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for first in tqdm(range(0, blocks.shape[0], batch_size), desc="calibrate", disable=not progress):
            model(blocks[first : first + batch_size, :-1].to(device))
    finally:
        for handle in handles:
            handle.remove()
        for mixer in model.mixers:
            if isinstance(mixer.points["ssm_state"], _StateObserver):
                mixer.points["ssm_state"] = nn.Identity()
        model.train(was_training)
    return stats


def model_fingerprint(model) -> str:
    """SHA-256 of the model config and every weight, so a calibration is tied to one model."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(blocks: torch.Tensor) -> str:
    """SHA-256 of the calibration token blocks."""
    return hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@dataclass
class Calibration:
    """Statistics of one calibration run and the key of everything they depend on."""

    stats: dict
    key: dict = field(default_factory=dict)

    def accumulator(self, site: str, layer: int | None) -> CovarianceAccumulator:
        return self.stats[stat_key(site, layer)]

    def save(self, directory: str | Path) -> Path:
        """Write calibration.safetensors (key in its metadata) and calibration.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, accumulator in self.stats.items():
            tensors.update(accumulator.state(name))
        staging = directory / ".calibration.safetensors.tmp"
        save_file(tensors, str(staging), metadata={"key": json.dumps(self.key, sort_keys=True)})
        staging.replace(directory / "calibration.safetensors")
        write_json_atomic(directory / "calibration.json", {"key": self.key})
        return directory

    @classmethod
    def load(cls, directory: str | Path, expected_key: dict | None = None) -> "Calibration":
        """Read a saved calibration; raise when its key differs from `expected_key` on any entry."""
        path = Path(directory) / "calibration.safetensors"
        if not path.is_file():
            raise UserError(f"no calibration found at {path}; run `mambaspin calibrate` first")
        key = read_key(directory)
        check_key(key, expected_key or {}, path)
        tensors = load_file(str(path))
        names = sorted({name.rsplit(".", 1)[0] for name in tensors})
        return cls({name: CovarianceAccumulator.from_state(tensors, name) for name in names}, key)


def read_key(directory: str | Path) -> dict:
    """The key (model, data, sites, tokens, dtype) a saved calibration was made with."""
    from safetensors import safe_open

    path = Path(directory) / "calibration.safetensors"
    try:
        with safe_open(str(path), "pt") as handle:
            return json.loads(handle.metadata()["key"])
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise UserError(f"cannot read the calibration key of {path}: {error}. Rerun `mambaspin calibrate`.") from error


def check_key(saved: dict, expected: dict, path) -> None:
    """Raise when a saved calibration was made for another model, data or set of sites."""
    for name, value in expected.items():
        if name == "sites":
            missing = sorted(set(value) - set(saved.get("sites", [])))
            if missing:
                raise UserError(
                    f"calibration {path} has no statistics for site(s) {missing} (it covers "
                    f"{saved.get('sites')}); rerun `mambaspin calibrate` with these sites applied"
                )
        elif saved.get(name) != value:
            raise UserError(
                f"calibration {path} was made for another {name}: saved {saved.get(name)!r}, this run "
                f"{value!r}. Rerun `mambaspin calibrate` for this model and data."
            )
