r"""How low-rank is a weight update? Singular values, effective rank, section 7 of LoRA.

Fine-tuning moves a weight matrix from its pretrained value :math:`W_0` to
:math:`W = W_0 + \Delta W`. LoRA (Hu et al. 2021) bets that :math:`\Delta W`
has low *intrinsic rank*: most of its energy lives in a few singular directions.
This module measures that bet.

Write the singular value decomposition :math:`\Delta W = U \operatorname{diag}(s) V^T`
with :math:`s_1 \ge s_2 \ge \dots \ge s_n \ge 0`. The exact rank (the number of
non-zero :math:`s_i`) is useless for trained weights, which are full rank up to
noise, so we summarise the spectrum with *effective ranks* instead:

=================  ===========================================================  ===========================
method             formula                                                      reference
=================  ===========================================================  ===========================
``entropy``        :math:`\exp(-\sum_i p_i \log p_i)`, :math:`p_i = s_i/\sum s`    Roy & Vetterli 2007
``stable``         :math:`\|M\|_F^2 / \|M\|_2^2 = \sum s_i^2 / s_1^2`             Rudelson & Vershynin 2007
``participation``  :math:`(\sum s_i^2)^2 / \sum s_i^4`                            participation ratio
``energy``         smallest :math:`k` with :math:`\sum_{i\le k} s_i^2 \ge t \sum s_i^2`   (PCA's "90% of variance")
``numerical``      :math:`\#\{s_i > \text{tol}\}`, numpy's default tolerance      ``numpy.linalg.matrix_rank``
``optimal``        :math:`\#\{s_i > \tau\}`, Gavish–Donoho optimal hard threshold   Gavish & Donoho 2014
=================  ===========================================================  ===========================

Every measure is invariant to scaling and transposing :math:`M`, and
``1 <= stable <= participation <= numerical`` always holds.

What counts as "low" depends on the shape, so every measure is also reported for
the null model: a Gaussian random matrix of the same shape (:func:`random_baseline`),
whose spectrum is the Marchenko–Pastur bulk with no structure at all.

The LoRA paper's section 7 compares subspaces:

* :func:`subspace_similarity` -- Eq. (4),
  :math:`\phi(A, B, i, j) = \|U_A^{i\,T} U_B^j\|_F^2 / \min(i, j) \in [0, 1]`,
  between the top-:math:`i` singular directions of one matrix and the top-:math:`j`
  of another;
* :func:`amplification_factor` -- :math:`\|\Delta W\|_F / \|U^T W V\|_F` with
  :math:`U, V` the top-:math:`r` singular vectors of :math:`\Delta W`: how much
  the update amplifies directions that :math:`W` already had but did not emphasise;
* :func:`principal_angles` between two subspaces.

Numerics: singular values are computed with ``torch.linalg.svdvals`` in float64 for
small matrices and float32 for large ones (bf16/fp16 are upcast first), batched
across layers of the same shape, on the GPU when the tensors are there.

References
----------
Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality", EUSIPCO.
Rudelson & Vershynin 2007, "Sampling from large matrices", J. ACM 54(4).
Gavish & Donoho 2014, "The optimal hard threshold for singular values is 4/sqrt(3)",
IEEE Trans. Inf. Theory 60(8).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from rankkit.devices import resolve_device
from rankkit.utils import check_choice

EFFECTIVE_RANK_METHODS = ("entropy", "stable", "participation", "energy", "numerical", "optimal")

# Matrices with at most this many entries get float64 SVDs; larger ones float32,
# whose relative error (~1e-7 * condition) is far below anything we report.
FLOAT64_MAX_ENTRIES = 256 * 256

# Per-layer energy ranks reported by rank_report.
REPORT_ENERGY_THRESHOLDS = (0.5, 0.9, 0.99)


# --------------------------------------------------------------------------- matrices


def _as_matrix(M: Any, name: str = "matrix", check_finite: bool = True) -> torch.Tensor:
    """A 2-D floating tensor from a tensor or array; conv kernels flattened; finite values."""
    if isinstance(M, np.ndarray):
        if not np.issubdtype(M.dtype, np.number):
            raise TypeError(f"{name}: expected a numeric array, got dtype {M.dtype}.")
        M = torch.from_numpy(np.ascontiguousarray(M))
    elif not isinstance(M, torch.Tensor):
        try:
            M = torch.as_tensor(np.asarray(M, dtype=np.float64))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"{name}: expected a torch tensor or numpy array, got {type(M).__name__}."
            ) from err
    M = M.detach()
    if M.ndim < 2:
        raise ValueError(
            f"{name}: expected a matrix (2-D), got shape {tuple(M.shape)}. 1-D parameters "
            "such as biases and norm scales have no singular values; skip them."
        )
    if M.ndim > 2:
        # A conv kernel (out, in, kh, kw) acts as the matrix (out, in*kh*kw) on unfolded
        # patches, so that is the matrix whose rank we mean.
        M = M.reshape(M.shape[0], -1)
    if M.is_complex():
        raise TypeError(f"{name}: complex matrices are not supported.")
    if not M.is_floating_point():
        M = M.to(torch.float64)
    if M.numel() == 0:
        raise ValueError(f"{name}: the matrix is empty (shape {tuple(M.shape)}).")
    if check_finite and not bool(torch.isfinite(M).all()):
        n_bad = int((~torch.isfinite(M)).sum())
        raise ValueError(
            f"{name}: contains {n_bad} NaN or Inf value(s). Singular values are undefined; "
            "check the checkpoint (a diverged run or a corrupt file) before analysing it."
        )
    return M


def svd_dtype(shape: tuple[int, int]) -> torch.dtype:
    """The dtype rankkit computes the SVD of an ``m x n`` matrix in.

    float64 when ``m * n <= FLOAT64_MAX_ENTRIES``, float32 above: see the comment at
    ``FLOAT64_MAX_ENTRIES``. bf16 / fp16 inputs are always upcast to one of the two.
    """
    return torch.float64 if shape[0] * shape[1] <= FLOAT64_MAX_ENTRIES else torch.float32


def _svdvals(stack: torch.Tensor) -> torch.Tensor:
    """Batched singular values in the policy dtype (float64 small, float32 large)."""
    dtype = svd_dtype(tuple(stack.shape[-2:]))
    if stack.device.type == "mps" and dtype == torch.float64:
        stack = stack.cpu()  # MPS has no float64
    if stack.shape[-2] < stack.shape[-1]:
        # Same singular values; LAPACK's gesdd is about 2x faster on tall matrices.
        stack = stack.mT
    return torch.linalg.svdvals(stack.to(dtype))


def singular_values(M: Any, name: str = "matrix") -> np.ndarray:
    """Singular values of a matrix, in descending order.

    Parameters
    ----------
    M : torch.Tensor or numpy.ndarray
        A matrix of shape (m, n). Tensors with more than two dimensions are read as
        ``(out, in, *kernel)`` convolution weights and reshaped to
        ``(out, in * prod(kernel))``. bf16/fp16/integer input is upcast.
    name : str
        What to call the matrix in error messages (a layer name).

    Returns
    -------
    numpy.ndarray
        ``min(m, n)`` non-negative float64 values, largest first. Computed in float64
        when ``m * n <= FLOAT64_MAX_ENTRIES`` and in float32 otherwise, on the
        tensor's device.

    Raises
    ------
    ValueError
        For 1-D input or NaN/Inf entries.

    Examples
    --------
    >>> import numpy as np, rankkit
    >>> rankkit.singular_values(np.diag([3.0, 1.0, 2.0]))
    array([3., 2., 1.])
    """
    M = _as_matrix(M, name)
    return _svdvals(M).cpu().to(torch.float64).numpy()


# --------------------------------------------------------------------------- effective rank


@functools.lru_cache(maxsize=256)
def marchenko_pastur_median(beta: float) -> float:
    r"""Median of the Marchenko–Pastur law with aspect ratio ``0 < beta <= 1`` (variance 1).

    The density on :math:`[(1-\sqrt\beta)^2, (1+\sqrt\beta)^2]` is
    :math:`f(x) = \sqrt{(b_+ - x)(x - b_-)} / (2\pi\beta x)`; the median is found by
    integrating it and solving ``CDF(x) = 1/2``.
    """
    from scipy import integrate, optimize

    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}.")
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2

    def density(x: float) -> float:
        return math.sqrt(max((hi - x) * (x - lo), 0.0)) / (2 * math.pi * beta * x)

    def cdf_minus_half(x: float) -> float:
        return integrate.quad(density, lo, x, limit=200)[0] - 0.5

    return float(optimize.brentq(cdf_minus_half, lo, hi, xtol=1e-12))


def gavish_donoho_threshold(
    s: Any, shape: tuple[int, int] | None = None, sigma: float | None = None
) -> float:
    r"""Gavish–Donoho optimal hard threshold :math:`\tau` for singular values.

    For an ``m x n`` matrix ``X + sigma * Z`` (``Z`` standard Gaussian noise) with
    aspect ratio :math:`\beta = \min(m,n)/\max(m,n)`, keeping singular values above

    * :math:`\tau = \lambda^*(\beta)\,\sqrt{\max(m,n)}\,\sigma` when the noise level is known;
    * :math:`\tau = \omega(\beta)\, s_{\text{med}}` when it is not, with
      :math:`\omega(\beta) = \lambda^*(\beta)/\sqrt{\mu_\beta}` and :math:`\mu_\beta`
      the Marchenko–Pastur median (computed exactly, :func:`marchenko_pastur_median`),

    where :math:`\lambda^*(\beta) = \sqrt{2(\beta+1) + 8\beta/(\beta+1+\sqrt{\beta^2+14\beta+1})}`,
    is asymptotically MSE-optimal among hard thresholds. For a square matrix
    :math:`\lambda^* = 4/\sqrt3` and :math:`\omega \approx 2.858`.

    Parameters
    ----------
    s : array-like or matrix
        Singular values (1-D) or the matrix itself.
    shape : (m, n), optional
        Shape of the matrix; required when ``s`` is a vector of singular values.
    sigma : float, optional
        Known per-entry noise standard deviation.

    Returns
    -------
    float
    """
    s, shape = _spectrum_and_shape(s, shape)
    if shape is None:
        raise ValueError(
            "gavish_donoho_threshold needs the matrix shape: pass the matrix, or shape=(m, n) "
            "with its singular values."
        )
    m, n = sorted(shape)
    beta = m / n
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta**2 + 14 * beta + 1)))
    if sigma is not None:
        if not sigma > 0:
            raise ValueError(f"sigma must be a positive noise level, got {sigma}.")
        return lam * math.sqrt(n) * sigma
    if len(s) < m:
        raise ValueError(
            f"the unknown-noise threshold uses the median of all {m} singular values; "
            f"got only {len(s)}. Pass the full spectrum or sigma=."
        )
    return lam / math.sqrt(marchenko_pastur_median(beta)) * float(np.median(s))


def _spectrum_and_shape(
    M_or_s: Any, shape: tuple[int, int] | None
) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Singular values (descending, float64) and, where known, the matrix shape."""
    is_vector = (isinstance(M_or_s, (np.ndarray, torch.Tensor)) and M_or_s.ndim == 1) or (
        not isinstance(M_or_s, (np.ndarray, torch.Tensor)) and np.ndim(M_or_s) == 1
    )
    if is_vector:
        if isinstance(M_or_s, torch.Tensor):
            M_or_s = M_or_s.detach().cpu().to(torch.float64).numpy()
        s = np.asarray(M_or_s, dtype=np.float64)
        if s.size == 0:
            raise ValueError("empty list of singular values.")
        if not np.all(np.isfinite(s)):
            raise ValueError("singular values contain NaN or Inf.")
        if np.any(s < 0):
            raise ValueError(
                "singular values must be non-negative; a 1-D input is read as singular values, "
                "not as a matrix."
            )
        return np.sort(s)[::-1], (tuple(shape) if shape is not None else None)
    M = _as_matrix(M_or_s)
    if shape is not None and tuple(shape) != tuple(M.shape):
        raise ValueError(f"shape={tuple(shape)} does not match the matrix shape {tuple(M.shape)}.")
    return _svdvals(M).cpu().to(torch.float64).numpy(), tuple(M.shape)


def effective_rank(M_or_singular_values: Any, method: str = "entropy", **kw: Any) -> float:
    r"""Effective rank of a matrix, by one of :data:`EFFECTIVE_RANK_METHODS`.

    Parameters
    ----------
    M_or_singular_values : matrix or 1-D array
        A matrix (tensor or array, see :func:`singular_values`) or its singular values.
    method : {"entropy", "stable", "participation", "energy", "numerical", "optimal"}
        See the module docstring for formulas.

        * ``"entropy"`` -- :math:`\exp H(p)`, :math:`p_i = s_i / \sum_j s_j` (singular
          values, not their squares; Roy & Vetterli 2007). Real-valued, in ``[1, n]``.
        * ``"stable"`` -- :math:`\sum s_i^2 / s_1^2`.
        * ``"participation"`` -- :math:`(\sum s_i^2)^2 / \sum s_i^4`.
        * ``"energy"`` -- smallest integer :math:`k` whose top-:math:`k` singular values
          hold a fraction ``threshold`` (default 0.9) of :math:`\sum s_i^2`.
        * ``"numerical"`` -- number of :math:`s_i >` ``tol``; by default numpy's
          ``S.max() * max(m, n) * eps`` with ``eps`` of the input's dtype.
        * ``"optimal"`` -- number of :math:`s_i > \tau`, the Gavish–Donoho threshold
          (:func:`gavish_donoho_threshold`); unknown noise by default, pass ``sigma=``
          when the noise level is known.
    **kw
        ``threshold`` (energy); ``tol`` (numerical); ``sigma`` (optimal);
        ``shape=(m, n)`` when passing singular values to ``numerical`` or ``optimal``
        (``numerical`` falls back to ``max(m, n) = len(s)``).

    Returns
    -------
    float
        Integer-valued for ``energy``, ``numerical`` and ``optimal``. A zero matrix has
        effective rank 0 under every method.

    Examples
    --------
    >>> import numpy as np, rankkit
    >>> rankkit.effective_rank(np.eye(5), "entropy")
    5.0...
    >>> rankkit.effective_rank([3.0, 4.0], "stable")
    1.5625
    """
    method = check_choice("effective-rank method", method, EFFECTIVE_RANK_METHODS)
    allowed = {
        "entropy": set(),
        "stable": set(),
        "participation": set(),
        "energy": {"threshold"},
        "numerical": {"tol", "shape", "eps"},
        "optimal": {"sigma", "shape"},
    }[method] | {"shape"}
    unknown = set(kw) - allowed
    if unknown:
        raise TypeError(
            f"effective_rank(method={method!r}) got unexpected option(s) {sorted(unknown)}; "
            f"it accepts {sorted(allowed)}."
        )
    eps = kw.pop("eps", None)
    if eps is None and not _is_vector(M_or_singular_values):
        eps = _input_eps(M_or_singular_values)
    s, shape = _spectrum_and_shape(M_or_singular_values, kw.pop("shape", None))
    return _effective_rank_from_spectrum(s, method, shape=shape, eps=eps, **kw)


def _is_vector(x: Any) -> bool:
    return (x.ndim if isinstance(x, (np.ndarray, torch.Tensor)) else np.ndim(x)) == 1


def _input_eps(M: Any) -> float:
    """Machine epsilon of the dtype the matrix was stored in (numpy's convention)."""
    if isinstance(M, torch.Tensor) and M.is_floating_point():
        return float(torch.finfo(M.dtype).eps)
    if isinstance(M, np.ndarray) and np.issubdtype(M.dtype, np.floating):
        return float(np.finfo(M.dtype).eps)
    return float(np.finfo(np.float64).eps)


def _effective_rank_from_spectrum(
    s: np.ndarray,
    method: str,
    *,
    shape: tuple[int, int] | None = None,
    eps: float | None = None,
    threshold: float = 0.9,
    tol: float | None = None,
    sigma: float | None = None,
) -> float:
    total = float(s.sum())
    if s[0] <= 0 or total <= 0:
        return 0.0
    if method == "entropy":
        p = s / total
        p = p[p > 0]
        return float(np.exp(-(p * np.log(p)).sum()))
    s2 = s**2
    if method == "stable":
        return float(s2.sum() / s2[0])
    if method == "participation":
        return float(s2.sum() ** 2 / (s2**2).sum())
    if method == "energy":
        if not 0 < threshold <= 1:
            raise ValueError(f"energy threshold must be in (0, 1], got {threshold}.")
        cumulative = np.cumsum(s2) / s2.sum()
        # The tolerance absorbs float round-off so that threshold=1.0 reaches k = n.
        return float(np.searchsorted(cumulative, threshold - 1e-12) + 1)
    if method == "numerical":
        if tol is None:
            big = max(shape) if shape is not None else len(s)
            tol = s[0] * big * (eps if eps is not None else np.finfo(np.float64).eps)
        return float((s > tol).sum())
    # method == "optimal"
    return float((s > gavish_donoho_threshold(s, shape=shape, sigma=sigma)).sum())


def all_effective_ranks(
    s: np.ndarray, shape: tuple[int, int], eps: float, thresholds: Iterable[float] = ()
) -> dict[str, float]:
    """Every measure of :data:`EFFECTIVE_RANK_METHODS` from one spectrum, as a dict.

    ``s`` are the singular values (descending) of a matrix of ``shape`` stored in a
    dtype of machine epsilon ``eps`` (which sets what "numerically zero" means); with
    ``thresholds`` the energy rank is reported once per fraction (``energy90``...).
    """
    thresholds = tuple(thresholds)
    # With explicit thresholds the energy ranks get one column each (energy90, ...).
    methods = [m for m in EFFECTIVE_RANK_METHODS if not (m == "energy" and thresholds)]
    out = {m: _effective_rank_from_spectrum(s, m, shape=shape, eps=eps) for m in methods}
    for t in thresholds:
        out[f"energy{round(100 * t)}"] = _effective_rank_from_spectrum(
            s, "energy", threshold=t, shape=shape
        )
    return out


# --------------------------------------------------------------------------- random baseline


def random_singular_values(
    shape: tuple[int, int], norm: float | None = None, seed: int = 0
) -> np.ndarray:
    """Singular values of an i.i.d. Gaussian matrix of ``shape``, scaled to Frobenius ``norm``.

    The null model for "no low-rank structure": its spectrum is the Marchenko–Pastur
    bulk. Deterministic given ``seed``.
    """
    shape = _check_shape(shape)
    gen = torch.Generator().manual_seed(seed)
    Z = torch.randn(shape, generator=gen, dtype=svd_dtype(shape))
    s = torch.linalg.svdvals(Z).to(torch.float64).numpy()
    if norm is not None:
        if not norm >= 0:
            raise ValueError(f"norm must be non-negative, got {norm}.")
        s = s * (norm / math.sqrt((s**2).sum()))
    return s


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        shape = tuple(int(d) for d in shape)
    except TypeError as err:
        raise TypeError(f"shape must be a pair (m, n), got {shape!r}.") from err
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise ValueError(f"shape must be at least 2 positive dimensions (m, n), got {shape}.")
    if len(shape) > 2:
        shape = (shape[0], math.prod(shape[1:]))
    return shape


def random_baseline(
    shape: tuple[int, int],
    norm: float | None = None,
    seed: int = 0,
    thresholds: Iterable[float] = REPORT_ENERGY_THRESHOLDS,
) -> dict[str, float]:
    """Every effective-rank measure for a Gaussian random matrix of this shape.

    This is what "full rank, no structure" looks like at this shape: a ΔW whose
    effective rank is far below these values has low-rank structure.

    Parameters
    ----------
    shape : (m, n)
        Matrix shape (a conv shape is flattened like :func:`singular_values`).
    norm : float, optional
        Scale the matrix to this Frobenius norm. The measures are scale-invariant, so
        this only matters for the returned ``spectral_norm`` and ``frobenius_norm``.
    seed : int
        Seed of the Gaussian draw.
    thresholds : iterable of float
        Energy fractions reported as ``energy50``, ``energy90``, ...

    Returns
    -------
    dict
        ``{method: value}`` for every method in :data:`EFFECTIVE_RANK_METHODS`, the
        energy ranks, and ``spectral_norm`` / ``frobenius_norm`` of the draw.
    """
    shape = _check_shape(shape)
    s = random_singular_values(shape, norm=norm, seed=seed)
    out = all_effective_ranks(s, shape, eps=float(np.finfo(np.float64).eps), thresholds=thresholds)
    out["spectral_norm"] = float(s[0])
    out["frobenius_norm"] = float(math.sqrt((s**2).sum()))
    return out


# --------------------------------------------------------------------------- many matrices, low-rank ones


def batched_singular_values(
    matrices: Mapping[str, torch.Tensor],
    device: str | torch.device | None = "auto",
    check_finite: bool = True,
) -> dict[str, np.ndarray]:
    """Singular values of many matrices, one batched SVD call per distinct shape.

    Layers of a model repeat the same few shapes, so stacking them amortises the
    per-call overhead (and fills a GPU). Returns ``{name: descending float64 array}``.
    """
    device = resolve_device(device)
    by_shape: dict[tuple[int, int], list[str]] = {}
    mats = {}
    for name, M in matrices.items():
        M = _as_matrix(M, name, check_finite=check_finite)
        mats[name] = M
        by_shape.setdefault(tuple(M.shape), []).append(name)
    out = {}
    for shape, names in by_shape.items():
        dtype = svd_dtype(shape)
        stack = torch.stack([mats[n].to(device=device, dtype=dtype) for n in names])
        s = _svdvals(stack).cpu().to(torch.float64).numpy()
        out.update(zip(names, s))
    return out


def lowrank_singular_values(B: Any, A: Any, scale: float = 1.0) -> np.ndarray:
    r"""Singular values of :math:`s\,BA` from its factors, without forming it.

    With thin QR factorisations :math:`B = Q_B R_B` and :math:`A^T = Q_A R_A`,

    .. math:: s\,BA = Q_B\,(s\,R_B R_A^T)\,Q_A^T,

    and :math:`Q_B, Q_A` have orthonormal columns, so the singular values of
    :math:`s\,BA` are those of the r x r matrix :math:`s\,R_B R_A^T`: exact, at a cost
    of :math:`O((m+n) r^2)` instead of :math:`O(mn\min(m,n))`. Computed in float64.

    Parameters
    ----------
    B : (m, r) matrix
    A : (r, n) matrix
    scale : float

    Returns
    -------
    numpy.ndarray
        The ``min(m, n)`` singular values, descending; all but the first ``r`` are 0.
    """
    B = torch.as_tensor(B).detach().to(torch.float64)
    A = torch.as_tensor(A).detach().to(torch.float64)
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"expected B (m, r) and A (r, n), got B {tuple(B.shape)} and A {tuple(A.shape)}."
        )
    s = abs(scale) * torch.linalg.svdvals(_r_factor(B) @ _r_factor(A.mT).mT).cpu().numpy()
    out = np.zeros(min(B.shape[0], A.shape[1]))
    k = min(len(s), len(out))
    out[:k] = s[:k]
    return out


def _r_factor(M: torch.Tensor) -> torch.Tensor:
    """R of a thin QR of the tall (m, r) matrix M (M itself if it is not tall)."""
    return torch.linalg.qr(M, mode="r")[1] if M.shape[0] >= M.shape[1] else M


def lowrank_amplification_factor(B: Any, A: Any, scale: float, W0: Any, r: int) -> float:
    """:func:`amplification_factor` of ``s·B·A`` against ``W0``, with U and V taken from the factors.

    Equal to ``amplification_factor(scale * B @ A, W0, r)`` without forming the update:
    with ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A``, the top singular vectors of s·B·A are
    ``Q_B`` and ``Q_A`` times those of the r x r matrix ``s R_B R_Aᵀ``.
    """
    B, A, W0 = (torch.as_tensor(t).detach().to(torch.float64) for t in (B, A, W0))
    QB, RB = torch.linalg.qr(B)
    QA, RA = torch.linalg.qr(A.mT)
    U, s, Vh = torch.linalg.svd(scale * RB @ RA.mT)
    k = min(r, len(s))
    projected = torch.linalg.matrix_norm((QB @ U[:, :k]).mT @ W0 @ (QA @ Vh.mT[:, :k]))
    norm = float(torch.linalg.vector_norm(s))
    return float(norm / projected) if projected > 0 else float("inf")


# --------------------------------------------------------------------------- LoRA section 7


def top_singular_subspace(M: Any, k: int | None = None, side: str = "right") -> torch.Tensor:
    """Orthonormal basis (columns) of the top-``k`` left or right singular directions of M.

    ``side="left"`` spans the column space (output side of a weight), ``"right"``
    the row space (input side). Returned as a float64 tensor of shape (dim, k).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
    M = _as_matrix(M).to(torch.float64)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    basis = U if side == "left" else Vh.mT
    kmax = basis.shape[1]
    if k is None:
        k = kmax
    if not 1 <= k <= kmax:
        raise ValueError(f"k must be between 1 and {kmax} for a {tuple(M.shape)} matrix, got {k}.")
    return basis[:, :k]


def subspace_similarity(A1: Any, A2: Any, i: int, j: int, side: str = "right") -> float:
    r"""Normalised subspace similarity of the LoRA paper, Eq. (4).

    .. math:: \phi(A_1, A_2, i, j) = \frac{\|U_1^{i\,T} U_2^{j}\|_F^2}{\min(i, j)} \in [0, 1]

    where :math:`U_1^i` holds the top-:math:`i` singular vectors of ``A1`` (on ``side``)
    and :math:`U_2^j` the top-:math:`j` of ``A2``. It is 1 when one subspace contains
    the other and 0 when they are orthogonal.

    Parameters
    ----------
    A1, A2 : matrix
        Two matrices acting on the same space on ``side``. For LoRA's ``A`` matrices
        (r x in), use the default ``side="right"``, as the paper does; for ΔW (out x in)
        either side is meaningful.
    i, j : int
        Number of top directions taken from each.
    side : {"right", "left"}

    Returns
    -------
    float
    """
    U1 = top_singular_subspace(A1, i, side)
    U2 = top_singular_subspace(A2, j, side)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(
            f"the {side} singular vectors live in spaces of different size "
            f"({U1.shape[0]} vs {U2.shape[0]}); compare matrices of the same layer."
        )
    return float((U1.mT @ U2).square().sum() / min(i, j))


def subspace_similarity_grid(
    A1: Any, A2: Any, max_i: int | None = None, max_j: int | None = None, side: str = "right"
) -> np.ndarray:
    r"""All :math:`\phi(A_1, A_2, i, j)` for ``1 <= i <= max_i``, ``1 <= j <= max_j``.

    Entry ``[i-1, j-1]`` equals ``subspace_similarity(A1, A2, i, j, side)``; computed
    from one SVD per matrix and a 2-D cumulative sum, ready for a heatmap (the LoRA
    paper's Figures 3 and 4).
    """
    U1 = top_singular_subspace(A1, max_i, side)
    U2 = top_singular_subspace(A2, max_j, side)
    if U1.shape[0] != U2.shape[0]:
        raise ValueError(
            f"the {side} singular vectors live in spaces of different size "
            f"({U1.shape[0]} vs {U2.shape[0]}); compare matrices of the same layer."
        )
    overlap = (U1.mT @ U2).square().numpy()
    total = overlap.cumsum(axis=0).cumsum(axis=1)
    i = np.arange(1, total.shape[0] + 1)[:, None]
    j = np.arange(1, total.shape[1] + 1)[None, :]
    return total / np.minimum(i, j)


def principal_angles(X: Any, Y: Any) -> np.ndarray:
    r"""Principal angles (radians, ascending) between the column spaces of X and Y.

    With orthonormal bases :math:`Q_X, Q_Y`, the cosines of the angles are the
    singular values of :math:`Q_X^T Q_Y` (Björck & Golub 1973). Agrees with
    ``scipy.linalg.subspace_angles`` (which sorts them descending). Pass
    :func:`top_singular_subspace` outputs to compare singular subspaces.
    """
    X = _as_matrix(X, "X").to(torch.float64)
    Y = _as_matrix(Y, "Y").to(torch.float64)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"X and Y must have the same number of rows (the ambient dimension), got "
            f"{X.shape[0]} and {Y.shape[0]}."
        )
    QX = torch.linalg.qr(X).Q
    QY = torch.linalg.qr(Y).Q
    if QX.shape[1] < QY.shape[1]:
        QX, QY = QY, QX  # the angles are symmetric; keep the smaller subspace as Y
    cosines = torch.linalg.svdvals(QX.mT @ QY).clamp(0.0, 1.0).numpy()  # descending
    angles = np.arccos(cosines)  # ascending
    # arccos loses precision for small angles (cos ~ 1); there the sines, the singular
    # values of Y's component orthogonal to X, give them accurately.
    small = cosines > 1 / math.sqrt(2)
    if small.any():
        sines = np.sort(torch.linalg.svdvals(QY - QX @ (QX.mT @ QY)).numpy())  # ascending
        angles[small] = np.arcsin(np.clip(sines[: small.sum()], 0.0, 1.0))
    return angles


def amplification_factor(delta_W: Any, W: Any, r: int) -> float:
    r"""How much ΔW amplifies directions of W: the LoRA paper's section 7.3.

    .. math:: \frac{\|\Delta W\|_F}{\|U^T W V\|_F}

    where :math:`U` (out x r) and :math:`V` (in x r) are the top-:math:`r` left and right
    singular vectors of :math:`\Delta W`, so :math:`U^T W V` is W projected onto ΔW's
    subspace. Hu et al. report about 21.5 for GPT-3's :math:`W_q` at r = 4 and about
    1.9 at r = 64: a low-rank ΔW strongly amplifies directions W does not emphasise.

    Parameters
    ----------
    delta_W : matrix (out x in)
        The update, e.g. from :func:`delta_weights` or ``rankkit.lora_delta_weights``.
    W : matrix (out x in)
        The weight it is compared with (the paper uses the pretrained W).
    r : int
        Number of singular directions of ΔW, ``1 <= r <= min(out, in)``.
    """
    dW = _as_matrix(delta_W, "delta_W").to(torch.float64)
    W = _as_matrix(W, "W").to(torch.float64)
    if dW.shape != W.shape:
        raise ValueError(f"delta_W has shape {tuple(dW.shape)} but W has {tuple(W.shape)}.")
    U = top_singular_subspace(dW, r, "left")
    V = top_singular_subspace(dW, r, "right")
    projected = torch.linalg.matrix_norm(U.mT @ W @ V)
    if projected == 0:
        return float("inf")
    return float(torch.linalg.matrix_norm(dW) / projected)


# --------------------------------------------------------------------------- demo data


def demo_pair(seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A (base, fine-tuned) pair of state dicts whose ΔW ranks are known.

    Four 'layers' of a made-up model, each ``W_ft = W_base + U diag(s) V^T + noise``
    with planted ranks 1, 4, 8 and 16, plus a bias (skipped by the analysis). The
    Gavish–Donoho column of :func:`rank_report` should recover the planted ranks.
    Used by ``python -m rankkit spectrum --demo``.
    """
    gen = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    layers = {"layer0.q": (1, 64, 64), "layer0.v": (4, 64, 64), "layer1.fc1": (8, 256, 64),
              "layer1.fc2": (16, 64, 256)}  # fmt: skip
    for name, (rank, out_dim, in_dim) in layers.items():
        W = torch.randn(out_dim, in_dim, generator=gen) / math.sqrt(in_dim)
        U = torch.linalg.qr(torch.randn(out_dim, rank, generator=gen)).Q
        V = torch.linalg.qr(torch.randn(in_dim, rank, generator=gen)).Q
        strength = torch.linspace(1.0, 0.5, rank)
        noise = 0.002 * torch.randn(out_dim, in_dim, generator=gen)
        base[f"{name}.weight"] = W
        tuned[f"{name}.weight"] = W + U @ torch.diag(strength) @ V.T + noise
        base[f"{name}.bias"] = torch.zeros(out_dim)
        tuned[f"{name}.bias"] = 0.01 * torch.randn(out_dim, generator=gen)
    return base, tuned
