"""Sweeps with chosen ranks: spectral allocation from a pilot fine-tune, and AdaLoRA (issue 17).

Ground truth: the allocation's parameter count against the uniform budget and the
knapsack's own optimality condition; planted pilots whose ΔW holds its energy in one
layer; the standard error of a difference computed by hand; AdaLoRA's rank budget.
"""

import dataclasses
import importlib.util
import json
import math
import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

from rankkit.checkpoints import load_state_dict, save_state_dict
from rankkit.cli import main
from rankkit.lora.model import lora_layers
from rankkit.methods import prepare_run
from rankkit.sweep import (
    RunSpec,
    SweepConfig,
    check_sweep_can_run,
    compare_allocations,
    format_summary,
    lora_config_for,
    plan_runs,
    pooled_difference,
    run_sweep,
)
from rankkit.sweep.config import task_defaults
from rankkit.sweep.pilot import (
    adapted_layers,
    pilot_finetune,
    rank_patterns,
    spectral_rank_patterns,
)
from rankkit.sweep.store import Claims, claim_directory
from rankkit.tasks import get_task

HAS_PEFT = importlib.util.find_spec("peft") is not None
DIGITS = {"fc1": (256, 128), "fc2": (256, 256)}  # (out, in) of the digits MLP's layers
UNIT = sum(m + n for m, n in DIGITS.values())  # 896 parameters per unit of uniform rank


pytestmark = pytest.mark.usefixtures("one_thread")


def planted(shapes, scales, seed=0):
    """Base and fine-tuned state dicts whose ΔW has singular values ``scale * (1 .. 2)``."""
    gen = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for (name, (m, n)), scale in zip(shapes.items(), scales):
        k = min(m, n)
        U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
        s = scale * torch.linspace(2, 1, k, dtype=torch.float64)
        base[f"{name}.weight"] = torch.randn(m, n, generator=gen, dtype=torch.float64)
        tuned[f"{name}.weight"] = base[f"{name}.weight"] + U @ torch.diag(s) @ V.T
    return base, tuned


# --------------------------------------------------------------------------- the allocation


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spectral_ranks_never_exceed_the_uniform_budget_and_leave_less_than_a_unit(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"a": (48, 16), "b": (32, 32), "c": (64, 24)}
    base = {f"{k}.weight": torch.zeros(m, n) for k, (m, n) in shapes.items()}
    tuned = {
        k: torch.randn(v.shape, generator=gen) * (1 + i) for i, (k, v) in enumerate(base.items())
    }
    unit = sum(m + n for m, n in shapes.values())
    patterns = rank_patterns(base, tuned, shapes, [1, 2, 4, 8, 16])
    for r, pattern in patterns.items():
        spent = sum(k * sum(shapes[m]) for m, k in pattern.items())
        assert spent <= r * unit
        # Optimality: a layer below full rank whose next unit still fits would add
        # energy, so what is left is below the cost of every such layer.
        open_costs = [sum(s) for m, s in shapes.items() if pattern.get(m, 0) < min(s)]
        assert r * unit - spent < min(open_costs, default=math.inf)


@pytest.mark.parametrize("strong, weak", [("fc1", "fc2"), ("fc2", "fc1")])
def test_a_pilot_whose_update_is_in_one_layer_gives_that_layer_the_rank(strong, weak):
    # Every singular value of the strong layer is >= 1, of the weak one <= 0.02: per
    # parameter, any unit of the strong layer keeps more energy than any of the weak one,
    # so the optimum fills the strong layer first and spends what is left on the weak one.
    base, tuned = planted(DIGITS, [1.0 if n == strong else 0.01 for n in DIGITS])
    patterns = rank_patterns(base, tuned, DIGITS, [1, 2, 4, 8, 16, 32])
    cost = {n: sum(s) for n, s in DIGITS.items()}
    for r, pattern in patterns.items():
        top = min(min(DIGITS[strong]), r * UNIT // cost[strong])
        rest = (r * UNIT - top * cost[strong]) // cost[weak]
        assert pattern.get(strong, 0) == top and pattern.get(weak, 0) == rest
        if r >= 2:
            assert pattern[strong] > r > pattern.get(weak, 0)


def test_adapted_layers_reads_names_and_shapes_of_a_target_set():
    task = get_task("digits")
    assert adapted_layers(task, "all-linear") == DIGITS
    assert adapted_layers(task, "fc2") == {"fc2": (256, 256)}


def test_a_spectral_run_trains_exactly_its_rank_pattern_within_the_budget():
    task = get_task("digits")
    config = SweepConfig(allocation="spectral").validated()
    spec = RunSpec("lora-spectral", 0, 4, 4.0, "all-linear", (("fc2", 6),))
    model = prepare_run(task, "lora", 0, lora_config=lora_config_for(spec, config, task)).model
    layers = lora_layers(model)
    assert {n: m.r for n, m in layers.items()} == {"fc2": 6}  # fc1 gets no adapter
    # The sweep's alpha rule at the layer's own rank: sqrt(6) / 6 = 1 / sqrt(6).
    assert layers["fc2"].scaling == pytest.approx(6**-0.5)
    adapter = sum(m.lora_A.numel() + m.lora_B.numel() for m in layers.values())
    assert adapter == 6 * 512 <= 4 * UNIT


# --------------------------------------------------------------------------- the pilot


def test_the_sweep_reuses_a_pilot_with_its_recipe_and_allocates_from_its_spectra(tmp_path):
    config = SweepConfig(
        ranks=[2, 8], seeds=[0], epochs=1, allocation="spectral", out=str(tmp_path)
    )
    config = config.validated()
    lines = []
    directory = pilot_finetune(config, tmp_path, log=lines.append)
    assert "pilot full fine-tune (seed 0)" in lines[-1]
    record = json.loads((directory / "metrics.json").read_text())
    assert record["hparams"]["epochs"] == 1 and record["hparams"]["seed"] == 0
    # Plant the fine-tune: all of ΔW in fc2. The sweep must reuse the folder, not retrain.
    base = load_state_dict(directory / "base.safetensors")
    before, after = planted(DIGITS, [0.01, 1.0])
    tuned = {k: base[k] + (after[k] - before[k]).float() for k in before}
    save_state_dict({**base, **tuned}, directory / "finetuned.safetensors")
    lines.clear()
    patterns = spectral_rank_patterns(config, tmp_path, log=lines.append)
    assert "reusing the pilot" in lines[0]
    assert patterns["all-linear", 2] == {"fc2": 3}  # 1,792 parameters: 3 units of fc2 (1,536)
    assert patterns["all-linear", 8] == {"fc2": 14}  # 7,168: 14 units of fc2 (7,168)
    runs = [r for r in plan_runs(config, patterns) if r.method == "lora-spectral"]
    assert [(r.rank, r.rank_pattern) for r in runs] == [(2, (("fc2", 3),)), (8, (("fc2", 14),))]
    # A different recipe (more epochs) trains the pilot again.
    lines.clear()
    pilot_finetune(dataclasses.replace(config, epochs=2), tmp_path, log=lines.append)
    assert "pilot full fine-tune" in lines[-1]
    assert json.loads((directory / "metrics.json").read_text())["hparams"]["epochs"] == 2


def test_a_second_process_waits_for_the_pilot_and_then_reuses_it(tmp_path):
    config = SweepConfig(seeds=[0], epochs=1, allocation="spectral", out=str(tmp_path)).validated()
    pilot_finetune(config, tmp_path, log=lambda _: None)
    other = Claims(tmp_path)  # another process fine-tuning the pilot: it holds the claim
    assert other.try_claim("pilot") is not None
    lines = []
    waiting = threading.Thread(
        target=pilot_finetune, args=(config, tmp_path), kwargs={"log": lines.append, "poll_s": 0.02}
    )
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive() and lines == [f"waiting for {other.holder('pilot')} to fine-tune "
                                            f"the pilot in {tmp_path / 'pilot'}"]  # fmt: skip
    other.release("pilot", done=True)
    waiting.join(timeout=30)
    assert "reusing the pilot" in lines[-1]


def test_allocation_and_adalora_are_toml_keys(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('[sweep]\nallocation = "spectral"\nadalora = true\n')
    config = SweepConfig.from_toml(path)
    assert (config.allocation, config.adalora) == ("spectral", True)


def test_adding_allocation_to_a_folder_written_without_the_key_resumes_it(tmp_path):
    config = SweepConfig(out=str(tmp_path)).validated()
    written = {**dataclasses.asdict(config), "task_defaults": task_defaults(config.task)}
    old = {k: v for k, v in written.items() if k not in ("allocation", "adalora")}
    (tmp_path / "config.json").write_text(json.dumps(old))
    spectral = SweepConfig(out=str(tmp_path), allocation="spectral", adalora=HAS_PEFT).validated()
    claim_directory(tmp_path, spectral, force=False)  # no "different config" error
    changed = SweepConfig(out=str(tmp_path), allocation="spectral", epochs=3).validated()
    with pytest.raises(ValueError, match="different config"):
        claim_directory(tmp_path, changed, force=False)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_tiny_spectral_sweep_on_digits_records_both_allocations(tmp_path):
    config = SweepConfig(
        ranks=[1, 4], seeds=[0, 1], epochs=2, allocation="spectral", adalora=HAS_PEFT,
        out=str(tmp_path),
    )  # fmt: skip
    result = run_sweep(config, progress=False, plot=False, log=lambda _: None)
    rows = result.results.set_index("run_id")
    assert (rows["status"] == "ok").all()
    uniform = rows[rows["method"] == "lora"]
    spectral = rows[rows["method"] == "lora-spectral"]
    assert set(uniform["allocation"]) == {"uniform"} and set(spectral["allocation"]) == {"spectral"}
    assert len(uniform) == len(spectral) == 4
    for _, row in spectral.iterrows():
        assert row["adapter_params"] <= row["rank"] * UNIT
        # The recorded pattern is the one trained and saved.
        saved = json.loads((tmp_path / row["adapter"]).with_name("adapter_config.json").read_text())
        ranks = dict(item.split(":") for item in row["rank_pattern"].split())
        assert {m: int(r) for m, r in ranks.items()} == {
            m: saved["rank_pattern"].get(m, saved["r"]) for m in saved["target_modules"]
        }
    assert (uniform["adapter_params"] == uniform["rank"] * UNIT).all()
    written = (tmp_path / "results.csv").read_text().splitlines()
    column = written[0].split(",").index("adapter_params")
    assert all("." not in line.split(",")[column] for line in written[1:])  # counts, not floats
    table = compare_allocations(result.results)
    assert set(table["allocation"]) == ({"spectral", "adalora"} if HAS_PEFT else {"spectral"})
    text = format_summary(result.results)
    assert "spectral - uniform at the same budget, targets all-linear" in text
    if HAS_PEFT:
        adalora = rows[rows["method"] == "adalora"]
        for _, row in adalora.iterrows():
            ranks = {m: int(r) for m, r in (x.split(":") for x in row["rank_pattern"].split())}
            assert sum(ranks.values()) == row["rank"] * len(DIGITS)  # its budget in rank units
            assert row["adapter_params"] == sum(r * sum(DIGITS[m]) for m, r in ranks.items())
    # Run again: everything (pilot included) is reused.
    lines = []
    again = run_sweep(config, progress=False, plot=False, log=lines.append)
    assert again.ran == [] and any("reusing the pilot" in line for line in lines)


@pytest.mark.skipif(not HAS_PEFT, reason="AdaLoRA comes from peft")
def test_adalora_ends_at_its_target_budget_through_the_one_loop(monkeypatch):
    from peft.tuners.adalora import AdaLoraModel

    from rankkit.adalora import fit_adalora

    steps = []
    original = AdaLoraModel.update_and_allocate

    def record(self, global_step):
        steps.append(global_step)
        return original(self, global_step)

    monkeypatch.setattr(AdaLoraModel, "update_and_allocate", record)
    task = get_task("digits")
    trained = fit_adalora(task, ["fc1", "fc2"], target_r=2, epochs=4, seed=0, device="cpu")
    per_epoch = math.ceil(len(task.splits()["train"]) / task.default_hparams["batch_size"])
    total = 4 * per_epoch
    assert steps == list(range(total))  # once per optimiser step, in order
    assert sum(trained.ranks.values()) == 2 * 2  # target_r units per layer, moved freely
    for name, rank in trained.ranks.items():
        E = trained.model.base_model.model.get_submodule(name).lora_E["default"]
        assert int((E != 0).sum()) == rank and E.shape[0] == 3  # init_r = ceil(1.5 * 2)
    assert trained.adapter_params == sum(r * sum(DIGITS[m]) for m, r in trained.ranks.items())
    # The ranks are final from step total - tfinal (tfinal: half the steps) on; only
    # epochs validated after it compete for the best epoch.
    scored = [h["epoch"] for h in trained.result.history if h["val_accuracy"] > -math.inf]
    assert scored == [e for e in range(1, 5) if e * per_epoch > total - round(total / 2)]
    assert trained.result.best_epoch in scored


@pytest.mark.skipif(not HAS_PEFT, reason="AdaLoRA comes from peft")
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys")  # PEFT's own AdaLoRA keys
def test_a_saved_adalora_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    from peft import PeftModel

    from rankkit.adalora import fit_adalora

    task = get_task("digits")
    trained = fit_adalora(task, ["fc1", "fc2"], target_r=1, epochs=2, seed=1, device="cpu")
    trained.save(tmp_path)
    loaded = PeftModel.from_pretrained(task.build_model(pretrained=True, seed=1), str(tmp_path))
    x = task.splits()["test"].tensors[0][:32]
    trained.model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained.model(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the comparison


def results_table(
    uniform, spectral, patterns=("fc1:4 fc2:4", "fc1:2 fc2:5"), other="lora-spectral"
):
    rows = []
    for method, values, pattern in (
        ("lora", uniform, patterns[0]),
        (other, spectral, patterns[1]),
    ):
        for seed, value in enumerate(values):
            rows.append(dict(method=method, targets="all-linear", rank=4, seed=seed, status="ok",
                             test_metric=value, rank_pattern=pattern, adapter_params=3584))  # fmt: skip
    return pd.DataFrame(rows)


def test_the_difference_has_the_standard_error_of_two_independent_means():
    u, s = [0.90, 0.92, 0.94], [0.93, 0.96, 0.96]
    (row,) = compare_allocations(results_table(u, s)).to_dict("records")
    se = math.sqrt(np.var(u, ddof=1) / 3 + np.var(s, ddof=1) / 3)
    assert row["difference"] == pytest.approx(np.mean(s) - np.mean(u))
    assert row["se"] == pytest.approx(se) and row["z"] == pytest.approx(row["difference"] / se)
    assert row["verdict"] == "within seed noise"  # Welch p = 0.13


def test_the_summary_pools_the_ranks_where_the_allocation_differs():
    at4 = results_table([0.90, 0.92, 0.94], [0.93, 0.96, 0.96])
    at8 = results_table([0.95, 0.95, 0.96], [0.94, 0.95, 0.95]).assign(rank=8)
    same = results_table([0.9, 0.91, 0.9], [0.9, 0.91, 0.9], ("fc1:1 fc2:1",) * 2).assign(rank=1)
    results = pd.concat([at4, at8, same]).assign(
        run_id=range(18), metric="accuracy", trainable_params=0, trainable_fraction=0.0
    )
    table = compare_allocations(results)
    d = [np.mean(s) - np.mean(u) for u, s in ([[0.90, 0.92, 0.94], [0.93, 0.96, 0.96]],
                                              [[0.95, 0.95, 0.96], [0.94, 0.95, 0.95]])]  # fmt: skip
    se = math.sqrt(sum(table.loc[table["rank"] > 1, "se"] ** 2)) / 2
    assert pooled_difference(table[table["rank"] > 1]) == pytest.approx((np.mean(d), se))
    assert f"mean over the 2 ranks it allocates differently: {np.mean(d):+.3f} ± {se:.3f}" in (
        format_summary(results)
    )


@pytest.mark.parametrize(
    "spectral, verdict",
    [
        ([0.95, 0.951, 0.952], "better than uniform"),
        ([0.80, 0.801, 0.802], "worse than uniform"),
        ([0.90, 0.92, 0.94], "within seed noise"),
    ],
)
def test_the_verdict_follows_welchs_test(spectral, verdict):
    table = compare_allocations(results_table([0.90, 0.901, 0.902], spectral))
    assert table["verdict"].tolist() == [verdict]


def test_identical_ranks_are_called_so_and_one_seed_gives_no_verdict():
    same = compare_allocations(results_table([0.9, 0.91], [0.9, 0.91], ("fc1:1 fc2:1",) * 2))
    assert same["verdict"].tolist() == ["same ranks as uniform"]
    one = compare_allocations(results_table([0.9], [0.95]))
    assert one["verdict"].tolist() == ["one seed, no noise estimate"] and math.isnan(one["se"][0])


def test_adalora_at_uniforms_ranks_still_gets_welchs_verdict():
    """Only a spectral run with uniform's ranks is uniform's configuration; AdaLoRA that ends
    at the same ranks is another method (P Λ Q, pruned from more units), judged by its numbers."""
    uniform, lower, patterns = [0.77, 0.78, 0.79], [0.74, 0.745, 0.75], ("fc1:2 fc2:2",) * 2
    adalora = compare_allocations(results_table(uniform, lower, patterns, other="adalora"))
    assert adalora["allocation"].tolist() == ["adalora"]
    assert adalora["verdict"].tolist() == ["worse than uniform"]  # Welch p < 0.05
    spectral = compare_allocations(results_table(uniform, lower, patterns))
    assert spectral["verdict"].tolist() == ["same ranks as uniform"]
    # The summary pools AdaLoRA over every rank, without saying it allocates differently.
    at4 = results_table(uniform, lower, patterns, other="adalora")
    results = pd.concat([at4, at4.assign(rank=8)]).assign(
        run_id=range(12), metric="accuracy", trainable_params=0, trainable_fraction=0.0
    )
    d, se = np.mean(lower) - np.mean(uniform), adalora["se"].item()
    assert se == pytest.approx(math.sqrt((np.var(uniform, ddof=1) + np.var(lower, ddof=1)) / 3))
    text = format_summary(results)
    assert f"r=8 {d:+.3f} ± {se:.3f} (worse than uniform)" in text
    assert f"mean over the 2 ranks: {d:+.3f} ± {se / math.sqrt(2):.3f}" in text


def test_old_results_without_allocation_columns_compare_nothing():
    old = results_table([0.9, 0.91], [0.9, 0.91]).drop(columns=["rank_pattern", "adapter_params"])
    old = old[old["method"] == "lora"]
    assert compare_allocations(old).empty
    old = old.assign(metric="accuracy", trainable_params=3402, trainable_fraction=0.04)
    assert "same budget" not in format_summary(old)


# --------------------------------------------------------------------------- bad input


def test_an_unknown_allocation_suggests_the_right_one():
    with pytest.raises(
        ValueError, match=r"unknown allocation 'spectrl' \(did you mean 'spectral'\?\)"
    ):
        SweepConfig(allocation="spectrl").validated()
    with pytest.raises(ValueError, match="adalora must be true or false"):
        SweepConfig(adalora="yes").validated()
    assert SweepConfig(allocation="Spectral").validated().allocation == "spectral"


def test_spectral_allocation_needs_two_layers_to_move_rank_between():
    with pytest.raises(
        ValueError, match=r"targets 'fc1' adapt one layer \(fc1\); target two or more"
    ):
        check_sweep_can_run(SweepConfig(targets=["fc1"], allocation="spectral").validated())
    check_sweep_can_run(SweepConfig(targets=["fc1"]).validated())  # uniform: fine


def test_plan_runs_refuses_spectral_allocation_without_a_pilot():
    with pytest.raises(ValueError, match="needs the per-layer ranks of a pilot fine-tune"):
        plan_runs(SweepConfig(allocation="spectral").validated())


@pytest.mark.skipif(not HAS_PEFT, reason="the rank check runs after the peft check")
def test_adalora_initial_ranks_must_fit_the_layers():
    # Rank 100 fits fc1 (min(256, 128) = 128) as LoRA, but AdaLoRA would start it at 150.
    check_sweep_can_run(SweepConfig(ranks=[4, 100]).validated())
    with pytest.raises(ValueError, match=r"AdaLoRA starts rank\(s\) \[100\] at \[150\]"):
        check_sweep_can_run(SweepConfig(ranks=[4, 100], adalora=True).validated())


def test_adalora_without_peft_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "peft" else real(n, *a)
    )
    with pytest.raises(ImportError, match=r"pip install 'rankkit\[peft\]'"):
        check_sweep_can_run(SweepConfig(adalora=True).validated())
    monkeypatch.setitem(__import__("sys").modules, "peft", None)
    from rankkit.adalora import require_peft

    with pytest.raises(ImportError, match=r"pip install 'rankkit\[peft\]'"):
        require_peft()


def test_the_command_line_reports_a_misspelt_allocation(capsys, tmp_path):
    assert main(["sweep", "--allocation", "spectrl", "--out", str(tmp_path / "x")]) == 1
    assert "did you mean 'spectral'" in capsys.readouterr().err
    out = ["--out", str(tmp_path / "x")]
    assert main(["sweep", "--allocation", "spectral", "--targets", "fc1", *out]) == 1
    assert "adapt one layer (fc1)" in capsys.readouterr().err
    if HAS_PEFT:
        assert main(["sweep", "--adalora", "--ranks", "100", *out]) == 1
        assert "AdaLoRA starts rank(s) [100] at [150]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written


# --------------------------------------------------------------------------- the record


def test_the_recorded_digits_allocation_says_what_docs_sweeps_md_says():
    """docs/sweeps.md's "Chosen ranks" verdicts, recomputed from its 10-seed record."""
    from pathlib import Path

    from rankkit.stats import compare_seeds

    records = Path(__file__).resolve().parents[1] / "docs" / "records"
    results = pd.read_csv(records / "digits-allocation.csv")
    assert len(results) == 200 and (results["status"] == "ok").all()
    table = compare_allocations(results).set_index(["rank", "allocation"])
    verdict = table["verdict"]
    # Full fine-tuning at the task's rate: seeds 0-2 are the digits sweep record's runs.
    full = results[results["method"] == "full"].sort_values("seed")
    sweep = pd.read_csv(records / "digits-sweep.csv").query("method == 'full'").sort_values("seed")
    assert full["test_metric"].iloc[:3].tolist() == sweep["test_metric"].tolist()
    full = full["test_metric"]

    def patterns(method, rank):
        return set(results.query("method == @method and rank == @rank")["rank_pattern"])

    # Spectral: the pilot's spectra give uniform's own ranks at r = 1, 2, 4, and ranks tilted
    # to fc2 above, where the difference is within seed noise at every rank and pooled.
    for rank in (1, 2, 4):
        assert patterns("lora-spectral", rank) == patterns("lora", rank)
        assert verdict[rank, "spectral"] == "same ranks as uniform"
        assert table.loc[(rank, "spectral"), "p"] > 0.05  # batching alone: not resolved
    for rank in (8, 16, 32):
        assert patterns("lora-spectral", rank) != patterns("lora", rank)
        assert verdict[rank, "spectral"] == "within seed noise"
    mean, se = pooled_difference(table.xs("spectral", level="allocation").loc[[8, 16, 32]])
    assert abs(mean) < 1.96 * se
    # AdaLoRA: worse at r = 1 and 2 (r = 2 at uniform's ranks in every seed), within noise at
    # 4, better from r = 8 on.
    assert patterns("adalora", 2) == patterns("lora", 2)
    assert [verdict[r, "adalora"] for r in (1, 2)] == ["worse than uniform"] * 2
    assert verdict[4, "adalora"] == "within seed noise"
    assert [verdict[r, "adalora"] for r in (8, 16, 32)] == ["better than uniform"] * 3

    # ... and against full fine-tuning: AdaLoRA below it at r = 16 and level at r = 32;
    # uniform LoRA below it at both.
    def versus_full(method, rank):
        runs = results.query("method == @method and rank == @rank")["test_metric"]
        return compare_seeds(runs, full).sign

    assert [versus_full("adalora", r) for r in (16, 32)] == [-1, 0]
    assert [versus_full("lora", r) for r in (16, 32)] == [-1, -1]
