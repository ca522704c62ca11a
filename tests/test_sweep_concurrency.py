"""Several sweeps on one folder, Ctrl-C, kills and changed task defaults: no run trained twice, no finished row lost, no stale row reused."""

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest

from rankkit.sweep import ResultsStore, SweepConfig, SweepInterrupted, plan_runs, run_sweep
from rankkit.sweep import config as sweep_config
from rankkit.sweep.store import claim_directory
from rankkit.tasks import get_task

QUIET = {"progress": False, "plot": False, "log": lambda _: None}
# 2 seeds x 4 ranks, no baselines: 8 LoRA runs.
CONFIG = {"task": "digits", "ranks": [1, 2, 4, 8], "seeds": [0, 1], "epochs": 3, "lr": 1e-2}


def _fake_row(spec, config):
    return {"run_id": spec.run_id, "task": config.task, "method": spec.method,
            "rank": spec.rank, "seed": spec.seed, "test_metric": 0.5, "status": "ok"}  # fmt: skip


def test_two_sweeps_on_one_folder_share_the_runs_and_train_each_once(tmp_path):
    config = SweepConfig(**CONFIG, out=str(tmp_path / "shared"))
    trained = collections.Counter()
    by_worker = collections.defaultdict(list)

    def runner(spec, config, out_dir):
        trained[spec.run_id] += 1
        by_worker[threading.current_thread().name].append(spec.run_id)
        time.sleep(0.05)  # long enough for the other sweep to claim runs meanwhile
        return _fake_row(spec, config)

    results = {}

    def sweep(name):
        results[name] = run_sweep(config, runner=runner, poll_s=0.01, **QUIET)

    # Claims are file locks on separate open files, so two threads contend for them
    # exactly as two processes do.
    threads = [threading.Thread(target=sweep, args=(n,), name=n) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    expected = {spec.run_id for spec in plan_runs(config)}
    assert len(expected) == 12  # 8 LoRA runs + frozen and full for 2 seeds
    assert dict(trained) == dict.fromkeys(expected, 1)
    assert by_worker["a"] and by_worker["b"], "both sweeps should have trained some runs"
    for name in ("a", "b"):  # each returns the whole sweep, not just its own runs
        assert set(results[name].results["run_id"]) == expected
        assert sorted(results[name].ran) == sorted(by_worker[name])
    final = pd.read_csv(tmp_path / "shared" / "results.csv")
    assert sorted(final["run_id"]) == sorted(expected)


def test_concurrent_writers_never_lose_each_others_rows(tmp_path):
    def write(worker):
        store = ResultsStore(tmp_path)
        for i in range(25):
            store.record({"run_id": f"{worker}-{i}", "status": "ok"})

    threads = [threading.Thread(target=write, args=(w,)) for w in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ResultsStore(tmp_path).rows) == 100


def test_an_error_never_replaces_a_finished_row(tmp_path):
    store = ResultsStore(tmp_path)
    store.record({"run_id": "r", "status": "ok", "test_metric": 0.9})
    ResultsStore(tmp_path).record({"run_id": "r", "status": "error", "error": "late"})
    assert ResultsStore(tmp_path).rows["r"]["test_metric"] == 0.9


def test_a_run_another_sweep_tried_in_this_session_is_not_retried(tmp_path):
    # Sweep "a" fails a run; sweep "b", waiting for it, must accept that error row
    # rather than train the run again (a re-run later retries it).
    config = SweepConfig(**{**CONFIG, "ranks": [1], "seeds": [0]}, baselines=False,
                         out=str(tmp_path / "err"))  # fmt: skip
    calls = collections.Counter()
    started, b_waits = threading.Event(), threading.Event()

    def failing(spec, config, out_dir):
        calls[spec.run_id] += 1
        started.set()
        b_waits.wait(60)  # fail only once sweep "b" is waiting for this run
        raise RuntimeError("injected")

    a = threading.Thread(target=run_sweep, args=(config,), kwargs={"runner": failing, **QUIET})
    a.start()
    started.wait(60)
    b = run_sweep(
        config, runner=failing, poll_s=0.01, progress=False, plot=False,
        log=lambda line: "waiting for 1 run(s) that process" in line and b_waits.set(),
    )  # fmt: skip
    a.join()
    assert sum(calls.values()) == 1 and b.ran == []
    assert list(b.results["status"]) == ["error"]


def test_a_runner_interrupted_leaves_finished_rows_and_says_how_to_resume(tmp_path):
    config = SweepConfig(**CONFIG, baselines=False, out=str(tmp_path / "ctrl-c"))

    def runner(spec, config, out_dir):
        if spec.rank == 4:
            raise KeyboardInterrupt
        if spec.rank == 2 and spec.seed == 0:
            raise RuntimeError("injected")  # an error row: not counted as saved
        return _fake_row(spec, config)

    with pytest.raises(SweepInterrupted, match=r"3 of 8 runs are saved in .*results.csv \(3 from "
                       r"this session\); run the same command again to resume the other 5"):  # fmt: skip
        run_sweep(config, runner=runner, **QUIET)
    assert len(ResultsStore(config.output_dir()).finished()) == 3
    # Nothing is left claimed: the resume trains exactly the other five.
    again = run_sweep(config, runner=lambda s, c, o: _fake_row(s, c), **QUIET)
    assert len(again.ran) == 5 and len(again.skipped) == 3


def test_a_ctrl_c_during_the_recording_of_a_finished_run_waits_for_it(tmp_path, monkeypatch):
    config = SweepConfig(**CONFIG, baselines=False, out=str(tmp_path / "cut"))
    record = ResultsStore.record

    def interrupted_while_recording(self, row):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands in the middle of the write
        record(self, row)

    monkeypatch.setattr(ResultsStore, "record", interrupted_while_recording)
    with pytest.raises(SweepInterrupted, match=r"^interrupted: 1 of 8 runs are saved"):
        run_sweep(config, runner=lambda s, c, o: _fake_row(s, c), **QUIET)
    assert len(ResultsStore(config.output_dir()).finished()) == 1


def _sweep_process(args):
    return subprocess.Popen(
        [sys.executable, "-m", "rankkit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_two_sweep_processes_on_one_folder_one_killed_then_a_rerun(tmp_path):
    out = tmp_path / "together"
    args = ["sweep", "--ranks", "1,2,4,8", "--seeds", "0,1", "--epochs", "3", "--lr", "0.01",
            "--no-baselines", "--no-batch", "--out", str(out), "--quiet"]  # fmt: skip
    a, b = _sweep_process(args), _sweep_process(args)
    results = out / "results.csv"
    seen = {}  # run_id -> train_time_s of every finished row ever read
    at_kill = None
    deadline = time.time() + 240
    while time.time() < deadline and b.poll() is None:
        if results.exists():
            rows = pd.read_csv(results)  # always a whole file: writes are atomic
            seen.update(zip(rows["run_id"], rows["train_time_s"]))
            if len(seen) >= 3 and at_kill is None:
                a.send_signal(signal.SIGKILL)  # mid-way through the sweep
                at_kill = len(seen)
        time.sleep(0.05)
    a.wait()
    _, b_err = b.communicate(timeout=240)
    assert a.returncode == -signal.SIGKILL, "the first sweep should have been killed mid-way"
    assert b.returncode == 0, b_err
    final = pd.read_csv(results)
    assert len(final) == 8 and final["run_id"].is_unique and (final["status"] == "ok").all()
    # Nothing finished was lost or trained again: every row ever seen is still there as is.
    assert at_kill is not None and 3 <= at_kill < 8, "the kill should fall mid-way"
    kept = final.set_index("run_id")["train_time_s"]
    assert all(kept[run] == t for run, t in seen.items())
    assert "Traceback" not in b_err

    rerun = subprocess.run(
        [sys.executable, "-m", "rankkit", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert "8 finished run(s) skipped, 0 to run" in rerun.stdout
    assert "nothing to run" in rerun.stdout and "0run" not in rerun.stdout + rerun.stderr
    assert pd.read_csv(results).equals(final)


def _children(pid: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in found.split()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize(
    ("jobs", "stop"),
    [("1", signal.SIGINT), ("2", signal.SIGINT), ("2", signal.SIGTERM)],
    ids=["ctrl-c-1-job", "ctrl-c-2-jobs", "kill-2-jobs"],
)
def test_ctrl_c_prints_one_line_on_what_was_saved(tmp_path, jobs, stop):
    """Ctrl-C, and a plain ``kill`` (SIGTERM), stop the sweep cleanly: what finished is
    saved, one line says so, and no worker process is left behind."""
    out = tmp_path / "interrupted"
    # 8 epochs of 3,000 digit pairs: long enough a run for the signal to fall mid-way.
    args = ["sweep", "--ranks", "1,2,4,8", "--seeds", "0,1", "--epochs", "8", "--lr", "0.01",
            "--no-baselines", "--no-batch", "--jobs", jobs, "--out", str(out)]  # fmt: skip
    proc = _sweep_process(args)
    results = out / "results.csv"
    deadline = time.time() + 240
    while time.time() < deadline and not (results.exists() and len(pd.read_csv(results)) >= 1):
        time.sleep(0.05)
    workers = _children(proc.pid)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    saved = len(pd.read_csv(results))
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert 1 <= saved < 8, "the interrupt should fall mid-way"
    assert last == (
        f"interrupted: {saved} of 8 runs are saved in {results} ({saved} from this session); "
        f"run the same command again to resume the other {8 - saved}."
    )
    if jobs == "2":  # the queue stopped; the runs in flight finished and were kept
        assert len(list((out / "adapters").iterdir())) == saved
        assert workers, "the sweep should have started worker processes"
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "a worker process outlived the sweep"


# --------------------------------------------------------------------------- changed task defaults


def test_a_folder_written_under_other_task_defaults_is_refused(tmp_path, monkeypatch):
    """A config's lr=None means "the task's default": if that default changes (a new
    rankkit, a re-tuned task), resuming would silently mix runs trained at both rates."""
    config = SweepConfig(task="digits", out=str(tmp_path)).validated()
    claim_directory(tmp_path, config, force=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["task_defaults"]["hparams"]["lr"] == get_task("digits").default_hparams["lr"]
    claim_directory(tmp_path, config, force=False)  # unchanged: resumes

    task_class = type(get_task("digits"))
    retuned = {**task_class.default_hparams, "lr": 0.5}
    monkeypatch.setattr(task_class, "default_hparams", retuned)
    with pytest.raises(ValueError, match=r"task 'digits' changed since: default lr: 0\.01 there "
                       r"vs 0\.5 now.*--force keeps the runs trained under the task's old"):  # fmt: skip
        claim_directory(tmp_path, config, force=False)
    monkeypatch.undo()

    manifest = sweep_config.read_manifest()
    rebuilt = {**manifest, "digits": {**manifest["digits"], "sha256": "f" * 64}}
    monkeypatch.setattr(sweep_config, "read_manifest", lambda: rebuilt)
    with pytest.raises(ValueError, match=r"base weights: sha256 \w{12} there vs ffffffffffff now"):
        claim_directory(tmp_path, config, force=False)
    claim_directory(tmp_path, config, force=True)  # the user's explicit choice
    assert json.loads((tmp_path / "config.json").read_text())["task_defaults"]["base_sha256"] == (
        "f" * 64
    )


def test_a_folder_from_before_task_defaults_were_recorded_is_refused(tmp_path):
    config = SweepConfig(task="digits", out=str(tmp_path)).validated()
    claim_directory(tmp_path, config, force=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["task_defaults"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"not recorded there \(written by an older rankkit\)"):
        claim_directory(tmp_path, config, force=False)
