"""Compare the sweep's alpha rules: one markdown table per task from three sweep folders.

The sweeps (``docs/sweeps.md``, "Choosing the default alpha rule")::

    for rule in "r" "8" "sqrt(r)"; do
      python -m rankkit sweep --task digits --ranks 1,2,4,8,16,32,64 --alpha "$rule" --threads 1 --out "runs/alpha/digits-$rule"
      python -m rankkit sweep --task topics --targets q,v all-linear --ranks 1,2,4,8,16,32,64 --alpha "$rule" --jobs 2 --out "runs/alpha/topics-$rule"
    done
    python docs/experiments/alpha_rules.py runs/alpha

A cell is the test accuracy, mean over seeds; it is marked **collapsed** (⚠) when it
is below the frozen base by a resolved margin: Welch's test over seeds
(``rankkit.stats.compare_seeds``) at the 5% level. A second table gives, per rule and
target set, the rank reaching 90% / 95% of the full-FT gain with its bootstrap interval
(``rankkit.sweep.rank_for_gain_interval``). A task with no folder under the root is
skipped.
"""

import math
import sys
from pathlib import Path

import pandas as pd

from rankkit.stats import compare_seeds
from rankkit.sweep import rank_for_gain, rank_for_gain_interval

RULES = {"r": "alpha = r (scale 1)", "8": "alpha = 8 (scale 8/r)", "sqrt(r)": "alpha = sqrt(r) (scale 1/sqrt(r))"}  # fmt: skip


def _folders(root: Path, task: str) -> dict[str, Path]:
    found = {rule: root / f"{task}-{rule}" for rule in RULES}
    return {rule: f for rule, f in found.items() if (f / "results.csv").exists()}


def _ok_runs(folder: Path) -> pd.DataFrame:
    runs = pd.read_csv(folder / "results.csv")
    return runs[runs["status"] == "ok"]


def _rank(results: pd.DataFrame, fraction: float, targets: str) -> str:
    point = rank_for_gain(results, fraction, targets)
    interval = rank_for_gain_interval(results, fraction, targets)
    name = "–" if point is None else str(point)
    if interval is None:
        return name
    low, high = ("–" if math.isinf(x) else str(int(x)) for x in interval)
    return f"{name} [{low}]" if low == high else f"{name} [{low}, {high}]"


def ranks_for_gain(root: Path, task: str) -> list[str]:
    """Table rows: the rank reaching 90% / 95% of the gain, per rule and target set."""
    rows = []
    for rule, folder in _folders(root, task).items():
        runs = _ok_runs(folder)
        for targets in sorted(runs.loc[runs["method"] == "lora", "targets"].unique()):
            cells = " | ".join(_rank(runs, f, targets) for f in (0.9, 0.95))
            rows.append(f"| {task} | {rule} | {targets} | {cells} |")
    return rows


def table(root: Path, task: str) -> str:
    lines = []
    for rule, folder in _folders(root, task).items():
        label = RULES[rule]
        runs = _ok_runs(folder)
        frozen = runs.loc[runs["method"] == "frozen", "test_metric"]
        lora = runs[runs["method"] == "lora"]
        for targets, group in lora.groupby("targets"):
            stats = group.groupby("rank")["test_metric"].agg(["mean", "std", "count"])
            cells, collapsed = [], 0
            for rank, row in stats.iterrows():
                scores = group.loc[group["rank"] == rank, "test_metric"]
                versus = compare_seeds(scores.to_numpy(), frozen.to_numpy())
                low = versus.resolved and versus.difference < 0
                collapsed += low
                cells.append(f"{row['mean']:.3f}" + (" ⚠" if low else ""))
            ranks = ", ".join(str(int(r)) for r in stats.index)
            if not lines:
                lines += [f"| rule | targets | {' | '.join(f'r={int(r)}' for r in stats.index)} | mean | collapsed |",
                          "|---|---|" + "---|" * (len(stats) + 2)]  # fmt: skip
            lines.append(
                f"| {label} | {targets} | {' | '.join(cells)} | {stats['mean'].mean():.3f} | "
                f"{collapsed} of {len(stats)} |"
            )
        seeds = sorted(runs["seed"].unique())
        full = runs.loc[runs["method"] == "full", "test_metric"]
    header = (
        f"{task}: frozen base {frozen.mean():.3f} ± {frozen.std():.3f}, full fine-tuning "
        f"{full.mean():.3f} ± {full.std():.3f} (seeds {', '.join(map(str, seeds))}; ranks {ranks})"
    )
    return header + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/alpha")
    tasks = [task for task in ("digits", "topics") if _folders(root, task)]
    if not tasks:
        sys.exit(f"no sweep folders such as {root / 'digits-r'}/results.csv: run the sweeps first.")
    for task in tasks:
        print(table(root, task), end="\n\n")
    print("| task | alpha rule | targets | 90% | 95% |\n|---|---|---|---|---|")
    print("\n".join(row for task in tasks for row in ranks_for_gain(root, task)))
