"""Attach fake quantization to a `MambaLM`: which linears and activations, and the presets.

Weights: in_proj, x_proj, dt_proj and out_proj of every block (lm_head when `lm_head` is set,
the depthwise conv1d kernels per channel when `conv1d` is set).
Activations: the input of each of those linears, read at the named points in_proj_input,
x_proj_input, dt_proj_input, out_proj_input (lm_head_input), after any online rotation there;
with `ssm_inputs`, also the scan inputs ssm_u, ssm_delta, ssm_B and ssm_C.
The embedding, A_log, D and the norms stay in float.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import UserError
from .quant import ActFakeQuantizer, ActQuantConfig, WeightQuantConfig, fake_quantize_weight

LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj")
LINEAR_INPUT_POINTS = {"in_proj": "in_proj_input", "x_proj": "x_proj_input", "dt_proj": "dt_proj_input",
                       "out_proj": "out_proj_input"}
SSM_POINTS = ("ssm_u", "ssm_delta", "ssm_B", "ssm_C")


@dataclass(frozen=True)
class QuantScheme:
    """Weight and activation quantizers of a model; None leaves that side in float."""

    weight: WeightQuantConfig | None = None
    act: ActQuantConfig | None = None
    lm_head: bool = False
    ssm_inputs: bool = False
    conv1d: bool = False

    @property
    def name(self) -> str:
        weight_bits = self.weight.bits if self.weight else 16
        act_bits = self.act.bits if self.act else 16
        return f"W{weight_bits}A{act_bits}"


def preset(name: str) -> QuantScheme:
    """The shipped presets: W8A8, W4A8, W4A4 (static per-tensor activations) and W4A16."""
    presets = {
        "W8A8": QuantScheme(WeightQuantConfig(bits=8), ActQuantConfig(bits=8, granularity="per_token")),
        "W4A8": QuantScheme(WeightQuantConfig(bits=4), ActQuantConfig(bits=8, granularity="per_token")),
        "W4A4": QuantScheme(WeightQuantConfig(bits=4), ActQuantConfig(bits=4, granularity="per_tensor", dynamic=False)),
        "W4A16": QuantScheme(WeightQuantConfig(bits=4), None),
    }
    if name.upper() not in presets:
        raise UserError(f"unknown quantization preset {name!r}: expected one of {', '.join(presets)}")
    return presets[name.upper()]


def quantized_linears(model, scheme: QuantScheme) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every linear the scheme quantizes."""
    linears = [(f"backbone.layers.{i}.mixer.{name}", getattr(mixer, name))
               for i, mixer in enumerate(model.mixers) for name in LINEARS]
    if scheme.lm_head:
        linears.append(("lm_head", model.lm_head))
    return linears


@torch.no_grad()
def quantize_weights_rtn(model, scheme: QuantScheme) -> None:
    """Replace each quantized linear's weight by its round-to-nearest fake-quantized value."""
    if scheme.weight is None:
        return
    if scheme.lm_head and model.is_tied():
        raise UserError("quantizing lm_head of a tied model would also quantize the embedding; apply R1 "
                        "(which unties it) or set quant.lm_head to false")
    for name, linear in quantized_linears(model, scheme):
        scheme.weight.check_shape(linear.out_features, linear.in_features, name)
        linear.weight.copy_(fake_quantize_weight(linear.weight.float(), scheme.weight).to(linear.weight.dtype))
    quantize_conv1d(model, scheme)


@torch.no_grad()
def quantize_conv1d(model, scheme: QuantScheme) -> None:
    """Round-to-nearest the depthwise conv1d kernels (d_inner, 1, k) in place when `scheme.conv1d`.

    Each channel's k taps form one row of the (d_inner, k) weight matrix. Always per channel: a
    group size would have to divide k. The kernels stay frozen in QAT, so quantizing them once
    is what training sees and what a merge ships.
    """
    if not scheme.conv1d or scheme.weight is None:
        return
    per_channel = dataclasses.replace(scheme.weight, granularity="per_channel", group_size=None, learnable_clip=False)
    for mixer in model.mixers:
        kernel = mixer.conv1d.weight  # (d_inner, 1, k)
        rows = kernel.detach().float().reshape(kernel.shape[0], -1)  # (d_inner, k)
        kernel.copy_(fake_quantize_weight(rows, per_channel).reshape(kernel.shape).to(kernel.dtype))


def attach_act_quantizers(model, scheme: QuantScheme) -> list[ActFakeQuantizer]:
    """Append an activation quantizer at each quantized point (after online rotations there)."""
    if scheme.act is None:
        return []
    quantizers = []
    points = list(LINEAR_INPUT_POINTS.values()) + (list(SSM_POINTS) if scheme.ssm_inputs else [])
    for layer in range(model.config.n_layer):
        for point in points:
            quantizer = ActFakeQuantizer(scheme.act)
            model.append_point(point, layer, quantizer)
            quantizers.append(quantizer)
    if scheme.lm_head:
        quantizer = ActFakeQuantizer(scheme.act)
        model.append_point("lm_head_input", None, quantizer)
        quantizers.append(quantizer)
    return quantizers


@torch.no_grad()
def calibrate_act_quantizers(model, quantizers, blocks: torch.Tensor, batch_size: int = 8, progress: bool = True) -> None:
    """Observe calibration blocks (n, l + 1) and freeze every static activation quantizer."""
    static = [q for q in quantizers if q.cfg.static]
    if not static:
        return
    for quantizer in static:
        quantizer.reset_observer()
        quantizer.calibrating = True
    device = next(model.parameters()).device
    try:
        for first in tqdm(range(0, blocks.shape[0], batch_size), desc="act scales", disable=not progress):
            model(blocks[first : first + batch_size, :-1].to(device))
    finally:
        for quantizer in static:
            quantizer.calibrating = False
    for quantizer in static:
        quantizer.freeze()


@torch.no_grad()
def quantize_weights_gptq(model, scheme: QuantScheme, calibration_blocks: torch.Tensor) -> None:
    """Replace each quantized linear's weight by its GPTQ value, from Hessians of its inputs as the
    model computes them now (activation quantizers included, weights still float)."""
    from .gptq import collect_hessians, gptq_quantize
    from .quant import dequantize_weight

    if scheme.weight is None:
        return
    linears = dict(quantized_linears(model, scheme))
    hessians = collect_hessians(model, linears, calibration_blocks)
    for name, linear in linears.items():
        scheme.weight.check_shape(linear.out_features, linear.in_features, name)
        codes, scale, zero = gptq_quantize(linear.weight.float(), hessians[name].hessian(), scheme.weight)
        linear.weight.copy_(dequantize_weight(codes, scale, zero, scheme.weight).to(linear.weight.dtype))


def quantize_model_ptq(model, scheme: QuantScheme, calibration_blocks: torch.Tensor, progress: bool = True,
                       gptq: bool = False):
    """Quantize in place: round-to-nearest (or GPTQ) weights and calibrated activation quantizers.

    Static activation scales are calibrated with the quantized weights, as in QAT. GPTQ needs the
    quantized activations first, so it calibrates them on float weights, quantizes the weights
    and calibrates again. Returns the activation quantizers.
    """
    if not gptq:
        quantize_weights_rtn(model, scheme)
    quantizers = attach_act_quantizers(model, scheme)
    calibrate_act_quantizers(model, quantizers, calibration_blocks, progress=progress)
    if gptq:
        quantize_weights_gptq(model, scheme, calibration_blocks)
        calibrate_act_quantizers(model, quantizers, calibration_blocks, progress=progress)
    return quantizers
