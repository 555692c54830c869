"""Online rotations use the fast Walsh-Hadamard transform exactly when R is a signed Hadamard matrix."""

import pytest
import torch

from rotations.fold import OnlineRotation, hadamard_signs
from rotations.hadamard import hadamard_matrix, random_hadamard, random_orthogonal


@pytest.mark.parametrize("size", [12, 16, 48, 384])
def test_signed_hadamard_takes_fast_path(size):
    rotation = random_hadamard(size, seed=3)
    module = OnlineRotation(rotation)
    x = torch.randn(2, 5, size, dtype=torch.float64)
    assert module.signs is not None
    assert torch.allclose(module(x), x @ rotation, atol=1e-10)


def test_plain_hadamard_signs_all_positive():
    assert torch.equal(hadamard_signs(hadamard_matrix(16)), torch.ones(16, dtype=torch.float64))


def test_general_rotation_takes_dense_path():
    rotation = random_orthogonal(48, seed=1)
    module = OnlineRotation(rotation)
    x = torch.randn(3, 48, dtype=torch.float64)
    assert module.signs is None
    assert torch.allclose(module(x), x @ rotation, atol=1e-10)


def test_transposed_paley_hadamard_not_fast():
    # Paley matrices are not symmetric, so Hᵀ is orthogonal but not diag(s)·H.
    assert hadamard_signs(hadamard_matrix(12).T) is None


def test_size_without_hadamard_not_fast():
    assert hadamard_signs(random_orthogonal(3, seed=0)) is None
