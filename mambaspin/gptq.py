"""GPTQ weight quantization (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", Algorithm 1).

For a linear with weight W (out, in) and calibration inputs X (n, in), GPTQ quantizes W one input
column at a time and spreads each column's rounding error over the columns not yet quantized,
weighted by the inverse Hessian of the layer's squared output error, H = 2·XᵀX / n:

    err_j      = (w_j − Q(w_j)) / [H⁻¹]_jj          (H⁻¹ in its upper Cholesky form)
    w_{j+1:}  −= err_j ⊗ [H⁻¹]_{j, j+1:}

The grid (scale and zero point per output channel or per group) is the one round-to-nearest
uses on the same weight, so codes are stored exactly as for RTN.
"""

from __future__ import annotations

import torch

from .errors import UserError
from .quant import WeightQuantConfig, quantize_weight


class HessianAccumulator:
    """Running sum of XᵀX (in, in) in float64 and the sample count, for one linear's inputs."""

    def __init__(self, in_features: int):
        self.sum_outer = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        samples = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)  # (n, in)
        self.sum_outer += samples.T @ samples
        self.count += samples.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise UserError("GPTQ saw no calibration inputs for a layer; check the calibration data")
        return 2.0 * self.sum_outer / self.count


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, with dead inputs (zero diagonal) fixed."""
    hessian = hessian.clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1.0
    hessian += damp * torch.diagonal(hessian).mean() * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True)


def _expand(tensor: torch.Tensor, cfg: WeightQuantConfig, weight: torch.Tensor) -> torch.Tensor:
    """Expand a per-channel (out, 1) or per-group (out, groups, 1) tensor to (out, in)."""
    if cfg.granularity == "per_group":
        return tensor.squeeze(-1).repeat_interleave(cfg.group_size, dim=1).to(weight.dtype)
    return tensor.to(weight.dtype).expand_as(weight)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, cfg: WeightQuantConfig, clip=None,
                  damp: float = 0.01):
    """Quantize weight (out, in) with GPTQ on the RTN grid of `cfg`.

    Returns (codes, scale, zero) in the layout of `quantize_weight`, so `dequantize_weight`
    turns them back into the quantized weight.
    """
    work = weight.detach().to(torch.float64).clone()  # (out, in)
    codes, scale, zero = quantize_weight(work, cfg, clip)
    full_scale = _expand(scale, cfg, work)  # (out, in)
    full_zero = None if zero is None else _expand(zero, cfg, work)  # (out, in)
    factor = _inverse_cholesky(hessian.to(torch.float64), damp)  # (in, in), upper
    for column in range(work.shape[1]):
        w, s = work[:, column], full_scale[:, column]  # (out,) each
        offset = 0.0 if full_zero is None else full_zero[:, column]
        code = torch.clamp(torch.round(w / s) + offset, cfg.qmin, cfg.qmax)  # (out,)
        codes[:, column] = code.to(codes.dtype)
        error = (w - (code - offset) * s) / factor[column, column]  # (out,)
        work[:, column + 1 :] -= error[:, None] * factor[column, column + 1 :][None, :]
    return codes, scale, zero


@torch.no_grad()
def collect_hessians(model, modules: dict, blocks: torch.Tensor, batch_size: int = 8) -> dict:
    """Run blocks (n, l + 1) through `model` and accumulate each module's input Hessian.

    modules: {name: linear-like module with in_features}. Returns {name: HessianAccumulator}.
    """
    accumulators = {name: HessianAccumulator(module.in_features) for name, module in modules.items()}
    handles = [module.register_forward_pre_hook(lambda m, args, acc=accumulators[name]: acc.update(args[0]))
               for name, module in modules.items()]
    device = next(model.parameters()).device
    try:
        for first in range(0, blocks.shape[0], batch_size):
            model(blocks[first : first + batch_size, :-1].to(device))
    finally:
        for handle in handles:
            handle.remove()
    return accumulators
