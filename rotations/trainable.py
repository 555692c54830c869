"""Trainable rotations: Stiefel manifold parameters and the modules that apply them on the fly.

Each applied site's matrix becomes a `geoopt.ManifoldParameter` on `geoopt.Stiefel(canonical=True)`,
whose Riemannian optimizers step with the Cayley retraction (Li et al., 2020, "Efficient
Riemannian Optimization on the Stiefel Manifold via the Cayley Transform"). The matrices are
float32 whatever the model dtype. Weight-side rotations are applied to the weights at every
forward (`WeightRotation`, used as a `QATLinear` transform), activation-side ones at the model's
named points, so one set of parameters drives both.

The model's RMSNorm weights must be folded into in_proj and lm_head first (`fold_norms`): the
live rotations then only multiply by R.
"""

from __future__ import annotations

import geoopt
import torch
import torch.nn.functional as F
from einops import einsum
from torch import nn

from .config import RotationConfig
from .fold import fold_layer, fold_residual, rotate_dt_proj, rotate_in_proj, rotate_out_proj, rotate_x_proj
from .klt import RotationSet, orthogonality_error


def parameter_name(site: str, layer: int | None) -> str:
    return site if layer is None else f"layers_{layer}_{site}"


class RotationParams(nn.Module):
    """All rotation matrices of a model as float32 Stiefel parameters, plus smoothing scales.

    `enabled` False makes every module that reads these parameters an identity, which turns
    the model back into the float model (the teacher for distillation).
    """

    def __init__(self, rotations: RotationSet, config: RotationConfig, n_layer: int):
        super().__init__()
        self.n_layer = n_layer
        self.matrices = nn.ParameterDict()
        manifold = geoopt.Stiefel(canonical=True)
        for site, matrix in rotations.global_matrices.items():
            self.matrices[site] = geoopt.ManifoldParameter(
                matrix.float().clone(), manifold=manifold, requires_grad=config.sites[site].train)
        for layer, matrices in enumerate(rotations.layer_matrices):
            for site, matrix in matrices.items():
                self.matrices[parameter_name(site, layer)] = geoopt.ManifoldParameter(
                    matrix.float().clone(), manifold=manifold, requires_grad=config.sites[site].train)
        for layer, scale in enumerate(rotations.smooth_scales):
            self.register_buffer(f"smooth_{layer}", scale.float().clone())
        self.has_smooth = bool(rotations.smooth_scales)
        self.enabled = True

    def get(self, site: str, layer: int | None) -> torch.Tensor | None:
        """The matrix of `site` (layer ignored for R1), or None when the site is not applied."""
        name = parameter_name(site, None if site == "R1" else layer)
        return self.matrices[name] if name in self.matrices else None

    def smooth(self, layer: int) -> torch.Tensor | None:
        return getattr(self, f"smooth_{layer}") if self.has_smooth else None

    def max_orthogonality_error(self) -> float:
        """max over all matrices of max |RᵀR − I|."""
        with torch.no_grad():
            return max((orthogonality_error(p.double()) for p in self.matrices.values()), default=0.0)

    def to_rotation_set(self) -> RotationSet:
        """Current matrices as a float64 `RotationSet` (for folding and export)."""
        rotations = RotationSet(layer_matrices=[{} for _ in range(self.n_layer)])
        for name, matrix in self.matrices.items():
            value = matrix.detach().double().cpu()
            if name.startswith("layers_"):
                _, layer, site = name.split("_")
                rotations.layer_matrices[int(layer)][site] = value
            else:
                rotations.global_matrices[name] = value
        rotations.smooth_scales = [self.smooth(i).double().cpu() for i in range(self.n_layer)] if self.has_smooth else []
        return rotations


class _UsesParams(nn.Module):
    """Base of modules that read a shared `RotationParams` without registering it again."""

    def __init__(self, params: RotationParams):
        super().__init__()
        self._params = [params]

    @property
    def params(self) -> RotationParams:
        return self._params[0]


class WeightRotation(_UsesParams):
    """Weight transform of one linear: forward(W, b) -> rotated (W, b), per `rotations.fold`.

    kind: in_proj, x_proj, dt_proj, out_proj or lm_head. Matrices are cast to W's dtype.
    """

    def __init__(self, params: RotationParams, kind: str, layer: int | None, dt_rank: int = 0, d_state: int = 0):
        super().__init__(params)
        self.kind, self.layer, self.dt_rank, self.d_state = kind, layer, dt_rank, d_state

    def _matrix(self, site, dtype):
        matrix = self.params.get(site, self.layer)
        return None if matrix is None else matrix.to(dtype)

    def forward(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if not self.params.enabled:
            return weight, bias
        get = lambda site: self._matrix(site, weight.dtype)  # noqa: E731
        smooth = None if self.layer is None or self.params.smooth(self.layer) is None else self.params.smooth(self.layer).to(weight.dtype)
        if self.kind == "in_proj":
            return rotate_in_proj(weight, bias, get("R1"), None, smooth)
        if self.kind == "x_proj":
            return rotate_x_proj(weight, self.dt_rank, self.d_state, get("R6"), get("R5"), get("R4")), bias
        if self.kind == "dt_proj":
            return rotate_dt_proj(weight, get("R5")), bias
        if self.kind == "out_proj":
            return rotate_out_proj(weight, bias, get("R1"), get("R2"), smooth)
        r1 = get("R1")
        return (weight if r1 is None else weight @ r1), bias

    def extra_repr(self) -> str:
        return f"kind={self.kind}, layer={self.layer}"


class ParamOnlineRotation(_UsesParams):
    """x → x·R (or x·Rᵀ with transpose) at a named point, in float32."""

    def __init__(self, params: RotationParams, site: str, layer: int | None, transpose: bool = False):
        super().__init__(params)
        self.site, self.layer, self.transpose = site, layer, transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.params.enabled:
            return x
        matrix = self.params.get(self.site, self.layer)
        matrix = matrix.T if self.transpose else matrix
        return (x.float() @ matrix.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"site={self.site}, layer={self.layer}, transpose={self.transpose}"


class ParamStateRotation(_UsesParams):
    """Rotate SSM states h (b, l, d, n) along d by R3 and along n by R4 of one layer."""

    def __init__(self, params: RotationParams, layer: int):
        super().__init__(params)
        self.layer = layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.params.enabled:
            return h
        r3, r4 = self.params.get("R3", self.layer), self.params.get("R4", self.layer)
        if r3 is not None:
            h = einsum(h, r3.to(h.dtype), "b l d n, d e -> b l e n")  # (b, l, d, n)
        if r4 is not None:
            h = einsum(h, r4.to(h.dtype), "b l d n, n m -> b l d m")  # (b, l, d, n)
        return h


class ParamSmoothGate(_UsesParams):
    """y·SiLU(z·s)/s with this layer's smoothing scale s; plain y·SiLU(z) when disabled."""

    def __init__(self, params: RotationParams, layer: int):
        super().__init__(params)
        self.layer = layer

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if not self.params.enabled:
            return y * F.silu(z)
        scale = self.params.smooth(self.layer).to(z.dtype)
        return y * F.silu(z * scale) / scale


@torch.no_grad()
def fold_norms(model) -> None:
    """Fold every RMSNorm weight into the following linear and untie lm_head (exact in float)."""
    fold_residual(model, None)
    empty = RotationSet(layer_matrices=[{} for _ in range(model.config.n_layer)])
    for layer in range(model.config.n_layer):
        fold_layer(model, layer, empty, fold_norm=True)


def attach_online_rotations(model, params: RotationParams) -> None:
    """Attach the activation side of every applied site at the model's named points."""
    if params.get("R1", None) is not None:
        model.append_point("embedding_output", None, ParamOnlineRotation(params, "R1", None))
    for layer, mixer in enumerate(model.mixers):
        if params.smooth(layer) is not None:
            mixer.gate = ParamSmoothGate(params, layer)
        if params.get("R2", layer) is not None:
            model.append_point("out_proj_input", layer, ParamOnlineRotation(params, "R2", layer))
        if params.get("R6", layer) is not None:
            model.append_point("x_proj_input", layer, ParamOnlineRotation(params, "R6", layer))
        if params.get("R3", layer) is not None or params.get("R4", layer) is not None:
            model.append_point("ssm_state", layer, ParamStateRotation(params, layer))
        if params.get("R3", layer) is not None:
            model.append_point("ssm_y", layer, ParamOnlineRotation(params, "R3", layer, transpose=True))
