"""What each adapter budget buys: LoRA extracted from a task's full fine-tune, evaluated.

For every seed, a built-in task is fine-tuned in full; then, at each budget of adapter
parameters, three adapters are extracted from that one fine-tune
(:func:`rankkit.extract.extract_lora`) and evaluated on the test split:

* ``uniform`` -- the same rank r in every layer, the largest that fits the budget;
* ``energy`` -- the energy rule with the largest fraction whose adapter fits;
* ``budget`` -- the allocation that keeps the most total energy of ΔW
  (:func:`rankkit.extract.allocate_budget`).

Next to them: full fine-tuning, the frozen base, and "all of ΔW" (every adapted layer
at full rank: the ceiling of any extraction, since layers LoRA cannot hold -- biases,
norms, embeddings -- keep their base values). :func:`compare_with_uniform` pairs the
energy and budget rules with uniform ranks by seed (the same fine-tune) and says
whether the difference is beyond seed noise (a two-sided paired t-test at 5%).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rankkit.checkpoints import load_state_dict
from rankkit.extract import ExtractedAdapter, extract_lora
from rankkit.lora import load_adapter
from rankkit.methods import finetune
from rankkit.stats import compare_seeds
from rankkit.tasks import Task


def extraction_study(
    task: Task,
    budgets: Sequence[int],
    seeds: Sequence[int],
    out: str | Path,
    *,
    modules_to_save: Sequence[str] | None = None,
    layers: str | None = None,
    device: str = "auto",
    log=print,
) -> pd.DataFrame:
    """One row per (seed, rule, budget) with its parameter count and test metric.

    Fine-tunings and adapters are written under ``out/seed<k>/``.
    """
    saved = list(modules_to_save or task.head_modules)
    rows = []
    for seed in seeds:
        rows += _one_seed(task, seed, list(budgets), saved, Path(out), layers, device, log)
    return pd.DataFrame(rows)


def _one_seed(task, seed, budgets, saved, out, layers, device, log) -> list[dict[str, Any]]:
    """Fine-tune with one seed, then extract at every budget three ways."""
    metric = f"test_{task.metric_name}"
    full, paths = finetune(task, out / f"seed{seed}", method="full", seed=seed, progress=False)
    frozen, _ = finetune(task, None, method="frozen", seed=seed, progress=False)
    # The base as a module, so that embeddings are recognised (and skipped) by type.
    base = task.build_model(pretrained=False, seed=seed)
    base.load_state_dict(load_state_dict(paths["base"]))
    tuned = load_state_dict(paths["finetuned"])
    rows = [
        dict(seed=seed, allocation=name, budget=None, parameters=result.trainable_params,
             kept_fraction=None, ranks="", **{metric: result.metrics[metric]})
        for name, result in (("full fine-tuning", full), ("frozen base", frozen))
    ]  # fmt: skip

    def extract(**rule) -> ExtractedAdapter:
        return extract_lora(base, tuned, layers=layers, modules_to_save=saved, device=device,
                            **rule)  # fmt: skip

    def evaluate(adapter: ExtractedAdapter, where: Path) -> float:
        adapter.save(where)
        return task.evaluate(load_adapter(copy.deepcopy(base), where), "test")

    ceiling = extract(energy=1.0)
    score = evaluate(ceiling, out / f"seed{seed}" / "all-of-dW")
    rows.append(dict(seed=seed, allocation="all of ΔW", budget=None,
                     parameters=ceiling.n_parameters + ceiling.n_saved_parameters,
                     kept_fraction=ceiling.kept_fraction, ranks="", **{metric: score}))  # fmt: skip
    unit = extract(rank=1).n_parameters  # uniform rank r costs r * unit
    for budget in budgets:
        adapters = {
            "uniform": extract(rank=budget // unit) if budget >= unit else None,
            "energy": energy_within(extract, budget),
            "budget": extract(budget=budget),
        }
        for name, adapter in adapters.items():
            if adapter is None:
                continue
            score = evaluate(adapter, out / f"seed{seed}" / f"{name}-{budget}")
            rows.append(dict(
                seed=seed, allocation=name, budget=budget,
                parameters=adapter.n_parameters + adapter.n_saved_parameters,
                kept_fraction=adapter.kept_fraction,
                ranks=" ".join(f"{m}:{r}" for m, r in adapter.ranks.items()),
                **{metric: score},
            ))  # fmt: skip
            log(f"seed {seed} budget {budget:>7,} {name:>8}: {metric} {score:.4f}, "
                f"{rows[-1]['parameters']:,} parameters, {100 * adapter.kept_fraction:.1f}% "
                f"energy, ranks {rows[-1]['ranks']}")  # fmt: skip
    return rows


def energy_within(extract, budget: int, steps: int = 30) -> ExtractedAdapter | None:
    """The energy rule with the largest fraction whose adapter fits in ``budget`` (bisection)."""
    low, high, best = 0.0, 1.0, None
    for _ in range(steps):
        mid = (low + high) / 2
        adapter = extract(energy=mid)
        if adapter.n_parameters <= budget:
            low, best = mid, adapter
        else:
            high = mid
    return best


def summarize_study(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean and sd over seeds of the metric, per rule and budget."""
    return (
        table.groupby(["allocation", "budget"], dropna=False)
        .agg(parameters=("parameters", "mean"), kept_fraction=("kept_fraction", "mean"),
             mean=(metric, "mean"), std=(metric, "std"), runs=(metric, "size"))
        .reset_index()
    )  # fmt: skip


def compare_with_uniform(table: pd.DataFrame, metric: str) -> list[dict[str, Any]]:
    """Energy and budget ranks minus uniform ranks, per budget, paired by seed (same fine-tune).

    The verdict is "within seed noise" unless the paired t-test of
    :func:`rankkit.stats.compare_seeds` rejects a zero mean difference at 5%.
    """
    lora = table[table["budget"].notna()]
    wide = lora.pivot_table(index=["budget", "seed"], columns="allocation", values=metric)
    rows = []
    for budget, part in wide.groupby(level="budget"):
        for name in ("energy", "budget"):
            if name not in part or "uniform" not in part or part["uniform"].isna().all():
                continue
            pairs = part[[name, "uniform"]].dropna()
            d = (pairs[name] - pairs["uniform"]).to_numpy()
            n, mean = len(d), float(d.mean())
            sd = float(d.std(ddof=1)) if n > 1 else float("nan")
            if n < 2:
                verdict = "one seed, no noise estimate"
            elif (d == 0).all():
                verdict = "identical on every seed"
            elif not compare_seeds(pairs[name], pairs["uniform"], paired=True).resolved:
                verdict = "within seed noise"
            else:
                verdict = "better than uniform" if mean > 0 else "worse than uniform"
            rows.append(dict(budget=budget, allocation=name, difference=mean, sd=sd, seeds=n,
                             verdict=verdict))  # fmt: skip
    return rows


def trained_lora(results: pd.DataFrame, task: str) -> pd.DataFrame:
    """Trained LoRA runs of a sweep's results, per target set and rank, for the same figure."""
    runs = results[(results["method"] == "lora") & (results["status"] == "ok")]
    runs = runs[runs["task"] == task]
    return (
        runs.groupby(["targets", "rank"])
        .agg(parameters=("trainable_params", "mean"), mean=("test_metric", "mean"),
             std=("test_metric", "std"), runs=("test_metric", "size"))
        .reset_index()
    )  # fmt: skip
