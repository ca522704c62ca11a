"""What a sweep is: its configuration, and the runs that configuration plans.

:class:`SweepConfig` holds every setting, with the same keys in a TOML file and on
the command line, and checks them once where they enter (:meth:`SweepConfig.validated`).
:func:`plan_runs` turns a config into its :class:`RunSpec` list, in a deterministic
order; a run's :attr:`RunSpec.run_id` names it in ``results.csv`` and on disk.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rankkit.tasks import get_task
from rankkit.tasks.base import frozen_data_key, read_manifest
from rankkit.utils import check_choice, did_you_mean

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32)
DEFAULT_SEEDS = (0, 1, 2)
EXECUTORS = ("local", "ray")
#: The ``method`` of a run. ``lora`` has the same rank r in every adapted layer;
#: ``lora-spectral`` spends uniform rank r's parameters with per-layer ranks from a pilot
#: full fine-tune's spectra (``allocation="spectral"``); ``adalora`` is PEFT's AdaLoRA
#: with uniform rank r's total rank as its final budget (``adalora=True``).
METHODS = ("frozen", "full", "lora", "lora-spectral", "adalora")
#: The methods trained as rankkit LoRA (one at a time or batched).
LORA_METHODS = ("lora", "lora-spectral")
#: How LoRA runs choose each layer's rank (:attr:`SweepConfig.allocation`).
ALLOCATIONS = ("uniform", "spectral")
#: AdaLoRA starts at this multiple of its final rank (Zhang et al. 2023: b(0) = 1.5 b(T)).
ADALORA_INIT_FACTOR = 1.5


# --------------------------------------------------------------------------- configuration


@dataclasses.dataclass
class SweepConfig:
    """Everything that defines a sweep. Same keys in a TOML file and on the command line.

    Parameters
    ----------
    task : str
        A task from :func:`rankkit.tasks.list_tasks`.
    ranks : list of int
        LoRA ranks. Ranks above the narrowest targeted layer are an error.
    seeds : list of int
        One run per seed for every configuration (baselines included).
    targets : list of str
        Target sets to compare, each a comma-separated list of roles or module-name
        suffixes (``"q,v"``) or ``"all-linear"``.
    alpha : float or str
        ``lora_alpha`` rule (:func:`alpha_for_rank`): a number, ``"r"`` (scale 1),
        ``"sqrt(r)"`` (scale 1/sqrt(r), the default) or multiples such as ``"2r"``. The
        default keeps every rank of the grid training on every built-in task, where
        ``"r"`` lets adapters of rank 32-64 diverge on ``topics`` (``docs/sweeps.md``).
    rslora : bool
        Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023).
    epochs, lr, full_lr : optional
        Training length and learning rates for LoRA and for the full-fine-tuning /
        frozen-base baselines; ``None`` takes the task's defaults.
    baselines : bool
        Also run full fine-tuning and the frozen base (head only), once per seed.
    device : str
        ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``...
    out : str, optional
        Output directory; default ``runs/<task>-sweep``.
    jobs : int
        Local worker processes (``executor="local"``).
    executor : {"local", "ray"}
    ray_address : str, optional
        Address of an existing Ray cluster; default starts a local instance.
    cpus_per_run, gpus_per_run : float
        Ray resource requests per run; fractional GPUs let small runs share one GPU.
    batch : bool
        Train compatible LoRA runs together (batched multi-adapter training) when available.
    allocation : {"uniform", "spectral"}
        ``"spectral"`` adds, next to every uniform rank r, a LoRA run with the same
        parameter budget, r * sum(in + out) over the adapted layers, spent on per-layer
        ranks that keep the most energy of a pilot full fine-tune's ΔW
        (:func:`rankkit.allocate_budget`, the rule of ``extract --budget``). The pilot is
        one full fine-tune with seed 0, kept in ``<out>/pilot/`` and reused
        (:mod:`rankkit.sweep.pilot`).
    adalora : bool
        Also train PEFT's AdaLoRA at every rank r: final budget r units of rank per
        adapted layer (``target_r = r``), starting from ``ceil(1.5 r)``
        (:mod:`rankkit.adalora`). Needs ``pip install 'rankkit[peft]'``.
    """

    task: str = "digits"
    ranks: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_RANKS))
    seeds: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_SEEDS))
    targets: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
    alpha: float | str = "sqrt(r)"
    rslora: bool = False
    epochs: int | None = None
    lr: float | None = None
    full_lr: float | None = None
    baselines: bool = True
    device: str = "auto"
    out: str | None = None
    jobs: int = 1
    executor: str = "local"
    ray_address: str | None = None
    cpus_per_run: float = 1.0
    gpus_per_run: float = 0.0
    batch: bool = True
    allocation: str = "uniform"
    adalora: bool = False

    # Keys that change no run's result: how runs are executed, and which runs join the
    # uniform-rank ones (spectral and AdaLoRA runs have run ids of their own). A directory
    # may be resumed with different values of these -- e.g. adding spectral runs to a
    # finished uniform sweep -- and folders written before a key existed resume as well.
    EXECUTION_KEYS = (
        "out",
        "jobs",
        "executor",
        "ray_address",
        "cpus_per_run",
        "gpus_per_run",
        "batch",
        "allocation",
        "adalora",
    )

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> SweepConfig:
        unknown = [k for k in data if k not in cls.keys()]
        if unknown:
            hints = [f"{k!r}" + did_you_mean(k.replace("-", "_"), cls.keys()) for k in unknown]
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(hints)}. Valid keys: {', '.join(cls.keys())}."
            )
        return cls(**dict(data)).validated()

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> SweepConfig:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"sweep config {str(path)!r} does not exist.") from err
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err}).") from err
        data = data.get("sweep", data)  # allow an optional [sweep] table
        return cls.from_dict(data, source=str(path))

    def validated(self) -> SweepConfig:
        """Check every field early; return self. Messages say what was expected."""
        get_task(self.task)  # raises with the known task names
        self.ranks = parse_int_list(self.ranks, "ranks")
        self.seeds = parse_int_list(self.seeds, "seeds", minimum=0)
        if not self.ranks:
            raise ValueError("ranks is empty: give at least one LoRA rank, e.g. --ranks 1,2,4,8.")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed, e.g. --seeds 0,1,2.")
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = [_normalise_targets(t) for t in self.targets]
        if not self.targets:
            raise ValueError("targets is empty: give a target set such as 'q,v' or 'all-linear'.")
        alpha_for_rank(self.alpha, 1)  # validates the spelling
        if self.executor not in EXECUTORS:
            raise ValueError(
                f"unknown executor {self.executor!r}; choose one of {', '.join(EXECUTORS)}."
            )
        if int(self.jobs) < 1:
            raise ValueError(f"jobs must be at least 1, got {self.jobs}.")
        self.jobs = int(self.jobs)
        for name in ("epochs",):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}.")
        for name in ("lr", "full_lr"):
            value = getattr(self, name)
            if value is not None and not float(value) > 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        if self.cpus_per_run <= 0 or self.gpus_per_run < 0:
            raise ValueError("cpus_per_run must be > 0 and gpus_per_run >= 0.")
        self.allocation = check_choice("allocation", self.allocation, ALLOCATIONS)
        if not isinstance(self.adalora, bool):
            raise ValueError(f"adalora must be true or false, got {self.adalora!r}.")
        return self

    def result_affecting(self) -> dict[str, Any]:
        """The settings that change some run's result: this config's, and the task's.

        ``None`` in the config (``lr``, ``epochs``...) means "the task's default", so the
        task's defaults, base weights and data count as much as the config's own keys:
        a folder written under other defaults (an older rankkit, a rebuilt base) must not
        be resumed as if nothing had changed (:func:`task_defaults`).
        """
        own = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.EXECUTION_KEYS}
        return {**own, "task_defaults": task_defaults(self.task)}

    def output_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{self.task}-sweep"


def task_defaults(name: str) -> dict[str, Any]:
    """What task ``name`` gives every run that the config leaves open.

    Its ``default_hparams`` (learning rates, epochs...) and the SHA-256 of its base
    weights and frozen data in ``data/manifest.json`` (``None`` where the manifest has no
    entry, e.g. MiniLM's weights, which come from a package). JSON-ready, as the sweep
    folder's ``config.json`` stores it.
    """
    task = get_task(name)
    manifest = read_manifest()
    return {
        "hparams": {k: task.default_hparams[k] for k in sorted(task.default_hparams)},
        "base_sha256": manifest.get(task.name, {}).get("sha256"),
        "data_sha256": manifest.get(frozen_data_key(task.name), {}).get("sha256"),
    }


def parse_int_list(values: Any, name: str, *, minimum: int = 1) -> list[int]:
    """A list option as sorted, distinct integers: the one parser of every list option.

    Accepts what a user may type or a config file may hold, alike: ``"1,2,4"``,
    ``"1 2 4"``, ``["1,2", "4"]`` (argparse tokens of ``--ranks 1,2 4``), ``[1, 2, 4]``
    or a single ``4``. ``name`` and ``minimum`` make the error message.

    Raises
    ------
    ValueError
        Naming the option and the offending item if one is not an integer >= ``minimum``.
    """
    if isinstance(values, (str, int)):
        values = [values]
    out = []
    for item in values:
        pieces = re.split(r"[,\s]+", item.strip()) if isinstance(item, str) else [item]
        for v in (p for p in pieces if p != ""):
            try:
                iv = int(v)
                exact = iv == float(v)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{name}: {v!r} is not an integer.") from err
            if not exact or iv < minimum:
                kind = {0: "a non-negative integer", 1: "a positive integer"}
                raise ValueError(
                    f"{name}: {v!r} is not {kind.get(minimum, f'an integer >= {minimum}')}."
                )
            out.append(iv)
    return sorted(dict.fromkeys(out))


def target_modules(targets: str) -> str | list[str]:
    """A sweep's target set (``"q,v"`` or ``"all-linear"``) as ``LoraConfig.target_modules``."""
    return "all-linear" if targets == "all-linear" else targets.split(",")


def adalora_init_rank(rank: int) -> int:
    """AdaLoRA's initial rank for a final rank ``rank``: ``ceil(1.5 rank)``."""
    return math.ceil(ADALORA_INIT_FACTOR * rank)


def _normalise_targets(spec: Any) -> str:
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"empty target set {spec!r}; use names such as 'q,v' or 'all-linear'.")
    return ",".join(parts)


def alpha_for_rank(alpha: float | str, rank: int) -> float:
    """``lora_alpha`` for a rank: a number, ``"r"``, ``"sqrt(r)"``, or a multiple (``"2r"``).

    The scale of a LoRA update is ``s = alpha / r``:

    * a fixed number (PEFT's default 8; the LoRA paper fixes alpha to the first r it
      tries): ``s = alpha / r`` shrinks as the rank grows;
    * ``"r"``: ``s = 1`` at every rank;
    * ``"sqrt(r)"``: ``s = 1 / sqrt(r)``, rsLoRA's scaling (Kalajdzievski 2023), so
      the update's size does not grow with the rank; at r = 1 it equals ``"r"``.
    """
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}.")
        return float(alpha)
    text = str(alpha).strip().replace(" ", "")
    match = re.fullmatch(r"(\d*\.?\d*)\*?(r|sqrt\(r\))", text)
    if match:
        factor = float(match.group(1)) if match.group(1) else 1.0
        if factor <= 0:
            raise ValueError(f"alpha {alpha!r}: the multiple of r must be positive.")
        return factor * (rank if match.group(2) == "r" else math.sqrt(rank))
    try:
        return alpha_for_rank(float(text), rank)
    except ValueError as err:
        raise ValueError(
            "alpha must be a positive number, 'r' (alpha = rank), 'sqrt(r)' (rsLoRA's "
            f"scale 1/sqrt(r)) or a multiple such as '2r'; got {alpha!r}."
        ) from err


# --------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep.

    For ``lora-spectral`` and ``adalora`` runs, ``rank`` names the budget: that of
    uniform rank ``rank``. ``rank_pattern`` holds a ``lora-spectral`` run's
    ``(module, rank)`` pairs (layers left out get no adapter); ``alpha`` is the alpha
    of uniform rank ``rank`` (``lora``, ``lora-spectral``) or of AdaLoRA's initial
    rank (``adalora``).
    """

    method: str  # one of METHODS
    seed: int
    rank: int | None = None
    alpha: float | None = None
    targets: str | None = None
    rank_pattern: tuple[tuple[str, int], ...] | None = None

    @property
    def run_id(self) -> str:
        if self.method in ("frozen", "full"):
            return f"{self.method}-s{self.seed}"
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.targets or "").strip("_")
        return f"{self.method}-r{self.rank}-a{self.alpha:g}-{slug}-s{self.seed}"

    @property
    def allocation(self) -> str | None:
        """How the run's ranks were chosen: uniform, spectral, adalora (None: a baseline)."""
        return {"lora": "uniform", "lora-spectral": "spectral", "adalora": "adalora"}.get(
            self.method
        )


def plan_runs(
    config: SweepConfig, rank_patterns: Mapping[tuple[str, int], Mapping[str, int]] | None = None
) -> list[RunSpec]:
    """Every run of the sweep, baselines first, in a deterministic order.

    Per target set: uniform ranks, then (``allocation="spectral"``) the spectral runs,
    then (``adalora``) the AdaLoRA runs, each by rank and seed.

    Parameters
    ----------
    config : SweepConfig
    rank_patterns : mapping, optional
        ``{(targets, rank): {module: rank}}``, required with ``allocation="spectral"``:
        what :func:`rankkit.sweep.pilot.spectral_rank_patterns` returns.
    """
    spectral = config.allocation == "spectral"
    if spectral and rank_patterns is None:
        raise ValueError(
            "plan_runs: allocation='spectral' needs the per-layer ranks of a pilot fine-tune; "
            "pass rank_patterns=spectral_rank_patterns(config, out_dir)."
        )
    runs = []
    if config.baselines:
        for seed in config.seeds:
            runs.append(RunSpec("frozen", seed))
            runs.append(RunSpec("full", seed))
    for targets in config.targets:
        alpha = {r: alpha_for_rank(config.alpha, r) for r in config.ranks}
        for rank in config.ranks:
            for seed in config.seeds:
                runs.append(RunSpec("lora", seed, rank, alpha[rank], targets))
        for rank in config.ranks if spectral else []:
            pattern = tuple(rank_patterns[targets, rank].items())
            for seed in config.seeds:
                runs.append(RunSpec("lora-spectral", seed, rank, alpha[rank], targets, pattern))
        for rank in config.ranks if config.adalora else []:
            init_alpha = alpha_for_rank(config.alpha, adalora_init_rank(rank))
            for seed in config.seeds:
                runs.append(RunSpec("adalora", seed, rank, init_alpha, targets))
    return runs
