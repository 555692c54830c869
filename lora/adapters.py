"""LoRA adapters on the linears of a `MambaLM`, and the LoRA factors under rotation.

A LoRA adapter (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") adds a
low-rank update to a frozen linear weight W (out, in):

    W_merged = W + s·B·A,   A: (r, in),  B: (out, r),  s = alpha / r

Adapters are peft `lora.Linear` layers injected with `peft.inject_adapter_in_model` under the
adapter name "default". The wrapped linear keeps its module name (`mixer.in_proj` is still
`mixer.in_proj`) and keeps its weight and bias in `.base_layer`.

Rotation of the factors. A rotation folded into a linear (see `rotations.fold`) maps
W → R_outᵀ·W·R_in. Applied to the merged weight it gives

    R_outᵀ·(W + s·B·A)·R_in = R_outᵀ·W·R_in + s·(R_outᵀ·B)·(A·R_in)

so the rotated adapter has the factors A' = A·R_in and B' = R_outᵀ·B, with the same rank and
scaling. The per-site helpers below apply the same rewrites as `rotate_in_proj`,
`rotate_x_proj`, `rotate_dt_proj` and `rotate_out_proj` in `rotations.fold`, whose module docstring lists the
sites. They are pure and differentiable, so training can apply them to trainable
rotations. Rotation matrices must have the dtype and device of the factors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import peft
import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from mambaspin.errors import UserError
from mambaspin.model import MambaLM

ADAPTER_NAME = "default"
MIXER_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")
LINEAR_NAMES = MIXER_LINEARS + ("lm_head",)
FACTOR_KEYS = (".lora_A.", ".lora_B.")


@dataclass(frozen=True)
class LoraSettings:
    """Shape of the adapters that `add_lora` injects.

    rank: r, the inner dimension of B·A. alpha: the update is scaled by s = alpha / rank.
    dropout: probability of peft's dropout on the adapter input. It acts only in peft's own
    forward, not in `merged_weight`. targets: module names, each matched as peft matches a list
    entry: a module whose full name equals the entry or ends with "." + entry. "in_proj" targets
    every block's in_proj, and "backbone.layers.0.mixer.in_proj" targets only block 0.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = MIXER_LINEARS

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise UserError(f"lora rank={self.rank!r} is invalid: expected an integer of at least 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise UserError(f"lora alpha={self.alpha!r} is invalid: expected a number greater than 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora dropout={self.dropout!r} is invalid: expected a number in [0, 1)")
        if isinstance(self.targets, str):
            raise UserError(f"lora targets={self.targets!r} is invalid: expected a list of module names, "
                            f"for example {list(MIXER_LINEARS)}")
        targets = tuple(self.targets)
        if not targets:
            raise UserError(f"lora targets is empty: name at least one of {', '.join(LINEAR_NAMES)}")
        for target in targets:
            if not isinstance(target, str) or not target:
                raise UserError(f"lora target {target!r} is invalid: expected a module name such as 'in_proj'")
        object.__setattr__(self, "targets", targets)

    @property
    def scaling(self) -> float:
        """s = alpha / rank, the factor of B·A in the merged weight."""
        return self.alpha / self.rank


# ---------------------------------------------------------------------------------------------
# Injection


def check_targets(model: nn.Module, settings: LoraSettings | None) -> None:
    """Raise UserError when `settings` cannot be applied to `model` (see _resolve_targets); None passes."""
    if settings is not None:
        _resolve_targets(model, settings)


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith("." + target)


def _resolve_targets(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Return the full names of the linears that `settings.targets` select, after checking them.

    Raises UserError for a model that already carries adapters, a target on a conv1d, a target
    that matches no module or a module that is not an nn.Linear, and a rank above a layer's max
    rank min(out_features, in_features).
    """
    valid_names = ", ".join(LINEAR_NAMES)
    modules = dict(model.named_modules())
    if any(isinstance(module, BaseTunerLayer) for module in modules.values()):
        raise UserError("the model already carries LoRA adapters: call add_lora once per model")
    selected: list[str] = []
    for target in settings.targets:
        matched = [name for name in modules if name and _matches(name, target)]

        convs = [name for name in matched if isinstance(modules[name], nn.Conv1d)]
        if convs:
            raise UserError(f"LoRA on conv1d is not supported: target {target!r} matches {convs[0]} (a depthwise "
                            f"nn.Conv1d). Expected linear names: {valid_names}")
        if not matched:
            raise UserError(f"LoRA target {target!r} matches no module of the model. Expected linear names: "
                            f"{valid_names} (or a full name such as backbone.layers.0.mixer.in_proj)")

        for name in matched:
            module = modules[name]
            if not isinstance(module, nn.Linear):
                raise UserError(f"LoRA target {target!r} matches {name}, a {type(module).__name__} and not an "
                                f"nn.Linear. Expected linear names: {valid_names}")
            max_rank = min(module.out_features, module.in_features)
            if settings.rank > max_rank:
                raise UserError(
                    f"LoRA rank {settings.rank} is too large for {name} with weight shape "
                    f"({module.out_features}, {module.in_features}): the max rank there is {max_rank} = "
                    f"min(out_features, in_features). Lower the rank or remove {target!r} from the targets"
                )
            if name not in selected:
                selected.append(name)
    return selected


def add_lora(model: MambaLM, settings: LoraSettings) -> MambaLM:
    """Inject a peft LoRA adapter into each targeted linear of `model`, in place, and return it.

    B starts at zero (peft's default init), so the model computes the same function right after
    injection. Every parameter of the model is frozen except the lora_A and lora_B weights. On a
    tied model an adapter on lm_head changes only the head: the embedding keeps the base weight.
    Raises UserError, naming the offending target or layer, before anything is changed.
    """
    if not isinstance(model, MambaLM):
        raise TypeError(f"add_lora expects a mambaspin MambaLM, got {type(model).__name__}")
    names = _resolve_targets(model, settings)

    config = peft.LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=names,
        bias="none",
    )
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)

    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(key in name for key in FACTOR_KEYS))
    return model


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    """Return (name, layer) of every peft LoRA layer in `model`, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


# ---------------------------------------------------------------------------------------------
# Factors and the merged weight


def lora_factors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """Return (A (r, in), B (out, r), s = alpha / r) of the "default" adapter of a peft lora.Linear.

    A and B are the adapter's parameters themselves, so gradients flow through them. Returns None
    for a plain nn.Linear. Raises TypeError for any other module and UserError for a LoRA layer
    without a "default" adapter.
    """
    if isinstance(module, LoraLayer):
        if ADAPTER_NAME not in module.lora_A:
            raise UserError(f"LoRA layer has no {ADAPTER_NAME!r} adapter (adapters: {sorted(module.lora_A)}). "
                            f"Inject adapters with add_lora")
        a = module.lora_A[ADAPTER_NAME].weight  # (r, in)
        b = module.lora_B[ADAPTER_NAME].weight  # (out, r)
        return a, b, float(module.scaling[ADAPTER_NAME])
    if isinstance(module, nn.Linear):
        return None
    raise TypeError(f"expected an nn.Linear or a peft lora.Linear, got {type(module).__name__}")


def base_linear(module: nn.Module) -> nn.Linear:
    """Return the nn.Linear holding the frozen W and b: the base layer of a LoRA layer, or `module`."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    if not isinstance(base, nn.Linear):
        raise TypeError(f"expected an nn.Linear or a peft lora.Linear, got {type(module).__name__}")
    return base


def _non_finite_message(module: nn.Module, name: str | None) -> str:
    base = base_linear(module)
    label = name or f"the linear with weight shape {tuple(base.weight.shape)}"
    parts = {"base weight W": base.weight}
    factors = lora_factors(module)
    if factors is not None:
        parts["LoRA A"] = factors[0]
        parts["LoRA B"] = factors[1]
    culprits = [part for part, tensor in parts.items() if not bool(torch.isfinite(tensor).all())]
    source = ", ".join(culprits) if culprits else "none of W, A, B, so the product s·B·A overflowed"
    return (f"merged weight of {label} is not finite (NaN or inf). Non-finite inputs: {source}. "
            f"Training may have diverged: lower the learning rate or reload a checkpoint")


def merged_weight(module: nn.Module, name: str | None = None, check_finite: bool = True) -> torch.Tensor:
    """Compute W + s·B·A (out, in) for a linear with or without an adapter.

    The result is float32, or float64 when the base weight is float64. It is differentiable with
    respect to A and B (and W, should W be trainable). It ignores whether the adapter is enabled
    (see `set_lora_enabled`) and ignores dropout. name: the layer name used in error messages.
    check_finite: raise FloatingPointError, naming the layer and the non-finite tensor, when the
    result contains NaN or inf. On a GPU the check waits for the device, so a hot loop may turn
    it off.
    """
    base = base_linear(module)
    compute = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
    weight = base.weight.to(compute)  # (out, in)
    factors = lora_factors(module)
    if factors is not None:
        a, b, scaling = factors
        weight = weight + scaling * (b.to(compute) @ a.to(compute))  # (out, in)

    if check_finite and not bool(torch.isfinite(weight).all()):
        raise FloatingPointError(_non_finite_message(module, name))
    return weight


# ---------------------------------------------------------------------------------------------
# Rotated factors


def rotate_lora_factors(a: torch.Tensor, b: torch.Tensor, r_in: torch.Tensor | None = None,
                        r_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the factors of the adapter after W → R_outᵀ·W·R_in: (A·R_in, R_outᵀ·B).

    a: (r, in). b: (out, r). r_in: (in, in). r_out: (out, out). None leaves that side as it is.
    """
    if r_in is not None:
        a = a @ r_in
    if r_out is not None:
        b = r_out.T @ b
    return a, b


def rotate_in_proj_factors(a: torch.Tensor, b: torch.Tensor, r1: torch.Tensor | None = None,
                           norm_weight: torch.Tensor | None = None,
                           smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return in_proj factors matching `rotate_in_proj`: A' = A·diag(g)·R1, B' = diag(1, 1/s)·B.

    a: (r, d_model). b: (2·d_inner, r), rows [x; z]. r1: (d_model, d_model). norm_weight g:
    (d_model,), the block norm weight folded into the columns. smooth s: (d_inner,), which
    divides the z rows (the second half) of B.
    """
    if norm_weight is not None:
        a = a * norm_weight[None, :]
    a, b = rotate_lora_factors(a, b, r_in=r1)
    if smooth is not None:
        divisor = torch.cat([torch.ones_like(smooth), smooth])  # (2·d_inner,)
        b = b / divisor[:, None]
    return a, b


def rotate_x_proj_factors(a: torch.Tensor, b: torch.Tensor, dt_rank: int, d_state: int,
                          r6: torch.Tensor | None = None, r5: torch.Tensor | None = None,
                          r4: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return x_proj factors matching `rotate_x_proj`: A' = A·R6 and B's rows rotated per block.

    a: (r, d_inner). b: (dt_rank + 2·d_state, r) with rows [dt; B; C]. The dt rows become
    R5ᵀ·B_dt, the C rows R4ᵀ·B_C, and the B rows (the SSM input matrix) stay as they are.
    r6: (d_inner, d_inner). r5: (dt_rank, dt_rank). r4: (d_state, d_state).
    """
    expected_rows = dt_rank + 2 * d_state
    if b.shape[0] != expected_rows:
        raise ValueError(f"x_proj LoRA B has {b.shape[0]} rows, expected dt_rank + 2·d_state = {expected_rows}")
    a, _ = rotate_lora_factors(a, b, r_in=r6)
    dt_rows, b_rows, c_rows = b.split([dt_rank, d_state, d_state], dim=0)
    if r5 is not None:
        dt_rows = r5.T @ dt_rows  # (dt_rank, r)
    if r4 is not None:
        c_rows = r4.T @ c_rows  # (d_state, r)
    return a, torch.cat([dt_rows, b_rows, c_rows], dim=0)


def rotate_dt_proj_factors(a: torch.Tensor, b: torch.Tensor,
                           r5: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return dt_proj factors matching `rotate_dt_proj`: A' = A·R5, B unchanged.

    a: (r, dt_rank). b: (d_inner, r). r5: (dt_rank, dt_rank).
    """
    return rotate_lora_factors(a, b, r_in=r5)


def rotate_out_proj_factors(a: torch.Tensor, b: torch.Tensor, r1: torch.Tensor | None = None,
                            r2: torch.Tensor | None = None,
                            smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return out_proj factors matching `rotate_out_proj`: A' = A·diag(s)·R2, B' = R1ᵀ·B.

    a: (r, d_inner). b: (d_model, r). r1: (d_model, d_model). r2: (d_inner, d_inner).
    smooth s: (d_inner,), which multiplies the columns before R2.
    """
    if smooth is not None:
        a = a * smooth[None, :]
    return rotate_lora_factors(a, b, r_in=r2, r_out=r1)


def rotate_lm_head_factors(a: torch.Tensor, b: torch.Tensor, r1: torch.Tensor | None = None,
                           norm_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return lm_head factors matching `rotations.fold.fold_residual`: A' = A·diag(g)·R1.

    a: (r, d_model). b: (vocab, r), unchanged. norm_weight g: (d_model,), the norm_f weight.
    """
    if norm_weight is not None:
        a = a * norm_weight[None, :]
    return rotate_lora_factors(a, b, r_in=r1)


# ---------------------------------------------------------------------------------------------
# Enabling and saving


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer's forward between W + s·B·A (enabled) and W alone (disabled).

    Uses peft's `enable_adapters` on each layer. peft also sets requires_grad on the adapter
    weights there, so this function restores each parameter's requires_grad flag afterwards.
    """
    flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
    for _, layer in lora_layers(model):
        layer.enable_adapters(enabled)
    for parameter, flag in flags.items():
        parameter.requires_grad_(flag)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the block with every LoRA layer disabled, then restore each layer's previous state."""
    layers = lora_layers(model)
    previous = [layer.disable_adapters for _, layer in layers]
    set_lora_enabled(model, False)
    try:
        yield model
    finally:
        flags = {parameter: parameter.requires_grad for parameter in model.parameters()}
        for (_, layer), was_disabled in zip(layers, previous):
            layer.enable_adapters(not was_disabled)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return the LoRA factors of `model` by state-dict key, e.g.
    "backbone.layers.0.mixer.in_proj.lora_A.default.weight" (r, in).

    Like `nn.Module.state_dict`, the tensors are detached and share storage with the parameters.
    """
    return {key: value for key, value in model.state_dict().items() if any(part in key for part in FACTOR_KEYS)}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA factors from `state` into `model`, in place.

    The keys must be exactly those of `lora_state_dict(model)`. Raises UserError listing the
    missing and unexpected keys, or naming a key whose shape differs.
    """
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing (first: {missing[:3]})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected (first: {unexpected[:3]})")
        raise UserError(f"LoRA state does not match the model's adapters: {'; '.join(problems)}. "
                        f"Inject adapters with the same targets as the saved ones before loading")
    for key, target in expected.items():
        value = state[key]
        if tuple(value.shape) != tuple(target.shape):
            raise UserError(f"LoRA state key {key} has shape {tuple(value.shape)}, but the model expects "
                            f"{tuple(target.shape)}: the saved rank or model size differs")
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key].to(device=target.device, dtype=target.dtype))
