"""A sweep's folder: results that survive a crash, shared safely by several processes.

Results are crash-safe. Each finished run is merged into ``results.csv`` by writing
the file to a temporary name and renaming it over the old one (an atomic operation,
:func:`write_atomically`), so killing the process at any moment loses at most the runs
in flight and never leaves a half-written file. Running the same sweep into the same
directory skips the runs already recorded as ``ok`` and retries those recorded as
``error``.

A directory is safe under concurrency: several processes (terminals, or machines
sharing a filesystem with working file locks) may run the same sweep into it at once.
Each run is claimed by exactly one process through a lock on ``.claims/<run_id>``
(:class:`Claims`), which the operating system releases if that process dies; rows are
merged under the directory's lock (``.lock``), and a finished row is never replaced by
an error. :func:`claim_directory` keeps one sweep's config per directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from rankkit.sweep.config import SweepConfig

RESULT_COLUMNS = [
    "run_id", "task", "method", "rank", "alpha", "targets", "seed",
    "trainable_params", "total_params", "trainable_fraction",
    "val_metric", "test_metric", "metric", "train_time_s", "peak_memory_mb", "device",
    "status", "error", "adapter",
]  # fmt: skip


# --------------------------------------------------------------------------- results store

# Integer columns that may be missing in some rows (baselines have no rank, error rows no
# parameter counts); written as integers (1, not 1.0) with empty cells for missing values.
_INTEGER_COLUMNS = ("rank", "seed", "trainable_params", "total_params", "adapter_params")


def _clean(value: Any) -> Any:
    """A cell as read by pandas, with NaN (an empty cell) as ``None``."""
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


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
        write_atomically(self.path, lambda fh: frame.to_csv(fh, index=False))


def write_atomically(path: Path, write: Callable[[Any], Any], binary: bool = False) -> None:
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
def interrupts_deferred():
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


class Claims:
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


# --------------------------------------------------------------------------- the folder


def claim_directory(out_dir: Path, config: SweepConfig, force: bool) -> None:
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
            lines = "; ".join(
                _describe_task_change(config.task, a, b)
                if k == "task_defaults"
                else f"{k}: {a!r} there vs {b!r} now"
                for k, (a, b) in diff.items()
            )
            if diff and not force:
                keeps = (
                    " (--force keeps the runs trained under the task's old defaults)"
                    if "task_defaults" in diff
                    else ""
                )
                raise ValueError(
                    f"{out_dir} holds a sweep with a different config ({lines}). Use another "
                    f"--out directory, or --force to continue it with the new config{keeps}."
                )
            busy = Claims(out_dir).holders() if diff else []
            if busy:
                raise ValueError(
                    f"{out_dir} holds a sweep with a different config ({lines}) that "
                    f"{', '.join(busy)} is running now; --force cannot change it until that "
                    "sweep ends. Use another --out directory."
                )
        saving = {**dataclasses.asdict(config), "task_defaults": wanted["task_defaults"]}
        write_atomically(path, lambda fh: json.dump(saving, fh, indent=2))


def _describe_task_change(task: str, saved: dict | None, now: dict) -> str:
    """What changed in the task's defaults since a folder was written, in a few words."""
    if saved is None:
        return (
            f"task {task!r}'s default hyperparameters, base weights and data: not recorded "
            "there (written by an older rankkit), so its runs may have used other ones"
        )
    changes = []
    old_hp, new_hp = saved.get("hparams", {}), now["hparams"]
    for key in sorted(set(old_hp) | set(new_hp)):
        if old_hp.get(key) != new_hp.get(key):
            changes.append(f"default {key}: {old_hp.get(key)!r} there vs {new_hp.get(key)!r} now")
    for key, what in (("base_sha256", "base weights"), ("data_sha256", "frozen data")):
        if saved.get(key) != now[key]:
            changes.append(
                f"{what}: sha256 {str(saved.get(key))[:12]} there vs {str(now[key])[:12]} now"
            )
    return f"task {task!r} changed since: " + (", ".join(changes) or "its recorded defaults")


def load_results(directory: str | os.PathLike) -> pd.DataFrame:
    """The results table of a sweep folder, one row per run (``results.csv``)."""
    path = Path(directory) / "results.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{directory} has no results.csv; run 'python -m rankkit sweep --out {directory}' first."
        )
    return ResultsStore(directory).frame()
