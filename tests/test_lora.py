"""LoRA adapters on a tiny random MambaLM: injection, refusals, merged weights, rotated factors.

The rotation tests check, per site, that rotating the merged weight W + s·B·A with the
`rotations.fold` weight functions equals rotating the base weight and adding s·B'·A', where
(A', B') come from the factor helpers. They run in float64 with a tolerance of 1e-10.
"""

from __future__ import annotations


import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from conftest import perturb_parameters
from lora.adapters import (
    LoraSettings,
    add_lora,
    base_linear,
    load_lora_state_dict,
    lora_disabled,
    lora_factors,
    lora_state_dict,
    merged_weight,
    rotate_dt_proj_factors,
    rotate_in_proj_factors,
    rotate_lm_head_factors,
    rotate_lora_factors,
    rotate_out_proj_factors,
    rotate_x_proj_factors,
    set_lora_enabled,
)
from mambaspin.config import MambaConfig
from mambaspin.errors import UserError
from mambaspin.model import MambaLM
from rotations.fold import fold_residual, rotate_dt_proj, rotate_in_proj, rotate_out_proj, rotate_x_proj
from rotations.hadamard import random_orthogonal

VOCAB = 101
D_MODEL = 48
D_INNER = 96
D_STATE = 8
DT_RANK = 3
N_LAYER = 2
ALL_LINEARS = ("in_proj", "x_proj", "dt_proj", "out_proj", "lm_head")
ROTATION_TOLERANCE = 1e-10


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32, tie: bool = True) -> MambaLM:
    """Build a tiny MambaLM with seeded, perturbed parameters, in eval mode."""
    torch.manual_seed(seed)
    config = MambaConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layer=N_LAYER, d_state=D_STATE, dt_rank=DT_RANK,
                         tie_embeddings=tie)
    model = MambaLM(config)
    perturb_parameters(model, seed)
    return model.to(dtype).eval()


def randomize_lora_b(model: nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Give every LoRA B a seeded random value, so the adapters change the model's function."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if ".lora_B." in name:
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.copy_(scale * noise.to(parameter.dtype))


def logits_of(model: MambaLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.fixture
def ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(123)
    return torch.randint(0, VOCAB, (2, 12), generator=generator)


# ---------------------------------------------------------------------------------------------
# Settings


@pytest.mark.parametrize(
    "options",
    [
        {"rank": 0},
        {"rank": -2},
        {"rank": True},
        {"alpha": 0.0},
        {"alpha": -1.0},
        {"dropout": 1.0},
        {"dropout": -0.1},
        {"targets": ()},
        {"targets": "in_proj"},
        {"targets": ("in_proj", "")},
    ],
)
def test_settings_reject_invalid(options):
    with pytest.raises(UserError):
        LoraSettings(**options)


def test_settings_defaults_and_scaling():
    settings = LoraSettings(rank=4, alpha=8.0, targets=["in_proj", "out_proj"])
    assert settings.scaling == 2.0
    assert settings.targets == ("in_proj", "out_proj")
    assert LoraSettings().targets == ("in_proj", "x_proj", "dt_proj", "out_proj")


# ---------------------------------------------------------------------------------------------
# Injection


def test_injection_keeps_logits(ids):
    model = make_model()
    expected = logits_of(model, ids)

    add_lora(model, LoraSettings(rank=2, targets=ALL_LINEARS))

    torch.testing.assert_close(logits_of(model, ids), expected, rtol=0, atol=0)


def test_injection_keeps_module_names():
    model = make_model()
    add_lora(model, LoraSettings(rank=2, targets=ALL_LINEARS))

    for mixer in model.mixers:
        for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            layer = getattr(mixer, name)
            assert isinstance(layer, LoraLinear)
            assert type(layer.base_layer) is nn.Linear
    assert isinstance(model.lm_head, LoraLinear)
    assert isinstance(model.mixers[0].conv1d, nn.Conv1d)
    names = {name for name, _ in model.named_modules()}
    assert "backbone.layers.0.mixer.in_proj" in names
    assert "backbone.layers.1.mixer.dt_proj.base_layer" in names


def test_injection_on_a_single_layer():
    model = make_model()
    add_lora(model, LoraSettings(rank=2, targets=("backbone.layers.1.mixer.x_proj",)))

    assert isinstance(model.mixers[1].x_proj, LoraLinear)
    assert type(model.mixers[0].x_proj) is nn.Linear


def test_random_b_changes_logits(ids):
    model = make_model()
    base_logits = logits_of(model, ids)
    add_lora(model, LoraSettings(rank=2, targets=ALL_LINEARS))
    randomize_lora_b(model)

    adapted_logits = logits_of(model, ids)
    assert (adapted_logits - base_logits).abs().max() > 1e-3

    with lora_disabled(model):
        torch.testing.assert_close(logits_of(model, ids), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits_of(model, ids), adapted_logits, rtol=0, atol=0)


def test_set_lora_enabled_keeps_grad_flags(ids):
    model = make_model()
    base_logits = logits_of(model, ids)
    add_lora(model, LoraSettings(rank=2))
    randomize_lora_b(model)
    adapted_logits = logits_of(model, ids)
    frozen_a = model.mixers[0].in_proj.lora_A["default"].weight
    frozen_a.requires_grad_(False)
    flags = {name: parameter.requires_grad for name, parameter in model.named_parameters()}

    set_lora_enabled(model, False)
    torch.testing.assert_close(logits_of(model, ids), base_logits, rtol=0, atol=0)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags

    set_lora_enabled(model, True)
    torch.testing.assert_close(logits_of(model, ids), adapted_logits, rtol=0, atol=0)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_lora_disabled_keeps_disabled_state(ids):
    model = make_model()
    base_logits = logits_of(model, ids)
    add_lora(model, LoraSettings(rank=2))
    randomize_lora_b(model)
    set_lora_enabled(model, False)

    with lora_disabled(model):
        pass

    torch.testing.assert_close(logits_of(model, ids), base_logits, rtol=0, atol=0)


def test_only_lora_factors_trainable():
    model = make_model()
    add_lora(model, LoraSettings(rank=2, targets=ALL_LINEARS))

    trainable = sorted(name for name, parameter in model.named_parameters() if parameter.requires_grad)
    expected_count = 2 * (4 * N_LAYER + 1)
    assert len(trainable) == expected_count
    for name in trainable:
        assert ".lora_A.default." in name or ".lora_B.default." in name
    assert not model.backbone.embeddings.weight.requires_grad
    assert not model.mixers[0].conv1d.weight.requires_grad
    assert not model.mixers[0].A_log.requires_grad
    assert not model.mixers[0].in_proj.base_layer.weight.requires_grad
    assert not model.mixers[0].dt_proj.base_layer.bias.requires_grad


def test_backward_reaches_only_lora_factors(ids):
    model = make_model()
    add_lora(model, LoraSettings(rank=2))
    randomize_lora_b(model)

    model(ids).square().mean().backward()

    layer = model.mixers[0].x_proj
    assert layer.lora_A["default"].weight.grad.abs().max() > 0
    assert layer.lora_B["default"].weight.grad.abs().max() > 0
    assert layer.base_layer.weight.grad is None


# ---------------------------------------------------------------------------------------------
# Refusals


def test_add_lora_rejects_conv1d():
    model = make_model()
    with pytest.raises(UserError, match=r"LoRA on conv1d is not supported: .*backbone\.layers\.0\.mixer\.conv1d"):
        add_lora(model, LoraSettings(rank=2, targets=("in_proj", "conv1d")))
    assert type(model.mixers[0].in_proj) is nn.Linear


def test_add_lora_rejects_unknown_name():
    model = make_model()
    with pytest.raises(UserError, match=r"'q_proj' matches no module.*in_proj, x_proj, dt_proj, out_proj, lm_head"):
        add_lora(model, LoraSettings(rank=2, targets=("q_proj",)))


def test_add_lora_rejects_non_linear_module():
    model = make_model()
    with pytest.raises(UserError, match=r"backbone\.layers\.0\.norm, a RMSNorm"):
        add_lora(model, LoraSettings(rank=2, targets=("norm",)))


def test_add_lora_rejects_rank_above_dt_rank():
    model = make_model()
    with pytest.raises(UserError, match=r"rank 4 .*backbone\.layers\.0\.mixer\.dt_proj .*\(96, 3\).*max rank there is 3"):
        add_lora(model, LoraSettings(rank=4, targets=("in_proj", "dt_proj")))
    assert type(model.mixers[0].in_proj) is nn.Linear


def test_add_lora_accepts_rank_at_max():
    model = make_model()
    add_lora(model, LoraSettings(rank=DT_RANK, targets=("dt_proj",)))
    a, b, scaling = lora_factors(model.mixers[0].dt_proj)
    assert a.shape == (DT_RANK, DT_RANK)
    assert b.shape == (D_INNER, DT_RANK)


def test_add_lora_rejects_second_call():
    model = make_model()
    add_lora(model, LoraSettings(rank=2))
    with pytest.raises(UserError, match="already carries LoRA adapters"):
        add_lora(model, LoraSettings(rank=2, targets=("lm_head",)))


# ---------------------------------------------------------------------------------------------
# Factors and merged weight


def test_lora_factors_shapes_and_scaling():
    model = make_model()
    add_lora(model, LoraSettings(rank=4, alpha=6.0, targets=("x_proj",)))
    layer = model.mixers[0].x_proj

    a, b, scaling = lora_factors(layer)

    assert a.shape == (4, D_INNER)
    assert b.shape == (DT_RANK + 2 * D_STATE, 4)
    assert scaling == 1.5
    assert a is layer.lora_A["default"].weight
    assert base_linear(layer) is layer.base_layer


def test_lora_factors_of_plain_linear():
    linear = nn.Linear(5, 3)
    assert lora_factors(linear) is None
    assert base_linear(linear) is linear
    with pytest.raises(TypeError):
        lora_factors(nn.Conv1d(2, 2, 3))


def test_merged_weight_formula_and_gradient():
    model = make_model(dtype=torch.float64)
    add_lora(model, LoraSettings(rank=3, alpha=5.0, targets=("out_proj",)))
    randomize_lora_b(model)
    layer = model.mixers[1].out_proj
    a, b, scaling = lora_factors(layer)

    merged = merged_weight(layer)

    assert merged.dtype == torch.float64
    expected = layer.base_layer.weight + scaling * b @ a
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-14)
    merged.square().sum().backward()
    assert a.grad is not None
    assert a.grad.abs().max() > 0
    assert b.grad is not None
    assert b.grad.abs().max() > 0
    assert layer.base_layer.weight.grad is None


def test_merged_weight_float32_for_plain_linear():
    linear = nn.Linear(4, 6).to(torch.bfloat16)
    merged = merged_weight(linear)
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, linear.weight.float(), rtol=0, atol=0)


def test_merged_weight_rejects_non_finite():
    model = make_model()
    add_lora(model, LoraSettings(rank=2, targets=("in_proj",)))
    layer = model.mixers[0].in_proj
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")

    with pytest.raises(FloatingPointError, match=r"backbone\.layers\.0\.mixer\.in_proj.*LoRA B"):
        merged_weight(layer, name="backbone.layers.0.mixer.in_proj")


# ---------------------------------------------------------------------------------------------
# Merging then rotating equals rotating the factors then merging


@pytest.fixture
def rotated_model() -> MambaLM:
    """A float64 model with LoRA on every linear and random nonzero A and B."""
    model = make_model(dtype=torch.float64, tie=False)
    add_lora(model, LoraSettings(rank=3, alpha=7.0, targets=ALL_LINEARS))
    randomize_lora_b(model, scale=0.5)
    return model


@pytest.fixture
def site_tensors() -> dict[str, torch.Tensor]:
    """Random float64 rotations R1, R2, R4, R5, R6, a smoothing scale and norm weights."""
    generator = torch.Generator().manual_seed(7)
    return {
        "r1": random_orthogonal(D_MODEL, 1),
        "r2": random_orthogonal(D_INNER, 2),
        "r4": random_orthogonal(D_STATE, 4),
        "r5": random_orthogonal(DT_RANK, 5),
        "r6": random_orthogonal(D_INNER, 6),
        "smooth": torch.exp(0.3 * torch.randn(D_INNER, generator=generator, dtype=torch.float64)),
        "norm": 1.0 + 0.2 * torch.randn(D_MODEL, generator=generator, dtype=torch.float64),
    }


def merge_factors(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    return base + scaling * b @ a


def test_in_proj_merge_then_rotate(rotated_model, site_tensors):
    r1, smooth, norm = site_tensors["r1"], site_tensors["smooth"], site_tensors["norm"]
    layer = rotated_model.mixers[0].in_proj
    a, b, scaling = lora_factors(layer)

    expected, _ = rotate_in_proj(merged_weight(layer), None, r1, norm, smooth)
    rotated_base, _ = rotate_in_proj(layer.base_layer.weight, None, r1, norm, smooth)
    a_rot, b_rot = rotate_in_proj_factors(a, b, r1, norm, smooth)

    torch.testing.assert_close(merge_factors(rotated_base, a_rot, b_rot, scaling), expected,
                               rtol=0, atol=ROTATION_TOLERANCE)


@pytest.mark.parametrize("sites", [("r6", "r5", "r4"), ("r6",), ("r5",), ("r4",)])
def test_x_proj_merge_then_rotate(rotated_model, site_tensors, sites):
    rotations = {site: site_tensors[site] for site in sites}
    layer = rotated_model.mixers[1].x_proj
    a, b, scaling = lora_factors(layer)

    expected = rotate_x_proj(merged_weight(layer), DT_RANK, D_STATE, **rotations)
    rotated_base = rotate_x_proj(layer.base_layer.weight, DT_RANK, D_STATE, **rotations)
    a_rot, b_rot = rotate_x_proj_factors(a, b, DT_RANK, D_STATE, **rotations)

    torch.testing.assert_close(merge_factors(rotated_base, a_rot, b_rot, scaling), expected,
                               rtol=0, atol=ROTATION_TOLERANCE)
    torch.testing.assert_close(b_rot[DT_RANK:DT_RANK + D_STATE], b[DT_RANK:DT_RANK + D_STATE], rtol=0, atol=0)


def test_dt_proj_merge_then_rotate(rotated_model, site_tensors):
    r5 = site_tensors["r5"]
    layer = rotated_model.mixers[0].dt_proj
    a, b, scaling = lora_factors(layer)

    expected = rotate_dt_proj(merged_weight(layer), r5)
    rotated_base = rotate_dt_proj(layer.base_layer.weight, r5)
    a_rot, b_rot = rotate_dt_proj_factors(a, b, r5)

    torch.testing.assert_close(merge_factors(rotated_base, a_rot, b_rot, scaling), expected,
                               rtol=0, atol=ROTATION_TOLERANCE)


def test_out_proj_merge_then_rotate(rotated_model, site_tensors):
    r1, r2, smooth = site_tensors["r1"], site_tensors["r2"], site_tensors["smooth"]
    layer = rotated_model.mixers[1].out_proj
    a, b, scaling = lora_factors(layer)

    expected, _ = rotate_out_proj(merged_weight(layer), None, r1, r2, smooth)
    rotated_base, _ = rotate_out_proj(layer.base_layer.weight, None, r1, r2, smooth)
    a_rot, b_rot = rotate_out_proj_factors(a, b, r1, r2, smooth)

    torch.testing.assert_close(merge_factors(rotated_base, a_rot, b_rot, scaling), expected,
                               rtol=0, atol=ROTATION_TOLERANCE)


def test_lm_head_merge_then_rotate(rotated_model, site_tensors):
    r1, norm = site_tensors["r1"], site_tensors["norm"]
    layer = rotated_model.lm_head
    a, b, scaling = lora_factors(layer)
    merged_copy = make_model(dtype=torch.float64, tie=False)
    base_copy = make_model(dtype=torch.float64, tie=False)
    with torch.no_grad():
        for copy_model in (merged_copy, base_copy):
            copy_model.backbone.norm_f.weight.copy_(norm)
        merged_copy.lm_head.weight.copy_(merged_weight(layer))
        base_copy.lm_head.weight.copy_(layer.base_layer.weight)

    fold_residual(merged_copy, r1)
    fold_residual(base_copy, r1)
    a_rot, b_rot = rotate_lm_head_factors(a, b, r1, norm)

    torch.testing.assert_close(merge_factors(base_copy.lm_head.weight, a_rot, b_rot, scaling),
                               merged_copy.lm_head.weight, rtol=0, atol=ROTATION_TOLERANCE)


def test_rotate_lora_factors_generic(site_tensors):
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(2, D_INNER, generator=generator, dtype=torch.float64)
    b = torch.randn(D_MODEL, 2, generator=generator, dtype=torch.float64)
    weight = torch.randn(D_MODEL, D_INNER, generator=generator, dtype=torch.float64)
    r_in, r_out = site_tensors["r2"], site_tensors["r1"]

    a_rot, b_rot = rotate_lora_factors(a, b, r_in=r_in, r_out=r_out)

    expected = r_out.T @ (weight + b @ a) @ r_in
    torch.testing.assert_close(r_out.T @ weight @ r_in + b_rot @ a_rot, expected, rtol=0, atol=ROTATION_TOLERANCE)
    unchanged_a, unchanged_b = rotate_lora_factors(a, b)
    assert unchanged_a is a
    assert unchanged_b is b


# ---------------------------------------------------------------------------------------------
# State dict


def test_lora_state_dict_round_trip(ids):
    source = make_model()
    add_lora(source, LoraSettings(rank=2, targets=ALL_LINEARS))
    randomize_lora_b(source)
    state = {key: value.clone() for key, value in lora_state_dict(source).items()}
    target = make_model()
    add_lora(target, LoraSettings(rank=2, targets=ALL_LINEARS))

    load_lora_state_dict(target, state)

    assert len(state) == 2 * (4 * N_LAYER + 1)
    assert "backbone.layers.0.mixer.in_proj.lora_A.default.weight" in state
    assert all(".lora_A." in key or ".lora_B." in key for key in state)
    torch.testing.assert_close(logits_of(target, ids), logits_of(source, ids), rtol=0, atol=0)


def test_load_lora_state_dict_rejects_mismatch():
    model = make_model()
    add_lora(model, LoraSettings(rank=2))
    state = {key: value.clone() for key, value in lora_state_dict(model).items()}
    missing_key = "backbone.layers.1.mixer.dt_proj.lora_B.default.weight"

    missing = dict(state)
    del missing[missing_key]
    with pytest.raises(UserError, match=r"1 missing .*lora_B"):
        load_lora_state_dict(model, missing)

    unexpected = dict(state)
    unexpected["lm_head.lora_A.default.weight"] = torch.zeros(2, D_MODEL)
    with pytest.raises(UserError, match=r"1 unexpected .*lm_head\.lora_A"):
        load_lora_state_dict(model, unexpected)

    wrong_shape = dict(state)
    wrong_shape[missing_key] = torch.zeros(D_INNER, 3)
    with pytest.raises(UserError, match=r"dt_proj\.lora_B\.default\.weight has shape \(96, 3\)"):
        load_lora_state_dict(model, wrong_shape)
