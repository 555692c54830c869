"""Tests for rotations.hadamard: dense matrices, random rotations and the fast transform."""

import math

import pytest
import torch

from rotations.hadamard import (
    HadamardTransform,
    _base_construction,
    _paley1,
    _paley2,
    fast_hadamard_transform,
    fast_hadamard_transform_transposed,
    hadamard_matrix,
    is_hadamard_size,
    random_hadamard,
    random_orthogonal,
    random_signs,
    supported_sizes,
)

# Orders that Mamba models need (d_model 768, 1536 and 2560, dt_rank 48 and 160, and
# other small dimensions), plus 44 from Paley I with q = 43 and trivial orders.
MODEL_SIZES = [1, 2, 12, 16, 24, 32, 44, 48, 64, 80, 96, 128, 160, 192, 384, 768, 1536, 2560]
BASE_ORDERS = [12, 20, 28, 36, 40, 52, 60]
# Prime powers, including non-primes that need GF(p^e) arithmetic.
PALEY1_Q = [3, 7, 11, 19, 23, 27, 31, 43, 47, 59, 243, 343]
PALEY2_Q = [5, 9, 13, 17, 25, 29, 49, 81, 121, 125]
UNSUPPORTED = [(3, "2, 4"), (6, "4, 8"), (92, "88, 96"), (116, "112, 120")]


def assert_orthonormal_hadamard(matrix: torch.Tensor, n: int) -> None:
    assert matrix.shape == (n, n)
    assert matrix.dtype == torch.float64
    gram_error = (matrix @ matrix.T - torch.eye(n, dtype=torch.float64)).abs().max().item()
    assert gram_error < 1e-10
    entry_error = (matrix.abs() - 1 / math.sqrt(n)).abs().max().item()
    assert entry_error < 1e-15


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_hadamard_matrix_model_sizes(n):
    assert_orthonormal_hadamard(hadamard_matrix(n), n)


@pytest.mark.parametrize("m", BASE_ORDERS)
def test_hadamard_matrix_base_orders(m):
    assert_orthonormal_hadamard(hadamard_matrix(m), m)


def test_hadamard_matrix_5120_kronecker():
    # A full float64 Gram matrix of order 5120 took 4.5 s on a 2-core CPU. Instead this
    # checks that H = kron(H_20, H_256) entry by entry, with both factors checked, and
    # computes 256 rows of H @ H.T in full.
    n = 5120
    matrix = hadamard_matrix(n)
    assert matrix.shape == (n, n)
    factor_20 = hadamard_matrix(20)
    factor_256 = hadamard_matrix(256)
    assert_orthonormal_hadamard(factor_20, 20)
    assert_orthonormal_hadamard(factor_256, 256)
    kronecker = factor_20[:, None, :, None] * factor_256[None, :, None, :]
    assert torch.equal(matrix.view(20, 256, 20, 256), kronecker)

    rows = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:256]
    gram_rows = matrix[rows] @ matrix.T
    gram_rows[torch.arange(256), rows] -= 1.0
    assert gram_rows.abs().max().item() < 1e-10


@pytest.mark.parametrize("q", PALEY1_Q)
def test_paley1_exact(q):
    signs = _paley1(q).to(torch.int64)
    assert signs.shape == (q + 1, q + 1)
    assert torch.equal(signs.abs(), torch.ones_like(signs))
    assert torch.equal(signs @ signs.T, (q + 1) * torch.eye(q + 1, dtype=torch.int64))
    # Paley I gives a skew Hadamard matrix: H + H^T = 2 I.
    assert torch.equal(signs + signs.T, 2 * torch.eye(q + 1, dtype=torch.int64))


@pytest.mark.parametrize("q", PALEY2_Q)
def test_paley2_exact(q):
    n = 2 * (q + 1)
    signs = _paley2(q).to(torch.int64)
    assert signs.shape == (n, n)
    assert torch.equal(signs.abs(), torch.ones_like(signs))
    assert torch.equal(signs @ signs.T, n * torch.eye(n, dtype=torch.int64))


@pytest.mark.parametrize("q", [1, 4, 15, 21, 9, 13])
def test_paley1_rejects_invalid_q(q):
    with pytest.raises(ValueError, match=f"q = {q}"):
        _paley1(q)


@pytest.mark.parametrize("q", [2, 3, 21, 45, 27])
def test_paley2_rejects_invalid_q(q):
    with pytest.raises(ValueError, match=f"q = {q}"):
        _paley2(q)


def test_base_construction_routes():
    assert _base_construction(12) == ("paley1", 11)
    assert _base_construction(20) == ("paley1", 19)
    assert _base_construction(28) == ("paley1", 27)
    assert _base_construction(36) == ("paley2", 17)
    assert _base_construction(52) == ("paley2", 25)
    assert _base_construction(60) == ("paley1", 59)
    assert _base_construction(92) is None


def test_hadamard_matrix_non_symmetric_base():
    # The transposed fast transform is only meaningful if H != H.T for Paley bases.
    matrix = hadamard_matrix(12)
    assert not torch.equal(matrix, matrix.T)
    assert torch.equal(hadamard_matrix(64), hadamard_matrix(64).T)


def test_hadamard_matrix_deterministic_and_uncached():
    first = hadamard_matrix(24)
    first.zero_()
    second = hadamard_matrix(24)
    assert torch.equal(second, hadamard_matrix(24))
    assert second.abs().min().item() > 0


def test_hadamard_matrix_float32():
    matrix = hadamard_matrix(768, torch.float32)
    assert matrix.dtype == torch.float32
    gram_error = (matrix @ matrix.T - torch.eye(768)).abs().max().item()
    assert gram_error < 1e-5


def test_supported_sizes_small_range():
    expected = [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64]
    assert supported_sizes(-5, 64) == expected
    assert supported_sizes(85, 100) == [88, 96, 100]
    assert supported_sizes(10, 5) == []


def test_is_hadamard_size():
    for n in MODEL_SIZES + BASE_ORDERS + [5120, 4, 8]:
        assert is_hadamard_size(n), n
    for n in [0, -4, 3, 5, 6, 10, 92, 116]:
        assert not is_hadamard_size(n), n
    assert not is_hadamard_size(True)
    assert not is_hadamard_size(12.0)


@pytest.mark.parametrize(("n", "neighbours"), UNSUPPORTED)
def test_hadamard_matrix_unsupported_message(n, neighbours):
    with pytest.raises(ValueError) as error:
        hadamard_matrix(n)
    message = str(error.value)
    assert f"size {n}" in message
    assert "No Hadamard construction is known here" in message
    assert f"Supported sizes near {n}: {neighbours}." in message
    assert "init: random" in message


@pytest.mark.parametrize("n", [0, -1, -12])
def test_hadamard_matrix_non_positive_message(n):
    with pytest.raises(ValueError) as error:
        hadamard_matrix(n)
    message = str(error.value)
    assert f"Invalid Hadamard size {n}" in message
    assert "positive integer" in message
    assert f"Supported sizes near {n}: 1." in message
    assert "init: random" in message


def test_hadamard_matrix_rejects_non_integer():
    with pytest.raises(TypeError, match="integer"):
        hadamard_matrix(12.0)
    with pytest.raises(TypeError, match="bool"):
        hadamard_matrix(True)


FAST_SIZES = [1, 2, 8, 12, 20, 24, 28, 36, 48, 52, 160, 768, 2560]
LEADING_SHAPES = [(), (3,), (2, 3)]


@pytest.mark.parametrize("n", FAST_SIZES)
@pytest.mark.parametrize("leading", LEADING_SHAPES)
def test_fast_transform_matches_dense_float64(n, leading):
    x = torch.randn(*leading, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    dense = hadamard_matrix(n)
    forward = fast_hadamard_transform(x)
    assert forward.shape == x.shape
    assert (forward - x @ dense).abs().max().item() < 1e-10
    transposed = fast_hadamard_transform(x, transpose=True)
    assert (transposed - x @ dense.T).abs().max().item() < 1e-10
    assert torch.equal(fast_hadamard_transform_transposed(x), transposed)


@pytest.mark.parametrize("n", FAST_SIZES + [5120])
def test_fast_transform_matches_dense_float32(n):
    x = torch.randn(2, 4, n, generator=torch.Generator().manual_seed(n))
    dense = hadamard_matrix(n)
    reference = x.double() @ dense
    result = fast_hadamard_transform(x)
    assert result.dtype == torch.float32
    assert (result.double() - reference).abs().max().item() < 1e-5
    reference_transposed = x.double() @ dense.T
    result_transposed = fast_hadamard_transform(x, transpose=True)
    assert (result_transposed.double() - reference_transposed).abs().max().item() < 1e-5


def test_fast_transform_blocks():
    x = torch.randn(5, 3 * 12, dtype=torch.float64)
    block = hadamard_matrix(12)
    dense = torch.block_diag(block, block, block)
    assert (fast_hadamard_transform(x, 12) - x @ dense).abs().max().item() < 1e-12
    assert (fast_hadamard_transform(x, 12, transpose=True) - x @ dense.T).abs().max().item() < 1e-12


def test_fast_transform_inverse():
    x = torch.randn(4, 1536, dtype=torch.float64)
    restored = fast_hadamard_transform_transposed(fast_hadamard_transform(x))
    assert (restored - x).abs().max().item() < 1e-12


def test_fast_transform_non_contiguous():
    x = torch.randn(48, 6, dtype=torch.float64).T
    assert not x.is_contiguous()
    assert (fast_hadamard_transform(x) - x @ hadamard_matrix(48)).abs().max().item() < 1e-12


def test_fast_transform_empty_batch():
    x = torch.randn(0, 24)
    assert fast_hadamard_transform(x).shape == (0, 24)


def test_fast_transform_invalid_input():
    with pytest.raises(TypeError, match="floating-point"):
        fast_hadamard_transform(torch.ones(12, dtype=torch.int64))
    with pytest.raises(ValueError, match="not a multiple"):
        fast_hadamard_transform(torch.randn(2, 20), 12)
    with pytest.raises(ValueError, match="size 92"):
        fast_hadamard_transform(torch.randn(2, 92))
    with pytest.raises(ValueError, match="scalar"):
        fast_hadamard_transform(torch.tensor(1.0))


@pytest.mark.parametrize("n", [12, 28, 64, 160])
@pytest.mark.parametrize("transpose", [False, True])
def test_fast_transform_gradient_matches_dense(n, transpose):
    generator = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, dtype=torch.float64, generator=generator)
    weights = torch.randn(3, n, dtype=torch.float64, generator=generator)
    dense = hadamard_matrix(n)
    dense = dense.T if transpose else dense

    x_fast = x.clone().requires_grad_(True)
    (fast_hadamard_transform(x_fast, transpose=transpose) * weights).sum().backward()
    x_dense = x.clone().requires_grad_(True)
    ((x_dense @ dense) * weights).sum().backward()

    assert (x_fast.grad - x_dense.grad).abs().max().item() < 1e-10


def test_fast_transform_gradcheck():
    x = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fast_hadamard_transform, (x,))
    assert torch.autograd.gradcheck(fast_hadamard_transform_transposed, (x,))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_transform_cuda():
    x = torch.randn(3, 2560, device="cuda")
    result = fast_hadamard_transform(x)
    assert result.device == x.device
    assert result.dtype == torch.float32
    reference = x.double().cpu() @ hadamard_matrix(2560)
    assert (result.double().cpu() - reference).abs().max().item() < 1e-5


def test_random_signs_seeded():
    state = torch.get_rng_state()
    signs = random_signs(64, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(signs, random_signs(64, seed=3))
    assert torch.equal(signs.abs(), torch.ones(64, dtype=torch.float64))
    assert not torch.equal(signs, random_signs(64, seed=4))


def test_random_hadamard_deterministic_and_orthogonal():
    state = torch.get_rng_state()
    matrix = random_hadamard(96, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(matrix, random_hadamard(96, seed=7))
    assert_orthonormal_hadamard(matrix, 96)
    assert not torch.equal(matrix, random_hadamard(96, seed=8))
    # Rows are the rows of H, each multiplied by +1 or -1.
    row_signs = (matrix * hadamard_matrix(96)).sum(dim=1)
    assert torch.allclose(row_signs.abs(), torch.ones(96, dtype=torch.float64))


def test_random_hadamard_unsupported_size():
    with pytest.raises(ValueError, match="Supported sizes near 92: 88, 96"):
        random_hadamard(92, seed=0)


def test_random_orthogonal():
    state = torch.get_rng_state()
    matrix = random_orthogonal(100, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert matrix.shape == (100, 100)
    assert (matrix @ matrix.T - torch.eye(100, dtype=torch.float64)).abs().max().item() < 1e-10
    assert torch.equal(matrix, random_orthogonal(100, seed=1))
    assert not torch.allclose(matrix, random_orthogonal(100, seed=2))

    single = random_orthogonal(100, seed=1, dtype=torch.float32)
    assert single.dtype == torch.float32
    assert (single.double() - matrix).abs().max().item() < 1e-6


def test_random_orthogonal_positive_r_diagonal():
    # The sign fix makes Q the factor of G = Q R with a positive diagonal of R, where G is
    # the float64 Gaussian that the seeded generator draws first.
    n = 50
    matrix = random_orthogonal(n, seed=11)
    gaussian = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    upper = matrix.T @ gaussian
    assert upper.tril(diagonal=-1).abs().max().item() < 1e-10
    assert torch.diagonal(upper).min().item() > 0


def test_random_orthogonal_non_hadamard_size():
    matrix = random_orthogonal(92, seed=0)
    assert (matrix.T @ matrix - torch.eye(92, dtype=torch.float64)).abs().max().item() < 1e-10
    with pytest.raises(ValueError, match="positive integer"):
        random_orthogonal(0, seed=0)


def test_hadamard_transform_module_signed():
    module = HadamardTransform(160, seed=5)
    matrix = module.matrix()
    assert torch.equal(matrix, random_hadamard(160, seed=5))
    assert "signs" in module.state_dict()

    x = torch.randn(2, 3, 160, dtype=torch.float64)
    assert (module(x) - x @ matrix).abs().max().item() < 1e-10
    assert (module.inverse(module(x)) - x).abs().max().item() < 1e-10

    x32 = x.float()
    assert module(x32).dtype == torch.float32
    assert (module(x32).double() - x @ matrix).abs().max().item() < 1e-5


def test_hadamard_transform_module_unsigned():
    module = HadamardTransform(48)
    assert torch.equal(module.matrix(), hadamard_matrix(48))
    x = torch.randn(4, 48, dtype=torch.float64)
    assert (module(x) - x @ hadamard_matrix(48)).abs().max().item() < 1e-10


def test_hadamard_transform_module_signs_load():
    source = HadamardTransform(24, seed=1)
    target = HadamardTransform(24)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.matrix(), source.matrix())


def test_hadamard_transform_module_errors():
    with pytest.raises(ValueError, match="Supported sizes near 46: 44, 48"):
        HadamardTransform(46)
    module = HadamardTransform(12)
    with pytest.raises(ValueError, match=r"\(\.\.\., 12\)"):
        module(torch.randn(3, 24))
