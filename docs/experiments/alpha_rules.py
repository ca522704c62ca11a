"""Compare the sweep's alpha rules: one markdown table per task from three sweep folders.

The sweeps (``docs/sweeps.md``, "Choosing the default alpha rule")::

    for rule in "r" "8" "sqrt(r)"; do
      python -m rankkit sweep --task digits --ranks 1,2,4,8,16,32,64 --alpha "$rule" --jobs 2 --out "runs/alpha/digits-$rule"
      python -m rankkit sweep --task topics --targets q,v all-linear --ranks 1,2,4,8,16,32,64 --alpha "$rule" --jobs 2 --out "runs/alpha/topics-$rule"
    done
    python docs/experiments/alpha_rules.py runs/alpha

A cell is the test accuracy, mean over seeds; it is marked **collapsed** (⚠) when it
is below the frozen base by a resolved margin: Welch's test over seeds
(``rankkit.stats.compare_seeds``) at the 5% level.
"""

import sys
from pathlib import Path

import pandas as pd

from rankkit.stats import compare_seeds

RULES = {"r": "alpha = r (scale 1)", "8": "alpha = 8 (scale 8/r)", "sqrt(r)": "alpha = sqrt(r) (scale 1/sqrt(r))"}  # fmt: skip


def table(root: Path, task: str) -> str:
    lines = []
    for rule, label in RULES.items():
        folder = root / f"{task}-{rule}"
        if not (folder / "results.csv").exists():
            continue
        runs = pd.read_csv(folder / "results.csv")
        runs = runs[runs["status"] == "ok"]
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
    for task in ("digits", "topics"):
        print(table(root, task), end="\n\n")
