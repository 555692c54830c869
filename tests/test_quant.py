"""Tests for mambaspin.quant: exactness, reference formulas, gradients, packing and config errors."""

from __future__ import annotations

import itertools

import pytest
import torch

from mambaspin.quant import (
    SCALE_FLOOR,
    ActFakeQuantizer,
    ActQuantConfig,
    WeightFakeQuantizer,
    WeightQuantConfig,
    dequantize_activation,
    dequantize_weight,
    fake_quantize_activation,
    fake_quantize_weight,
    pack_int4,
    quantize_activation,
    quantize_weight,
    unpack_int4,
)

WEIGHT_BITS = (2, 3, 4, 8)
ACT_BITS = (4, 8, 16)
WEIGHT_LAYOUTS = (("per_channel", None), ("per_group", 16))
ACT_MODES = (("per_token", True), ("per_tensor", True), ("per_tensor", False))


def make_weight(out_features: int = 12, in_features: int = 64, seed: int = 0) -> torch.Tensor:
    """Gaussian weight with a few outliers and a shifted row, so asymmetric ranges differ from symmetric."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator)
    w[0, 3] = 9.0
    w[1] += 2.0
    w[2, 10] = -7.5
    return w


def make_activation(seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 32, generator=generator) * 3.0
    x[0, 1, 4] = 40.0
    x[1, 2] += 5.0
    return x


def static_scale_zero(x: torch.Tensor, cfg: ActQuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    quantizer = ActFakeQuantizer(cfg)
    quantizer.observe(x)
    quantizer.freeze()
    return quantizer.scale, (None if cfg.symmetric else quantizer.zero)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype == torch.float32
    assert torch.equal(actual, expected)
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


# ---------------------------------------------------------------------------
# Exactness: fake quantization equals quantize then dequantize
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("granularity,group_size", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("clip", (None, 0.7))
def test_fake_weight_matches_quant_dequant(bits, symmetric, granularity, group_size, clip):
    cfg = WeightQuantConfig(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    w = make_weight()

    fake = fake_quantize_weight(w, cfg, clip)
    q, scale, zero = quantize_weight(w, cfg, clip)
    reference = dequantize_weight(q, scale, zero, cfg)

    assert_bitwise_equal(fake, reference)


@pytest.mark.parametrize("bits", ACT_BITS)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("granularity,dynamic", ACT_MODES)
def test_fake_activation_matches_quant_dequant(bits, symmetric, granularity, dynamic):
    cfg = ActQuantConfig(bits=bits, symmetric=symmetric, granularity=granularity, dynamic=dynamic, clip_ratio=0.9)
    x = make_activation()
    scale, zero = (None, None) if dynamic else static_scale_zero(x, cfg)

    fake = fake_quantize_activation(x, cfg, scale, zero)
    q, used_scale, used_zero = quantize_activation(x, cfg, scale, zero)
    reference = dequantize_activation(q, used_scale, used_zero, cfg)

    assert_bitwise_equal(fake, reference)


def test_code_dtypes_and_shapes():
    w = make_weight()
    q, scale, zero = quantize_weight(w, WeightQuantConfig(bits=4, granularity="per_group", group_size=16))
    assert q.dtype == torch.int8
    assert q.shape == w.shape
    assert scale.shape == (12, 4, 1)
    assert zero is None

    q, scale, zero = quantize_weight(w, WeightQuantConfig(bits=4, symmetric=False))
    assert q.dtype == torch.uint8
    assert scale.shape == (12, 1)
    assert zero.dtype == torch.uint8
    assert zero.shape == (12, 1)

    x = make_activation()
    q, scale, zero = quantize_activation(x, ActQuantConfig(bits=16, symmetric=False))
    assert q.dtype == torch.int32
    assert scale.shape == (2, 5, 1)
    assert zero.dtype == torch.int32
    q, scale, _ = quantize_activation(x, ActQuantConfig(bits=8, granularity="per_tensor"))
    assert q.dtype == torch.int8
    assert scale.shape == ()


# ---------------------------------------------------------------------------
# Slow loop references with the formulas written out
# ---------------------------------------------------------------------------


def reference_quantize_group(values: torch.Tensor, bits: int, symmetric: bool, clip: float):
    """Quantize one 1-D group element by element with the documented formulas (float32 scalars)."""
    clip_tensor = torch.tensor(clip, dtype=torch.float32)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax
        absmax = max(values.abs().tolist())
        scale = torch.maximum(clip_tensor * torch.tensor(absmax) / qmax, torch.tensor(SCALE_FLOOR))
        zero = torch.tensor(0.0)
    else:
        qmin, qmax = 0, 2**bits - 1
        low = clip_tensor * torch.tensor(min(min(values.tolist()), 0.0))
        high = clip_tensor * torch.tensor(max(max(values.tolist()), 0.0))
        scale = torch.maximum((high - low) / qmax, torch.tensor(SCALE_FLOOR))
        zero = torch.round(-low / scale).clamp(0, qmax)
    codes = []
    for value in values:
        code = torch.round(value / scale) + zero
        codes.append(int(min(max(code.item(), qmin), qmax)))
    return codes, scale, zero


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("granularity,group_size", WEIGHT_LAYOUTS)
def test_weight_matches_loop_reference(bits, symmetric, granularity, group_size):
    cfg = WeightQuantConfig(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    w = make_weight(out_features=6, in_features=32)
    clip = 0.8
    q, scale, zero = quantize_weight(w, cfg, clip)
    w_hat = dequantize_weight(q, scale, zero, cfg)

    width = group_size or w.shape[1]
    for row, start in itertools.product(range(w.shape[0]), range(0, w.shape[1], width)):
        columns = slice(start, start + width)
        codes, ref_scale, ref_zero = reference_quantize_group(w[row, columns], bits, symmetric, clip)
        group = start // width
        got_scale = scale[row, group, 0] if granularity == "per_group" else scale[row, 0]
        assert q[row, columns].tolist() == codes
        assert got_scale.item() == ref_scale.item()
        if not symmetric:
            got_zero = zero[row, group, 0] if granularity == "per_group" else zero[row, 0]
            assert got_zero.item() == ref_zero.item()
        expected = [(code - ref_zero.item()) * ref_scale.item() for code in codes]
        torch.testing.assert_close(w_hat[row, columns], torch.tensor(expected), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", ACT_BITS)
@pytest.mark.parametrize("symmetric", (True, False))
def test_per_token_matches_loop_reference(bits, symmetric):
    cfg = ActQuantConfig(bits=bits, symmetric=symmetric, clip_ratio=0.9)
    x = make_activation()
    q, scale, _ = quantize_activation(x, cfg)

    for batch, position in itertools.product(range(x.shape[0]), range(x.shape[1])):
        codes, ref_scale, _ = reference_quantize_group(x[batch, position], bits, symmetric, 0.9)
        assert q[batch, position].tolist() == codes
        assert scale[batch, position, 0].item() == ref_scale.item()


def test_per_tensor_dynamic_matches_flat_reference():
    cfg = ActQuantConfig(bits=8, symmetric=False, granularity="per_tensor")
    x = make_activation()
    q, scale, zero = quantize_activation(x, cfg)

    codes, ref_scale, ref_zero = reference_quantize_group(x.flatten(), 8, False, 1.0)
    assert q.flatten().tolist() == codes
    assert scale.item() == ref_scale.item()
    assert zero.item() == ref_zero.item()


# ---------------------------------------------------------------------------
# Grid properties
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("symmetric", (True, False))
def test_levels_per_row_within_bits(bits, symmetric):
    cfg = WeightQuantConfig(bits=bits, symmetric=symmetric)
    w = make_weight(in_features=512)
    w_hat = fake_quantize_weight(w, cfg)
    q, _, _ = quantize_weight(w, cfg)

    for row in range(w.shape[0]):
        assert torch.unique(w_hat[row]).numel() <= 2**bits
    assert int(q.min()) >= cfg.qmin
    assert int(q.max()) <= cfg.qmax
    if symmetric:
        assert cfg.qmin == -(2 ** (bits - 1) - 1)
    else:
        assert (cfg.qmin, cfg.qmax) == (0, 2**bits - 1)


@pytest.mark.parametrize("bits", WEIGHT_BITS)
@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("granularity,group_size", WEIGHT_LAYOUTS)
def test_weight_error_within_half_scale(bits, symmetric, granularity, group_size):
    cfg = WeightQuantConfig(bits=bits, symmetric=symmetric, granularity=granularity, group_size=group_size)
    w = make_weight()
    q, scale, zero = quantize_weight(w, cfg)
    w_hat = dequantize_weight(q, scale, zero, cfg)

    if granularity == "per_group":
        per_element_scale = scale.expand(-1, -1, group_size).reshape(w.shape)
    else:
        per_element_scale = scale.expand_as(w)
    error = (w - w_hat).abs()
    # clip = 1 puts every value inside the range, so only rounding error remains.
    assert torch.all(error <= per_element_scale / 2 * (1 + 1e-5))


@pytest.mark.parametrize("bits", ACT_BITS)
@pytest.mark.parametrize("granularity,dynamic", ACT_MODES)
def test_activation_error_within_half_scale(bits, granularity, dynamic):
    cfg = ActQuantConfig(bits=bits, granularity=granularity, dynamic=dynamic)
    x = make_activation()
    scale, zero = (None, None) if dynamic else static_scale_zero(x, cfg)
    q, used_scale, used_zero = quantize_activation(x, cfg, scale, zero)
    x_hat = dequantize_activation(q, used_scale, used_zero, cfg)

    error = (x - x_hat).abs()
    assert torch.all(error <= used_scale / 2 * (1 + 1e-4) + 1e-7)


# ---------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", (True, False))
def test_weight_ste_identity_inside_zero_outside(symmetric):
    cfg = WeightQuantConfig(bits=4, symmetric=symmetric)
    w = make_weight().requires_grad_(True)
    clip = 0.5
    upstream = torch.randn_like(w)

    fake_quantize_weight(w, cfg, clip).backward(upstream)

    q, scale, zero = quantize_weight(w.detach(), cfg, clip)
    zero = torch.zeros_like(scale) if zero is None else zero.float()
    low = (cfg.qmin - zero) * scale
    high = (cfg.qmax - zero) * scale
    # The clamp acts after rounding, so the gradient passes up to half a step beyond the
    # last code. Stay a quarter step clear of that edge on both sides.
    inside = (w.detach() > low - scale / 4) & (w.detach() < high + scale / 4)
    outside = (w.detach() < low - 3 * scale / 4) | (w.detach() > high + 3 * scale / 4)
    assert inside.sum() > 0
    assert outside.sum() > 0
    torch.testing.assert_close(w.grad[inside], upstream[inside], rtol=1e-6, atol=0)
    assert torch.all(w.grad[outside] == 0)


@pytest.mark.parametrize("granularity,dynamic", ACT_MODES)
def test_activation_ste_identity_inside(granularity, dynamic):
    cfg = ActQuantConfig(bits=8, granularity=granularity, dynamic=dynamic)
    x = make_activation()
    scale, zero = (None, None) if dynamic else static_scale_zero(x, cfg)
    x = x.requires_grad_(True)
    upstream = torch.randn_like(x)

    fake_quantize_activation(x, cfg, scale, zero).backward(upstream)

    _, used_scale, _ = quantize_activation(x.detach(), cfg, scale, zero)
    inside = x.detach().abs() < (cfg.qmax - 0.5) * used_scale
    assert inside.sum() > x.numel() // 2
    torch.testing.assert_close(x.grad[inside], upstream[inside], rtol=1e-6, atol=0)


def test_static_activation_zero_grad_outside_range():
    cfg = ActQuantConfig(bits=8, granularity="per_tensor", dynamic=False)
    scale = torch.tensor(0.01)  # range [-1.27, 1.27]
    x = torch.tensor([0.5, -0.5, 3.0, -3.0], requires_grad=True)

    fake_quantize_activation(x, cfg, scale).sum().backward()

    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("granularity,group_size", WEIGHT_LAYOUTS)
def test_learnable_clip_gets_gradient(symmetric, granularity, group_size):
    cfg = WeightQuantConfig(
        bits=4, symmetric=symmetric, granularity=granularity, group_size=group_size, learnable_clip=True, clip_init=0.9
    )
    quantizer = WeightFakeQuantizer(cfg, 12, 64, name="layers.0.mixer.in_proj")
    w = make_weight()
    expected_shape = (12, 1) if granularity == "per_channel" else (12, 4, 1)
    assert quantizer.clip.shape == expected_shape
    assert torch.all(quantizer.clip == 0.9)

    loss = (quantizer(w) - w).pow(2).sum()
    loss.backward()

    grad = quantizer.clip.grad
    assert grad is not None
    assert torch.all(torch.isfinite(grad))
    assert grad.abs().sum() > 0
    assert torch.equal(quantizer(w), fake_quantize_weight(w, cfg, quantizer.clip.detach()))


def test_clip_above_one_keeps_gradient():
    cfg = WeightQuantConfig(bits=4, learnable_clip=True)
    quantizer = WeightFakeQuantizer(cfg, 12, 64)
    w = make_weight()
    with torch.no_grad():
        quantizer.clip.fill_(1.5)

    out = quantizer(w)
    (out - w).pow(2).sum().backward()

    assert torch.equal(out, fake_quantize_weight(w, cfg, 1.0))
    assert quantizer.clip.grad.abs().sum() > 0


def test_static_scale_tensor_gets_gradient():
    cfg = ActQuantConfig(bits=4, granularity="per_tensor", dynamic=False)
    x = make_activation()
    scale = torch.tensor(0.5, requires_grad=True)

    (fake_quantize_activation(x, cfg, scale) - x).pow(2).sum().backward()

    assert torch.isfinite(scale.grad)
    assert scale.grad != 0


# ---------------------------------------------------------------------------
# Degenerate inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("granularity,group_size", WEIGHT_LAYOUTS)
def test_zero_rows_give_no_nan(symmetric, granularity, group_size):
    cfg = WeightQuantConfig(
        bits=4, symmetric=symmetric, granularity=granularity, group_size=group_size, learnable_clip=True
    )
    w = make_weight()
    w[3] = 0.0
    w[5, :16] = 0.0
    quantizer = WeightFakeQuantizer(cfg, 12, 64)
    w.requires_grad_(True)

    out = quantizer(w)
    out.sum().backward()
    q, scale, zero = quantize_weight(w.detach(), cfg)

    assert torch.all(torch.isfinite(out))
    assert torch.all(out[3] == 0)
    assert torch.all(out[5, :16] == 0)
    assert torch.all(torch.isfinite(w.grad))
    assert torch.all(torch.isfinite(quantizer.clip.grad))
    assert torch.all(scale >= SCALE_FLOOR)
    assert torch.all(torch.isfinite(dequantize_weight(q, scale, zero, cfg)))


@pytest.mark.parametrize("symmetric", (True, False))
@pytest.mark.parametrize("granularity", ("per_token", "per_tensor"))
def test_zero_activations_give_no_nan(symmetric, granularity):
    cfg = ActQuantConfig(bits=8, symmetric=symmetric, granularity=granularity)
    x = torch.zeros(2, 3, 8, requires_grad=True)

    out = fake_quantize_activation(x, cfg)
    out.sum().backward()

    assert torch.all(out == 0)
    assert torch.all(torch.isfinite(x.grad))


# ---------------------------------------------------------------------------
# int4 packing
# ---------------------------------------------------------------------------


def test_pack_int4_round_trip_signed():
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 16)
    unpacked = unpack_int4(packed, signed=True)
    assert unpacked.dtype == torch.int8
    assert torch.equal(unpacked, codes)


def test_pack_int4_round_trip_unsigned():
    codes = torch.arange(0, 16, dtype=torch.uint8).flip(0).repeat(2, 1, 1)
    unpacked = unpack_int4(pack_int4(codes), signed=False)
    assert unpacked.dtype == torch.uint8
    assert torch.equal(unpacked, codes)


def test_pack_int4_nibble_order():
    packed = pack_int4(torch.tensor([1, 2, 15, 0], dtype=torch.uint8))
    assert packed.tolist() == [0x21, 0x0F]


@pytest.mark.parametrize("symmetric", (True, False))
def test_pack_quantized_weight_round_trip(symmetric):
    cfg = WeightQuantConfig(bits=4, symmetric=symmetric, granularity="per_group", group_size=16)
    q, _, _ = quantize_weight(make_weight(), cfg)
    assert torch.equal(unpack_int4(pack_int4(q), signed=symmetric), q)


def test_pack_int4_rejects_odd_last_dim():
    with pytest.raises(ValueError, match=r"even last dimension.*\(3, 5\)"):
        pack_int4(torch.zeros(3, 5, dtype=torch.int8))


def test_pack_int4_rejects_out_of_range():
    with pytest.raises(ValueError, match="from -3 to 9"):
        pack_int4(torch.tensor([-3, 9], dtype=torch.int8))
    with pytest.raises(ValueError, match="from 0 to 16"):
        pack_int4(torch.tensor([0, 16], dtype=torch.int32))
    with pytest.raises(ValueError, match="integer codes"):
        pack_int4(torch.zeros(4))


# ---------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", (1, 9, 4.0, True))
def test_weight_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=rf"weight bits={bits!r} is out of range.*quant\.weight\.bits"):
        WeightQuantConfig(bits=bits)


@pytest.mark.parametrize("bits", (3, 17))
def test_activation_bits_out_of_range(bits):
    with pytest.raises(ValueError, match=rf"activation bits={bits} is out of range.*4 to 16"):
        ActQuantConfig(bits=bits)


def test_group_size_not_dividing_names_layer():
    cfg = WeightQuantConfig(bits=4, granularity="per_group", group_size=128)
    with pytest.raises(ValueError) as info:
        cfg.check_shape(1536, 200, "layers.3.mixer.out_proj")
    message = str(info.value)
    assert "layers.3.mixer.out_proj" in message
    assert "in_features=200" in message
    assert "out_features=1536" in message
    assert "group_size=128" in message
    assert "100" in message


def test_group_size_checked_by_module_and_function():
    cfg = WeightQuantConfig(bits=4, granularity="per_group", group_size=24)
    with pytest.raises(ValueError, match="in_features=64"):
        WeightFakeQuantizer(cfg, 12, 64, name="proj")
    with pytest.raises(ValueError, match="group_size=24 does not divide"):
        quantize_weight(make_weight(), cfg)


@pytest.mark.parametrize("group_size", (None, 0, -8))
def test_per_group_needs_positive_group_size(group_size):
    with pytest.raises(ValueError, match="group_size"):
        WeightQuantConfig(bits=4, granularity="per_group", group_size=group_size)


def test_per_channel_rejects_group_size():
    with pytest.raises(ValueError, match="group_size=64 is only used with granularity='per_group'"):
        WeightQuantConfig(bits=4, group_size=64)


def test_granularity_typo_suggests_choice():
    with pytest.raises(ValueError, match="granularity='per_grup'.*Did you mean 'per_group'"):
        WeightQuantConfig(bits=4, granularity="per_grup")


@pytest.mark.parametrize("clip_init", (0.0, 1.5, -0.1))
def test_clip_init_out_of_range(clip_init):
    with pytest.raises(ValueError, match=rf"clip_init={clip_init!r} is out of range"):
        WeightQuantConfig(bits=4, clip_init=clip_init)


def test_clip_ratio_out_of_range():
    with pytest.raises(ValueError, match=r"clip_ratio=1\.2 is out of range"):
        ActQuantConfig(bits=8, clip_ratio=1.2)


def test_per_token_static_rejected():
    with pytest.raises(ValueError, match="granularity='per_token' with dynamic=False"):
        ActQuantConfig(bits=8, granularity="per_token", dynamic=False)


def test_from_dict_unknown_key_suggests():
    with pytest.raises(ValueError, match=r"unknown key 'group_sise' \(did you mean 'group_size'\?\)"):
        WeightQuantConfig.from_dict({"bits": 4, "granularity": "per_group", "group_sise": 128})
    with pytest.raises(ValueError, match=r"'clip_ration' \(did you mean 'clip_ratio'\?\).*Valid keys: bits"):
        ActQuantConfig.from_dict({"bits": 8, "clip_ration": 0.9})


def test_from_dict_builds_and_requires_bits():
    cfg = WeightQuantConfig.from_dict({"bits": 4, "granularity": "per_group", "group_size": 128})
    assert cfg == WeightQuantConfig(bits=4, granularity="per_group", group_size=128)
    act = ActQuantConfig.from_dict({"bits": 8, "granularity": "per_tensor", "dynamic": False})
    assert act.static
    with pytest.raises(ValueError, match="missing key 'bits' in quant.act"):
        ActQuantConfig.from_dict({"granularity": "per_tensor"})


def test_configs_are_frozen():
    cfg = WeightQuantConfig(bits=4)
    with pytest.raises(AttributeError):
        cfg.bits = 8


# ---------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------


def test_static_quantizer_requires_freeze():
    cfg = ActQuantConfig(bits=8, granularity="per_tensor", dynamic=False)
    quantizer = ActFakeQuantizer(cfg)
    x = make_activation()
    with pytest.raises(RuntimeError, match="before freeze"):
        quantizer(x)
    with pytest.raises(RuntimeError, match="no observed values"):
        quantizer.freeze()


def test_static_quantizer_calibrates_and_freezes():
    cfg = ActQuantConfig(bits=8, granularity="per_tensor", dynamic=False, clip_ratio=0.5)
    quantizer = ActFakeQuantizer(cfg)
    x = make_activation()

    first, second = x[0], x[1]
    quantizer.calibrating = True
    assert quantizer(first) is first
    assert quantizer(second) is second
    quantizer.calibrating = False
    quantizer.freeze()

    absmax = x.abs().max()
    assert quantizer.scale.item() == pytest.approx((0.5 * absmax / 127).item(), rel=1e-6)
    assert torch.equal(quantizer(x), fake_quantize_activation(x, cfg, quantizer.scale))


def test_static_quantizer_state_dict_keeps_frozen():
    cfg = ActQuantConfig(bits=8, symmetric=False, granularity="per_tensor", dynamic=False)
    quantizer = ActFakeQuantizer(cfg)
    x = make_activation()
    quantizer.observe(x)
    quantizer.freeze()

    restored = ActFakeQuantizer(cfg)
    restored.load_state_dict(quantizer.state_dict())

    assert restored.frozen
    assert torch.equal(restored(x), quantizer(x))


def test_dynamic_quantizer_rejects_observe():
    quantizer = ActFakeQuantizer(ActQuantConfig(bits=8))
    with pytest.raises(ValueError, match="only for static per_tensor"):
        quantizer.observe(make_activation())


def test_scale_argument_checks():
    x = make_activation()
    with pytest.raises(ValueError, match="scale is missing"):
        quantize_activation(x, ActQuantConfig(bits=8, granularity="per_tensor", dynamic=False))
    with pytest.raises(ValueError, match="computes its own scale"):
        fake_quantize_activation(x, ActQuantConfig(bits=8), scale=torch.tensor(0.1))
    static_asym = ActQuantConfig(bits=8, symmetric=False, granularity="per_tensor", dynamic=False)
    with pytest.raises(ValueError, match="zero is missing"):
        quantize_activation(x, static_asym, scale=torch.tensor(0.1))


def test_disabled_quantizers_return_input():
    w = make_weight()
    x = make_activation()
    weight_quantizer = WeightFakeQuantizer(WeightQuantConfig(bits=4, learnable_clip=True), 12, 64)
    act_quantizer = ActFakeQuantizer(ActQuantConfig(bits=4, granularity="per_tensor", dynamic=False))
    assert not torch.equal(weight_quantizer(w), w)

    weight_quantizer.enabled = False
    act_quantizer.enabled = False

    assert weight_quantizer(w) is w
    assert act_quantizer(x) is x


def test_weight_quantizer_rejects_wrong_shape():
    quantizer = WeightFakeQuantizer(WeightQuantConfig(bits=4), 12, 64, name="proj")
    with pytest.raises(ValueError, match=r"proj.*\(12, 64\).*\(64, 12\)"):
        quantizer(make_weight().t())


def test_extra_repr_shows_bits_and_granularity():
    weight_repr = repr(WeightFakeQuantizer(WeightQuantConfig(bits=4, granularity="per_group", group_size=16), 12, 64))
    act_repr = repr(ActFakeQuantizer(ActQuantConfig(bits=8, granularity="per_tensor", dynamic=False)))
    assert "bits=4" in weight_repr
    assert "granularity=per_group" in weight_repr
    assert "group_size=16" in weight_repr
    assert "bits=8" in act_repr
    assert "granularity=per_tensor" in act_repr
    assert "frozen=False" in act_repr
