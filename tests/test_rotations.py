"""Tests of rotation building and folding: function preservation, no silent fallback, the pure
weight functions and the KLT.

The models are tiny random Mamba-1 LMs (d_model 48, 2 layers, d_state 8, dt_rank 3). Every
parameter carries seeded noise, so norm weights, A_log, D and biases are away from their initial
values. A fold that drops or misplaces one of them therefore changes the logits.
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from mambaspin.config import MambaConfig
from mambaspin.errors import UserError
from mambaspin.loading import load_model
from mambaspin.model import MambaLM
from mambaspin.scan import selective_scan_torch
from rotations.calibration import Calibration, CovarianceAccumulator, collect_statistics
from rotations.config import SITES, RotationConfig, SiteConfig, SmoothConfig
from rotations.fold import OnlineRotation, StateRotation, apply_rotations, rotate_out_proj, rotate_x_proj
from rotations.hadamard import random_orthogonal
from rotations.klt import build_rotations, channel_spread

VOCAB = 101
D_MODEL, N_LAYER, D_STATE, DT_RANK = 48, 2, 8, 3
D_INNER = 2 * D_MODEL
NOISE_STD = 0.2
CALIBRATION_SHAPE = (16, 33)
EVAL_SHAPE = (2, 32)
TOLERANCE = 1e-4

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "shipped" / "mamba-shakespeare"
SHIPPED_EVAL_SHAPE = (2, 64)
SHIPPED_CALIBRATION_SHAPE = (4, 65)

SUBSETS = [subset for size in range(len(SITES) + 1) for subset in itertools.combinations(SITES, size)]
VARIANTS = [
    pytest.param(bias, tie, id=f"{'bias' if bias else 'nobias'}-{'tied' if tie else 'untied'}")
    for bias in (False, True)
    for tie in (True, False)
]
# "klt_hadamard" here means the KLT-enhanced init: K·H wherever the size has a Hadamard matrix,
# and plain K at R5, whose size 3 has none.
INITS = ("random", "klt_hadamard")


def subset_id(subset: tuple[str, ...]) -> str:
    return "+".join(subset) if subset else "none"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return max |actual - expected| / max |expected|."""
    return float((actual - expected).abs().max() / expected.abs().max())


def make_model(bias: bool, tie: bool, seed: int = 0) -> MambaLM:
    """Build a tiny MambaLM with seeded N(0, 0.2²) noise added to every parameter, in eval mode."""
    config = MambaConfig(
        vocab_size=VOCAB,
        d_model=D_MODEL,
        n_layer=N_LAYER,
        d_state=D_STATE,
        dt_rank=DT_RANK,
        bias=bias,
        tie_embeddings=tie,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MambaLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.add_(NOISE_STD * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def random_tokens(shape: tuple[int, int], seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Setup:
    """A float model, its calibration on random tokens, an eval batch and the batch's logits."""

    model: MambaLM
    calibration: Calibration
    blocks: torch.Tensor
    ids: torch.Tensor
    reference: torch.Tensor


def build_setup(model: MambaLM, calibration_shape, eval_shape) -> Setup:
    vocab = model.config.vocab_size
    blocks = random_tokens(calibration_shape, seed=1, vocab=vocab)
    stats = collect_statistics(model, blocks, SITES, progress=False)
    ids = random_tokens(eval_shape, seed=2, vocab=vocab)
    with torch.no_grad():
        reference = model(ids)
    return Setup(model, Calibration(stats), blocks, ids, reference)


@functools.lru_cache(maxsize=None)
def tiny_setup(bias: bool, tie: bool) -> Setup:
    """Calibrate each tiny model once per session. Tests must deepcopy `model` before changing it."""
    return build_setup(make_model(bias, tie), CALIBRATION_SHAPE, EVAL_SHAPE)


@functools.lru_cache(maxsize=1)
def shipped_setup() -> Setup:
    return build_setup(load_model(SHIPPED_MODEL), SHIPPED_CALIBRATION_SHAPE, SHIPPED_EVAL_SHAPE)


def rotation_config(applied, init: str, smooth: bool = False) -> RotationConfig:
    """Apply `applied` sites with `init`, except that R5 uses plain KLT where `init` is klt_hadamard."""
    sites = {}
    for site in SITES:
        site_init = "klt" if site == "R5" and init == "klt_hadamard" else init
        sites[site] = SiteConfig(apply=site in applied, init=site_init, seed=7)
    return RotationConfig(sites=sites, smooth=SmoothConfig(apply=smooth))


def rotated_model(setup: Setup, config: RotationConfig) -> MambaLM:
    model = copy.deepcopy(setup.model)
    apply_rotations(model, build_rotations(config, model, setup.calibration))
    return model


def logits(model: MambaLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


# ---------------------------------------------------------------------------
# Function preservation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bias, tie", VARIANTS)
@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("subset", SUBSETS, ids=subset_id)
def test_fold_preserves_logits(subset, init, bias, tie):
    setup = tiny_setup(bias, tie)
    model = rotated_model(setup, rotation_config(subset, init))

    assert relative_error(logits(model, setup.ids), setup.reference) <= TOLERANCE


@pytest.mark.parametrize("bias, tie", VARIANTS)
@pytest.mark.parametrize("init", INITS)
def test_fold_smooth_preserves_logits(init, bias, tie):
    setup = tiny_setup(bias, tie)
    model = rotated_model(setup, rotation_config(SITES, init, smooth=True))

    assert relative_error(logits(model, setup.ids), setup.reference) <= TOLERANCE


@pytest.mark.parametrize("init", ["hadamard", "klt_hadamard"])
def test_hadamard_size3_rejected(init):
    setup = tiny_setup(False, True)
    config = RotationConfig().with_sites(("R5",), init)

    with pytest.raises(UserError, match=r"size 3\b") as raised:
        build_rotations(config, setup.model, setup.calibration)
    assert "R5" in str(raised.value)


@pytest.mark.parametrize("subset", [(site,) for site in SITES] + [SITES], ids=subset_id)
def test_shipped_fold_preserves_logits(subset):
    if not SHIPPED_MODEL.is_dir():
        pytest.skip("shipped model not built yet: run scripts/pretrain_reference.py")
    setup = shipped_setup()
    model = rotated_model(setup, RotationConfig().with_sites(subset, "klt_hadamard"))

    assert relative_error(logits(model, setup.ids), setup.reference) <= TOLERANCE


# ---------------------------------------------------------------------------
# No silent fallback: every site changes its weights and attaches its online modules
# ---------------------------------------------------------------------------

# Weights a site rewrites when it is applied alone. "x_proj.dt", "x_proj.B" and "x_proj.C" are
# the row blocks of x_proj. R1 also folds the norm weights, which test_fold_r1_resets_norms checks.
TOUCHED = {
    "R1": {"embeddings", "lm_head", "in_proj", "out_proj", "out_proj.bias"},
    "R2": {"out_proj"},
    "R3": set(),
    "R4": {"x_proj.C"},
    "R5": {"x_proj.dt", "dt_proj"},
    "R6": {"x_proj.dt", "x_proj.B", "x_proj.C"},
}
# Mixer points that carry a module after folding one site alone, in every layer.
ONLINE_POINTS = {
    "R1": set(),
    "R2": {"out_proj_input"},
    "R3": {"ssm_state", "ssm_y"},
    "R4": {"ssm_state"},
    "R5": set(),
    "R6": {"x_proj_input"},
}


def watched_weights(model: MambaLM) -> dict[str, torch.Tensor]:
    """Copies of the weights that rotations rewrite, keyed "name" or "layers.i.name"."""
    weights = {
        "embeddings": model.backbone.embeddings.weight,
        "lm_head": model.lm_head.weight,
    }
    for layer, mixer in enumerate(model.mixers):
        dt_rows, b_rows, c_rows = mixer.x_proj.weight.split([DT_RANK, D_STATE, D_STATE], dim=0)
        weights.update({
            f"layers.{layer}.in_proj": mixer.in_proj.weight,
            f"layers.{layer}.in_proj.bias": mixer.in_proj.bias,
            f"layers.{layer}.x_proj.dt": dt_rows,
            f"layers.{layer}.x_proj.B": b_rows,
            f"layers.{layer}.x_proj.C": c_rows,
            f"layers.{layer}.dt_proj": mixer.dt_proj.weight,
            f"layers.{layer}.out_proj": mixer.out_proj.weight,
            f"layers.{layer}.out_proj.bias": mixer.out_proj.bias,
        })
    return {name: tensor.detach().clone() for name, tensor in weights.items()}


def short_name(name: str) -> str:
    return name.split(".", 2)[2] if name.startswith("layers.") else name


def random_fold(site: str) -> tuple[MambaLM, MambaLM]:
    """Return (original, copy with `site` folded from a random rotation) of the biased untied model."""
    setup = tiny_setup(True, False)
    return setup.model, rotated_model(setup, rotation_config((site,), "random"))


@pytest.mark.parametrize("site", SITES)
def test_fold_changes_touched_weights(site):
    original, rotated = random_fold(site)
    before, after = watched_weights(original), watched_weights(rotated)

    for name in before:
        if short_name(name) in TOUCHED[site]:
            assert (after[name] - before[name]).abs().max() > 1e-3, f"{site} left {name} unchanged"


@pytest.mark.parametrize("site", ["R2", "R3", "R4", "R5", "R6"])
def test_fold_keeps_other_weights(site):
    original, rotated = random_fold(site)
    before, after = watched_weights(original), watched_weights(rotated)

    for name in before:
        if short_name(name) not in TOUCHED[site]:
            assert torch.equal(after[name], before[name]), f"{site} changed {name}"


def test_fold_r1_resets_norms():
    _, rotated = random_fold("R1")
    norms = [layer.norm.weight for layer in rotated.backbone.layers] + [rotated.backbone.norm_f.weight]

    for norm in norms:
        assert torch.equal(norm, torch.ones_like(norm))


def test_fold_r1_unties_head():
    setup = tiny_setup(False, True)
    rotated = rotated_model(setup, rotation_config(("R1",), "random"))

    assert not rotated.is_tied()


@pytest.mark.parametrize("site", SITES)
def test_fold_attaches_online_points(site):
    _, rotated = random_fold(site)
    expected = [f"layers.{layer}.{point}" for layer in range(N_LAYER) for point in ONLINE_POINTS[site]]

    assert sorted(rotated.attached_points()) == sorted(expected)


@pytest.mark.parametrize(
    "site, point",
    [("R2", "out_proj_input"), ("R3", "ssm_state"), ("R3", "ssm_y"), ("R4", "ssm_state"), ("R6", "x_proj_input")],
)
def test_detached_online_changes_logits(site, point):
    setup = tiny_setup(True, False)
    _, rotated = random_fold(site)
    rotated.set_point(point, 0, nn.Identity())

    assert relative_error(logits(rotated, setup.ids), setup.reference) > 1e-2


# ---------------------------------------------------------------------------
# Pure weight functions and the state rotation
# ---------------------------------------------------------------------------


def gaussian(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_x_proj_r5_rotates_dt_rows():
    weight = gaussian(DT_RANK + 2 * D_STATE, D_INNER, seed=0)
    r5 = random_orthogonal(DT_RANK, seed=1)
    rotated = rotate_x_proj(weight, DT_RANK, D_STATE, r5=r5)

    torch.testing.assert_close(rotated[:DT_RANK], r5.T @ weight[:DT_RANK], rtol=0, atol=1e-12)


def test_x_proj_r5_keeps_b_c_rows():
    weight = gaussian(DT_RANK + 2 * D_STATE, D_INNER, seed=0)
    r5 = random_orthogonal(DT_RANK, seed=1)
    rotated = rotate_x_proj(weight, DT_RANK, D_STATE, r5=r5)

    assert torch.equal(rotated[DT_RANK : DT_RANK + D_STATE], weight[DT_RANK : DT_RANK + D_STATE])
    assert torch.equal(rotated[DT_RANK + D_STATE :], weight[DT_RANK + D_STATE :])


def test_out_proj_r1_r2_product():
    weight, bias = gaussian(D_MODEL, D_INNER, seed=0), gaussian(D_MODEL, seed=1)
    r1, r2 = random_orthogonal(D_MODEL, seed=2), random_orthogonal(D_INNER, seed=3)
    rotated_weight, rotated_bias = rotate_out_proj(weight, bias, r1=r1, r2=r2)

    torch.testing.assert_close(rotated_weight, r1.T @ weight @ r2, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotated_bias, r1.T @ bias, rtol=0, atol=1e-12)


def scan_inputs(seed: int = 0):
    """Float32 inputs of `selective_scan_torch`: u, delta, A, B, C, D for b=2, l=12, d=16, n=8."""
    batch, length, d_inner, d_state = 2, 12, 16, 8
    u = gaussian(batch, length, d_inner, seed=seed, dtype=torch.float32)
    delta = torch.nn.functional.softplus(gaussian(batch, length, d_inner, seed=seed + 1, dtype=torch.float32))
    A = -torch.exp(gaussian(d_inner, d_state, seed=seed + 2, dtype=torch.float32))
    B = gaussian(batch, length, d_state, seed=seed + 3, dtype=torch.float32)
    C = gaussian(batch, length, d_state, seed=seed + 4, dtype=torch.float32)
    D = gaussian(d_inner, seed=seed + 5, dtype=torch.float32)
    return u, delta, A, B, C, D


def test_state_r3_preserves_scan():
    u, delta, A, B, C, D = scan_inputs()
    r3 = random_orthogonal(u.shape[-1], seed=9)
    reference = selective_scan_torch(u, delta, A, B, C, D)
    rotated = selective_scan_torch(
        u, delta, A, B, C, D, state_transform=StateRotation(r3, None), output_transform=OnlineRotation(r3.T)
    )

    assert relative_error(rotated, reference) <= 1e-5


def test_state_r3_alone_changes_scan():
    u, delta, A, B, C, D = scan_inputs()
    r3 = random_orthogonal(u.shape[-1], seed=9)
    reference = selective_scan_torch(u, delta, A, B, C, D)
    rotated = selective_scan_torch(u, delta, A, B, C, D, state_transform=StateRotation(r3, None))

    assert relative_error(rotated, reference) > 1e-2


def test_state_r4_preserves_scan():
    u, delta, A, B, C, D = scan_inputs()
    r4 = random_orthogonal(A.shape[-1], seed=9)
    reference = selective_scan_torch(u, delta, A, B, C, D)
    # Folding R4 into x_proj's C rows turns C into R4ᵀ·C, which is C @ R4 for row vectors.
    rotated = selective_scan_torch(u, delta, A, B, C @ r4.float(), D, state_transform=StateRotation(None, r4))

    assert relative_error(rotated, reference) <= 1e-5


# ---------------------------------------------------------------------------
# KLT correctness
# ---------------------------------------------------------------------------

KLT_SITES = ("R2", "R5", "R6")
LAYER_CASES = [pytest.param(site, layer, id=f"{site}-layer{layer}") for site in KLT_SITES for layer in range(N_LAYER)]


def off_diagonal_ratio(matrix: torch.Tensor) -> float:
    """max |off-diagonal entry| / max diagonal entry."""
    diagonal = torch.diagonal(matrix)
    off_diagonal = matrix - torch.diag(diagonal)
    return float(off_diagonal.abs().max() / diagonal.max())


@functools.lru_cache(maxsize=1)
def klt_rotations():
    setup = tiny_setup(False, True)
    return build_rotations(rotation_config(KLT_SITES, "klt"), setup.model, setup.calibration)


def layer_covariance(site: str, layer: int) -> torch.Tensor:
    return tiny_setup(False, True).calibration.accumulator(site, layer).covariance(False)


@pytest.mark.parametrize("site, layer", LAYER_CASES)
def test_klt_diagonalizes_layer(site, layer):
    rotation = klt_rotations().get(site, layer)
    rotated = rotation.T @ layer_covariance(site, layer) @ rotation

    assert off_diagonal_ratio(rotated) < 1e-8


@pytest.mark.parametrize("site, layer", LAYER_CASES)
def test_klt_diagonal_descending(site, layer):
    rotation = klt_rotations().get(site, layer)
    diagonal = torch.diagonal(rotation.T @ layer_covariance(site, layer) @ rotation)

    assert bool((diagonal[:-1] >= diagonal[1:]).all())


@pytest.mark.parametrize("site", KLT_SITES)
def test_klt_layers_differ(site):
    # Guard for the per-layer tests: layer 0's rotation must not diagonalize layer 1's covariance,
    # or a build that used one layer's statistics for all layers would pass them.
    rotation = klt_rotations().get(site, 0)
    rotated = rotation.T @ layer_covariance(site, 1) @ rotation

    assert off_diagonal_ratio(rotated) > 1e-3


@pytest.mark.parametrize("site, layer", LAYER_CASES)
def test_klt_not_symmetric(site, layer):
    # Guard for the transposition test below, which detects a transposed K only when K is not symmetric.
    rotation = klt_rotations().get(site, layer)

    assert (rotation - rotation.T).abs().max() > 1e-3


@pytest.mark.parametrize("site, layer", LAYER_CASES)
def test_klt_transposed_not_diagonal(site, layer):
    rotation = klt_rotations().get(site, layer)
    rotated = rotation @ layer_covariance(site, layer) @ rotation.T

    assert off_diagonal_ratio(rotated) > 1e-3


@pytest.mark.parametrize("site", KLT_SITES)
def test_klt_folded_activation_diagonal(site):
    # Measures the activation that the folded model feeds to the site's linear, so it checks
    # that the fold puts K (not Kᵀ) where the calibration measured the covariance.
    setup = tiny_setup(False, True)
    model = copy.deepcopy(setup.model)
    apply_rotations(model, klt_rotations())
    module_name = {"R2": "out_proj", "R5": "dt_proj", "R6": "x_proj"}[site]
    dim = DT_RANK if site == "R5" else D_INNER
    accumulators = [CovarianceAccumulator(dim) for _ in range(N_LAYER)]
    handles = [
        getattr(mixer, module_name).register_forward_pre_hook(lambda module, args, acc=acc: acc.update(args[0]))
        for mixer, acc in zip(model.mixers, accumulators)
    ]
    try:
        logits(model, setup.blocks[:, :-1])
    finally:
        for handle in handles:
            handle.remove()

    for layer, accumulator in enumerate(accumulators):
        # float32 activations limit the off-diagonal entries to about 1e-7 of the diagonal.
        assert off_diagonal_ratio(accumulator.covariance(False)) < 1e-5, f"layer {layer}"


# Sites with a Hadamard size in the tiny model: R1 48, R2 R3 R6 96, R4 8.
HADAMARD_CASES = [pytest.param("R1", None, id="R1")] + [
    pytest.param(site, layer, id=f"{site}-layer{layer}")
    for site in ("R2", "R3", "R4", "R6")
    for layer in range(N_LAYER)
]


@functools.lru_cache(maxsize=1)
def klt_hadamard_rotations():
    setup = tiny_setup(False, True)
    applied = ("R1", "R2", "R3", "R4", "R6")
    return build_rotations(rotation_config(applied, "klt_hadamard"), setup.model, setup.calibration)


@pytest.mark.parametrize("site, layer", HADAMARD_CASES)
def test_klt_hadamard_equal_spread(site, layer):
    covariance = tiny_setup(False, True).calibration.accumulator(site, layer).covariance(False)
    rotation = klt_hadamard_rotations().get(site, layer)

    assert abs(channel_spread(covariance, rotation) - 1.0) < 1e-6


@pytest.mark.parametrize("site, layer", HADAMARD_CASES)
def test_unrotated_spread_above_one(site, layer):
    covariance = tiny_setup(False, True).calibration.accumulator(site, layer).covariance(False)

    assert channel_spread(covariance) > 1.0 + 1e-3
