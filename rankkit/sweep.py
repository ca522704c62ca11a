"""Rank sweeps: LoRA at many ranks, seeds and target sets, next to full fine-tuning.

A sweep answers "what rank should I pick?" the way the LoRA paper does (its Tables 5
and 6): train LoRA at ranks r = 1, 2, 4, ... on the same pretrained base, a few seeds
each, and compare the test metric with two references on the same task:

* **full fine-tuning** (every weight trainable) -- the quality LoRA tries to match;
* the **frozen base** (only the task head trained) -- what you get for free.

The *gain* of a run is ``(metric - frozen) / (full - frozen)``: 0 means no better than
the frozen base, 1 means as good as full fine-tuning. :func:`rank_for_gain` reads off
the smallest rank reaching 90% or 95% of the gain, and :func:`rank_for_gain_interval`
says how much that answer moves when the seeds are resampled (a bootstrap).

Results are crash-safe. Each finished run is merged into ``results.csv`` by writing
the file to a temporary name and renaming it over the old one (an atomic operation),
so killing the process at any moment loses at most the runs in flight and never
leaves a half-written file. Running the same sweep into the same directory skips the
runs already recorded as ``ok`` and retries those recorded as ``error``.

A directory is safe under concurrency: several processes (terminals, or machines
sharing a filesystem with working file locks) may run the same sweep into it at once.
Each run is claimed by exactly one process through a lock on ``.claims/<run_id>``,
which the operating system releases if that process dies; rows are merged under the
directory's lock (``.lock``), and a finished row is never replaced by an error.

Executors: ``local`` runs in this process (``jobs=1``) or in ``jobs`` worker processes;
``ray`` submits one task per run to a Ray cluster (``ray_address``) or a local Ray
instance, with per-run CPU and (fractional) GPU requests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from rankkit.batched import fit_batched, max_batch_runs
from rankkit.devices import resolve_device
from rankkit.lora import LoraConfig, apply_lora, save_adapter
from rankkit.methods import method_lr, prepare_run
from rankkit.tasks import get_task
from rankkit.utils import count_parameters

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32)
DEFAULT_SEEDS = (0, 1, 2)
EXECUTORS = ("local", "ray")
METHODS = ("frozen", "full", "lora")

RESULT_COLUMNS = [
    "run_id", "task", "method", "rank", "alpha", "targets", "seed",
    "trainable_params", "total_params", "trainable_fraction",
    "val_metric", "test_metric", "metric", "train_time_s", "peak_memory_mb", "device",
    "status", "error", "adapter",
]  # fmt: skip


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
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k.replace("-", "_"), cls.keys(), n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
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
        from rankkit.tasks import get_task  # raises with the known task names

        get_task(self.task)
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


def check_ranks_fit(config: SweepConfig) -> None:
    """Refuse ranks larger than the narrowest layer each target set adapts.

    The layers are read from a model on the ``meta`` device: shapes only, no memory, no
    weights and no random numbers.
    """
    task = get_task(config.task)
    for targets in config.targets:
        with torch.device("meta"):
            model = task.build_model(pretrained=False, seed=None)
            config_r1 = LoraConfig(
                r=1, target_modules=_target_modules(targets), modules_to_save=task.head_modules
            )
            apply_lora(model, config_r1, roles=task.roles)
        widths = {
            name: min(m.in_features, m.out_features)
            for name, m in model.named_modules()
            if hasattr(m, "lora_A")
        }
        narrowest = min(widths, key=widths.get)
        too_big = [r for r in config.ranks if r > widths[narrowest]]
        if too_big:
            raise ValueError(
                f"rank(s) {too_big} exceed the width of {narrowest!r} "
                f"(min(in, out) = {widths[narrowest]}) for targets {targets!r}; the largest "
                f"useful rank there is {widths[narrowest]}."
            )


def run_one(spec: RunSpec, config: SweepConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train one run and return its results row. Exceptions propagate to the caller."""
    task = get_task(config.task)
    lora_config = _lora_config(spec, config, task) if spec.method == "lora" else None
    lr = config.lr if spec.method == "lora" else config.full_lr
    run = prepare_run(task, spec.method, spec.seed, lr=lr, lora_config=lora_config)
    result = run.fit(task, epochs=config.epochs, device=config.device, progress=False)
    return _result_row(spec, config, task, run.model, result, out_dir)


def _target_modules(targets: str) -> str | list[str]:
    """A sweep's target set (``"q,v"`` or ``"all-linear"``) as ``LoraConfig.target_modules``."""
    return "all-linear" if targets == "all-linear" else targets.split(",")


def _lora_config(spec: RunSpec, config: SweepConfig, task) -> Any:
    """The LoraConfig of a LoRA run (the same for single and batched training)."""
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=_target_modules(spec.targets),
        use_rslora=config.rslora,
        modules_to_save=task.head_modules,
    )


def _result_row(spec: RunSpec, config: SweepConfig, task, model, result, out_dir) -> dict[str, Any]:
    """Save a trained run's adapter (LoRA) and return its results row."""
    adapter_path = ""
    counts = count_parameters(model)
    if spec.method == "lora":
        directory = Path(out_dir) / "adapters" / spec.run_id
        save_adapter(model, directory)
        adapter_path = str(directory.relative_to(out_dir) / "adapter_model.safetensors")
    metric = task.metric_name
    return {
        "run_id": spec.run_id,
        "task": config.task,
        "method": spec.method,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "targets": spec.targets,
        "seed": spec.seed,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        "trainable_fraction": counts.fraction,
        "val_metric": result.metrics[f"val_{metric}"],
        "test_metric": result.metrics[f"test_{metric}"],
        "metric": metric,
        "train_time_s": result.wall_time_s,
        "peak_memory_mb": result.peak_memory_mb,
        "device": str(result.device),
        "status": "ok",
        "error": "",
        "adapter": adapter_path,
    }


def _safe_run(
    runner: Callable[..., dict[str, Any]], spec: RunSpec, config: SweepConfig, out_dir: str
) -> dict[str, Any]:
    """Run, and turn any exception into an ``error`` row so the sweep carries on."""
    try:
        return runner(spec, config, out_dir)
    except Exception as err:  # a failing run must never stop the sweep
        return {
            **_spec_row(spec, config),
            "status": "error",
            "error": f"{type(err).__name__}: {err}".replace("\n", " ")[:500],
            "traceback": traceback.format_exc(),
        }


def _spec_row(spec: RunSpec, config: SweepConfig) -> dict[str, Any]:
    return {
        "run_id": spec.run_id, "task": config.task, "method": spec.method, "rank": spec.rank,
        "alpha": spec.alpha, "targets": spec.targets, "seed": spec.seed,
    }  # fmt: skip


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    # Ctrl-C is the parent's to handle: it stops the queue and keeps the runs in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------- results store

# Integer columns that may be missing in some rows (baselines have no rank, error rows no
# parameter counts); written as integers (1, not 1.0) with empty cells for missing values.
_INTEGER_COLUMNS = ("rank", "seed", "trainable_params", "total_params")


class ResultsStore:
    """``results.csv`` of a sweep directory, shared by every process working on the sweep.

    :meth:`record` merges under the directory lock: it re-reads the file, adds its row
    and writes a temporary file that atomically replaces the old one. So processes
    writing at the same time never lose each other's rows, a reader always sees a
    whole file, and a finished (``ok``) row is never replaced by an ``error`` row.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / "results.csv"
        self.rows: dict[str, dict[str, Any]] = {}
        self.reload()

    def reload(self) -> ResultsStore:
        """Re-read the file (other processes may have added rows); return self."""
        self.rows = {}
        if not self.path.exists():
            return self
        try:
            frame = pd.read_csv(self.path, dtype={"targets": str, "error": str, "adapter": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{self.path} is not a readable results table ({err}). Move it away "
                "or choose another --out directory."
            ) from err
        if "run_id" not in frame:
            raise ValueError(f"{self.path} has no run_id column; it was not written by rankkit.")
        for row in frame.to_dict("records"):
            self.rows[row["run_id"]] = {k: _clean(v) for k, v in row.items()}
        return self

    def finished(self) -> set[str]:
        return {k for k, row in self.rows.items() if row.get("status") == "ok"}

    def record(self, row: Mapping[str, Any]) -> None:
        """Merge one run's row into the file, under the directory lock."""
        row = {k: v for k, v in row.items() if k != "traceback"}
        self.directory.mkdir(parents=True, exist_ok=True)
        with _DirectoryLock(self.directory):
            self.reload()
            old = self.rows.get(row["run_id"])
            if old is None or old.get("status") != "ok" or row.get("status") == "ok":
                self.rows[row["run_id"]] = row
            self._write()

    def frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(list(self.rows.values()))
        columns = [c for c in RESULT_COLUMNS if c in frame] + [
            c for c in frame if c not in RESULT_COLUMNS
        ]
        return frame[columns] if len(frame) else pd.DataFrame(columns=RESULT_COLUMNS)

    def _write(self) -> None:
        frame = self.frame()
        for column in _INTEGER_COLUMNS:
            if column in frame:
                frame[column] = pd.to_numeric(frame[column]).astype("Int64")
        _write_atomically(self.path, lambda fh: frame.to_csv(fh, index=False))


def _write_atomically(path: Path, write: Callable[[Any], Any], binary: bool = False) -> None:
    """Write a file through a temporary file that replaces ``path`` atomically.

    Readers (and other sweeps writing the same file) see the old or the new file,
    never half of one. The file is made readable by everyone (mode 0644).
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------- locks and claims


def _lock(fh, blocking: bool) -> bool:
    """Lock an open file exclusively; ``False`` if another process holds it (non-blocking).

    An advisory lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) that the
    operating system releases when its holder exits or is killed: a killed sweep
    never leaves a stale lock behind. Shared filesystems work if they support these
    locks (NFSv4 does).
    """
    if os.name == "nt":  # pragma: no cover - Windows
        import msvcrt

        fh.seek(0)
        while True:
            try:
                msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                if not blocking:
                    return False
                time.sleep(0.05)
    import fcntl

    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _unlock(fh) -> None:
    if os.name == "nt":  # pragma: no cover - Windows
        import msvcrt

        fh.seek(0)
        msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
    fh.close()  # closing releases a flock


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold a Ctrl-C until the block has run, then raise it (main thread only)."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # only Python's own Ctrl-C handler is replaced (and only where it can be)
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


class _DirectoryLock:
    """The sweep directory's lock (``<out>/.lock``): held while config.json or results.csv change."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".lock"

    def __enter__(self) -> _DirectoryLock:
        self._fh = open(self.path, "a+")  # closed by __exit__
        _lock(self._fh, blocking=True)
        return self

    def __exit__(self, *exc) -> None:
        _unlock(self._fh)


class _Claims:
    """Per-run claim files in ``<out>/.claims/``: a run is trained by the process holding its lock.

    Each file holds who claimed it last (pid, host) and whether that process finished
    the run (``"done"``) and when, so another process can tell "being trained now" (the
    lock is held), "tried during my session" (done since I started) and "its process
    died" (the lock is free but the state is still ``"running"``).
    """

    def __init__(self, directory: Path):
        self.directory = Path(directory) / ".claims"
        self.held: dict[str, Any] = {}

    def _path(self, run_id: str) -> Path:
        return self.directory / run_id

    def try_claim(self, run_id: str) -> dict[str, Any] | None:
        """Claim a run: its previous state (``{}`` if never claimed), or ``None`` if held."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fh = open(self._path(run_id), "a+")  # kept open while the claim is held
        if not _lock(fh, blocking=False):
            fh.close()
            return None
        fh.seek(0)
        try:
            previous = json.loads(fh.read() or "{}")
        except json.JSONDecodeError:
            previous = {}
        self.held[run_id] = fh
        self._state(run_id, "running")
        return previous

    def _state(self, run_id: str, state: str) -> None:
        fh = self.held[run_id]
        fh.seek(0)
        fh.truncate()
        info = {"pid": os.getpid(), "host": socket.gethostname(), "state": state}
        fh.write(json.dumps({**info, "time": time.time()}))
        fh.flush()

    def release(self, run_id: str, done: bool = False) -> None:
        """Give a claim back; ``done`` records that this process finished the run."""
        if run_id not in self.held:
            return
        if done:
            self._state(run_id, "done")
        _unlock(self.held.pop(run_id))

    def release_all(self) -> None:
        for run_id in list(self.held):
            self.release(run_id)

    def holder(self, run_id: str) -> str:
        """Who holds a run's claim, for messages: ``"process 123 on host"``."""
        try:
            info = json.loads(self._path(run_id).read_text() or "{}")
            return f"process {info['pid']} on {info['host']}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def holders(self) -> list[str]:
        """The processes holding claims in this directory now (empty if none)."""
        found = []
        for path in sorted(self.directory.glob("*")) if self.directory.exists() else []:
            with open(path, "a+") as fh:
                if not _lock(fh, blocking=False):
                    found.append(self.holder(path.name))
        return sorted(set(found))


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# --------------------------------------------------------------------------- the sweep


@dataclasses.dataclass
class SweepResult:
    directory: Path
    results: pd.DataFrame
    ran: list[str]
    skipped: list[str]
    figures: list[Path]


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; the message says what was saved and how to resume."""


def check_sweep_can_run(config: SweepConfig) -> None:
    """Refuse, once and before any training, what would make every run fail.

    Checks that the device exists on this machine, that the task's optional
    dependencies are installed, that its base weights load (present and matching
    the manifest), that every rank fits the layers it adapts, and that Ray is
    installed if the executor is ``"ray"``. (:func:`run_sweep` then checks that the
    output folder can be written, before it writes anything there.)

    Raises
    ------
    ValueError
        With the problem and the fix (``rankkit.checkpoints.CheckpointError`` for base
        weights, ``ImportError`` for a missing extra).
    """
    device = resolve_device(config.device)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {config.device!r}: this machine has {torch.cuda.device_count()} CUDA "
            f"device(s), numbered from 0; use 'cuda', 'cuda:N' with N below that, or 'cpu'."
        )
    task = get_task(config.task)
    task.build_model(pretrained=True)
    check_ranks_fit(config)
    if config.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise ImportError(
            "executor='ray' needs Ray: pip install 'rankkit[ray]' (or pip install 'ray[default]')."
        )


def run_sweep(
    config: SweepConfig,
    *,
    force: bool = False,
    progress: bool = True,
    runner: Callable[..., dict[str, Any]] | None = None,
    plot: bool = True,
    log: Callable[[str], None] = print,
    poll_s: float = 1.0,
) -> SweepResult:
    """Run (or resume, or join) a sweep and return its results.

    Several processes may run the same sweep into the same directory at once (two
    terminals, or machines sharing a filesystem): each run is trained by the one
    process that claims it (see :class:`_Claims`), rows are merged into
    ``results.csv`` under a lock, and a process that runs out of unclaimed runs waits
    for the others' runs -- taking over any whose process died -- so that every
    process returns the whole sweep.

    Parameters
    ----------
    config : SweepConfig
    force : bool
        Accept a directory whose saved config differs from ``config`` (the saved one is
        replaced; finished runs with the same run id are kept).
    progress : bool
        Show a progress bar over runs.
    runner : callable, optional
        ``runner(spec, config, out_dir) -> row``; defaults to :func:`run_one`. Tests use
        it to inject failures.
    plot : bool
        Write the trade-off figures at the end.
    log : callable
        Where status lines go (``print`` by default).
    poll_s : float
        How often to look again at runs that another process is training.

    Raises
    ------
    SweepInterrupted
        On Ctrl-C, after releasing this process's runs; the message says what is saved.
    """
    from tqdm.auto import tqdm

    config = config.validated()
    check_sweep_can_run(config)
    out_dir = config.output_dir()
    _claim_directory(out_dir, config, force)
    started = time.time()
    store = ResultsStore(out_dir)
    claims = _Claims(out_dir)
    runs = plan_runs(config)
    finished = store.finished()
    todo = [r for r in runs if r.run_id not in finished]
    skipped = [r.run_id for r in runs if r.run_id in finished]
    if skipped:
        log(f"resuming {out_dir}: {len(skipped)} finished run(s) skipped, {len(todo)} to run")
    if not todo:
        log(f"nothing to run: all {len(runs)} runs are in {store.path}")
    runner = runner or run_one
    bar = tqdm(
        total=len(todo), desc=f"sweep {config.task}", unit="run", disable=not (progress and todo)
    )
    ran: list[str] = []
    settled: set[str] = set()
    shown: dict[str, float] = {}  # the part of a batched run the bar already shows

    def done(row: dict[str, Any]) -> None:
        if row["run_id"] in settled:
            return  # recorded already (finished runs are handed over again after Ctrl-C)
        with _interrupts_deferred():  # a finished run is recorded whole, Ctrl-C or not
            store.record(row)
            claims.release(row["run_id"], done=True)
            settled.add(row["run_id"])
            ran.append(row["run_id"])
        bar.update(1 - shown.pop(row["run_id"], 0.0))
        if row["status"] != "ok":
            log(f"run {row['run_id']} failed: {row['error']}")

    def claim(specs: list[RunSpec]) -> list[RunSpec]:
        """Those of ``specs`` this process now holds and has to train."""
        mine = []
        for spec in specs:
            previous = claims.try_claim(spec.run_id)
            if previous is None:
                continue  # another process is training it
            row = store.reload().rows.get(spec.run_id)
            tried = previous.get("state") == "done" and previous.get("time", 0) >= started
            if row is not None and (row.get("status") == "ok" or tried):
                claims.release(spec.run_id)  # finished (or tried) by another process
                settled.add(spec.run_id)
                bar.update(1)
            else:
                mine.append(spec)
        return mine

    parallel = config.executor == "ray" or config.jobs > 1

    def train(group: list[RunSpec]) -> None:
        """Train claimed runs: in parallel, as one batched group, or the one run."""
        if config.executor == "ray" and group:
            _run_ray(group, config, out_dir, runner, done)
        elif parallel and len(group) > 1:
            _run_processes(group, config, out_dir, runner, done, log)
        elif len(group) == 1:
            done(_safe_run(runner, group[0], config, str(out_dir)))
        elif group:

            def on_epoch(epoch: int, epochs: int) -> None:
                # A batched group's epochs move the bar by fractions of its runs.
                bar.set_postfix_str(f"{len(group)} runs batched: epoch {epoch}/{epochs}", False)
                bar.update(len(group) * epoch / epochs - sum(shown.get(s.run_id, 0) for s in group))
                shown.update(dict.fromkeys((s.run_id for s in group), epoch / epochs))

            for row in _run_batched(group, config, str(out_dir), log, on_epoch=on_epoch):
                done(row)
            bar.set_postfix_str("")

    try:
        # Parallel executors take every run they can claim at once; sequential training
        # claims one (batched) group at a time, so that processes share the work.
        for group in [todo] if parallel else _batch_groups(todo, config, runner, log):
            train(claim(group))
        waiting_for = None
        while pending := [s for s in todo if s.run_id not in settled]:
            holders = sorted({claims.holder(s.run_id) for s in pending})
            if holders != waiting_for:
                log(
                    f"waiting for {len(pending)} run(s) that {', '.join(holders)} "
                    f"{'is' if len(holders) == 1 else 'are'} training in {out_dir}"
                )
                waiting_for = holders
            time.sleep(poll_s)
            mine = claim(pending)  # the runs of a process that died are taken over
            for group in [mine] if parallel else _batch_groups(mine, config, runner, log):
                train(group)
    except KeyboardInterrupt:
        bar.close()
        claims.release_all()
        saved = store.reload().finished() & {r.run_id for r in runs}
        raise SweepInterrupted(
            f"interrupted: {len(saved)} of {len(runs)} runs are saved in {store.path} "
            f"({len(saved & set(ran))} from this session); run the same command again to "
            f"resume the other {len(runs) - len(saved)}."
        ) from None
    finally:
        claims.release_all()
    bar.close()

    results = store.reload().frame()
    figures = []
    if plot and len(results):
        figures = write_sweep_figures(out_dir)
    return SweepResult(out_dir, results, ran, skipped, figures)


def _batch_groups(
    todo: list[RunSpec], config: SweepConfig, runner: Callable, log: Callable[[str], None]
) -> list[list[RunSpec]]:
    """Runs to train together: LoRA runs of a target set in groups sized by memory.

    Batching applies to the built-in runner (batched training reproduces
    :func:`run_one`) with ``config.batch``; other runs go one by one. A target set's
    runs are split evenly into consecutive groups of at most
    :func:`rankkit.batched.max_batch_runs` (the plan orders them by rank, so a group
    pads little), and a kill loses at most the group in flight.
    """
    single = [[s] for s in todo]
    if not config.batch or runner is not run_one:
        return single

    task = get_task(config.task)
    groups = [[s] for s in todo if s.method != "lora"]
    for targets in dict.fromkeys(s.targets for s in todo if s.method == "lora"):
        runs = [s for s in todo if s.method == "lora" and s.targets == targets]
        try:
            largest = _lora_config(max(runs, key=lambda s: s.rank), config, task)
            size = max_batch_runs(task, largest, device=config.device)
        except Exception as err:  # sizing is an optimisation: never let it stop a sweep
            log(f"batched training off for targets {targets!r} ({type(err).__name__}: {err})")
            size = 1
        n = math.ceil(len(runs) / size)
        bounds = [round(i * len(runs) / n) for i in range(n + 1)]
        groups += [runs[a:b] for a, b in itertools.pairwise(bounds)]
    if any(len(g) > 1 for g in groups):
        sizes = sorted({len(g) for g in groups if len(g) > 1})
        log(
            f"batched training: {sum(len(g) for g in groups if len(g) > 1)} LoRA runs in "
            f"groups of {'/'.join(map(str, sizes))} (--no-batch trains them one at a time)"
        )
    return groups


def _run_batched(
    specs: list[RunSpec],
    config: SweepConfig,
    out_dir: str,
    log: Callable[[str], None],
    on_epoch: Callable[[int, int], None] | None = None,
):
    """Train LoRA runs together with :func:`rankkit.batched.fit_batched`; yield their rows.

    Each row is what :func:`run_one` returns for that run. If the batch fails as a
    whole, its runs are trained one by one instead, so a bad run is recorded as an
    ``error`` row and the others still finish. ``on_epoch`` goes to ``fit_batched``.
    """

    task = get_task(config.task)
    try:
        trained = fit_batched(
            task, [_lora_config(s, config, task) for s in specs], [s.seed for s in specs],
            epochs=config.epochs, lr=method_lr(task, "lora", config.lr), device=config.device,
            on_epoch=on_epoch,
        )  # fmt: skip
    except Exception as err:  # fall back to single runs; their errors become rows
        log(
            f"batched training of {len(specs)} runs failed ({type(err).__name__}: {err}); "
            "training them one by one"
        )
        for spec in specs:
            yield _safe_run(run_one, spec, config, out_dir)
        return
    for spec, run in zip(specs, trained):

        def finish(spec, config, out_dir, run=run):
            return _result_row(spec, config, task, run.model, run.result, out_dir)

        yield _safe_run(finish, spec, config, out_dir)


def _claim_directory(out_dir: Path, config: SweepConfig, force: bool) -> None:
    """Check ``config`` against the directory's config.json and write it, under the lock.

    A directory holds one sweep: a different config is refused unless ``force``, and
    refused even then while another process is working on the directory.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".lock").touch()
    except OSError as err:
        raise ValueError(
            f"cannot write the sweep folder {str(out_dir)!r} ({err.strerror or err}); choose "
            "another --out directory."
        ) from err
    path = out_dir / "config.json"
    wanted = config.result_affecting()
    with _DirectoryLock(out_dir):
        if path.exists():
            saved = json.loads(path.read_text())
            saved_affecting = {
                k: v for k, v in saved.items() if k not in SweepConfig.EXECUTION_KEYS
            }
            diff = {
                k: (saved_affecting.get(k), wanted.get(k))
                for k in sorted(set(saved_affecting) | set(wanted))
                if saved_affecting.get(k) != wanted.get(k)
            }
            lines = "; ".join(f"{k}: {a!r} there vs {b!r} now" for k, (a, b) in diff.items())
            if diff and not force:
                raise ValueError(
                    f"{out_dir} holds a sweep with a different config ({lines}). Use another "
                    "--out directory, or --force to continue it with the new config."
                )
            busy = _Claims(out_dir).holders() if diff else []
            if busy:
                raise ValueError(
                    f"{out_dir} holds a sweep with a different config ({lines}) that "
                    f"{', '.join(busy)} is running now; --force cannot change it until that "
                    "sweep ends. Use another --out directory."
                )
        _write_atomically(path, lambda fh: json.dump(dataclasses.asdict(config), fh, indent=2))


def _run_processes(todo, config, out_dir, runner, done, log=print) -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed, wait

    threads = max(1, (os.cpu_count() or 1) // config.jobs)
    with ProcessPoolExecutor(
        max_workers=config.jobs,
        mp_context=mp.get_context("spawn"),
        initializer=_worker_init,
        initargs=(threads,),
    ) as pool:
        futures = [pool.submit(_safe_run, runner, s, config, str(out_dir)) for s in todo]
        try:
            for future in as_completed(futures):
                done(future.result())
        except KeyboardInterrupt:
            # Queued runs never start; the runs in flight finish, and every finished run
            # is kept (done() skips those it recorded already).
            for future in futures:
                future.cancel()
            running = [f for f in futures if not f.done()]
            if running:
                log(f"Ctrl-C: keeping the {len(running)} run(s) in flight, which finish first")
            wait(running)
            for future in futures:
                if future.done() and not future.cancelled() and future.exception() is None:
                    done(future.result())
            raise


def _run_ray(todo, config, out_dir, runner, done) -> None:
    try:
        import ray
    except ImportError as err:
        raise ImportError(
            "executor='ray' needs Ray: pip install 'rankkit[ray]' (or pip install 'ray[default]')."
        ) from err
    started_here = False
    if not ray.is_initialized():
        if config.ray_address:
            ray.init(address=config.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        started_here = True
    try:
        remote = ray.remote(_safe_run).options(
            num_cpus=config.cpus_per_run, num_gpus=config.gpus_per_run
        )
        pending = [remote.remote(runner, s, config, str(Path(out_dir).resolve())) for s in todo]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            done(ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()


# --------------------------------------------------------------------------- summaries


def _references(results: pd.DataFrame) -> tuple[float | None, float | None]:
    ok = results[results["status"] == "ok"]
    full = ok[ok["method"] == "full"]["test_metric"]
    frozen = ok[ok["method"] == "frozen"]["test_metric"]
    return (
        float(full.mean()) if len(full) else None,
        float(frozen.mean()) if len(frozen) else None,
    )


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread of the test metric per configuration, with the gain over the frozen base."""
    ok = results[results["status"] == "ok"].copy()
    if ok.empty:
        return pd.DataFrame()
    ok["targets"] = ok["targets"].fillna("-")
    ok["rank"] = ok["rank"].fillna(-1)
    table = (
        ok.groupby(["method", "targets", "rank"], sort=False)
        .agg(
            runs=("test_metric", "size"),
            test_mean=("test_metric", "mean"),
            test_std=("test_metric", "std"),
            trainable_params=("trainable_params", "mean"),
            trainable_fraction=("trainable_fraction", "mean"),
        )
        .reset_index()
    )
    table["rank"] = table["rank"].map(lambda r: "-" if r == -1 else int(r))
    full, frozen = _references(results)
    if full is not None and frozen is not None and full > frozen:
        table["gain"] = (table["test_mean"] - frozen) / (full - frozen)
    return table


#: Slack of "reaches the threshold": a mean equal to ``frozen + f (full - frozen)`` up to
#: float round-off counts as reaching it (0.86 with frozen 0.5, full 0.9 and f = 0.9).
GAIN_TOLERANCE = 1e-9


def _reaches(mean, frozen, full, fraction: float):
    """Whether ``mean >= frozen + fraction (full - frozen)``, up to :data:`GAIN_TOLERANCE`.

    Works on floats and on NumPy arrays alike.
    """
    return mean >= frozen + fraction * (full - frozen) - GAIN_TOLERANCE


def rank_for_gain(results: pd.DataFrame, fraction: float, targets: str | None = None) -> int | None:
    """Smallest LoRA rank whose mean test metric reaches ``fraction`` of the full-FT gain.

    gain(r) = (mean metric at r - frozen base) / (full fine-tuning - frozen base); a rank
    reaches ``fraction`` when its mean is at least ``frozen + fraction (full - frozen)``
    (compared directly, with a round-off tolerance, not as a ratio). Returns ``None`` if no
    rank reaches it, the baselines are missing, or full fine-tuning is not above the
    frozen base (no gain to reach).
    """
    full, frozen = _references(results)
    if full is None or frozen is None or full <= frozen:
        return None
    ok = results[(results["status"] == "ok") & (results["method"] == "lora")]
    if targets is not None:
        ok = ok[ok["targets"] == targets]
    means = ok.groupby("rank")["test_metric"].mean().sort_index()
    for rank, mean in means.items():
        if _reaches(mean, frozen, full, fraction):
            return int(rank)
    return None


def rank_for_gain_interval(
    results: pd.DataFrame,
    fraction: float,
    targets: str | None = None,
    *,
    level: float = 0.9,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """How sure is :func:`rank_for_gain`? A bootstrap over seeds.

    Each replicate resamples, with replacement, the seeds of every configuration
    (each LoRA rank, full fine-tuning and the frozen base) independently, recomputes
    the mean metrics and reads off the smallest rank reaching ``fraction`` of the
    gain. The interval is the central ``level`` quantiles of that rank over the
    replicates, with ``math.inf`` for "not reached at any swept rank".

    With three seeds this is a coarse, optimistic picture (the resamples only mix
    the three values observed), but it shows at a glance when the answer is fragile.

    Returns
    -------
    (low, high) or None
        ``None`` when there is nothing to resample: a missing baseline or LoRA
        results, or at most one run per configuration.
    """
    if not 0 < level < 1:
        raise ValueError(f"rank_for_gain_interval: level must be in (0, 1), got {level!r}.")
    ok = results[results["status"] == "ok"]
    lora = ok[ok["method"] == "lora"]
    if targets is not None:
        lora = lora[lora["targets"] == targets]
    full = ok.loc[ok["method"] == "full", "test_metric"].to_numpy(float)
    frozen = ok.loc[ok["method"] == "frozen", "test_metric"].to_numpy(float)
    by_rank = {int(r): g["test_metric"].to_numpy(float) for r, g in lora.groupby("rank")}
    groups = [full, frozen, *by_rank.values()]
    if not by_rank or min(len(g) for g in groups) < 1 or max(len(g) for g in groups) < 2:
        return None
    rng = np.random.default_rng(seed)

    def resampled_means(values: np.ndarray) -> np.ndarray:
        return values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)

    full_b, frozen_b = resampled_means(full), resampled_means(frozen)
    ranks = sorted(by_rank)
    means_b = np.stack([resampled_means(by_rank[r]) for r in ranks], axis=1)
    reached = _reaches(means_b, frozen_b[:, None], full_b[:, None], fraction)
    reached &= (full_b > frozen_b)[:, None]
    first = np.where(
        reached.any(axis=1), np.asarray(ranks, float)[reached.argmax(axis=1)], math.inf
    )
    tail = (1 - level) / 2
    return (
        float(np.quantile(first, tail, method="lower")),
        float(np.quantile(first, 1 - tail, method="higher")),
    )


def _rank_text(rank: float | None) -> str:
    return "not reached" if rank is None or math.isinf(rank) else str(int(rank))


def format_summary(results: pd.DataFrame) -> str:
    table = summarize(results)
    if table.empty:
        return "(no finished runs)"
    metric = results["metric"].dropna().iloc[0] if results["metric"].notna().any() else "metric"
    shown = table.rename(columns={"test_mean": f"test {metric}", "test_std": "± std"})
    text = shown.to_string(index=False, float_format=lambda x: f"{x:.4g}")
    lines = [text]
    any_interval = False
    lora_targets = results.loc[results["method"] == "lora", "targets"].dropna().unique()
    missing = [name for name, ref in zip(("full fine-tuning", "frozen-base"), _references(results))
               if ref is None]  # fmt: skip
    if missing and len(lora_targets):
        # Without both references there is no gain: say what was measured, conclude nothing.
        lines.append(
            f"no finished {' or '.join(missing)} runs, so no full-FT gain to measure ranks "
            "against: the table shows each rank's test metric only (sweep without "
            "--no-baselines for the rank reaching 90%/95% of the gain)"
        )
        lora_targets = []
    full, frozen = _references(results)
    if not missing and len(lora_targets) and full <= frozen:
        lines.append(_full_below_frozen(results, full, frozen, metric))
        lora_targets = []
    for targets in lora_targets:
        parts = []
        for fraction in (0.9, 0.95):
            text = f"rank {_rank_text(rank_for_gain(results, fraction, targets))}"
            interval = rank_for_gain_interval(results, fraction, targets)
            if interval is not None:
                any_interval = True
                low, high = (_rank_text(x) for x in interval)
                text += f" [{low}, {high}]" if low != high else f" [{low}]"
            parts.append(text)
        lines.append(f"targets {targets}: 90% of the full-FT gain at {parts[0]}, 95% at {parts[1]}")
    if any_interval:
        lines.append(
            "[low, high]: 90% bootstrap interval of that rank, resampling each configuration's "
            "seeds (rank_for_gain_interval)"
        )
    if "gain" in table:
        # Far below the frozen base (by half the full-FT gain or more): training broke down.
        below = table[(table["method"] == "lora") & (table["gain"] < -0.5)]
        if len(below):
            where = ", ".join(f"{t} r={r}" for t, r in zip(below["targets"], below["rank"]))
            collapsed = results[
                (results["method"] == "lora")
                & results["rank"].isin(below["rank"])
                & results["targets"].isin(below["targets"])
            ]
            hint = (
                "with lora_alpha = r the update per step grows with r; try a fixed --alpha "
                "(e.g. 8), --rslora or a lower --lr"
                if (collapsed["alpha"] == collapsed["rank"]).any()
                else "try a lower --lr"
            )
            lines.append(f"warning: LoRA scored far below the frozen base at {where}: {hint}")
    errors = results[results["status"] == "error"]
    if len(errors):
        lines.append(f"{len(errors)} run(s) failed; see the 'error' column of results.csv")
    return "\n".join(lines)


def _full_below_frozen(results: pd.DataFrame, full: float, frozen: float, metric: str) -> str:
    """What happened when full fine-tuning did not beat the frozen base (no gain to measure)."""
    lora = results[(results["status"] == "ok") & (results["method"] == "lora")]
    means = lora.groupby(["targets", "rank"])["test_metric"].mean()
    (targets, rank), best = means.idxmax(), float(means.max())
    verdict = (
        "above both baselines"
        if best > frozen
        else "above full fine-tuning, below the frozen base"
        if best > full
        else "below both baselines"
    )
    return (
        f"full fine-tuning ({metric} {full:.4g}) did not beat the frozen base ({frozen:.4g}), "
        "so there is no full-FT gain to measure ranks against; LoRA's best mean is "
        f"{best:.4g} (targets {targets}, r={int(rank)}), {verdict}. Full fine-tuning may need a "
        "lower --full-lr or more --epochs."
    )


def load_results(directory: str | os.PathLike) -> pd.DataFrame:
    path = Path(directory) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} has no results.csv; run 'python -m rankkit sweep --out {directory}' first."
        )
    return ResultsStore(directory).frame()


def write_sweep_figures(directory: str | os.PathLike) -> list[Path]:
    """Write the rank and parameter trade-off figures (PNG and SVG) into ``directory``."""
    from rankkit.plots import plot_params_tradeoff, plot_rank_tradeoff

    directory = Path(directory)
    results = load_results(directory)
    d90 = _intrinsic_dimension(directory)
    written = []
    for stem, fig in (
        ("rank_vs_quality", plot_rank_tradeoff(results)),
        ("params_vs_quality", plot_params_tradeoff(results, d90=d90)),
    ):
        for ext in ("png", "svg"):
            path = directory / f"{stem}.{ext}"

            def save(fh, fig=fig, ext=ext):
                fig.savefig(fh, format=ext, dpi=150, bbox_inches="tight")

            _write_atomically(path, save, binary=True)  # sweeps sharing the folder redraw too
            written.append(path)
        import matplotlib.pyplot as plt

        plt.close(fig)
    return written


def _intrinsic_dimension(directory: Path) -> dict[str, Any] | None:
    """d90 written into this directory by ``python -m rankkit intrinsic-dim --out``."""
    path = directory / "intrinsic_dimension.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
