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

Results are crash-safe: a killed sweep loses at most the runs in flight, and running
the same sweep into the same directory skips the runs already recorded as ``ok`` and
retries those recorded as ``error``. A directory is safe under concurrency: several
processes (terminals, or machines sharing a filesystem with working file locks) may
run the same sweep into it at once, each run trained by exactly one of them.

Executors: ``local`` runs in this process (``jobs=1``) or in ``jobs`` worker processes;
``ray`` submits one task per run to a Ray cluster (``ray_address``) or a local Ray
instance, with per-run CPU and (fractional) GPU requests.

This module trains the runs; its parts live beside it, and every public name is
importable from here:

* :mod:`rankkit.sweep.config` -- :class:`SweepConfig` and the runs it plans;
* :mod:`rankkit.sweep.store` -- the results folder: atomic writes, locks and claims;
* :mod:`rankkit.sweep.summary` -- the gain, and the rank that reaches it;
* :mod:`rankkit.sweep.pilot` -- spectral allocation: per-layer ranks from a pilot full
  fine-tune (``allocation="spectral"``); ``adalora=True`` adds PEFT's AdaLoRA
  (:mod:`rankkit.adalora`) at the same final rank.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from rankkit.adalora import fit_adalora
from rankkit.batched import fit_batched, max_batch_runs
from rankkit.devices import resolve_device
from rankkit.lora import LoraConfig, save_adapter
from rankkit.lora.model import lora_layers
from rankkit.methods import method_lr, prepare_run
from rankkit.sweep.config import (
    ALLOCATIONS,
    DEFAULT_RANKS,
    DEFAULT_SEEDS,
    EXECUTORS,
    LORA_METHODS,
    METHODS,
    RunSpec,
    SweepConfig,
    adalora_init_rank,
    alpha_for_rank,
    parse_int_list,
    plan_runs,
    target_modules,
)
from rankkit.sweep.pilot import adapted_layers, describe_pattern, spectral_rank_patterns
from rankkit.sweep.store import (
    RESULT_COLUMNS,
    Claims,
    ResultsStore,
    claim_directory,
    interrupts_deferred,
    load_results,
    write_atomically,
)
from rankkit.sweep.summary import (
    GAIN_TOLERANCE,
    compare_allocations,
    format_summary,
    pooled_difference,
    rank_for_gain,
    rank_for_gain_interval,
    summarize,
)
from rankkit.tasks import get_task
from rankkit.utils import count_parameters

__all__ = [
    "ALLOCATIONS",
    "DEFAULT_RANKS",
    "DEFAULT_SEEDS",
    "EXECUTORS",
    "GAIN_TOLERANCE",
    "METHODS",
    "RESULT_COLUMNS",
    "ResultsStore",
    "RunSpec",
    "SweepConfig",
    "SweepInterrupted",
    "SweepResult",
    "alpha_for_rank",
    "batch_groups",
    "check_ranks_fit",
    "check_sweep_can_run",
    "compare_allocations",
    "format_summary",
    "load_results",
    "lora_config_for",
    "parse_int_list",
    "plan_runs",
    "pooled_difference",
    "rank_for_gain",
    "rank_for_gain_interval",
    "run_one",
    "run_sweep",
    "spectral_rank_patterns",
    "summarize",
    "write_sweep_figures",
]

# --------------------------------------------------------------------------- runs


def check_ranks_fit(config: SweepConfig) -> None:
    """Refuse ranks larger than the narrowest layer each target set adapts.

    With ``adalora``, AdaLoRA's initial ranks (``ceil(1.5 r)``) must fit as well; with
    ``allocation="spectral"``, a target set must adapt at least two layers (with one,
    there is no rank to move and spectral runs would repeat the uniform ones). The
    layers are read from a model on the ``meta`` device (:func:`adapted_layers`).
    """
    task = get_task(config.task)
    for targets in config.targets:
        layers = adapted_layers(task, targets)
        widths = {name: min(shape) for name, shape in layers.items()}
        narrowest = min(widths, key=widths.get)
        too_big = [r for r in config.ranks if r > widths[narrowest]]
        if too_big:
            raise ValueError(
                f"rank(s) {too_big} exceed the width of {narrowest!r} "
                f"(min(in, out) = {widths[narrowest]}) for targets {targets!r}; the largest "
                f"useful rank there is {widths[narrowest]}."
            )
        init = {r: adalora_init_rank(r) for r in config.ranks}
        too_big = [r for r in config.ranks if init[r] > widths[narrowest]]
        if config.adalora and too_big:
            raise ValueError(
                f"adalora: AdaLoRA starts rank(s) {too_big} at {[init[r] for r in too_big]} "
                f"(1.5 times the final rank), above the width of {narrowest!r} (min(in, out) = "
                f"{widths[narrowest]}) for targets {targets!r}; drop those ranks or adalora."
            )
        if config.allocation == "spectral" and len(layers) < 2:
            raise ValueError(
                f"allocation='spectral' moves rank between layers, but targets {targets!r} "
                f"adapt one layer ({narrowest}); target two or more (e.g. 'all-linear'), or "
                "use allocation='uniform'."
            )


def run_one(spec: RunSpec, config: SweepConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Train one run and return its results row. Exceptions propagate to the caller."""
    task = get_task(config.task)
    if spec.method == "adalora":
        return _run_adalora(spec, config, task, out_dir)
    lora = spec.method in LORA_METHODS
    lora_config = lora_config_for(spec, config, task) if lora else None
    lr = config.lr if lora else config.full_lr
    run = prepare_run(task, "lora" if lora else spec.method, spec.seed, lr=lr,
                      lora_config=lora_config)  # fmt: skip
    result = run.fit(task, epochs=config.epochs, device=config.device, progress=False)
    return _result_row(spec, config, task, run.model, result, out_dir)


def lora_config_for(spec: RunSpec, config: SweepConfig, task) -> Any:
    """The LoraConfig of a LoRA run (the same for single and batched training).

    A spectral run adapts exactly the modules of its ``rank_pattern`` (an exact regular
    expression), each with its own rank and the alpha the sweep's rule gives that rank.
    """
    if spec.rank_pattern is None:
        return LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,
            target_modules=target_modules(spec.targets),
            use_rslora=config.rslora,
            modules_to_save=task.head_modules,
        )
    # Longest names first: PEFT applies the first key matching a module name as a suffix.
    ranks = dict(sorted(spec.rank_pattern, key=lambda kv: -len(kv[0])))
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules="(" + "|".join(re.escape(m) for m in ranks) + ")",
        use_rslora=config.rslora,
        rank_pattern={re.escape(m): r for m, r in ranks.items()},
        alpha_pattern={re.escape(m): alpha_for_rank(config.alpha, r) for m, r in ranks.items()},
        modules_to_save=task.head_modules,
    )


def _run_adalora(spec: RunSpec, config: SweepConfig, task, out_dir) -> dict[str, Any]:
    """Train one AdaLoRA run (PEFT) through the one training loop; save it; its row."""
    layers = adapted_layers(task, spec.targets)
    trained = fit_adalora(
        task, list(layers), spec.rank, init_r=adalora_init_rank(spec.rank),
        lora_alpha=spec.alpha, seed=spec.seed, epochs=config.epochs, lr=config.lr,
        device=config.device,
    )  # fmt: skip
    directory = Path(out_dir) / "adapters" / spec.run_id
    trained.save(directory)
    row = _result_row(spec, config, task, trained.model, trained.result, out_dir, save=False)
    row["adapter"] = str(directory.relative_to(out_dir) / "adapter_model.safetensors")
    row["rank_pattern"] = describe_pattern(trained.ranks)
    row["adapter_params"] = trained.adapter_params
    return row


def _result_row(
    spec: RunSpec, config: SweepConfig, task, model, result, out_dir, save: bool = True
) -> dict[str, Any]:
    """Save a trained run's adapter (LoRA) and return its results row.

    LoRA rows also record their allocation, per-layer ranks (``"fc1:3 fc2:5"``) and
    ``adapter_params``, the parameters of ``A`` and ``B`` (the head not included).
    """
    adapter_path, extra = "", {}
    counts = count_parameters(model)
    if save and spec.method in LORA_METHODS:
        directory = Path(out_dir) / "adapters" / spec.run_id
        save_adapter(model, directory)
        adapter_path = str(directory.relative_to(out_dir) / "adapter_model.safetensors")
        layers = lora_layers(model)
        extra = {
            "rank_pattern": describe_pattern({n: m.r for n, m in layers.items()}),
            "adapter_params": sum(m.lora_A.numel() + m.lora_B.numel() for m in layers.values()),
        }
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
        "allocation": spec.allocation,
        **extra,
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
        "allocation": spec.allocation,
    }  # fmt: skip


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    # Ctrl-C is the parent's to handle: it stops the queue and keeps the runs in flight.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    installed if the executor is ``"ray"``, and PEFT if ``adalora``. (:func:`run_sweep`
    then checks that the output folder can be written, before it writes anything there.)

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
    if config.adalora and importlib.util.find_spec("peft") is None:
        raise ImportError("adalora=True trains PEFT's AdaLoRA: pip install 'rankkit[peft]'.")


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
    process that claims it (see :class:`Claims`), rows are merged into
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
    config = config.validated()
    check_sweep_can_run(config)
    out_dir = config.output_dir()
    claim_directory(out_dir, config, force)
    patterns = None
    if config.allocation == "spectral":  # train (or reuse) the pilot before any run
        patterns = spectral_rank_patterns(config, out_dir, log)
    session = _Session(config, out_dir, runner or run_one, log, progress, patterns)
    try:
        with _terminate_as_interrupt():
            session.train_all(poll_s)
    except KeyboardInterrupt:
        raise session.interrupted() from None
    finally:
        session.claims.release_all()
    session.bar.close()

    results = session.store.reload().frame()
    figures = write_sweep_figures(out_dir) if plot and len(results) else []
    return SweepResult(out_dir, results, session.ran, session.skipped, figures)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Let SIGTERM (``kill``, a scheduler's time limit) take Ctrl-C's path.

    Without it the sweep process dies at once and its worker processes, blocked on
    a queue that no one will ever fill, live on; with it the queue stops, the runs in
    flight finish and are kept, the claims are released and the workers exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Session:
    """This process's part in a sweep: it claims runs, trains them and records their rows.

    ``settled`` holds the runs recorded since the session started (by this process or
    another), ``ran`` those this process recorded, and ``shown`` the part of each run
    of a batched group in flight that the progress bar already shows.
    """

    def __init__(
        self,
        config: SweepConfig,
        out_dir: Path,
        runner: Callable[..., dict[str, Any]],
        log: Callable[[str], None],
        progress: bool,
        rank_patterns: dict | None = None,
    ):
        from tqdm.auto import tqdm

        self.config, self.out_dir, self.runner, self.log = config, out_dir, runner, log
        self.started = time.time()
        self.store = ResultsStore(out_dir)
        self.claims = Claims(out_dir)
        self.runs = plan_runs(config, rank_patterns)
        finished = self.store.finished()
        self.todo = [r for r in self.runs if r.run_id not in finished]
        self.skipped = [r.run_id for r in self.runs if r.run_id in finished]
        if self.skipped:
            log(
                f"resuming {out_dir}: {len(self.skipped)} finished run(s) skipped, "
                f"{len(self.todo)} to run"
            )
        if not self.todo:
            log(f"nothing to run: all {len(self.runs)} runs are in {self.store.path}")
        self.bar = tqdm(
            total=len(self.todo),
            desc=f"sweep {config.task}",
            unit="run",
            disable=not (progress and self.todo),
        )
        self.parallel = config.executor == "ray" or config.jobs > 1
        self.ran: list[str] = []
        self.settled: set[str] = set()
        self.shown: dict[str, float] = {}

    def train_all(self, poll_s: float) -> None:
        """Train the runs this process can claim, then wait for (or take over) the others'."""
        for group in self._groups(self.todo):
            self.train(self.claim(group))
        waiting_for = None
        while pending := [s for s in self.todo if s.run_id not in self.settled]:
            holders = sorted({self.claims.holder(s.run_id) for s in pending})
            if holders != waiting_for:
                self.log(
                    f"waiting for {len(pending)} run(s) that {', '.join(holders)} "
                    f"{'is' if len(holders) == 1 else 'are'} training in {self.out_dir}"
                )
                waiting_for = holders
            time.sleep(poll_s)
            mine = self.claim(pending)  # the runs of a process that died are taken over
            for group in self._groups(mine):
                self.train(group)

    def _groups(self, specs: list[RunSpec]) -> list[list[RunSpec]]:
        """Parallel executors take every run they can claim at once; sequential training
        claims one (batched) group at a time, so that processes share the work."""
        if self.parallel:
            return [specs]
        return batch_groups(specs, self.config, self.runner, self.log)

    def claim(self, specs: list[RunSpec]) -> list[RunSpec]:
        """Those of ``specs`` this process now holds and has to train."""
        mine = []
        for spec in specs:
            previous = self.claims.try_claim(spec.run_id)
            if previous is None:
                continue  # another process is training it
            row = self.store.reload().rows.get(spec.run_id)
            tried = previous.get("state") == "done" and previous.get("time", 0) >= self.started
            if row is not None and (row.get("status") == "ok" or tried):
                self.claims.release(spec.run_id)  # finished (or tried) by another process
                self.settled.add(spec.run_id)
                self.bar.update(1)
            else:
                mine.append(spec)
        return mine

    def train(self, group: list[RunSpec]) -> None:
        """Train claimed runs: in parallel, as one batched group, or the one run."""
        config, out_dir, runner, done = self.config, self.out_dir, self.runner, self.done
        if config.executor == "ray" and group:
            _run_ray(group, config, out_dir, runner, done)
        elif self.parallel and len(group) > 1:
            _run_processes(group, config, out_dir, runner, done, self.log)
        elif len(group) == 1:
            done(_safe_run(runner, group[0], config, str(out_dir)))
        elif group:
            bar, shown = self.bar, self.shown

            def on_epoch(epoch: int, epochs: int) -> None:
                # A batched group's epochs move the bar by fractions of its runs.
                bar.set_postfix_str(f"{len(group)} runs batched: epoch {epoch}/{epochs}", False)
                bar.update(len(group) * epoch / epochs - sum(shown.get(s.run_id, 0) for s in group))
                shown.update(dict.fromkeys((s.run_id for s in group), epoch / epochs))

            for row in _run_batched(group, config, str(out_dir), self.log, on_epoch=on_epoch):
                done(row)
            bar.set_postfix_str("")

    def done(self, row: dict[str, Any]) -> None:
        """Record a finished run's row (once) and give its claim back."""
        if row["run_id"] in self.settled:
            return  # recorded already (finished runs are handed over again after Ctrl-C)
        with interrupts_deferred():  # a finished run is recorded whole, Ctrl-C or not
            self.store.record(row)
            self.claims.release(row["run_id"], done=True)
            self.settled.add(row["run_id"])
            self.ran.append(row["run_id"])
        self.bar.update(1 - self.shown.pop(row["run_id"], 0.0))
        if row["status"] != "ok":
            self.log(f"run {row['run_id']} failed: {row['error']}")

    def interrupted(self) -> SweepInterrupted:
        """After Ctrl-C: release this process's runs and say what is saved."""
        self.bar.close()
        self.claims.release_all()
        runs = self.runs
        saved = self.store.reload().finished() & {r.run_id for r in runs}
        return SweepInterrupted(
            f"interrupted: {len(saved)} of {len(runs)} runs are saved in {self.store.path} "
            f"({len(saved & set(self.ran))} from this session); run the same command again to "
            f"resume the other {len(runs) - len(saved)}."
        )


def batch_groups(
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
    groups = [[s] for s in todo if s.method not in LORA_METHODS]
    for targets in dict.fromkeys(s.targets for s in todo if s.method in LORA_METHODS):
        runs = [s for s in todo if s.method in LORA_METHODS and s.targets == targets]
        try:
            largest = lora_config_for(max(runs, key=lambda s: s.rank), config, task)
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
            task, [lora_config_for(s, config, task) for s in specs], [s.seed for s in specs],
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


def write_sweep_figures(directory: str | os.PathLike) -> list[Path]:
    """Write the rank and parameter trade-off figures (PNG and SVG) into ``directory``."""
    from rankkit.plots import plot_params_tradeoff, plot_rank_tradeoff

    directory = Path(directory)
    results = load_results(directory)
    # The figures draw uniform ranks and the baselines; spectral and AdaLoRA runs are
    # compared with uniform ranks in the summary (compare_allocations).
    results = results[results["method"].isin(("frozen", "full", "lora"))]
    d90 = _intrinsic_dimension(directory)
    config = directory / "config.json"
    rslora = config.exists() and bool(json.loads(config.read_text()).get("rslora"))
    written = []
    for stem, fig in (
        ("rank_vs_quality", plot_rank_tradeoff(results, rslora=rslora)),
        ("params_vs_quality", plot_params_tradeoff(results, d90=d90)),
    ):
        for ext in ("png", "svg"):
            path = directory / f"{stem}.{ext}"

            def save(fh, fig=fig, ext=ext):
                fig.savefig(fh, format=ext, dpi=150, bbox_inches="tight")

            write_atomically(path, save, binary=True)  # sweeps sharing the folder redraw too
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
