"""Small helpers every layer shares: checked choices, parameter names and counts.

One copy of each, imported everywhere it is needed:

* :func:`check_choice` and :func:`did_you_mean` -- the "did you mean ...?" of every
  option a user names (a task, a projection, a mode, a module);
* :func:`within` -- "this parameter, or anything under this module";
* :func:`set_submodule` -- replace a module of a model by its dotted name;
* :func:`count_parameters` -- trainable and total parameter counts.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import NamedTuple

from torch import nn

__all__ = [
    "ParameterCount",
    "check_choice",
    "count_parameters",
    "did_you_mean",
    "set_submodule",
    "within",
]


def did_you_mean(value: str, options: Iterable[str], cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the option closest to ``value``, or ``""`` if none is close."""
    close = difflib.get_close_matches(str(value), list(options), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(kind: str, value: str, options: Iterable[str], *, cutoff: float = 0.4) -> str:
    """``value`` if it is one of ``options`` (case-insensitively), else a ValueError that helps.

    Parameters
    ----------
    kind : str
        What is chosen, for the message: ``"projection"``, ``"task"``...
    value : str
        The user's choice.
    options : iterable of str
        The valid choices.
    cutoff : float
        How close (``difflib`` ratio) a suggestion must be.

    Returns
    -------
    str
        The matching option, spelled as in ``options``.

    Raises
    ------
    ValueError
        ``unknown <kind> 'x' (did you mean 'y'?); choose one of a, b, c.``

    Examples
    --------
    >>> check_choice("projection", "Dense", ["dense", "sparse", "fastfood"])
    'dense'
    """
    options = list(options)
    by_key = {str(o).lower(): o for o in options}
    key = str(value).lower()
    if key in by_key:
        return by_key[key]
    hint = did_you_mean(key, by_key, cutoff=cutoff)
    raise ValueError(f"unknown {kind} {value!r}{hint}; choose one of {', '.join(options)}.")


def within(name: str, prefix: str) -> bool:
    """True for the parameter named ``prefix`` itself and for every name under module ``prefix``.

    >>> within("head.bias", "head"), within("head", "head"), within("header.w", "head")
    (True, True, False)
    """
    return name == prefix or name.startswith(prefix + ".")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in ``model`` under the dotted ``name`` (``"blocks.0.attn.q"``)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


class ParameterCount(NamedTuple):
    """Trainable and total parameter counts (shared parameters counted once)."""

    trainable: int
    total: int
    fraction: float


def count_parameters(model: nn.Module) -> ParameterCount:
    """``(trainable, total, trainable / total)`` for ``model``."""
    total = trainable = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return ParameterCount(trainable, total, trainable / total if total else 0.0)
