"""What a sweep is: its configuration, and the runs that configuration plans.

:class:`SweepConfig` holds every setting, with the same keys in a TOML file and on
the command line, and checks them once where they enter (:meth:`SweepConfig.validated`).
:func:`plan_runs` turns a config into its :class:`RunSpec` list, in a deterministic
order; a run's :attr:`RunSpec.run_id` names it in ``results.csv`` and on disk.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rankkit.tasks import get_task
from rankkit.utils import did_you_mean

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32)
DEFAULT_SEEDS = (0, 1, 2)
EXECUTORS = ("local", "ray")
METHODS = ("frozen", "full", "lora")


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
        ``lora_alpha``: a number, ``"r"`` (alpha = r, scaling 1) or ``"2r"``-style multiples.
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
    """

    task: str = "digits"
    ranks: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_RANKS))
    seeds: list[int] = dataclasses.field(default_factory=lambda: list(DEFAULT_SEEDS))
    targets: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
    alpha: float | str = "r"
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

    # Keys that change how runs are executed, not what they compute: a directory may be
    # resumed with different values of these.
    EXECUTION_KEYS = (
        "out",
        "jobs",
        "executor",
        "ray_address",
        "cpus_per_run",
        "gpus_per_run",
        "batch",
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
        return self

    def result_affecting(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.EXECUTION_KEYS}

    def output_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"{self.task}-sweep"


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


def _normalise_targets(spec: Any) -> str:
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"empty target set {spec!r}; use names such as 'q,v' or 'all-linear'.")
    return ",".join(parts)


def alpha_for_rank(alpha: float | str, rank: int) -> float:
    """``lora_alpha`` for a rank: a fixed number, ``"r"`` (= rank) or ``"<k>r"`` (= k * rank)."""
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}.")
        return float(alpha)
    text = str(alpha).strip().replace(" ", "")
    match = re.fullmatch(r"(\d*\.?\d*)\*?r", text)
    if match:
        factor = float(match.group(1)) if match.group(1) else 1.0
        if factor <= 0:
            raise ValueError(f"alpha {alpha!r}: the multiple of r must be positive.")
        return factor * rank
    try:
        return alpha_for_rank(float(text), rank)
    except ValueError as err:
        raise ValueError(
            f"alpha must be a positive number, 'r' (alpha = rank) or a multiple such as '2r'; "
            f"got {alpha!r}."
        ) from err


# --------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of a sweep."""

    method: str  # "frozen", "full" or "lora"
    seed: int
    rank: int | None = None
    alpha: float | None = None
    targets: str | None = None

    @property
    def run_id(self) -> str:
        if self.method != "lora":
            return f"{self.method}-s{self.seed}"
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.targets or "").strip("_")
        return f"lora-r{self.rank}-a{self.alpha:g}-{slug}-s{self.seed}"


def plan_runs(config: SweepConfig) -> list[RunSpec]:
    """Every run of the sweep, baselines first, in a deterministic order."""
    runs = []
    if config.baselines:
        for seed in config.seeds:
            runs.append(RunSpec("frozen", seed))
            runs.append(RunSpec("full", seed))
    for targets in config.targets:
        for rank in config.ranks:
            for seed in config.seeds:
                runs.append(
                    RunSpec("lora", seed, rank, alpha_for_rank(config.alpha, rank), targets)
                )
    return runs
