"""Quantization-aware linear layer: y = x · Q(T(W + s·B·A))ᵀ + T(b).

W and b are the frozen base weight and bias, s·B·A an optional LoRA update, T a weight transform
(rotations folded on the fly, so it follows trainable rotation matrices) and Q a weight fake
quantizer. What is trained here is exactly what a merge writes out: the merge evaluates the same
expression once.

The layer stays generic: the LoRA update and the transform are callables given by the caller, so
this module knows nothing of peft or of rotations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .quant import WeightFakeQuantizer

MergeFn = Callable[[nn.Module], torch.Tensor]


class QATLinear(nn.Module):
    """Wrap a linear (a plain nn.Linear or one carrying adapters) for QAT.

    inner: the wrapped module; its parameters stay registered here.
    merged_weight: callable returning W + s·B·A (out, in) for `inner`; None uses inner.weight.
    base: the nn.Linear holding the frozen weight and bias.
    transform: nn.Module with forward(weight, bias) -> (weight, bias), or None.
    quantizer: WeightFakeQuantizer or None.
    Flags `use_lora`, `use_transform` and `use_quant` switch each part off (a float teacher
    turns all three off).
    """

    def __init__(self, inner: nn.Module, base: nn.Linear, merged_weight: MergeFn | None = None,
                 transform: nn.Module | None = None, quantizer: WeightFakeQuantizer | None = None):
        super().__init__()
        self.inner = inner
        self._base = [base]
        self._merged_weight = merged_weight
        self.transform = transform
        self.quantizer = quantizer
        self.use_lora = merged_weight is not None
        self.use_transform = transform is not None
        self.use_quant = quantizer is not None

    @property
    def base(self) -> nn.Linear:
        return self._base[0]

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def effective_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight (out, in) and bias (out,) this layer applies, before quantization."""
        weight = self._merged_weight(self.inner) if self.use_lora else self.base.weight
        bias = self.base.bias
        if self.use_transform:
            weight, bias = self.transform(weight, bias)
        return weight, bias

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Q(T(W + s·B·A)) and T(b): what the layer computes with and what a merge ships."""
        weight, bias = self.effective_weight()
        if self.use_quant:
            weight = self.quantizer(weight.float())
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.quantized_weight()
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, lora={self.use_lora}, " \
               f"transform={self.use_transform}, quant={self.use_quant}"
