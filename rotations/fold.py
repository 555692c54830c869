"""Fold rotations into a Mamba-1 model's weights and attach the online ones at its named points.

Linear weights use the nn.Linear convention W: (out, in), y = x·Wᵀ + b. Rotating an input
activation x → x·R keeps y when W → W·R; rotating an output y → y·R needs W → Rᵀ·W, b → Rᵀ·b.

Per site (see `rotations.config` for the table):
    R1  norm weights folded into in_proj columns and lm_head columns, lm_head untied,
        E → E·R1, W_in → W_in·R1, W_out → R1ᵀ·W_out, b_out → R1ᵀ·b_out, W_head → W_head·R1
    R2  W_out → W_out·R2, online y → y·R2 at out_proj_input
    R3  online h → h rotated along d by R3 at ssm_state, h·C → (h·C)·R3ᵀ at ssm_y
    R4  x_proj C rows → R4ᵀ·W_C, online h → h·R4 along n at ssm_state
    R5  x_proj dt rows → R5ᵀ·W_dt, W_dt_proj → W_dt_proj·R5
    R6  W_x → W_x·R6, online x → x·R6 at x_proj_input
    smooth  in_proj z rows → W_z / s, gate → y·SiLU(z·s)/s, W_out → W_out·diag(s)
The weight functions are pure and differentiable, so training can apply them to trainable
rotations; `apply_rotations` runs them once in float64 and writes the results in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum
from torch import nn

from .hadamard import fast_hadamard_transform, hadamard_matrix, is_hadamard_size
from .klt import RotationSet


def hadamard_signs(rotation: torch.Tensor) -> torch.Tensor | None:
    """Return s when rotation = diag(s)·H with H = hadamard_matrix(n) and s in {±1}ⁿ, else None."""
    size = rotation.shape[0]
    if not is_hadamard_size(size):
        return None
    candidate = rotation.double() @ hadamard_matrix(size).T  # diag(s) when rotation = diag(s)·H
    signs = torch.diagonal(candidate).round()
    if not bool((signs.abs() == 1).all()) or not torch.allclose(candidate, torch.diag(signs), atol=1e-6):
        return None
    return signs


class OnlineRotation(nn.Module):
    """x → x·R along the last axis, computed in float32 (float64 for float64 inputs).

    When R is a (signed) Hadamard matrix diag(s)·H, the product runs as the fast Walsh-Hadamard
    transform of x·diag(s), in O(n log n) instead of O(n²) per token.
    """

    def __init__(self, rotation: torch.Tensor):
        super().__init__()
        self.register_buffer("rotation", rotation.detach().float().clone())
        signs = hadamard_signs(rotation)
        self.register_buffer("signs", None if signs is None else signs.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self.signs is not None:
            return fast_hadamard_transform(x.to(compute) * self.signs.to(compute)).to(x.dtype)
        return (x.to(compute) @ self.rotation.to(compute)).to(x.dtype)


class StateRotation(nn.Module):
    """Rotate SSM states h (b, l, d, n): along d by R3 (d, d) and along n by R4 (n, n)."""

    def __init__(self, r3: torch.Tensor | None, r4: torch.Tensor | None):
        super().__init__()
        self.register_buffer("r3", None if r3 is None else r3.detach().float().clone())
        self.register_buffer("r4", None if r4 is None else r4.detach().float().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.r3 is not None:
            h = einsum(h, self.r3.to(h.dtype), "b l d n, d e -> b l e n")  # (b, l, d, n)
        if self.r4 is not None:
            h = einsum(h, self.r4.to(h.dtype), "b l d n, n m -> b l d m")  # (b, l, d, n)
        return h


class SmoothSiLUGate(nn.Module):
    """Gate with a smoothing scale s (d_inner,): y·SiLU(z·s)/s, where in_proj already gives z/s."""

    def __init__(self, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", scale.detach().float().clone())

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(z.dtype)
        return y * F.silu(z * scale) / scale


def _right(matrix, rotation):
    return matrix if rotation is None else matrix @ rotation


def rotate_in_proj(weight, bias, r1=None, norm_weight=None, smooth=None):
    """in_proj (2·d_inner, d_model): fold the block norm weight, rotate columns by R1, and divide
    the z rows (second half) by the smoothing scale."""
    if norm_weight is not None:
        weight = weight * norm_weight[None, :]
    weight = _right(weight, r1)
    if smooth is not None:
        divisor = torch.cat([torch.ones_like(smooth), smooth])  # (2·d_inner,)
        weight = weight / divisor[:, None]
        bias = None if bias is None else bias / divisor
    return weight, bias


def rotate_x_proj(weight, dt_rank: int, d_state: int, r6=None, r5=None, r4=None):
    """x_proj (dt_rank + 2·d_state, d_inner): columns by R6, dt rows by R5ᵀ, C rows by R4ᵀ."""
    weight = _right(weight, r6)
    dt_rows, b_rows, c_rows = weight.split([dt_rank, d_state, d_state], dim=0)
    if r5 is not None:
        dt_rows = r5.T @ dt_rows
    if r4 is not None:
        c_rows = r4.T @ c_rows
    return torch.cat([dt_rows, b_rows, c_rows], dim=0)


def rotate_dt_proj(weight, r5=None):
    """dt_proj (d_inner, dt_rank): columns by R5."""
    return _right(weight, r5)


def rotate_out_proj(weight, bias, r1=None, r2=None, smooth=None):
    """out_proj (d_model, d_inner): R1ᵀ·W·diag(s)·R2 and bias R1ᵀ·b."""
    if smooth is not None:
        weight = weight * smooth[None, :]
    weight = _right(weight, r2)
    if r1 is not None:
        weight = r1.T @ weight
        bias = None if bias is None else r1.T @ bias
    return weight, bias


def _write(parameter: nn.Parameter | None, value: torch.Tensor | None) -> None:
    if parameter is not None:
        parameter.data.copy_(value.to(parameter.dtype))


@torch.no_grad()
def fold_residual(model, r1: torch.Tensor | None) -> None:
    """Fold norm_f into an untied lm_head and rotate embedding and lm_head by R1 (when given)."""
    head = model.lm_head
    if model.is_tied():
        head.weight = nn.Parameter(head.weight.detach().clone())
    head_weight = head.weight.double() * model.backbone.norm_f.weight.double()[None, :]
    _write(head.weight, _right(head_weight, None if r1 is None else r1.to(head_weight)))
    model.backbone.norm_f.weight.fill_(1.0)
    if r1 is not None:
        embedding = model.backbone.embeddings.weight
        _write(embedding, embedding.double() @ r1.to(embedding.device, torch.float64))
    model.config = type(model.config)(**{**model.config.to_dict(), "tie_embeddings": False})


@torch.no_grad()
def fold_layer(model, layer: int, rotations: RotationSet, fold_norm: bool) -> None:
    """Rewrite one block's weights in float64 for its sites and attach its online rotations."""
    block, mixer, cfg = model.backbone.layers[layer], model.mixers[layer], model.config
    device = mixer.in_proj.weight.device
    get = lambda site: None if rotations.get(site, layer) is None else rotations.get(site, layer).to(device, torch.float64)  # noqa: E731
    r1, r2, r3, r4, r5, r6 = (get(site) for site in ("R1", "R2", "R3", "R4", "R5", "R6"))
    smooth = rotations.smooth_scales[layer].to(device, torch.float64) if rotations.smooth_scales else None
    double = lambda p: None if p is None else p.double()  # noqa: E731

    # Offline weight rewrites.
    norm_weight = block.norm.weight.double() if fold_norm else None
    w_in, b_in = rotate_in_proj(mixer.in_proj.weight.double(), double(mixer.in_proj.bias), r1, norm_weight, smooth)
    _write(mixer.in_proj.weight, w_in)
    _write(mixer.in_proj.bias, b_in)
    if fold_norm:
        block.norm.weight.fill_(1.0)
    _write(mixer.x_proj.weight, rotate_x_proj(mixer.x_proj.weight.double(), cfg.dt_rank, cfg.d_state, r6, r5, r4))
    _write(mixer.dt_proj.weight, rotate_dt_proj(mixer.dt_proj.weight.double(), r5))
    w_out, b_out = rotate_out_proj(mixer.out_proj.weight.double(), double(mixer.out_proj.bias), r1, r2, smooth)
    _write(mixer.out_proj.weight, w_out)
    _write(mixer.out_proj.bias, b_out)

    # Online transforms at the named points.
    if smooth is not None:
        mixer.gate = SmoothSiLUGate(smooth)
    if r2 is not None:
        model.append_point("out_proj_input", layer, OnlineRotation(r2))
    if r6 is not None:
        model.append_point("x_proj_input", layer, OnlineRotation(r6))
    if r3 is not None or r4 is not None:
        model.append_point("ssm_state", layer, StateRotation(r3, r4))
    if r3 is not None:
        model.append_point("ssm_y", layer, OnlineRotation(r3.T))


def apply_rotations(model, rotations: RotationSet) -> None:
    """Fold `rotations` into `model` in place; the float function is unchanged up to rounding.

    With R1, every RMSNorm weight is folded into the next linear first and lm_head is untied.
    """
    r1 = rotations.global_matrices.get("R1")
    if r1 is not None:
        fold_residual(model, r1)
    for layer in range(model.config.n_layer):
        fold_layer(model, layer, rotations, fold_norm=r1 is not None)
