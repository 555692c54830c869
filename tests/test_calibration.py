"""Tests of calibration statistics: the covariance accumulator, collect_statistics, saving and
loading with a key, the KLT eigen-decomposition and the orthogonality check."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from mambaspin.config import MambaConfig
from mambaspin.errors import UserError
from mambaspin.model import MIXER_POINTS, MambaLM
from rotations.calibration import (
    Calibration,
    CovarianceAccumulator,
    collect_statistics,
    data_fingerprint,
    model_fingerprint,
)
from rotations.config import SITES
from rotations.fold import OnlineRotation
from rotations.hadamard import random_orthogonal
from rotations.klt import RotationSet, check_orthogonal, klt, orthogonality_error

VOCAB = 101
D_MODEL, N_LAYER, D_STATE, DT_RANK = 48, 2, 8, 3
D_INNER = 2 * D_MODEL
NOISE_STD = 0.2
BLOCKS_SHAPE = (16, 33)
# collect_statistics drops the last column of each block, which is the next-token target.
TOKENS = BLOCKS_SHAPE[0] * (BLOCKS_SHAPE[1] - 1)


def make_model(seed: int = 0) -> MambaLM:
    """Build a tiny MambaLM with seeded N(0, 0.2²) noise added to every parameter, in eval mode."""
    config = MambaConfig(
        vocab_size=VOCAB, d_model=D_MODEL, n_layer=N_LAYER, d_state=D_STATE, dt_rank=DT_RANK, bias=True
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MambaLM(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, parameter in sorted(model.named_parameters()):
            parameter.add_(NOISE_STD * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def random_blocks(shape=BLOCKS_SHAPE, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=1)
def calibrated() -> tuple[MambaLM, dict]:
    """Collect statistics for every site once. Tests must not change the returned objects."""
    model = make_model()
    return model, collect_statistics(model, random_blocks(), SITES, progress=False)


def gaussian(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------
# CovarianceAccumulator
# ---------------------------------------------------------------------------

DIM = 6
# Batches of different leading shapes, with a nonzero mean so centring matters.
BATCH_SHAPES = [(5, 7, DIM), (11, DIM), (2, 3, 4, DIM)]


def filled_accumulator() -> tuple[CovarianceAccumulator, torch.Tensor]:
    """Return an accumulator updated with every batch of BATCH_SHAPES, and all samples (N, DIM)."""
    accumulator = CovarianceAccumulator(DIM)
    batches = [gaussian(*shape, seed=index) + 0.5 for index, shape in enumerate(BATCH_SHAPES)]
    for batch in batches:
        accumulator.update(batch)
    samples = torch.cat([batch.reshape(-1, DIM) for batch in batches]).double()
    return accumulator, samples


def test_accumulator_uncentred_covariance():
    accumulator, samples = filled_accumulator()
    expected = samples.T @ samples / samples.shape[0]

    torch.testing.assert_close(accumulator.covariance(centered=False), expected, rtol=1e-12, atol=1e-12)


def test_accumulator_centred_covariance():
    accumulator, samples = filled_accumulator()
    expected = torch.cov(samples.T, correction=0)

    torch.testing.assert_close(accumulator.covariance(centered=True), expected, rtol=1e-12, atol=1e-12)


def test_accumulator_absmax_and_count():
    accumulator, samples = filled_accumulator()

    torch.testing.assert_close(accumulator.absmax, samples.abs().amax(0), rtol=0, atol=0)
    assert accumulator.count == samples.shape[0]


def test_accumulator_empty_rejected():
    with pytest.raises(UserError, match="no calibration samples"):
        CovarianceAccumulator(DIM).covariance(centered=False)


def accumulator_footprint(accumulator: CovarianceAccumulator) -> dict[str, tuple]:
    """Shape and element count of every tensor attribute, keyed by attribute name."""
    return {
        name: (tuple(value.shape), value.numel())
        for name, value in vars(accumulator).items()
        if isinstance(value, torch.Tensor)
    }


def test_accumulator_memory_constant():
    accumulator = CovarianceAccumulator(DIM)
    accumulator.update(gaussian(32, DIM, seed=0))
    after_one = accumulator_footprint(accumulator)
    attributes_after_one = sorted(vars(accumulator))
    for seed in range(1, 50):
        accumulator.update(gaussian(32, DIM, seed=seed))

    assert accumulator_footprint(accumulator) == after_one
    assert sorted(vars(accumulator)) == attributes_after_one


# ---------------------------------------------------------------------------
# collect_statistics
# ---------------------------------------------------------------------------


def expected_keys(sites) -> set[str]:
    keys = {"R1"} if "R1" in sites else set()
    keys.update(f"layers.{layer}.{site}" for layer in range(N_LAYER) for site in sites if site != "R1")
    return keys


def test_collect_keys_all_sites():
    _, stats = calibrated()

    assert set(stats) == expected_keys(SITES)


@pytest.mark.parametrize("sites", [("R1",), ("R4",), ("R3", "R5"), ("R2", "R6")], ids="+".join)
def test_collect_keys_requested_sites(sites):
    stats = collect_statistics(make_model(), random_blocks((2, 9)), sites, progress=False)

    assert set(stats) == expected_keys(sites)


# Samples per token: R1 reads every block norm and norm_f, R3 one d_inner vector per state index,
# R4 one d_state vector per channel.
SAMPLES_PER_TOKEN = {"R1": N_LAYER + 1, "R2": 1, "R3": D_STATE, "R4": D_INNER, "R5": 1, "R6": 1}


@pytest.mark.parametrize("site", SITES)
def test_collect_counts(site):
    _, stats = calibrated()
    keys = ["R1"] if site == "R1" else [f"layers.{layer}.{site}" for layer in range(N_LAYER)]

    for key in keys:
        assert stats[key].count == TOKENS * SAMPLES_PER_TOKEN[site], key


@pytest.mark.parametrize("site, dim", [("R1", D_MODEL), ("R2", D_INNER), ("R3", D_INNER), ("R4", D_STATE),
                                       ("R5", DT_RANK), ("R6", D_INNER)])
def test_collect_dims(site, dim):
    _, stats = calibrated()
    key = "R1" if site == "R1" else f"layers.0.{site}"

    assert stats[key].sum_outer.shape == (dim, dim)


@pytest.mark.parametrize("layer", range(N_LAYER))
def test_collect_r3_r4_same_states(layer):
    # R3 and R4 read the same states h along different axes, so both sums of squares equal sum(h²).
    _, stats = calibrated()
    r3 = torch.trace(stats[f"layers.{layer}.R3"].sum_outer)
    r4 = torch.trace(stats[f"layers.{layer}.R4"].sum_outer)

    torch.testing.assert_close(r3, r4, rtol=1e-9, atol=0)


def test_collect_r1_normalized():
    # R1 reads x / rms(x), whose mean square per token is mean(x²) / (mean(x²) + eps), just below 1.
    _, stats = calibrated()
    mean_square = float(torch.trace(stats["R1"].covariance(centered=False))) / D_MODEL

    assert 0.99 < mean_square <= 1.0


@pytest.mark.parametrize("site, module_name", [("R2", "out_proj"), ("R5", "dt_proj"), ("R6", "x_proj")])
def test_collect_reads_linear_input(site, module_name):
    model = make_model()
    blocks = random_blocks((2, 9))
    inputs = []
    handle = getattr(model.mixers[1], module_name).register_forward_pre_hook(
        lambda module, args: inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())
    )
    try:
        stats = collect_statistics(model, blocks, (site,), progress=False)
    finally:
        handle.remove()
    samples = torch.cat(inputs)

    torch.testing.assert_close(stats[f"layers.1.{site}"].sum_outer, samples.T @ samples, rtol=1e-10, atol=1e-10)


def test_collect_rejects_attached_point():
    model = make_model()
    model.set_point("out_proj_input", 1, OnlineRotation(torch.eye(D_INNER)))

    with pytest.raises(UserError, match="layers.1.out_proj_input"):
        collect_statistics(model, random_blocks((2, 9)), SITES, progress=False)


def all_points(model: MambaLM) -> list[nn.Module]:
    points = list(model.points.values())
    for mixer in model.mixers:
        points.extend(mixer.points[name] for name in MIXER_POINTS)
    return points


def hook_count(model: MambaLM) -> int:
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


def test_collect_restores_points():
    model = make_model()
    collect_statistics(model, random_blocks((2, 9)), SITES, progress=False)

    for point in all_points(model):
        assert isinstance(point, nn.Identity)


def test_collect_removes_hooks():
    model = make_model()
    collect_statistics(model, random_blocks((2, 9)), SITES, progress=False)

    assert hook_count(model) == 0


def test_collect_restores_after_error():
    model = make_model()
    # A token id past the vocabulary makes the embedding lookup fail in the first batch.
    blocks = random_blocks((2, 9))
    blocks[0, 0] = VOCAB

    with pytest.raises(IndexError):
        collect_statistics(model, blocks, SITES, progress=False)
    assert model.attached_points() == []
    assert hook_count(model) == 0


def test_collect_restores_train_mode():
    model = make_model().train()
    collect_statistics(model, random_blocks((2, 9)), ("R2",), progress=False)

    assert model.training


# ---------------------------------------------------------------------------
# Calibration save and load
# ---------------------------------------------------------------------------


def saved_calibration(directory, sites=SITES) -> tuple[Calibration, dict]:
    model, stats = calibrated()
    key = {"model": model_fingerprint(model), "data": data_fingerprint(random_blocks()), "sites": list(sites)}
    calibration = Calibration(stats, key)
    calibration.save(directory)
    return calibration, key


def test_calibration_round_trip_key(tmp_path):
    _, key = saved_calibration(tmp_path)

    assert Calibration.load(tmp_path, expected_key=key).key == key


def test_calibration_round_trip_stats(tmp_path):
    calibration, key = saved_calibration(tmp_path)
    loaded = Calibration.load(tmp_path, expected_key=key)

    assert set(loaded.stats) == set(calibration.stats)
    for name, accumulator in calibration.stats.items():
        assert loaded.stats[name].count == accumulator.count, name
        assert torch.equal(loaded.stats[name].sum_outer, accumulator.sum_outer), name
        assert torch.equal(loaded.stats[name].sum, accumulator.sum), name
        assert torch.equal(loaded.stats[name].absmax, accumulator.absmax), name


def test_calibration_other_model_rejected(tmp_path):
    _, key = saved_calibration(tmp_path)
    other = model_fingerprint(make_model(seed=5))

    with pytest.raises(UserError, match=other) as raised:
        Calibration.load(tmp_path, expected_key={**key, "model": other})
    assert key["model"] in str(raised.value)


def test_calibration_missing_site_rejected(tmp_path):
    _, key = saved_calibration(tmp_path, sites=("R2", "R6"))

    with pytest.raises(UserError, match="'R5'"):
        Calibration.load(tmp_path, expected_key={**key, "sites": ["R2", "R5"]})


def test_calibration_missing_file_rejected(tmp_path):
    with pytest.raises(UserError, match="no calibration found"):
        Calibration.load(tmp_path / "absent")


def test_fingerprint_equal_for_copy():
    model = make_model()

    assert model_fingerprint(copy.deepcopy(model)) == model_fingerprint(model)


def test_fingerprint_changes_with_weight():
    model = make_model()
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.mixers[1].D[0] += 1e-3

    assert model_fingerprint(changed) != model_fingerprint(model)


# ---------------------------------------------------------------------------
# klt and check_orthogonal
# ---------------------------------------------------------------------------


def sample_covariance(dim: int = 12, seed: int = 0) -> torch.Tensor:
    # Scaled columns give well separated eigenvalues.
    samples = gaussian(200, dim, seed=seed).double() * torch.linspace(0.2, 3.0, dim, dtype=torch.float64)
    return samples.T @ samples / samples.shape[0]


def test_klt_eigenvalues_descending():
    values, _ = klt(sample_covariance())

    assert bool((values[:-1] >= values[1:]).all())


def test_klt_vectors_orthogonal():
    _, vectors = klt(sample_covariance())

    assert orthogonality_error(vectors) < 1e-12


def test_klt_diagonalizes():
    covariance = sample_covariance()
    values, vectors = klt(covariance)

    torch.testing.assert_close(vectors.T @ covariance @ vectors, torch.diag(values), rtol=0, atol=1e-10)


def test_klt_sign_convention():
    _, vectors = klt(sample_covariance())
    pivot_rows = vectors.abs().argmax(0)

    assert bool((vectors[pivot_rows, torch.arange(vectors.shape[1])] > 0).all())


def test_check_orthogonal_accepts_rotations():
    rotations = RotationSet({"R1": random_orthogonal(D_MODEL, seed=0)}, [{"R2": random_orthogonal(D_INNER, seed=1)}])

    assert check_orthogonal(rotations) is None


def test_check_orthogonal_reports_error():
    perturbed = random_orthogonal(D_INNER, seed=1) + 1e-3 * gaussian(D_INNER, D_INNER, seed=2).double()
    rotations = RotationSet({"R1": random_orthogonal(D_MODEL, seed=0)}, [{"R2": perturbed}])
    measured = orthogonality_error(perturbed)

    with pytest.raises(UserError, match="layers.0.R2") as raised:
        check_orthogonal(rotations)
    assert f"{measured:.3e}" in str(raised.value)
