"""Fake quantization of weights and activations for post-training quantization and QAT.

Each quantizer has a frozen config dataclass that validates itself when built
(`WeightQuantConfig`, `ActQuantConfig`), pure functions that quantize, dequantize and
fake-quantize a tensor, and an `nn.Module` wrapper for use inside a model.

Integer grids, for ``b`` bits:

- symmetric: codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``. This is the restricted range,
  so the grid is symmetric around 0 and has ``2^b - 1`` levels (4 bits: -7..7).
  ``scale = clip * max|x| / (2^(b-1) - 1)``, ``q = clamp(round(x / scale), -qmax, qmax)``,
  ``x_hat = q * scale``. There is no zero point, and the functions return ``zero=None``.
- asymmetric: codes in ``[0, 2^b - 1]``. The range is widened to contain 0, so
  ``lo = clip * min(min(x), 0)`` and ``hi = clip * max(max(x), 0)``.
  ``scale = (hi - lo) / (2^b - 1)``, ``zero = clamp(round(-lo / scale), 0, 2^b - 1)``,
  ``q = clamp(round(x / scale) + zero, 0, 2^b - 1)``, ``x_hat = (q - zero) * scale``.

Every scale is floored at ``SCALE_FLOOR`` so that all-zero rows, groups or tokens give
``scale = SCALE_FLOOR``, codes 0 and no NaN. ``round`` is round-half-to-even (`torch.round`).

Codes are returned as ``torch.int8`` (symmetric) or ``torch.uint8`` (asymmetric) when
``b <= 8`` and as ``torch.int32`` otherwise. The asymmetric zero point has the dtype of
the codes. Scales are float32, or float64 for float64 input.

Gradients (fake quantization only) use a clipped straight-through estimator (STE).
``d x_hat / d x = 1`` where ``round(x / scale)`` (plus ``zero``) lies inside the integer
range, boundaries included, and 0 where the clamp is active. Because the clamp acts after
rounding, the gradient still passes up to half a step beyond the last code. The statistics
``max|x|``, ``min(x)`` and ``max(x)`` are detached, so ``x`` gets no gradient through the
scale. A clip or scale given as a tensor that requires grad gets the LSQ gradient
``d x_hat / d scale = round(x / scale) - x / scale`` inside the range and
``q - zero`` outside it, chained through ``scale = clip * max|x| / qmax``.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .errors import UserError

logger = logging.getLogger(__name__)

SCALE_FLOOR = 1e-8
"""Minimum quantization scale. An all-zero row, group or token gets this scale and codes 0, not NaN."""

CLIP_FLOOR = 1e-4
"""Minimum clipping ratio that `WeightFakeQuantizer` applies to its learnable clip."""

WEIGHT_GRANULARITIES = ("per_channel", "per_group")
ACT_GRANULARITIES = ("per_token", "per_tensor")


# ---------------------------------------------------------------------------
# Config validation helpers
# ---------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_bits(kind: str, key_path: str, bits: Any, low: int, high: int, hint: str) -> None:
    if not _is_int(bits) or not low <= bits <= high:
        raise UserError(
            f"{kind} bits={bits!r} is out of range: expected an integer from {low} to {high}. "
            f"Set {key_path}.bits to {hint}."
        )


def _check_bool(kind: str, key_path: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UserError(
            f"{kind} {name}={value!r} is invalid: expected true or false. "
            f"Set {key_path}.{name} to true or false."
        )


def _check_choice(kind: str, key_path: str, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value in choices:
        return
    options = " or ".join(repr(choice) for choice in choices)
    close = difflib.get_close_matches(str(value), choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UserError(
        f"{kind} {name}={value!r} is invalid: expected {options}.{hint} "
        f"Set {key_path}.{name} to one of them."
    )


def _check_ratio(kind: str, key_path: str, name: str, value: Any) -> None:
    if not _is_real(value) or not 0.0 < value <= 1.0:
        raise UserError(
            f"{kind} {name}={value!r} is out of range: expected a number in (0, 1]. "
            f"Set {key_path}.{name} to 1.0 for no clipping, or to a ratio such as 0.9."
        )


def _build_from_dict(cls: type, data: Any) -> Any:
    """Build the dataclass ``cls`` from a mapping, rejecting unknown and missing keys."""
    key_path = cls.KEY_PATH
    if not isinstance(data, Mapping):
        raise UserError(
            f"{key_path} must be a mapping of option names to values, got {type(data).__name__}."
        )
    fields = [field.name for field in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in fields]
    if unknown:
        described = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), fields, n=1)
            suffix = f" (did you mean {close[0]!r}?)" if close else ""
            described.append(f"{key!r}{suffix}")
        raise UserError(
            f"unknown key {', '.join(described)} in {key_path}. Valid keys: {', '.join(fields)}."
        )
    required = [
        field.name
        for field in dataclasses.fields(cls)
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    missing = [key for key in required if key not in data]
    if missing:
        raise UserError(f"missing key {', '.join(map(repr, missing))} in {key_path}.")
    return cls(**data)


def _nearest_divisors(number: int, target: int, count: int = 3) -> list[int]:
    """Return up to ``count`` divisors of ``number`` closest to ``target`` on a log scale."""
    divisors = [d for d in range(1, number + 1) if number % d == 0]
    divisors.sort(key=lambda d: abs(math.log(d / target)))
    return sorted(divisors[:count], reverse=True)


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightQuantConfig:
    """Weight fake-quantization settings for a linear weight of shape (out, in).

    ``per_channel`` gives each output row one scale. ``per_group`` splits each row into
    ``in / group_size`` contiguous groups with one scale each. ``clip_init`` is the
    clipping ratio applied to the range: the initial value of the learnable clip when
    ``learnable_clip`` is True, otherwise a fixed ratio.
    """

    KEY_PATH: ClassVar[str] = "quant.weight"

    bits: int
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: int | None = None
    learnable_clip: bool = False
    clip_init: float = 1.0

    def __post_init__(self) -> None:
        path = self.KEY_PATH
        _check_bits("weight", path, self.bits, 2, 8, "4 or 8")
        _check_bool("weight", path, "symmetric", self.symmetric)
        _check_choice("weight", path, "granularity", self.granularity, WEIGHT_GRANULARITIES)
        self._check_group_size()
        _check_bool("weight", path, "learnable_clip", self.learnable_clip)
        _check_ratio("weight", path, "clip_init", self.clip_init)
        object.__setattr__(self, "clip_init", float(self.clip_init))

    def _check_group_size(self) -> None:
        path = self.KEY_PATH
        if self.granularity == "per_channel":
            if self.group_size is not None:
                raise UserError(
                    f"weight group_size={self.group_size!r} is only used with granularity='per_group'. "
                    f"Remove {path}.group_size or set {path}.granularity to 'per_group'."
                )
            return
        if self.group_size is None:
            raise UserError(
                f"weight group_size is missing: granularity='per_group' needs a group size. "
                f"Set {path}.group_size to a divisor of the input dimension, such as 128."
            )
        if not _is_int(self.group_size) or self.group_size <= 0:
            raise UserError(
                f"weight group_size={self.group_size!r} is invalid: expected a positive integer. "
                f"Set {path}.group_size to a divisor of the input dimension, such as 128."
            )

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return _integer_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return _integer_range(self.bits, self.symmetric)[1]

    def check_shape(self, out_features: int, in_features: int, name: str) -> None:
        """Raise ValueError unless a weight of shape (out_features, in_features) fits.

        With ``per_group``, ``group_size`` must divide ``in_features``. ``name`` is the
        layer name used in the message.
        """
        for label, size in (("out_features", out_features), ("in_features", in_features)):
            if not _is_int(size) or size <= 0:
                raise UserError(f"layer {name!r} has invalid {label}={size!r}: expected a positive integer.")
        if self.granularity != "per_group" or in_features % self.group_size == 0:
            return
        suggestions = ", ".join(str(d) for d in _nearest_divisors(in_features, self.group_size))
        raise UserError(
            f"layer {name!r} has in_features={in_features} (out_features={out_features}), "
            f"which group_size={self.group_size} does not divide. "
            f"Set {self.KEY_PATH}.group_size to a divisor of {in_features}, such as {suggestions}."
        )

    def check_shapes(self, layers: Mapping[str, tuple[int, int]]) -> None:
        """Check every (out_features, in_features) of `layers` at once; with per_group, the error
        suggests group sizes that divide all of them."""
        if self.granularity == "per_group":
            widths = sorted({shape[1] for shape in layers.values()})
            common = math.gcd(*widths)
            if common % self.group_size:
                suggestions = ", ".join(str(d) for d in _nearest_divisors(common, self.group_size))
                raise UserError(
                    f"{self.KEY_PATH}.group_size={self.group_size} does not divide the input width of every quantized "
                    f"linear (in_features {', '.join(map(str, widths))}). Use a divisor of their gcd {common}, such as "
                    f"{suggestions}, or per_channel granularity.")
        for name, (out_features, in_features) in layers.items():
            self.check_shape(out_features, in_features, name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WeightQuantConfig:
        """Build a config from a mapping such as a parsed YAML section.

        Raises ValueError on an unknown key (naming the nearest valid key) or a missing ``bits``.
        """
        return _build_from_dict(cls, data)


@dataclass(frozen=True)
class ActQuantConfig:
    """Activation fake-quantization settings.

    ``per_token`` gives every position of the leading dimensions its own scale, reduced
    over the last dimension. ``per_tensor`` uses one scale, computed from each tensor
    when ``dynamic`` is True, or fixed from calibration (static) when it is False.
    ``clip_ratio`` multiplies the observed range before the scale is computed.
    """

    KEY_PATH: ClassVar[str] = "quant.act"

    bits: int
    symmetric: bool = True
    granularity: str = "per_token"
    dynamic: bool = True
    clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        path = self.KEY_PATH
        _check_bits("activation", path, self.bits, 4, 16, "4, 8 or 16")
        _check_bool("activation", path, "symmetric", self.symmetric)
        _check_choice("activation", path, "granularity", self.granularity, ACT_GRANULARITIES)
        _check_bool("activation", path, "dynamic", self.dynamic)
        if self.granularity == "per_token" and not self.dynamic:
            raise UserError(
                "activation granularity='per_token' with dynamic=False is invalid because per_token "
                "scales come from each token and cannot be fixed by calibration. "
                f"Set {path}.dynamic to true, or set {path}.granularity to 'per_tensor'."
            )
        _check_ratio("activation", path, "clip_ratio", self.clip_ratio)
        object.__setattr__(self, "clip_ratio", float(self.clip_ratio))

    @property
    def static(self) -> bool:
        """True when the scale is fixed from calibration (per_tensor and not dynamic)."""
        return not self.dynamic

    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        return _integer_range(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return _integer_range(self.bits, self.symmetric)[1]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ActQuantConfig:
        """Build a config from a mapping such as a parsed YAML section.

        Raises ValueError on an unknown key (naming the nearest valid key) or a missing ``bits``.
        """
        return _build_from_dict(cls, data)


# ---------------------------------------------------------------------------
# Shared grid arithmetic
# ---------------------------------------------------------------------------


def _integer_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2**bits - 1


def _code_dtype(bits: int, symmetric: bool) -> torch.dtype:
    if bits > 8:
        return torch.int32
    return torch.int8 if symmetric else torch.uint8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _RoundSTE(torch.autograd.Function):
    """``torch.round`` in the forward pass and the identity in the backward pass.

    The forward is ``torch.round`` itself, so fake quantization runs the same ops as
    `quantize_weight` and `quantize_activation`. The common form
    ``x + (round(x) - x).detach()`` gives the same gradient but can differ in the sign of zero.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        return grad_output


def _symmetric_scale(absmax: Tensor, clip: float | Tensor, qmax: int) -> Tensor:
    """``scale = max(clip * absmax / qmax, SCALE_FLOOR)``, elementwise."""
    return (clip * absmax / qmax).clamp_min(SCALE_FLOOR)


def _asymmetric_scale_zero(
    low: Tensor, high: Tensor, clip: float | Tensor, qmax: int
) -> tuple[Tensor, Tensor]:
    """Return ``(scale, zero)`` for the range ``clip * [min(low, 0), max(high, 0)]``.

    ``zero`` is a detached float tensor holding integers in ``[0, qmax]``. In exact
    arithmetic it does not depend on ``clip``, so detaching it loses no gradient.
    """
    low = clip * low.clamp(max=0.0)
    high = clip * high.clamp(min=0.0)
    scale = ((high - low) / qmax).clamp_min(SCALE_FLOOR)
    zero = torch.round(-low / scale).clamp(0, qmax).detach()
    return scale, zero


def _to_grid(x: Tensor, scale: Tensor, zero: Tensor | None, qmin: int, qmax: int, ste: bool) -> Tensor:
    """Map real values to float-valued integer codes: ``clamp(round(x / scale) + zero, qmin, qmax)``."""
    scaled = x / scale
    rounded = _RoundSTE.apply(scaled) if ste else torch.round(scaled)
    if zero is not None:
        rounded = rounded + zero
    return rounded.clamp(qmin, qmax)


def _from_grid(codes: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """Map float-valued codes back to real values: ``(codes - zero) * scale``."""
    if zero is None:
        # Adding +0.0 turns -0.0 into +0.0, the value that an integer round trip gives, so
        # fake quantization and quantize-then-dequantize agree bit for bit.
        return (codes + 0.0) * scale
    return (codes - zero) * scale


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------


def _group_view(w: Tensor, cfg: WeightQuantConfig) -> Tensor:
    """View (out, in) as (out, 1, in) per channel or (out, in / group_size, group_size) per group."""
    if w.dim() != 2:
        raise UserError(
            f"weight quantization expects a 2-D weight of shape (out, in), got shape {tuple(w.shape)}. "
            "Reshape the weight to 2-D first."
        )
    out_features, in_features = w.shape
    if cfg.granularity == "per_channel":
        return w.reshape(out_features, 1, in_features)
    cfg.check_shape(out_features, in_features, name="weight")
    return w.reshape(out_features, in_features // cfg.group_size, cfg.group_size)


def _resolve_clip(
    clip: float | Tensor | None, cfg: WeightQuantConfig, dtype: torch.dtype
) -> float | Tensor:
    """Return ``clip`` as a float or as a tensor that broadcasts to the (out, n_groups, 1) scales."""
    if clip is None:
        return cfg.clip_init
    if isinstance(clip, Tensor):
        clip = clip.to(dtype)
        if cfg.granularity == "per_channel" and clip.dim() == 2:
            clip = clip.unsqueeze(1)  # (out, 1) -> (out, 1, 1), the per-channel group view
        return clip
    if not _is_real(clip) or not 0.0 < clip <= 1.0:
        raise UserError(f"clip={clip!r} is out of range: expected a number in (0, 1], or a tensor.")
    return float(clip)


def _weight_scale_zero(
    groups: Tensor, cfg: WeightQuantConfig, clip: float | Tensor
) -> tuple[Tensor, Tensor | None]:
    """Return the scale and zero point of each group, both of shape (out, n_groups, 1)."""
    stats = groups.detach()
    if cfg.symmetric:
        absmax = stats.abs().amax(dim=-1, keepdim=True)
        return _symmetric_scale(absmax, clip, cfg.qmax), None
    low = stats.amin(dim=-1, keepdim=True)
    high = stats.amax(dim=-1, keepdim=True)
    return _asymmetric_scale_zero(low, high, clip, cfg.qmax)


def _squeeze_scale(scale: Tensor, cfg: WeightQuantConfig) -> Tensor:
    return scale.squeeze(1) if cfg.granularity == "per_channel" else scale


def quantize_weight(
    w: Tensor, cfg: WeightQuantConfig, clip: float | Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantize a weight of shape (out, in) to integer codes.

    ``clip`` is a ratio in (0, 1], a tensor of the scale shape (below), or None for
    ``cfg.clip_init``. The formulas are in the module docstring.

    Returns ``(q, scale, zero)``: ``q`` has shape (out, in) and dtype int8 (symmetric)
    or uint8 (asymmetric). ``scale`` has shape (out, 1) per channel or
    (out, in / group_size, 1) per group, in float32 (float64 for float64 input).
    ``zero`` has the shape of ``scale`` and the dtype of ``q``, or is None when symmetric.
    """
    dtype = _compute_dtype(w.dtype)
    groups = _group_view(w.to(dtype), cfg)
    clip = _resolve_clip(clip, cfg, dtype)
    scale, zero = _weight_scale_zero(groups, cfg, clip)
    codes = _to_grid(groups, scale, zero, cfg.qmin, cfg.qmax, ste=False)
    code_dtype = _code_dtype(cfg.bits, cfg.symmetric)
    q = codes.to(code_dtype).reshape(w.shape)
    zero_codes = None if zero is None else _squeeze_scale(zero, cfg).to(code_dtype)
    return q, _squeeze_scale(scale, cfg), zero_codes


def dequantize_weight(
    q: Tensor, scale: Tensor, zero: Tensor | None, cfg: WeightQuantConfig
) -> Tensor:
    """Return ``w_hat = (q - zero) * scale`` (``q * scale`` when symmetric), shape (out, in).

    Takes the outputs of `quantize_weight`. The result has the dtype of ``scale``.
    """
    dtype = scale.dtype
    out_features, in_features = q.shape
    if cfg.granularity == "per_channel":
        groups = q.to(dtype).reshape(out_features, 1, in_features)
        scale = scale.unsqueeze(1)
        zero = None if zero is None else zero.unsqueeze(1)
    else:
        groups = q.to(dtype).reshape(out_features, scale.shape[1], -1)
    zero = None if zero is None else zero.to(dtype)
    return _from_grid(groups, scale, zero).reshape(out_features, in_features)


def fake_quantize_weight(
    w: Tensor, cfg: WeightQuantConfig, clip: float | Tensor | None = None
) -> Tensor:
    """Quantize and dequantize a weight of shape (out, in) in one differentiable step.

    The value equals ``dequantize_weight(*quantize_weight(w, cfg, clip), cfg)`` bit for
    bit, cast to ``w.dtype``. Gradients follow the clipped STE described in the module
    docstring: identity for ``w`` inside the clipping range and 0 outside, and the LSQ
    gradient for a ``clip`` tensor that requires grad.
    """
    dtype = _compute_dtype(w.dtype)
    groups = _group_view(w.to(dtype), cfg)
    clip = _resolve_clip(clip, cfg, dtype)
    scale, zero = _weight_scale_zero(groups, cfg, clip)
    codes = _to_grid(groups, scale, zero, cfg.qmin, cfg.qmax, ste=True)
    return _from_grid(codes, scale, zero).reshape(w.shape).to(w.dtype)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def _act_scale_zero(
    x: Tensor, cfg: ActQuantConfig, scale: float | Tensor | None, zero: float | Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Return the scale and float zero point: dynamic from ``x``, static from the arguments."""
    if cfg.dynamic:
        if scale is not None or zero is not None:
            raise UserError(
                "a dynamic activation quantizer computes its own scale, but scale or zero was given. "
                f"Drop the argument, or set {cfg.KEY_PATH}.dynamic to false for a static scale."
            )
        return _dynamic_act_scale_zero(x, cfg)
    if scale is None:
        raise UserError(
            "static per_tensor activation quantization needs the calibrated scale, but scale is missing. "
            "Pass scale= (from ActFakeQuantizer.freeze()), or set dynamic to true."
        )
    if cfg.symmetric and zero is not None:
        raise UserError("symmetric activation quantization has no zero point, but zero was given.")
    if not cfg.symmetric and zero is None:
        raise UserError(
            "static asymmetric activation quantization needs the calibrated zero point, but zero is missing."
        )
    dtype = _compute_dtype(x.dtype)
    scale = torch.as_tensor(scale, dtype=dtype, device=x.device).clamp_min(SCALE_FLOOR)
    zero = None if zero is None else torch.as_tensor(zero, device=x.device).to(dtype)
    return scale, zero


def _dynamic_act_scale_zero(x: Tensor, cfg: ActQuantConfig) -> tuple[Tensor, Tensor | None]:
    stats = x.detach()
    if cfg.granularity == "per_token":
        reduce = {"dim": -1, "keepdim": True}
    else:
        reduce = {}
    if cfg.symmetric:
        return _symmetric_scale(stats.abs().amax(**reduce), cfg.clip_ratio, cfg.qmax), None
    return _asymmetric_scale_zero(stats.amin(**reduce), stats.amax(**reduce), cfg.clip_ratio, cfg.qmax)


def quantize_activation(
    x: Tensor,
    cfg: ActQuantConfig,
    scale: float | Tensor | None = None,
    zero: float | Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantize an activation of shape (..., features) to integer codes.

    Dynamic per_token scales have shape (..., 1), one per position of the leading
    dimensions. Dynamic per_tensor scales are 0-d. Static per_tensor quantization uses
    the given ``scale`` (and ``zero`` when asymmetric), which are required. The scale is
    floored at ``SCALE_FLOOR`` in every mode.

    Returns ``(q, scale, zero)``: ``q`` has the shape of ``x`` and dtype int8/uint8 for
    ``bits <= 8``, int32 otherwise. ``zero`` has the dtype of ``q``, or is None when symmetric.
    """
    dtype = _compute_dtype(x.dtype)
    x = x.to(dtype)
    scale, zero = _act_scale_zero(x, cfg, scale, zero)
    codes = _to_grid(x, scale, zero, cfg.qmin, cfg.qmax, ste=False)
    code_dtype = _code_dtype(cfg.bits, cfg.symmetric)
    zero_codes = None if zero is None else zero.to(code_dtype)
    return codes.to(code_dtype), scale, zero_codes


def dequantize_activation(
    q: Tensor, scale: Tensor, zero: Tensor | None, cfg: ActQuantConfig
) -> Tensor:
    """Return ``x_hat = (q - zero) * scale`` (``q * scale`` when symmetric) in the dtype of ``scale``."""
    if cfg.symmetric != (zero is None):
        raise UserError(
            f"zero must be None for symmetric and a tensor for asymmetric quantization "
            f"(symmetric={cfg.symmetric}, zero is {'None' if zero is None else 'a tensor'})."
        )
    dtype = scale.dtype
    zero = None if zero is None else zero.to(dtype)
    return _from_grid(q.to(dtype), scale, zero)


def fake_quantize_activation(
    x: Tensor,
    cfg: ActQuantConfig,
    scale: float | Tensor | None = None,
    zero: float | Tensor | None = None,
) -> Tensor:
    """Quantize and dequantize an activation in one differentiable step.

    The value equals ``dequantize_activation(*quantize_activation(x, cfg, scale, zero), cfg)``
    bit for bit, cast to ``x.dtype``. The gradient w.r.t. ``x`` is the clipped STE, and a
    static ``scale`` tensor that requires grad gets the LSQ gradient.
    """
    dtype = _compute_dtype(x.dtype)
    values = x.to(dtype)
    scale, zero = _act_scale_zero(values, cfg, scale, zero)
    codes = _to_grid(values, scale, zero, cfg.qmin, cfg.qmax, ste=True)
    return _from_grid(codes, scale, zero).to(x.dtype)


# ---------------------------------------------------------------------------
# int4 packing
# ---------------------------------------------------------------------------


def pack_int4(q: Tensor) -> Tensor:
    """Pack 4-bit codes two per byte along the last dimension.

    ``q`` is an integer tensor of shape (..., n) with n even and values either all in
    [-8, 7] (signed) or all in [0, 15] (unsigned). Element ``2i`` goes to the low nibble
    and element ``2i + 1`` to the high nibble of byte ``i``, in two's complement for
    signed codes. Returns uint8 of shape (..., n / 2). `unpack_int4` reverses it.
    """
    if q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise UserError(f"pack_int4 expects integer codes, got dtype {q.dtype}. Quantize first.")
    if q.dim() == 0 or q.shape[-1] % 2 != 0:
        raise UserError(
            f"pack_int4 needs an even last dimension to pair codes, got shape {tuple(q.shape)}. "
            "Pad the last dimension to an even size."
        )
    if q.numel() > 0:
        low, high = int(q.min()), int(q.max())
        if low < -8 or high > 15 or (low < 0 and high > 7):
            raise UserError(
                f"pack_int4 expects codes in [-8, 7] or [0, 15], got values from {low} to {high}. "
                "Quantize with 4 bits before packing."
            )
    nibbles = q.to(torch.int32) & 0xF
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return packed.to(torch.uint8)


def unpack_int4(packed: Tensor, signed: bool) -> Tensor:
    """Unpack bytes from `pack_int4` into codes of shape (..., 2 * n).

    Returns int8 codes in [-8, 7] when ``signed`` is True, else uint8 codes in [0, 15].
    """
    if packed.dtype != torch.uint8:
        raise UserError(f"unpack_int4 expects uint8 input from pack_int4, got dtype {packed.dtype}.")
    values = packed.to(torch.int16)
    low = values & 0xF
    high = values >> 4
    codes = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)
    if signed:
        codes = torch.where(codes >= 8, codes - 16, codes)
        return codes.to(torch.int8)
    return codes.to(torch.uint8)


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


class WeightFakeQuantizer(nn.Module):
    """Fake-quantize a weight of shape (out, in) with an optional learnable clipping ratio.

    With ``cfg.learnable_clip``, ``clip`` is an ``nn.Parameter`` of shape (out, 1) per
    channel or (out, in / group_size, 1) per group, initialized to ``cfg.clip_init``.
    The forward pass clamps it to ``[CLIP_FLOOR, 1]`` with a straight-through gradient,
    so a value that an optimizer step pushed past 1 still gets a gradient and can return.
    When ``enabled`` is False, ``forward`` returns its input unchanged.
    """

    def __init__(
        self, cfg: WeightQuantConfig, out_features: int, in_features: int, name: str = "weight"
    ) -> None:
        super().__init__()
        cfg.check_shape(out_features, in_features, name)
        self.cfg = cfg
        self.out_features = out_features
        self.in_features = in_features
        self.name = name
        self.enabled = True
        if cfg.learnable_clip:
            if cfg.granularity == "per_channel":
                shape = (out_features, 1)
            else:
                shape = (out_features, in_features // cfg.group_size, 1)
            self.clip = nn.Parameter(torch.full(shape, cfg.clip_init))
        else:
            self.register_parameter("clip", None)

    def effective_clip(self) -> Tensor | None:
        """Return the clipping ratio used in forward, clamped to [CLIP_FLOOR, 1], or None."""
        if self.clip is None:
            return None
        clamped = self.clip.clamp(CLIP_FLOOR, 1.0)
        return self.clip + (clamped - self.clip).detach()

    def forward(self, w: Tensor) -> Tensor:
        if not self.enabled:
            return w
        expected = (self.out_features, self.in_features)
        if tuple(w.shape) != expected:
            raise UserError(
                f"{self.name}: WeightFakeQuantizer was built for shape {expected}, got {tuple(w.shape)}."
            )
        return fake_quantize_weight(w, self.cfg, self.effective_clip())

    def extra_repr(self) -> str:
        cfg = self.cfg
        parts = [f"bits={cfg.bits}", f"granularity={cfg.granularity}"]
        if cfg.group_size is not None:
            parts.append(f"group_size={cfg.group_size}")
        parts += [
            f"symmetric={cfg.symmetric}",
            f"learnable_clip={cfg.learnable_clip}",
            f"enabled={self.enabled}",
        ]
        return ", ".join(parts)


class ActFakeQuantizer(nn.Module):
    """Fake-quantize activations, with an observer for static per_tensor scales.

    Dynamic configs compute the scale from each input. A static config (per_tensor,
    ``dynamic=False``) needs calibration first: call `observe` on calibration inputs, or
    set ``calibrating = True`` so that ``forward`` observes and returns its input
    unchanged, then call `freeze`. The observed min and max, the frozen scale and zero
    point are buffers, and so is the frozen flag (a bool tensor, so ``state_dict`` holds
    only tensors and saves to safetensors).
    When ``enabled`` is False, ``forward`` returns its input unchanged.
    """

    def __init__(self, cfg: ActQuantConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.enabled = True
        self.calibrating = False
        self.register_buffer("frozen_flag", torch.tensor(False))
        if cfg.static:
            self.register_buffer("observed_min", torch.tensor(math.inf))
            self.register_buffer("observed_max", torch.tensor(-math.inf))
            self.register_buffer("scale", torch.tensor(1.0))
            self.register_buffer("zero", torch.tensor(0.0))

    def _require_static(self, method: str) -> None:
        if not self.cfg.static:
            raise UserError(
                f"ActFakeQuantizer.{method}() is only for static per_tensor quantization, but this "
                f"quantizer is dynamic ({self.cfg.granularity}). Set {self.cfg.KEY_PATH}.dynamic to false "
                "and granularity to 'per_tensor' to calibrate a fixed scale."
            )

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Update the running min and max of ``x`` over all calls since the last reset."""
        self._require_static("observe")
        if x.numel() == 0:
            return
        values = x.detach().to(self.observed_min.dtype)
        self.observed_min.copy_(torch.minimum(self.observed_min, values.amin()))
        self.observed_max.copy_(torch.maximum(self.observed_max, values.amax()))

    def reset_observer(self) -> None:
        """Forget the observed range and the frozen scale."""
        self._require_static("reset_observer")
        self.observed_min.fill_(math.inf)
        self.observed_max.fill_(-math.inf)
        self.frozen = False

    @torch.no_grad()
    def freeze(self) -> None:
        """Fix the scale (and zero point) from the observed range and ``cfg.clip_ratio``.

        Symmetric: ``scale = clip_ratio * max(|min|, |max|) / qmax``. Asymmetric: the
        formulas of the module docstring on ``[min, max]``. Calling it again recomputes both.
        """
        self._require_static("freeze")
        if torch.isinf(self.observed_max):
            raise RuntimeError(
                "ActFakeQuantizer.freeze() found no observed values. Call observe(x) on calibration "
                "inputs, or set calibrating=True and run calibration batches, before freeze()."
            )
        cfg = self.cfg
        if cfg.symmetric:
            absmax = torch.maximum(self.observed_min.abs(), self.observed_max.abs())
            self.scale.copy_(_symmetric_scale(absmax, cfg.clip_ratio, cfg.qmax))
            self.zero.zero_()
        else:
            scale, zero = _asymmetric_scale_zero(self.observed_min, self.observed_max, cfg.clip_ratio, cfg.qmax)
            self.scale.copy_(scale)
            self.zero.copy_(zero)
        self.frozen = True
        logger.debug(
            "froze activation scale %.6g (zero %d) from observed range [%.6g, %.6g]",
            float(self.scale), int(self.zero), float(self.observed_min), float(self.observed_max),
        )

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if not self.cfg.static:
            return fake_quantize_activation(x, self.cfg)
        if self.calibrating:
            self.observe(x)
            return x
        if not self.frozen:
            raise RuntimeError(
                "static per_tensor ActFakeQuantizer was called before freeze(). Set calibrating=True "
                "and run calibration batches (or call observe(x)), then call freeze()."
            )
        zero = None if self.cfg.symmetric else self.zero
        return fake_quantize_activation(x, self.cfg, scale=self.scale, zero=zero)

    @property
    def frozen(self) -> bool:
        return bool(self.frozen_flag)

    @frozen.setter
    def frozen(self, value: bool) -> None:
        self.frozen_flag.fill_(bool(value))

    def extra_repr(self) -> str:
        cfg = self.cfg
        parts = [
            f"bits={cfg.bits}",
            f"granularity={cfg.granularity}",
            f"dynamic={cfg.dynamic}",
            f"symmetric={cfg.symmetric}",
        ]
        if cfg.static:
            parts.append(f"frozen={self.frozen}")
        parts.append(f"enabled={self.enabled}")
        return ", ".join(parts)
