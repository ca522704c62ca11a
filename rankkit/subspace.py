r"""Training inside a random subspace: :math:`\theta = \theta_0 + P\,\theta_d`.

:class:`SubspaceModel` wraps any network so that only the ``d`` coordinates
:math:`\theta_d` (plus, in SAID mode, one scale per parameter tensor) train, while
the network's own ``D`` parameters stay frozen at :math:`\theta_0`; :math:`P` is a
fixed random projection from :mod:`rankkit.projections`. Any loop that trains the
parameters with ``requires_grad=True`` (:func:`rankkit.train.fit`) then trains in
the subspace. :class:`HyperplaneProblem` is Li et al.'s toy problem, whose
intrinsic dimension is known exactly (10). :mod:`rankkit.intrinsic` measures
:math:`d_{90}` with both; the theory is in its docstring.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from rankkit.projections import (
    DEFAULT_MAX_DENSE_BYTES,
    Projection,
    check_dimensions,
    make_projection,
)
from rankkit.utils import check_choice, within

__all__ = ["MODES", "HyperplaneProblem", "HyperplaneToy", "SubspaceModel"]

MODES = ("did", "said")
"""``did``: one projection for all parameters; ``said``: plus a scale per tensor."""


# --------------------------------------------------------------------------- the wrapper


class SubspaceModel(nn.Module):
    r"""Train ``model`` only in a random ``d``-dimensional subspace of its parameters.

    The wrapped model's own parameters become :math:`\theta_0` and are frozen
    (``requires_grad=False``, set in place on ``model``). The only trainable
    parameters are ``theta_d`` (length ``d``, or ``d - m`` in SAID mode, starting
    at zero) and, in SAID mode, ``said_scale`` (length ``m``, starting at one).
    :meth:`forward` takes the same inputs as ``model`` and evaluates it at
    :math:`\theta_0 + P\theta_d` through :func:`torch.func.functional_call`, so any
    training loop that trains the parameters with ``requires_grad=True`` (such as
    :func:`rankkit.train.fit`) trains the subspace unchanged.

    Parameters
    ----------
    model : nn.Module
        The network; its current weights are :math:`\theta_0`.
    d : int
        Subspace dimension, ``1 <= d <= D`` (``m + 1 <= d <= D + m`` in SAID mode),
        where ``D`` is the number of parameters taking part.
    projection : {"fastfood", "dense", "sparse"}
        How :math:`P` is drawn; see :mod:`rankkit.projections`.
    mode : {"did", "said"}
        Direct, or structure-aware with one scale per parameter tensor.
    exclude : iterable of str
        Parameter names, or module prefixes such as ``"head"``, that do *not* take
        part: they stay frozen at their :math:`\theta_0` value and are not counted
        in ``D``. Default: all parameters take part.
    seed : int
        Seed of the projection.
    max_dense_bytes : int
        Memory budget of the ``dense`` projection.

    Attributes
    ----------
    base : nn.Module
        The wrapped model (holding :math:`\theta_0`).
    projection : Projection
    names : list of str
        Parameters taking part, in the order they are laid out in the flat vector.
    D : int
        Number of parameters taking part.
    d : int
        Number of trained numbers (``theta_d`` plus SAID scales).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> sub = SubspaceModel(net, d=5, projection="dense")
    >>> x = torch.randn(3, 4)
    >>> torch.equal(sub(x), net(x))  # theta_d = 0 is the base model
    True
    >>> [n for n, p in sub.named_parameters() if p.requires_grad]
    ['theta_d']
    """

    def __init__(
        self,
        model: nn.Module,
        d: int,
        *,
        projection: str = "fastfood",
        mode: str = "did",
        exclude: Iterable[str] = (),
        seed: int = 0,
        max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.mode = check_choice("mode", mode, MODES)
        exclude = [exclude] if isinstance(exclude, str) else list(exclude)

        named = list(model.named_parameters())
        if not named:
            raise ValueError("model has no parameters to train in a subspace.")
        for pattern in exclude:
            if not any(within(name, pattern) for name, _ in named):
                some = ", ".join(name for name, _ in named[:6])
                raise ValueError(
                    f"exclude={pattern!r} matches no parameter of the model; "
                    f"parameter names look like: {some}, ..."
                )
        taking_part = [(n, p) for n, p in named if not any(within(n, e) for e in exclude)]
        if not taking_part:
            raise ValueError(f"exclude={exclude!r} leaves no parameter to train.")

        self.base = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.names = [n for n, _ in taking_part]
        self._shapes = [p.shape for _, p in taking_part]
        self._numels = [p.numel() for _, p in taking_part]
        self.D = sum(self._numels)
        self.d = d

        m = len(self.names) if self.mode == "said" else 0
        if m and isinstance(d, int) and not isinstance(d, bool) and d > self.D + m:
            raise ValueError(
                f"d={d} exceeds what mode='said' can use: D={self.D} projected parameters plus "
                f"m={m} per-tensor scales. Use d <= {self.D + m}."
            )
        check_dimensions(self.D + m, d)
        if d <= m:
            raise ValueError(
                f"d={d} is too small for mode='said': it spends one of the d dimensions on "
                f"a scale for each of the m={m} parameter tensors, leaving none to project. "
                f"Use d >= {m + 1}, or mode='did'."
            )
        self.projection: Projection = make_projection(
            projection, self.D, d - m, seed=seed, max_dense_bytes=max_dense_bytes
        )
        self.theta_d = nn.Parameter(torch.zeros(d - m))
        self.said_scale = nn.Parameter(torch.ones(m)) if m else None

    @property
    def num_trainable(self) -> int:
        """Number of trained numbers: ``d`` (``theta_d`` plus the SAID scales)."""
        return sum(p.numel() for p in (self.theta_d, self.said_scale) if p is not None)

    def deltas(self) -> dict[str, Tensor]:
        r"""The displacement :math:`\theta - \theta_0` of each parameter taking part."""
        flat = self.projection(self.theta_d)
        # torch.split, not slicing: its backward is one concatenation, whereas
        # each slice's backward would allocate a zero tensor of the full size D.
        pieces = torch.split(flat, self._numels)
        out = {}
        for i, (name, shape, piece) in enumerate(zip(self.names, self._shapes, pieces)):
            delta = piece.view(shape)
            if self.said_scale is not None:
                delta = delta * self.said_scale[i]
            out[name] = delta
        return out

    def current_parameters(self) -> dict[str, Tensor]:
        r""":math:`\theta = \theta_0 + P\theta_d` for each parameter taking part."""
        return {
            name: (p0 := self.base.get_parameter(name)) + delta.to(p0.dtype)
            for name, delta in self.deltas().items()
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.base, self.current_parameters(), args, kwargs)

    def merged(self) -> nn.Module:
        r"""A copy of the base model with :math:`\theta_0 + P\theta_d` written into it.

        Useful to compare with other fine-tuning methods, e.g. the spectra of
        ``ΔW`` with :func:`rankkit.delta_weights`. Parameters of the copy have
        ``requires_grad=False``.
        """
        merged = copy.deepcopy(self.base)
        with torch.no_grad():
            for name, value in self.current_parameters().items():
                merged.get_parameter(name).copy_(value)
        return merged

    def extra_repr(self) -> str:
        return (
            f"d={self.d}, D={self.D:,}, projection={self.projection.name!r}, mode={self.mode!r}, "
            f"tensors={len(self.names)}"
        )


# --------------------------------------------------------------------------- the toy problem


class HyperplaneToy(nn.Module):
    """Li et al.'s toy model: one parameter vector whose group sums are the output.

    Parameters
    ----------
    groups, group_size : int
        ``D = groups * group_size`` parameters; the output is the sum of each
        consecutive group of ``group_size`` entries.
    seed : int
        Seed of the random starting point :math:`\\theta_0 \\sim N(0, 1)`.
    """

    def __init__(self, groups: int = 10, group_size: int = 100, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.groups = groups
        self.theta = nn.Parameter(torch.randn(groups * group_size, generator=gen))
        self.register_buffer("targets", torch.arange(1, groups + 1, dtype=torch.float32))

    def forward(self) -> Tensor:
        return self.theta.view(self.groups, -1).sum(1)


class HyperplaneProblem:
    r"""Li et al.'s toy problem, whose intrinsic dimension is exactly ``groups``.

    ``D = groups * group_size`` parameters (default 10 x 100 = 1000); the loss
    :math:`L(\theta) = \sum_g (\sum_{i \in g} \theta_i - t_g)^2` with targets
    :math:`t_g = 1, 2, \dots, 10`. The solution set is a hyperplane of dimension
    ``D - groups`` = 990, so a random ``d``-dimensional affine subspace reaches it
    exactly if ``d >= 10`` and generically misses it if ``d < 10``.

    **Training.** The residual is linear in :math:`\theta_d` (DID), so
    "training" is a Gauss–Newton solve through the :class:`SubspaceModel`: the
    10 x d Jacobian by backpropagation, then the minimum-norm least-squares step
    (plus refinement steps, which also handle SAID's bilinear scales). This is the
    best any optimiser could do in the subspace, so the measured dimension is
    the subspace's, not an optimiser's.

    **Metric.** "90% of the loss removed" would be the wrong criterion here: with
    ``d = 9`` the subspace misses the hyperplane along one random direction out
    of 10 and removes on average 90% of the initial loss :math:`L_0` anyway. The
    question is whether the hyperplane is *reached*, so the metric counts digits
    of precision, capped at ``digits``:

    .. math::  \text{precision} = \min\big(1, \log_{10}(L_0 / L) / \text{digits}\big)

    Full training reaches 1 (baseline 1); 90% of it means :math:`L \le 10^{-5.4}
    L_0` for the default ``digits = 6``. With ``d = 9`` a seed gets there with
    probability about 0.5% (the missed direction must be almost orthogonal to
    the initial residual); with ``d >= 10`` every seed gets there.

    Parameters
    ----------
    groups, group_size : int
        Problem size; the intrinsic dimension is ``groups``.
    digits : float
        Digits of precision that count as solved.
    """

    metric_name = "precision"

    def __init__(self, groups: int = 10, group_size: int = 100, digits: float = 6.0) -> None:
        self.groups, self.group_size, self.digits = groups, group_size, float(digits)
        self.name = f"hyperplane toy (D={groups * group_size}, {groups} groups)"

    def num_params(self) -> int:
        return self.groups * self.group_size

    def num_tensors(self) -> int:
        return 1

    def build_model(self, seed: int = 0) -> HyperplaneToy:
        return HyperplaneToy(self.groups, self.group_size, seed=seed)

    def precision(self, loss: float, initial_loss: float) -> float:
        """The metric for a final ``loss`` starting from ``initial_loss``."""
        if loss <= 0:
            return 1.0
        return float(np.clip(math.log10(initial_loss / loss) / self.digits, 0.0, 1.0))

    def train_full(self, seed: int) -> float:
        model = self.build_model(seed)
        model.theta.requires_grad_(True)
        return self._solve(model, [model.theta], model.targets)

    def train_subspace(
        self,
        d: int,
        seed: int,
        *,
        projection: str = "fastfood",
        mode: str = "did",
        max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
    ) -> float:
        base = self.build_model(seed)
        sub = SubspaceModel(
            base, d, projection=projection, mode=mode, seed=seed, max_dense_bytes=max_dense_bytes
        )
        return self._solve(sub, [p for p in sub.parameters() if p.requires_grad], base.targets)

    def _solve(self, model: nn.Module, params: list[Tensor], targets: Tensor) -> float:
        def loss() -> Tensor:
            return ((model() - targets) ** 2).sum()

        with torch.no_grad():
            initial = float(loss())
        _gauss_newton(lambda: model() - targets, params)
        with torch.no_grad():
            return self.precision(float(loss()), initial)


def _gauss_newton(residual: Callable[[], Tensor], params: list[Tensor], steps: int = 20) -> None:
    """Minimise ``||residual()||^2`` over ``params`` by Gauss–Newton steps.

    Each step solves the linearised problem ``J delta = -r`` in float64 for the
    minimum-norm least-squares ``delta`` (SVD-based ``gelsd``). Stops when the loss
    stops decreasing.
    """
    best = math.inf
    for _ in range(steps):
        r = residual()
        loss = float((r.detach().double() ** 2).sum())
        if loss == 0 or loss >= best * (1 - 1e-6):
            break
        best = loss
        rows = []
        for i in range(r.numel()):
            grads = torch.autograd.grad(r[i], params, retain_graph=i + 1 < r.numel())
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        J = torch.stack(rows).double()
        step = torch.linalg.lstsq(J, -r.detach().double().unsqueeze(1), driver="gelsd").solution
        with torch.no_grad():
            offset = 0
            for p in params:
                p += step[offset : offset + p.numel(), 0].view_as(p).to(p.dtype)
                offset += p.numel()
