"""GPTQ against round-to-nearest: same grid, lower output error on correlated inputs."""

import pytest
import torch

from mambaspin.gptq import HessianAccumulator, gptq_quantize
from mambaspin.quant import WeightQuantConfig, dequantize_weight, quantize_weight

CONFIGS = [
    WeightQuantConfig(bits=4),
    WeightQuantConfig(bits=4, symmetric=False),
    WeightQuantConfig(bits=3, granularity="per_group", group_size=32),
    WeightQuantConfig(bits=8),
]


def correlated_inputs(n: int = 2048, dim: int = 96, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=generator, dtype=torch.float64) * 0.3
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) @ mixing + torch.randn(
        n, dim, generator=generator, dtype=torch.float64)


def weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(64, 96, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def output_error(x, w, w_hat) -> float:
    return float(((x @ w_hat.T - x @ w.T) ** 2).mean())


def test_hessian_accumulator_matches_formula():
    x = correlated_inputs()
    accumulator = HessianAccumulator(96)
    accumulator.update(x[:1000])
    accumulator.update(x[1000:].reshape(2, -1, 96))
    assert torch.allclose(accumulator.hessian(), 2 * x.T @ x / x.shape[0])


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.bits}bit-{c.granularity}-sym{c.symmetric}")
def test_gptq_identity_hessian_equals_rtn(cfg):
    w = weight()
    codes, scale, zero = gptq_quantize(w, torch.eye(96, dtype=torch.float64) * 2, cfg)
    assert torch.equal(dequantize_weight(codes, scale, zero, cfg), dequantize_weight(*quantize_weight(w, cfg), cfg))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.bits}bit-{c.granularity}-sym{c.symmetric}")
def test_gptq_beats_rtn_on_correlated_inputs(cfg):
    x, w = correlated_inputs(), weight()
    accumulator = HessianAccumulator(96)
    accumulator.update(x)
    gptq = dequantize_weight(*gptq_quantize(w, accumulator.hessian(), cfg), cfg)
    rtn = dequantize_weight(*quantize_weight(w, cfg), cfg)
    assert output_error(x, w, gptq) < output_error(x, w, rtn)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.bits}bit-{c.granularity}-sym{c.symmetric}")
def test_gptq_codes_stay_on_grid(cfg):
    accumulator = HessianAccumulator(96)
    accumulator.update(correlated_inputs())
    codes, _, _ = gptq_quantize(weight(), accumulator.hessian(), cfg)
    assert int(codes.min()) >= cfg.qmin
    assert int(codes.max()) <= cfg.qmax


def test_hessian_without_samples_rejected():
    with pytest.raises(ValueError, match="no calibration inputs"):
        HessianAccumulator(8).hessian()
