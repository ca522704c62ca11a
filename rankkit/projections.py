r"""Random projections :math:`P \in \mathbb{R}^{D \times d}` for subspace training.

Training in a random subspace (:mod:`rankkit.intrinsic`) writes the parameters
of a network as :math:`\theta = \theta_0 + P\,\theta_d`: only the ``d`` numbers in
:math:`\theta_d` are trained, and ``P`` maps them to a displacement of all ``D``
parameters. ``P`` is drawn once, from a seed, and never trained. This module
provides three ways to draw it. All three have **unit-norm columns**
(Li et al. 2018, section 2), so one step of size ``lr`` along a coordinate of
:math:`\theta_d` moves :math:`\theta` by the same distance whichever projection
is used, and learning rates carry over between them.

``dense``
    A Gaussian matrix, columns rescaled to unit length. The reference, but it
    stores ``D * d`` floats: 4 GB for a 1M-parameter model at ``d = 1000``. It
    refuses to be built above a memory budget (``max_dense_bytes``).

``sparse``
    A very sparse random projection (Li, Hastie & Church 2006; used by Li et al.
    2018 and by scikit-learn's ``SparseRandomProjection``): each entry is
    non-zero with probability :math:`s = 1/\sqrt{D}`, with a random sign. Each
    column keeps about :math:`\sqrt{D}` non-zeros, all of magnitude
    :math:`1/\sqrt{k_j}` where :math:`k_j` is that column's count, so the column
    has exactly unit norm. Memory and time are :math:`O(d\sqrt{D})`.

``fastfood``
    The Fastfood transform (Le, Sarlós & Smola 2013), one global transform over
    all parameters, padded to :math:`n = 2^{\lceil \log_2 D \rceil}`:

    .. math::  P\,\theta_d = \big[\, S\, H G \Pi H B\, \operatorname{pad}_n(\theta_d) \big]_{1:D}

    where :math:`B` is a diagonal of random signs, :math:`H` the normalised
    Walsh–Hadamard matrix (orthogonal and symmetric, :math:`H = H^\top = H^{-1}`),
    :math:`\Pi` a random permutation and :math:`G` a diagonal of Gaussians.
    Le et al.'s :math:`S` also reshapes row norms to mimic a Gaussian matrix; we
    only need unit-norm columns, so (as in the public PyTorch implementations
    derived from Aghajanyan et al.'s code) :math:`S` is the scalar
    :math:`n / (\lVert G \rVert \sqrt{D})`.
    Memory is :math:`O(D)` and time :math:`O(D \log D)`. Before the final
    truncation to ``D`` rows every column has norm exactly one; keeping ``D`` of
    the ``n`` rows keeps ``D/n`` of each column's squared norm in expectation,
    which :math:`S` divides back out. So columns have unit norm *exactly* when
    ``D`` is a power of two and to within a relative :math:`O(1/\sqrt{D})`
    otherwise (about 2% at ``D = 1000``, 0.07% at ``D = 10^6``).

    The backward pass is the transposed transform,
    :math:`P^\top g = B H \Pi^\top G H S^\top \operatorname{pad}_n(g)`, which
    again costs two Hadamard transforms because :math:`H^\top = H`. Both
    directions skip work that is known to be zero or thrown away: the first
    transform acts on a vector that is zero beyond its first ``d`` entries (see
    ``_fastfood``), and the second on ``n`` rows of which only ``D`` are kept
    (:func:`fwht_truncated`, :func:`fwht_padded`).

References
----------
Li, Farkhoor, Liu & Yosinski (2018), Measuring the Intrinsic Dimension of
Objective Landscapes, ICLR, arXiv:1804.08838.
Le, Sarlós & Smola (2013), Fastfood: Approximating Kernel Expansions in
Loglinear Time, ICML.
Li, Hastie & Church (2006), Very Sparse Random Projections, KDD.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from rankkit.utils import check_choice

__all__ = [
    "DEFAULT_MAX_DENSE_BYTES",
    "PROJECTIONS",
    "DenseProjection",
    "FastfoodProjection",
    "Projection",
    "SparseProjection",
    "fwht",
    "fwht_padded",
    "fwht_truncated",
    "make_projection",
]

PROJECTIONS = ("dense", "sparse", "fastfood")
"""Names accepted by :func:`make_projection`."""

DEFAULT_MAX_DENSE_BYTES = 1 << 30
"""A dense projection larger than this (1 GiB) is refused."""


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError  # pragma: no cover


def check_dimensions(D: int, d: int) -> None:
    """Raise a ValueError naming the problem unless ``1 <= d <= D``."""
    if isinstance(d, bool) or not isinstance(d, int):
        raise TypeError(f"d must be an int, got {type(d).__name__} {d!r}.")
    if isinstance(D, bool) or not isinstance(D, int) or D < 1:
        raise ValueError(f"D must be a positive int (the number of parameters), got {D!r}.")
    if d <= 0:
        raise ValueError(
            f"d={d}: the subspace dimension must be a positive integer; "
            "use d >= 1 (d = 1 trains a single direction)."
        )
    if d > D:
        raise ValueError(
            f"d={d} exceeds D={D}, the number of parameters being trained: a random "
            f"subspace cannot have more dimensions than the space it lives in. Use d <= {D}."
        )


# --------------------------------------------------------------------------- Walsh–Hadamard


_HADAMARD_BLOCK_BITS = 6  # Hadamard factors of size up to 2**6 = 64
_hadamard_cache: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _hadamard(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The normalised Sylvester–Hadamard matrix H_k / sqrt(k) (cached)."""
    key = (k, dtype, device)
    if key not in _hadamard_cache:
        H = torch.ones(1, 1, dtype=torch.float64)
        while H.shape[0] < k:
            H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
        _hadamard_cache[key] = (H / math.sqrt(k)).to(dtype=dtype, device=device)
    return _hadamard_cache[key]


def fwht(x: Tensor, scale: float = 1.0) -> Tensor:
    r"""Normalised fast Walsh–Hadamard transform along the last dimension.

    Computes ``scale *`` :math:`H_n x / \sqrt{n}` for ``n = x.shape[-1]`` a power of two, with
    :math:`H_n` the Sylvester–Hadamard matrix (``scipy.linalg.hadamard(n)``). The
    normalised transform is orthogonal and symmetric, so it is its own inverse.

    Parameters
    ----------
    x : Tensor
        Shape ``(..., n)`` with ``n`` a power of two.
    scale : float
        Multiplies the result, at no cost (it is folded into the first factor).

    Returns
    -------
    Tensor
        Same shape and dtype as ``x``.

    Notes
    -----
    :math:`H_n` is a Kronecker product of small Hadamard matrices,
    :math:`H_n = H_{k_1} \otimes \dots \otimes H_{k_s}` with :math:`\prod k_i = n`.
    Viewing ``x`` as an array of shape ``(k_1, ..., k_s)``, each factor acts on one
    axis. Reshaping ``x`` to a ``k_1 x (n/k_1)`` matrix ``X``, the product
    :math:`X^\top H_{k_1}` (``H`` is symmetric) applies :math:`H_{k_1}` to the
    leading axis *and* stores the result with that axis moved to the end, so
    the next factor again finds its axis in front. After ``s`` such products the
    axes are back in order. With ``k_i <= 64`` this is :math:`O(n \log n)` work
    (:math:`2 n \sum_i k_i` flops) in a handful of large matrix products, each one
    pass over memory, instead of :math:`\log_2 n` memory-bound butterfly passes
    (6-12x faster than the butterfly at :math:`n = 2^{20}` in ``benchmarks/bench_intrinsic.py``).
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length in the last dimension, got {n}.")
    if n == 1:
        return x * scale
    batch = x.shape[:-1]
    y = x.reshape(-1, n)
    bits = n.bit_length() - 1
    n_factors = math.ceil(bits / _HADAMARD_BLOCK_BITS)
    for i in range(n_factors):
        k = 1 << (bits // n_factors + (1 if i < bits % n_factors else 0))
        H = _hadamard(k, x.dtype, x.device)
        if i == 0 and scale != 1.0:
            H = H * scale
        # (batch, k, n/k) -> (batch, n/k, k): transform the leading axis, move it to the end.
        y = y.reshape(y.shape[0], k, n // k).transpose(1, 2) @ H
    return y.reshape(*batch, n)


# --------------------------------------------------------------------------- base class


class Projection(nn.Module):
    """A fixed random linear map ``P: R^d -> R^D`` with unit-norm columns.

    Subclasses implement :meth:`forward` for inputs of shape ``(..., d)``. ``P``
    lives in buffers, so ``.to(device)`` moves it and ``state_dict()`` saves it.

    Attributes
    ----------
    D, d : int
        Output and input dimension.
    seed : int
        Seed the projection was drawn from; the same seed gives the same ``P``.
    """

    name = "projection"

    def __init__(self, D: int, d: int, seed: int = 0) -> None:
        super().__init__()
        check_dimensions(D, d)
        self.D, self.d, self.seed = D, d, int(seed)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)

    def matrix(self) -> Tensor:
        """``P`` as a dense ``(D, d)`` tensor (for inspection and tests; O(D d) memory)."""
        with torch.no_grad():
            eye = torch.eye(self.d, dtype=torch.float32, device=self._device())
            return self(eye).T.contiguous()

    def _device(self) -> torch.device:
        buffers = list(self.buffers())
        return buffers[0].device if buffers else torch.device("cpu")

    def extra_repr(self) -> str:
        return f"D={self.D}, d={self.d}, seed={self.seed}"


# --------------------------------------------------------------------------- dense


class DenseProjection(Projection):
    """Gaussian ``D x d`` matrix with columns rescaled to unit norm.

    Parameters
    ----------
    D, d : int
        Number of parameters and subspace dimension, ``1 <= d <= D``.
    seed : int
        Seed of the random matrix.
    max_dense_bytes : int
        Refuse (with a ValueError suggesting ``fastfood``) if the float32 matrix
        would take more memory than this.
    """

    name = "dense"

    def __init__(
        self, D: int, d: int, seed: int = 0, max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES
    ) -> None:
        super().__init__(D, d, seed)
        need = 4 * D * d
        if need > max_dense_bytes:
            raise ValueError(
                f"a dense projection for D={D:,} parameters and d={d:,} needs "
                f"{_format_bytes(need)} of float32, over the budget max_dense_bytes="
                f"{_format_bytes(max_dense_bytes)}. Use projection='fastfood' (O(D) memory, "
                "the usual choice for large models) or 'sparse', or raise max_dense_bytes."
            )
        P = torch.randn(D, d, generator=self._generator())
        P /= P.norm(dim=0, keepdim=True)
        self.register_buffer("P", P, persistent=False)

    def forward(self, theta_d: Tensor) -> Tensor:
        return theta_d @ self.P.T.to(theta_d.dtype)

    def matrix(self) -> Tensor:
        return self.P.clone()


# --------------------------------------------------------------------------- sparse


class _SparseMatVec(torch.autograd.Function):
    """``x @ P^T`` for a CSR matrix ``P``, with ``P^T`` kept in CSR for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, P: Tensor, Pt: Tensor) -> Tensor:
        ctx.save_for_backward(Pt)
        ctx.P = P
        return (P @ x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], P.shape[0])

    @staticmethod
    def backward(ctx, g: Tensor):
        (Pt,) = ctx.saved_tensors
        gx = (Pt @ g.reshape(-1, g.shape[-1]).T).T.reshape(*g.shape[:-1], Pt.shape[0])
        return gx, None, None


class SparseProjection(Projection):
    r"""Very sparse random projection with exactly unit-norm columns.

    Each entry of ``P`` is non-zero with probability ``density`` (default
    :math:`1/\sqrt{D}`, as in Li et al. 2018 and scikit-learn's
    ``SparseRandomProjection(density="auto")``). The non-zeros of column ``j``
    are :math:`\pm 1/\sqrt{k_j}`, with :math:`k_j` the number of non-zeros in that
    column (at least one), so every column has norm exactly one. ``P`` and
    ``P^T`` are stored in CSR format: memory and time :math:`O(d \sqrt{D})`.

    Parameters
    ----------
    D, d : int
        Number of parameters and subspace dimension, ``1 <= d <= D``.
    seed : int
        Seed of the random pattern and signs.
    density : float, optional
        Probability that an entry is non-zero; default ``1 / sqrt(D)``.
    """

    name = "sparse"

    def __init__(self, D: int, d: int, seed: int = 0, density: float | None = None) -> None:
        super().__init__(D, d, seed)
        density = 1.0 / math.sqrt(D) if density is None else float(density)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}.")
        self.density = density
        gen = self._generator()
        # Non-zeros per column ~ Binomial(D, density), at least one; positions
        # drawn with replacement and de-duplicated (duplicates are rare: about
        # k^2 / 2D per column).
        counts = torch.binomial(
            torch.full((d,), float(D)), torch.full((d,), density), generator=gen
        ).long()
        counts.clamp_(min=1)
        cols = torch.repeat_interleave(torch.arange(d), counts)
        rows = torch.randint(0, D, (cols.numel(),), generator=gen)
        key = torch.unique(rows * d + cols)  # sorted by row, then column
        rows, cols = key // d, key % d
        k = torch.bincount(cols, minlength=d)  # non-zeros per column after de-duplication
        signs = torch.randint(0, 2, (key.numel(),), generator=gen).float() * 2 - 1
        vals = signs / k[cols].float().sqrt()
        self.nnz = int(key.numel())
        self.register_buffer("P_csr", _csr(rows, cols, vals, (D, d)), persistent=False)
        order = torch.argsort(cols * D + rows)
        self.register_buffer(
            "Pt_csr", _csr(cols[order], rows[order], vals[order], (d, D)), persistent=False
        )

    def forward(self, theta_d: Tensor) -> Tensor:
        return _SparseMatVec.apply(theta_d.float(), self.P_csr, self.Pt_csr).to(theta_d.dtype)

    def _device(self) -> torch.device:
        return self.P_csr.device

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nnz={self.nnz:,} (density {self.density:.2g})"


def _csr(rows: Tensor, cols: Tensor, vals: Tensor, size: tuple[int, int]) -> Tensor:
    """CSR tensor from COO triplets already sorted by row."""
    crow = torch.zeros(size[0] + 1, dtype=torch.long)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=size[0]), 0)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we only use mm
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, vals, size, check_invariants=False)


# --------------------------------------------------------------------------- fastfood


def _pow2_at_least(k: int) -> int:
    return 1 << (k - 1).bit_length()


# Padding D up to n = 2^k can waste almost half of the transform. Write the
# normalised H_n = 1/sqrt(2) [[H, H], [H, -H]] with H = H_{n/2}, and D = n/2 + r.
# If r <= n/4, the r outputs kept from the bottom half are the first r of
# H (a - b), and the first q >= r outputs of H_{n/2} only need the sum of the
# n/(2q) blocks of length q (the first row block of H_{n/(2q)} is constant). The
# transpose is the same idea on the zeros of pad_n(g). For D = 1.07M, n = 2^21
# this roughly halves the memory traffic of both transforms.


def fwht_truncated(x: Tensor, D: int) -> Tensor:
    """``fwht(x)[..., :D]``, computing only what the first ``D`` outputs need."""
    n = x.shape[-1]
    half, r = n // 2, D - n // 2
    if r <= 0 or 4 * r > n:  # nothing worth skipping
        return fwht(x)[..., :D]
    a, b = x[..., :half], x[..., half:]
    q = _pow2_at_least(r)
    top = fwht(a + b, _SQRT_HALF)
    shape = (*x.shape[:-1], half // q, q)
    block_sums = a.reshape(shape).sum(-2) - b.reshape(shape).sum(-2)
    bottom = fwht(block_sums, _SQRT_HALF / math.sqrt(half // q))[..., :r]
    return torch.cat([top, bottom], dim=-1)


def fwht_padded(g: Tensor, n: int) -> Tensor:
    """``fwht(pad_n(g))`` for ``g`` of length ``D <= n``, skipping the zeros (the transpose)."""
    D = g.shape[-1]
    half, r = n // 2, D - n // 2
    if r <= 0 or 4 * r > n:
        return fwht(torch.nn.functional.pad(g, (0, n - D)))
    q = _pow2_at_least(r)
    Ha = fwht(g[..., :half], _SQRT_HALF).reshape(*g.shape[:-1], half // q, q)
    tail = torch.nn.functional.pad(g[..., half:], (0, q - r))
    # H_{n/2} pad(b) is H_q pad_q(b) / sqrt(n/2q) repeated n/2q times: a broadcast.
    Hb = fwht(tail, _SQRT_HALF / math.sqrt(half // q)).unsqueeze(-2)
    out = g.new_empty(*g.shape[:-1], 2, half // q, q)
    torch.add(Ha, Hb, out=out.select(-3, 0))
    torch.sub(Ha, Hb, out=out.select(-3, 1))
    return out.reshape(*g.shape[:-1], n)


_SQRT_HALF = math.sqrt(0.5)


def _fastfood(x: Tensor, B: Tensor, src: Tensor, G: Tensor, D: int) -> Tensor:
    """``P x`` for inputs ``(..., d)``: ``[S H G Pi H B pad_n(x)]_{:D}``.

    ``G`` arrives with the scalars folded in; ``src = perm mod m`` (see below).
    """
    d = x.shape[-1]
    m = _pow2_at_least(d)
    # H_n B pad_n(x): pad_n(x) is zero outside its first m entries, and
    # H_n = H_{n/m} (x) H_m, whose first column block is constant, so H_n pad_n(x)
    # is u = H_m B pad_m(x) tiled n/m times (times 1/sqrt(n/m), folded into G).
    u = fwht(torch.nn.functional.pad(x * B[:d], (0, m - d)))
    # Pi then picks entry perm[i] of the tiled vector, which is u[perm[i] mod m]:
    # a gather from a small, cache-resident vector instead of a length-n one.
    return fwht_truncated(u.index_select(-1, src) * G, D)  # [H G Pi ...]_{:D}


def _fastfood_transpose(g: Tensor, B: Tensor, src: Tensor, G: Tensor, d: int) -> Tensor:
    """``P^T g`` for inputs ``(..., D)``: ``[B H Pi^T G H S pad_n(g)]_{:d}`` (H is symmetric)."""
    n = G.shape[0]
    m = _pow2_at_least(d)
    t = fwht_padded(g, n) * G
    # Transpose of "gather u[perm[i] mod m]": add every t[i] into slot perm[i] mod m.
    u = t.new_zeros(*t.shape[:-1], m).index_add_(-1, src, t)
    return fwht(u)[..., :d] * B[:d]


class _FastfoodFunction(torch.autograd.Function):
    """Fastfood with its hand-written backward: the transposed transform."""

    @staticmethod
    def forward(ctx, x, B, src, G, D):
        B, G = B.to(x.dtype), G.to(x.dtype)
        ctx.save_for_backward(B, src, G)
        ctx.d = x.shape[-1]
        return _fastfood(x, B, src, G, D)

    @staticmethod
    def backward(ctx, g):
        B, src, G = ctx.saved_tensors
        return _fastfood_transpose(g.to(G.dtype), B, src, G, ctx.d), None, None, None, None


class FastfoodProjection(Projection):
    r"""Fastfood transform ``S H G Pi H B`` over all ``D`` parameters, O(D) memory.

    See the module docstring for the construction. Stores three length-``n``
    vectors (``n`` = ``D`` rounded up to a power of two) and computes
    :math:`P\theta_d` and its gradient :math:`P^\top g` in
    :math:`O(n \log n)`, in float32 unless given float64 (used by
    ``torch.autograd.gradcheck``).

    Parameters
    ----------
    D, d : int
        Number of parameters and subspace dimension, ``1 <= d <= D``.
    seed : int
        Seed of ``B``, ``Pi`` and ``G``.
    """

    name = "fastfood"

    def __init__(self, D: int, d: int, seed: int = 0) -> None:
        super().__init__(D, d, seed)
        n = 1 << (D - 1).bit_length()
        gen = self._generator()
        B = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
        perm = torch.randperm(n, generator=gen)
        G = torch.randn(n, generator=gen)
        self.n = n
        # Every column of H G Pi H B has norm ||G|| / sqrt(n); keeping D of n rows
        # keeps D/n of its squared norm in expectation.
        self.scale = float(n / (G.norm() * math.sqrt(D)))
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("G", G, persistent=False)
        # What the fast path uses (see _fastfood): Pi as a gather from the m-periodic
        # vector H B pad(x), and G with S and the tiling factor 1/sqrt(n/m) folded in.
        m = _pow2_at_least(d)
        # int32: half the memory traffic of int64 in the gather and its transpose.
        self.register_buffer("_src", (perm % m).to(torch.int32), persistent=False)
        self.register_buffer("_G_scaled", G * (self.scale / math.sqrt(n // m)), persistent=False)

    def forward(self, theta_d: Tensor) -> Tensor:
        if theta_d.dtype != torch.float64:
            theta_d = theta_d.float()
        return _FastfoodFunction.apply(theta_d, self.B, self._src, self._G_scaled, self.D)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n={self.n}"


# --------------------------------------------------------------------------- factory


def make_projection(
    name: str,
    D: int,
    d: int,
    *,
    seed: int = 0,
    max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
) -> Projection:
    """Build a projection ``R^d -> R^D`` by name.

    Parameters
    ----------
    name : {"dense", "sparse", "fastfood"}
        Which projection; see the module docstring.
    D : int
        Number of parameters (output dimension).
    d : int
        Subspace dimension (input dimension), ``1 <= d <= D``.
    seed : int
        Seed; the same seed gives the same projection.
    max_dense_bytes : int
        Memory budget of ``dense`` (default 1 GiB).

    Returns
    -------
    Projection

    Raises
    ------
    ValueError
        Unknown name (with the closest valid one), ``d`` out of range, or a
        dense matrix over budget.
    """
    check_dimensions(D, d)
    key = str(name).lower()
    if key == "dense":
        return DenseProjection(D, d, seed=seed, max_dense_bytes=max_dense_bytes)
    if key == "sparse":
        return SparseProjection(D, d, seed=seed)
    if key == "fastfood":
        return FastfoodProjection(D, d, seed=seed)
    check_choice("projection", name, PROJECTIONS)  # raises: not one of them
    raise AssertionError(f"make_projection: {key!r} is in PROJECTIONS but has no class here.")
