"""Assemble the QAT model: folded norms, trainable rotations, LoRA adapters and fake quantizers.

Every targeted linear becomes a `QATLinear` computing Q(R_outᵀ·(W + s·B·A)·R_in); activation
quantizers sit at the linears' input points after the online rotations. `float_mode` switches
rotations, LoRA and quantizers off together, which gives back the float model: the distillation
teacher, with no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from lora.adapters import LoraSettings, add_lora, base_linear, lora_factors, merged_weight
from mambaspin.qat import QATLinear
from mambaspin.quant import ActFakeQuantizer, WeightFakeQuantizer
from mambaspin.quant_model import LINEARS, QuantScheme, attach_act_quantizers, quantize_conv1d
from rotations.config import RotationConfig
from rotations.klt import RotationSet
from rotations.trainable import RotationParams, WeightRotation, attach_online_rotations, fold_norms


def _wrap(inner: nn.Module, transform, scheme_weight, name: str) -> QATLinear:
    base = base_linear(inner)
    merge = functools.partial(merged_weight, check_finite=False) if lora_factors(inner) is not None else None
    quantizer = None
    if scheme_weight is not None:
        quantizer = WeightFakeQuantizer(scheme_weight, base.out_features, base.in_features, name)
    return QATLinear(inner, base, merge, transform, quantizer)


def build_qat_model(model, rotations: RotationSet, rotation_config: RotationConfig, scheme: QuantScheme,
                    lora: LoraSettings | None) -> RotationParams:
    """Turn a float `MambaLM` into the QAT model in place; returns its rotation parameters.

    Steps: fold norms (exact), quantize the conv1d kernels when the scheme says so, inject LoRA,
    register the rotations as `model.rotations`, wrap the linears, attach online rotations, then
    activation quantizers after them.
    """
    fold_norms(model)
    # NOTE: conv1d kernels are frozen, so they are quantized once in place, and the distillation
    # teacher (float_mode) then also runs with the quantized kernels.
    quantize_conv1d(model, scheme)
    if lora is not None:
        add_lora(model, lora)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    params = RotationParams(rotations, rotation_config, model.config.n_layer)
    model.rotations = params
    cfg = model.config
    for layer, mixer in enumerate(model.mixers):
        for name in LINEARS:
            transform = WeightRotation(params, name, layer, cfg.dt_rank, cfg.d_state)
            setattr(mixer, name, _wrap(getattr(mixer, name), transform, scheme.weight, f"layers.{layer}.{name}"))
    head_quant = scheme.weight if scheme.lm_head else None
    model.lm_head = _wrap(model.lm_head, WeightRotation(params, "lm_head", None), head_quant, "lm_head")
    attach_online_rotations(model, params)
    attach_act_quantizers(model, scheme)
    _set_trainable(model, rotation_config)
    return params


def _set_trainable(model, rotation_config: RotationConfig) -> None:
    """Train LoRA factors, learnable clips and the rotations of sites with train=True."""
    for name, parameter in model.named_parameters():
        if "lora_A" in name or "lora_B" in name or name.endswith("quantizer.clip"):
            parameter.requires_grad_(True)
    for name, parameter in model.rotations.matrices.items():
        site = name.rsplit("_", 1)[-1]
        parameter.requires_grad_(rotation_config.sites[site].train)


def qat_linears(model) -> list[QATLinear]:
    return [module for module in model.modules() if isinstance(module, QATLinear)]


def act_quantizers(model) -> list[ActFakeQuantizer]:
    return [module for module in model.modules() if isinstance(module, ActFakeQuantizer)]


def make_act_scales_learnable(model) -> None:
    """Turn frozen static activation scales into trainable parameters (LSQ, Esser et al., 2020)."""
    for quantizer in act_quantizers(model):
        if quantizer.cfg.static and quantizer.frozen and not isinstance(quantizer.scale, nn.Parameter):
            scale = quantizer.scale.detach().clone()
            del quantizer.scale
            quantizer.scale = nn.Parameter(scale)


@contextlib.contextmanager
def float_mode(model):
    """Run `model` as the float model: rotations, LoRA and all quantizers off, restored on exit.

    Accepts a model wrapped by DistributedDataParallel too.
    """
    inner = getattr(model, "module", model)
    linears, quantizers = qat_linears(inner), act_quantizers(inner)
    saved_linears = [(m.use_lora, m.use_quant) for m in linears]
    saved_quantizers = [q.enabled for q in quantizers]
    saved_rotations = inner.rotations.enabled
    inner.rotations.enabled = False
    for module in linears:
        module.use_lora, module.use_quant = False, False
    for quantizer in quantizers:
        quantizer.enabled = False
    try:
        yield model
    finally:
        inner.rotations.enabled = saved_rotations
        for module, (use_lora, use_quant) in zip(linears, saved_linears):
            module.use_lora, module.use_quant = use_lora, use_quant
        for quantizer, enabled in zip(quantizers, saved_quantizers):
            quantizer.enabled = enabled


def trainable_groups(model) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Riemannian rotation parameters, Euclidean parameters: LoRA, clips, activation scales)."""
    rotation_ids = {id(p) for p in model.rotations.matrices.values()}
    rotations = [p for p in model.rotations.matrices.values() if p.requires_grad]
    euclidean = [p for p in model.parameters() if p.requires_grad and id(p) not in rotation_ids]
    return rotations, euclidean


@torch.no_grad()
def check_finite(model) -> None:
    """Raise FloatingPointError naming the first trainable parameter that is not finite."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not torch.isfinite(parameter).all():
            raise FloatingPointError(f"parameter {name} is not finite")
