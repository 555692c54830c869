"""Orthonormal Hadamard matrices, seeded random rotations and a fast Hadamard transform.

A Hadamard matrix of order n has entries +-1 and orthogonal rows. This module returns
the orthonormal version, with entries +-1/sqrt(n), so that H @ H.T = I.

Supported orders are n = m * 2^k, where the base order m is one of:

- 1, giving the Sylvester matrix of order 2^k: H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]];
- q + 1 for a prime power q = 3 (mod 4), by Paley construction I;
- 2(q + 1) for a prime power q = 1 (mod 4), by Paley construction II.

The full matrix is kron(H_m, H_(2^k)) with the largest k for which m has a construction.
A Hadamard matrix of order n > 2 can exist only when 4 divides n. Some multiples of 4,
such as 92 and 116, have Hadamard matrices that none of these constructions reach, and
this module raises UserError (a ValueError) for them.

Source for the Paley constructions: the Wikipedia article "Paley construction", which
describes R. Paley, "On orthogonal matrices", J. Math. Phys. 12 (1933).
"""

from __future__ import annotations

import functools
import logging
import math
import operator

import torch
from torch import nn

from mambaspin.errors import UserError

__all__ = [
    "HadamardTransform",
    "fast_hadamard_transform",
    "fast_hadamard_transform_transposed",
    "hadamard_matrix",
    "is_hadamard_size",
    "random_hadamard",
    "random_orthogonal",
    "random_signs",
    "supported_sizes",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Integer helpers and the choice of construction
# ---------------------------------------------------------------------------


def _check_size(n: object, name: str = "n") -> int:
    """Convert ``n`` to int, or raise TypeError for bools and non-integers."""
    if isinstance(n, bool):
        raise TypeError(f"{name} must be an integer, got bool {n!r}")
    try:
        return operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(n).__name__} {n!r}") from None


@functools.lru_cache(maxsize=4096)
def _prime_power(q: int) -> tuple[int, int] | None:
    """Return (p, e) with q = p**e for a prime p, or None if q is not a prime power."""
    if q < 2:
        return None
    p = 2
    while p * p <= q:
        if q % p == 0:
            break
        p += 1
    else:
        return (q, 1)
    exponent = 0
    while q % p == 0:
        q //= p
        exponent += 1
    return (p, exponent) if q == 1 else None


def _base_construction(m: int) -> tuple[str, int] | None:
    """Return the construction for base order ``m`` as ("sylvester", 1), ("paley1", q) or ("paley2", q).

    Paley I is preferred when both apply (for example m = 12 uses q = 11, not q = 5).
    Returns None if no construction here gives order ``m``.
    """
    if m == 1:
        return ("sylvester", 1)
    q = m - 1
    if q % 4 == 3 and _prime_power(q) is not None:
        return ("paley1", q)
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _prime_power(q) is not None:
            return ("paley2", q)
    return None


def _decompose(n: int) -> tuple[int, int] | None:
    """Split ``n`` into (m, 2**k) with the largest k for which base order m has a construction."""
    if n < 1:
        return None
    power = n & -n  # largest power of two that divides n
    while power >= 1:
        m = n // power
        if _base_construction(m) is not None:
            return (m, power)
        power //= 2
    return None


def is_hadamard_size(n: int) -> bool:
    """Return whether :func:`hadamard_matrix` can build an orthonormal Hadamard matrix of order ``n``."""
    if isinstance(n, bool):
        return False
    try:
        n = operator.index(n)
    except TypeError:
        return False
    return _decompose(n) is not None


def supported_sizes(lo: int, hi: int) -> list[int]:
    """Return the supported orders n with lo <= n <= hi (both ends inclusive), in increasing order."""
    lo = max(_check_size(lo, "lo"), 1)
    hi = _check_size(hi, "hi")
    return [n for n in range(lo, hi + 1) if _decompose(n) is not None]


def _nearest_supported(n: int) -> tuple[int | None, int]:
    """Return the largest supported order below ``n`` (None if there is none) and the smallest above."""
    below = None
    for candidate in range(n - 1, 0, -1):
        if _decompose(candidate) is not None:
            below = candidate
            break
    above = max(n + 1, 1)
    while _decompose(above) is None:
        above += 1
    return below, above


def nearest_hadamard_sizes(n: int) -> tuple[int | None, int]:
    """Return the largest supported order below ``n`` (None if there is none) and the smallest above."""
    return _nearest_supported(n)


def _unsupported_size_error(n: int) -> UserError:
    """Build the UserError for an order ``n`` that has no construction here."""
    below, above = _nearest_supported(n)
    neighbours = ", ".join(str(size) for size in (below, above) if size is not None)
    if n < 1:
        reason = f"Invalid Hadamard size {n}. The size must be a positive integer."
    else:
        reason = f"No Hadamard construction is known here for size {n}."
        if n > 2 and n % 4 != 0:
            reason += " A Hadamard matrix of order n > 2 exists only when n is a multiple of 4."
    return UserError(
        f"{reason} Supported sizes near {n}: {neighbours}. "
        "Set `init: random` to use a seeded random orthogonal matrix instead."
    )


# ---------------------------------------------------------------------------
# Finite fields GF(p^e) and the Paley constructions
# ---------------------------------------------------------------------------


def _poly_mod(dividend: list[int], divisor: list[int], p: int) -> list[int]:
    """Return the remainder of ``dividend`` by the monic ``divisor`` over GF(p).

    Polynomials are coefficient lists, lowest degree first.
    """
    remainder = list(dividend)
    degree = len(divisor) - 1
    for top in range(len(remainder) - 1, degree - 1, -1):
        coefficient = remainder[top] % p
        if coefficient:
            for i in range(degree + 1):
                remainder[top - degree + i] = (remainder[top - degree + i] - coefficient * divisor[i]) % p
    return [c % p for c in remainder[:degree]]


def _monic_polynomials(degree: int, p: int):
    """Yield every monic polynomial of ``degree`` over GF(p), lowest coefficient first."""
    for index in range(p**degree):
        coefficients = []
        for _ in range(degree):
            index, digit = divmod(index, p)
            coefficients.append(digit)
        yield coefficients + [1]


@functools.lru_cache(maxsize=64)
def _irreducible_polynomial(p: int, degree: int) -> tuple[int, ...]:
    """Return the first monic irreducible polynomial of ``degree`` over GF(p), lowest coefficient first.

    Candidates are tried in the order of :func:`_monic_polynomials`. A candidate is
    irreducible when no monic polynomial of degree 1 .. degree // 2 divides it.
    """
    for candidate in _monic_polynomials(degree, p):
        if candidate[0] == 0:
            continue  # divisible by x
        has_factor = any(
            not any(_poly_mod(candidate, factor, p))
            for factor_degree in range(1, degree // 2 + 1)
            for factor in _monic_polynomials(factor_degree, p)
        )
        if not has_factor:
            return tuple(candidate)
    # Unreachable, because irreducible polynomials exist for every degree.
    raise RuntimeError(f"internal error: no irreducible polynomial of degree {degree} over GF({p})")


def _field_digits(p: int, e: int) -> torch.Tensor:
    """Return the (p**e, e) int64 base-p digits of 0 .. p**e - 1, lowest digit first.

    Element x of GF(p^e) is the polynomial sum_i digits[x, i] * t**i.
    """
    values = torch.arange(p**e, dtype=torch.int64)
    powers = p ** torch.arange(e, dtype=torch.int64)
    return (values[:, None] // powers) % p


def _square_indices(p: int, e: int) -> torch.Tensor:
    """Return the (p**e,) int64 indices of x*x for every element x of GF(p^e)."""
    digits = _field_digits(p, e)
    if e == 1:
        return (digits[:, 0] * digits[:, 0]) % p
    modulus = _irreducible_polynomial(p, e)

    # Coefficients of x(t)^2 before reduction, degrees 0 .. 2e - 2.
    product = torch.zeros(p**e, 2 * e - 1, dtype=torch.int64)
    for i in range(e):
        for j in range(e):
            product[:, i + j] += digits[:, i] * digits[:, j]
    product %= p

    # Reduce with t^e = -(modulus[0] + ... + modulus[e-1] t^(e-1)), top degree first.
    for top in range(2 * e - 2, e - 1, -1):
        coefficient = product[:, top].clone()
        for i in range(e):
            product[:, top - e + i] -= coefficient * modulus[i]
        product[:, top] = 0
        product %= p

    powers = p ** torch.arange(e, dtype=torch.int64)
    return (product[:, :e] * powers).sum(dim=1)


def _jacobsthal_matrix(q: int) -> torch.Tensor:
    """Return the (q, q) int64 Jacobsthal matrix Q[a, b] = chi(a - b) of GF(q).

    chi is the quadratic character: 0 at 0, 1 on nonzero squares, -1 on the other
    elements. Q Q^T = q I - J, and Q is symmetric if q = 1 (mod 4) and skew-symmetric
    if q = 3 (mod 4).
    """
    p, e = _prime_power(q)
    character = -torch.ones(q, dtype=torch.int64)
    character[_square_indices(p, e)] = 1
    character[0] = 0

    # Index of a - b, digit by digit, because subtraction in GF(p^e) is digitwise mod p.
    digits = _field_digits(p, e)
    difference = torch.zeros(q, q, dtype=torch.int64)
    for i in range(e):
        difference += ((digits[:, None, i] - digits[None, :, i]) % p) * p**i
    return character[difference]


def _paley1(q: int) -> torch.Tensor:
    """Return the (q + 1, q + 1) int8 +-1 Hadamard matrix of Paley construction I.

    For a prime power q = 3 (mod 4), H = I + S with S = [[0, j^T], [-j, Q]], where j is
    the all-ones column and Q the Jacobsthal matrix. S is skew-symmetric and
    S S^T = q I, so H H^T = (q + 1) I.
    """
    if q % 4 != 3 or _prime_power(q) is None:
        raise UserError(f"Paley construction I needs a prime power q = 3 (mod 4), got q = {q}")
    skew = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = _jacobsthal_matrix(q)
    return (torch.eye(q + 1, dtype=torch.int64) + skew).to(torch.int8)


def _paley2(q: int) -> torch.Tensor:
    """Return the (2(q + 1), 2(q + 1)) int8 +-1 Hadamard matrix of Paley construction II.

    For a prime power q = 1 (mod 4), C = [[0, j^T], [j, Q]] is a symmetric conference
    matrix (C C^T = q I). Then H = kron(C, A) + kron(I, B) with A = [[1, 1], [1, -1]]
    and B = [[1, -1], [-1, -1]]. Because A A^T = B B^T = 2 I and A B^T + B A^T = 0,
    H H^T = 2(q + 1) I.
    """
    if q % 4 != 1 or _prime_power(q) is None:
        raise UserError(f"Paley construction II needs a prime power q = 1 (mod 4), got q = {q}")
    conference = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    conference[0, 1:] = 1
    conference[1:, 0] = 1
    conference[1:, 1:] = _jacobsthal_matrix(q)
    block_a = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    block_b = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)
    identity = torch.eye(q + 1, dtype=torch.int64)
    return (torch.kron(conference, block_a) + torch.kron(identity, block_b)).to(torch.int8)


@functools.lru_cache(maxsize=128)
def _base_matrix(m: int) -> torch.Tensor:
    """Return the cached (m, m) int8 +-1 Hadamard matrix of base order ``m``.

    Callers must not modify the result in place, because it is shared.
    """
    construction = _base_construction(m)
    if construction is None:
        raise _unsupported_size_error(m)
    kind, q = construction
    logger.debug("building Hadamard base matrix of order %d with %s (q = %d)", m, kind, q)
    if kind == "sylvester":
        return torch.ones(1, 1, dtype=torch.int8)
    if kind == "paley1":
        return _paley1(q)
    return _paley2(q)


# ---------------------------------------------------------------------------
# Dense matrices
# ---------------------------------------------------------------------------


def _sylvester_signs(size: int, dtype: torch.dtype) -> torch.Tensor:
    """Return the (size, size) +-1 Sylvester matrix, entry (i, j) = (-1)^popcount(i & j)."""
    matrix = torch.ones(1, 1, dtype=dtype)
    while matrix.shape[0] < size:
        matrix = torch.cat((torch.cat((matrix, matrix), dim=1), torch.cat((matrix, -matrix), dim=1)), dim=0)
    return matrix


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return the (n, n) orthonormal Hadamard matrix H = kron(H_m, H_(2^k)) / sqrt(n).

    H_m is the base matrix described in the module docstring and H_(2^k) the Sylvester
    matrix, with n = m * 2^k and k as large as possible. H @ H.T = I, and every entry is
    +-1/sqrt(n). The matrix for a given n is always the same. It is symmetric when m is 1,
    but Paley base matrices make it non-symmetric in general.

    Raises:
        TypeError: ``n`` is not an integer.
        ValueError: no construction here gives order ``n`` (including n <= 0). The message
            lists the nearest supported sizes.
    """
    n = _check_size(n)
    split = _decompose(n)
    if split is None:
        raise _unsupported_size_error(n)
    m, power = split
    # Scaling the small factor first saves a pass over the n x n result. Entries are
    # still exactly round(+-1/sqrt(n)), because the Sylvester factor is +-1.
    base = _base_matrix(m).to(dtype) * (1.0 / math.sqrt(n))
    return torch.kron(base, _sylvester_signs(power, dtype))


def random_signs(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return an (n,) vector of seeded random +-1 values.

    A local ``torch.Generator`` seeded with ``seed`` draws the values, so the global RNG
    is untouched and the same (n, seed) gives the same vector.
    """
    n = _check_size(n)
    if n < 1:
        raise UserError(f"invalid size {n}: the size must be a positive integer")
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64)
    return (2 * bits - 1).to(dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return the (n, n) orthogonal matrix diag(s) @ H.

    H is :func:`hadamard_matrix` (n) and s is :func:`random_signs` (n, seed). Flipping
    the sign of rows keeps H orthogonal. Raises like :func:`hadamard_matrix`.
    """
    matrix = hadamard_matrix(n, dtype)
    return random_signs(n, seed, dtype)[:, None] * matrix


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Return a seeded (n, n) orthogonal matrix drawn from the Haar measure.

    Q comes from the QR decomposition G = Q R of a standard Gaussian G. Column j of Q is
    multiplied by sign(R[j, j]), which makes the decomposition unique (R with a positive
    diagonal), so Q does not depend on the QR routine's sign convention and is Haar.
    G is drawn in float64 by a local ``torch.Generator`` and the result cast to ``dtype``,
    so float32 and float64 give the same matrix up to rounding.
    """
    n = _check_size(n)
    if n < 1:
        raise UserError(f"invalid size {n}: the size must be a positive integer")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    diagonal_signs = torch.sign(torch.diagonal(r))
    diagonal_signs[diagonal_signs == 0] = 1.0
    return (q * diagonal_signs).to(dtype)


# ---------------------------------------------------------------------------
# Fast transform
# ---------------------------------------------------------------------------


def _walsh_hadamard_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Return x @ S along the last dimension, where S is the unnormalized Sylvester matrix.

    The last dimension must be a power of two 2^k. The butterfly takes k steps of O(2^k)
    each. Step h maps each pair (x[i], x[i + h]) whose index i has bit h clear to
    (x[i] + x[i + h], x[i] - x[i + h]).
    """
    size = x.shape[-1]
    leading = x.shape[:-1]
    half = 1
    while half < size:
        pairs = x.reshape(*leading, size // (2 * half), 2, half)
        first = pairs[..., 0, :]
        second = pairs[..., 1, :]
        x = torch.stack((first + second, first - second), dim=-2)
        half *= 2
    return x.reshape(*leading, size)


def fast_hadamard_transform(x: torch.Tensor, n: int | None = None, transpose: bool = False) -> torch.Tensor:
    """Return x @ H, or x @ H.T if ``transpose``, with H = :func:`hadamard_matrix` (n).

    x has shape (..., d) and the result has the same shape, dtype and device. ``n``
    defaults to d. If n is smaller, d must be a multiple of n, and each consecutive
    block of n entries is transformed on its own, which is x @ block_diag(H, ..., H).

    For n = m * 2^k, H = kron(H_m, S) / sqrt(n) with S the Sylvester matrix, so with x
    viewed as X of shape (..., m, 2^k), x @ H = H_m^T X S / sqrt(n). S comes from a
    butterfly in O(n log n) and H_m from a dense (m, m) matmul. The result agrees with
    the dense product up to rounding. The function uses plain torch ops, so autograd
    works through it, and H is orthogonal, so x @ H.T undoes x @ H.

    Raises:
        TypeError: x is not a floating-point tensor, or n is not an integer.
        ValueError: n is not supported (see :func:`hadamard_matrix`) or does not divide d.
    """
    if not x.is_floating_point():
        raise TypeError(f"fast_hadamard_transform needs a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise UserError("fast_hadamard_transform needs a tensor with at least one dimension, got a scalar")
    width = x.shape[-1]
    n = width if n is None else _check_size(n)
    split = _decompose(n)
    if split is None:
        raise _unsupported_size_error(n)
    if width % n != 0:
        raise UserError(f"last dimension {width} of x is not a multiple of the Hadamard size {n}")
    m, power = split

    leading = x.shape[:-1]
    blocks = x.reshape(*leading, width // n, m, power)
    blocks = _walsh_hadamard_last_dim(blocks)
    if m > 1:
        # NOTE: this copies the (m, m) base matrix to x.device on every call. The CUDA path
        # has a test that only runs where CUDA is available.
        base = _base_matrix(m).to(device=x.device, dtype=x.dtype)
        # x @ H applies H_m^T on the left of each (m, 2^k) block, and x @ H.T applies H_m.
        blocks = torch.matmul(base if transpose else base.T, blocks)
    return blocks.reshape(*leading, width) * (1.0 / math.sqrt(n))


def fast_hadamard_transform_transposed(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """Return x @ H.T, which undoes :func:`fast_hadamard_transform`. Arguments and errors are the same."""
    return fast_hadamard_transform(x, n, transpose=True)


class HadamardTransform(nn.Module):
    """Fixed rotation x -> x @ (diag(s) @ H) of the last dimension, applied in O(n log n).

    H is :func:`hadamard_matrix` (size). With a ``seed``, s is :func:`random_signs`
    (size, seed), so ``matrix()`` equals :func:`random_hadamard` (size, seed). Without
    one, s is all ones. s is the float32 buffer ``signs`` of shape (size,), saved in the
    state dict.
    """

    def __init__(self, size: int, seed: int | None = None) -> None:
        super().__init__()
        size = _check_size(size, "size")
        if not is_hadamard_size(size):
            raise _unsupported_size_error(size)
        self.size = size
        self.seed = seed
        if seed is None:
            signs = torch.ones(size, dtype=torch.float32)
        else:
            signs = random_signs(size, seed, torch.float32)
        self.register_buffer("signs", signs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return x @ (diag(s) @ H) for x of shape (..., size), with the same shape and dtype."""
        self._check_input(x)
        return fast_hadamard_transform(x * self.signs.to(x.dtype), self.size)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """Return x @ (diag(s) @ H).T, which undoes :meth:`forward`, for x of shape (..., size)."""
        self._check_input(x)
        return fast_hadamard_transform(x, self.size, transpose=True) * self.signs.to(x.dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Return the dense (size, size) matrix diag(s) @ H that :meth:`forward` applies.

        The matrix is on the device of the ``signs`` buffer.
        """
        dense = hadamard_matrix(self.size, dtype).to(self.signs.device)
        return self.signs.to(dtype)[:, None] * dense

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() == 0 or x.shape[-1] != self.size:
            raise UserError(
                f"HadamardTransform of size {self.size} needs input of shape (..., {self.size}), "
                f"got {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"size={self.size}, seed={self.seed}"
