"""Tests for mambaspin.scan: the fused CPU scan and the state-transform path against the reference."""

from __future__ import annotations

import pytest
import torch

from mambaspin.scan import (
    FusedSelectiveScan,
    LinearRecurrence,
    selective_scan_reference,
    selective_scan_torch,
)

# (batch, length, d_inner, d_state): length 1, odd sizes, and d_state 16 as in released models.
SHAPES = [(1, 1, 1, 1), (2, 1, 5, 3), (3, 7, 5, 2), (2, 19, 11, 4), (1, 33, 16, 16)]
SHAPE_IDS = ["b1_l1_d1_n1", "b2_l1_d5_n3", "b3_l7_d5_n2", "b2_l19_d11_n4", "b1_l33_d16_n16"]
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D")
TOLERANCE = 1e-5


def scan_inputs(batch, length, d_inner, d_state, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    """Draw inputs in the ranges of a trained model: delta = softplus(randn), A = -exp(randn)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    return {
        "u": randn(batch, length, d_inner),
        "delta": torch.nn.functional.softplus(randn(batch, length, d_inner)),
        "A": -torch.exp(randn(d_inner, d_state)),
        "B": randn(batch, length, d_state),
        "C": randn(batch, length, d_state),
        "D": randn(d_inner),
    }


def leaf_copies(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone().requires_grad_(True) for name, tensor in inputs.items()}


def output_and_gradients(scan, inputs, grad_seed=1, **kwargs):
    """Run `scan` on fresh leaf copies of `inputs` and backpropagate a fixed random dy.

    Returns y and a dict of gradients keyed by input name.
    """
    leaves = leaf_copies(inputs)
    y = scan(*(leaves[name] for name in INPUT_NAMES), **kwargs)
    generator = torch.Generator().manual_seed(grad_seed)
    grad_y = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.dtype)
    gradients = torch.autograd.grad(y, [leaves[name] for name in INPUT_NAMES], grad_y)
    return y.detach(), dict(zip(INPUT_NAMES, gradients))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Return max |actual - expected| / max |expected|, or the absolute error when expected is 0."""
    scale = float(expected.abs().max())
    return float((actual - expected).abs().max()) / (scale if scale > 0 else 1.0)


def random_orthogonal(n: int, seed: int = 2, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q.to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fused_scan_values(shape):
    inputs = scan_inputs(*shape)
    expected = selective_scan_reference(*(inputs[name] for name in INPUT_NAMES))

    actual = selective_scan_torch(*(inputs[name] for name in INPUT_NAMES))

    assert actual.shape == shape[:3]
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fused_scan_gradients(shape):
    inputs = scan_inputs(*shape)
    _, expected = output_and_gradients(selective_scan_reference, inputs)

    _, actual = output_and_gradients(selective_scan_torch, inputs)

    for name in INPUT_NAMES:
        assert relative_error(actual[name], expected[name]) <= TOLERANCE, f"gradient of {name}"


def test_fused_scan_without_d():
    inputs = scan_inputs(2, 9, 6, 4)
    args = [inputs[name] for name in ("u", "delta", "A", "B", "C")]

    actual = selective_scan_torch(*args)
    expected = selective_scan_reference(*args)

    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_state_path_values(shape):
    inputs = scan_inputs(*shape)
    expected = selective_scan_reference(*(inputs[name] for name in INPUT_NAMES))

    actual = selective_scan_torch(*(inputs[name] for name in INPUT_NAMES), state_transform=lambda h: h)

    assert actual.shape == shape[:3]
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_state_path_gradients(shape):
    inputs = scan_inputs(*shape)
    _, expected = output_and_gradients(selective_scan_reference, inputs)

    _, actual = output_and_gradients(selective_scan_torch, inputs, state_transform=lambda h: h)

    for name in INPUT_NAMES:
        assert relative_error(actual[name], expected[name]) <= TOLERANCE, f"gradient of {name}"


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_orthogonal_state_transform(shape):
    # (h Q) · (C Q) = h Q Qᵀ Cᵀ = h · C for an orthogonal Q, so y must not change.
    inputs = scan_inputs(*shape)
    rotation = random_orthogonal(shape[3])
    expected_y, expected_grads = output_and_gradients(selective_scan_reference, inputs)

    rotated = dict(inputs, C=inputs["C"] @ rotation)
    actual_y, actual_grads = output_and_gradients(
        selective_scan_torch, rotated, state_transform=lambda h: h @ rotation
    )

    assert relative_error(actual_y, expected_y) <= TOLERANCE
    for name in ("u", "delta", "A", "B", "D"):
        assert relative_error(actual_grads[name], expected_grads[name]) <= TOLERANCE, f"gradient of {name}"
    # The gradient reaches C through C' = C Q, so dL/dC = dL/dC' Qᵀ.
    actual_grad_c = actual_grads["C"] @ rotation.T
    assert relative_error(actual_grad_c, expected_grads["C"]) <= TOLERANCE


def test_state_transform_changes_output():
    # A transform that is not orthogonal must reach y, or the orthogonal test proves nothing.
    inputs = scan_inputs(2, 9, 6, 4)
    args = [inputs[name] for name in INPUT_NAMES]

    plain = selective_scan_torch(*args)
    scaled = selective_scan_torch(*args, state_transform=lambda h: 2 * h)

    assert relative_error(scaled - plain, plain - inputs["u"] * inputs["D"]) <= TOLERANCE


def test_output_transform_before_d_skip():
    inputs = scan_inputs(2, 9, 6, 4)
    args = [inputs[name] for name in INPUT_NAMES]

    zeroed = selective_scan_torch(*args, output_transform=lambda y: 0 * y)

    assert relative_error(zeroed, inputs["u"] * inputs["D"]) <= TOLERANCE


def test_fused_scan_gradcheck():
    inputs = scan_inputs(2, 4, 3, 2, dtype=torch.float64)
    leaves = leaf_copies({name: inputs[name] for name in ("u", "delta", "A", "B", "C")})

    assert torch.autograd.gradcheck(FusedSelectiveScan.apply, tuple(leaves.values()))


def test_linear_recurrence_gradcheck():
    generator = torch.Generator().manual_seed(3)
    decay = torch.rand(2, 5, 3, 2, generator=generator, dtype=torch.float64).requires_grad_(True)
    increment = torch.randn(2, 5, 3, 2, generator=generator, dtype=torch.float64).requires_grad_(True)

    assert torch.autograd.gradcheck(LinearRecurrence.apply, (decay, increment))


def test_linear_recurrence_values():
    generator = torch.Generator().manual_seed(4)
    decay = torch.rand(2, 6, 3, generator=generator, dtype=torch.float64)
    increment = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    expected, state = [], torch.zeros(2, 3, dtype=torch.float64)
    for t in range(6):
        state = decay[:, t] * state + increment[:, t]
        expected.append(state)

    actual = LinearRecurrence.apply(decay, increment)

    assert torch.allclose(actual, torch.stack(expected, dim=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("state_transform", [None, lambda h: h], ids=["fused", "state_path"])
def test_float64_stays_float64(state_transform):
    inputs = scan_inputs(2, 5, 4, 3, dtype=torch.float64)
    _, gradients = output_and_gradients(selective_scan_torch, inputs, state_transform=state_transform)

    y = selective_scan_torch(*(inputs[name] for name in INPUT_NAMES), state_transform=state_transform)

    assert y.dtype == torch.float64
    for name in INPUT_NAMES:
        assert gradients[name].dtype == torch.float64, f"gradient of {name}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lower_precision_returns_float32(dtype):
    inputs = scan_inputs(2, 5, 4, 3, dtype=dtype)

    y = selective_scan_torch(*(inputs[name] for name in INPUT_NAMES))

    assert y.dtype == torch.float32


def test_float64_matches_reference_closely():
    inputs = scan_inputs(2, 19, 11, 4, dtype=torch.float64)
    expected = selective_scan_reference(*(inputs[name] for name in INPUT_NAMES))

    actual = selective_scan_torch(*(inputs[name] for name in INPUT_NAMES))

    assert relative_error(actual, expected) <= 1e-12
