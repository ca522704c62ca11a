"""The table of docs/sweeps.md's "Chosen ranks" section, from one sweep folder.

The sweep (``docs/sweeps.md``, "Chosen ranks: spectral allocation and AdaLoRA")::

    python -m rankkit sweep --allocation spectral --adalora --alpha r --threads 1 --out runs/digits-allocation
    python docs/experiments/allocation_table.py runs/digits-allocation

One row per rank r: uniform LoRA (its adapter parameters and test metric), the spectral
allocation at the same budget (its per-layer ranks) and AdaLoRA (its commonest final
ranks, in how many seeds, and its mean parameter count), each as mean ± sd over seeds,
and each allocation's difference from uniform as mean ± s.e.
(``rankkit.sweep.compare_allocations``; bold: Welch's test rejects a zero difference at
5%).
"""

import sys
from pathlib import Path

import pandas as pd

from rankkit.sweep import compare_allocations, load_results


def _cell(values: pd.Series) -> str:
    return f"{values.mean():.3f} ± {values.std():.3f}"


def _difference(row: pd.Series) -> str:
    text = f"{row['difference']:+.3f} ± {row['se']:.3f}".replace("-", "−")
    if row["verdict"] == "same ranks as uniform":
        return f"{text} (same ranks)"
    return (
        f"**{text}**" if row["verdict"] in ("better than uniform", "worse than uniform") else text
    )


def table(results: pd.DataFrame, targets: str = "all-linear") -> str:
    ok = results[(results["status"] == "ok") & (results["targets"] == targets)]
    compared = compare_allocations(results).set_index(["rank", "allocation"])
    lines = [
        "| r | uniform: params | uniform | spectral ranks (params) | spectral | spectral − uniform "
        "| AdaLoRA ranks, params | AdaLoRA | AdaLoRA − uniform |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rank, part in ok[ok["method"] != "frozen"].groupby("rank"):
        uniform = part[part["method"] == "lora"]
        spectral = part[part["method"] == "lora-spectral"]
        adalora = part[part["method"] == "adalora"]
        cells = [
            str(int(rank)),
            f"{int(uniform['adapter_params'].iloc[0]):,}",
            _cell(uniform["test_metric"]),
        ]
        if len(spectral):
            pattern = spectral["rank_pattern"].iloc[0]
            cells += [f"{pattern} ({int(spectral['adapter_params'].iloc[0]):,})",
                      _cell(spectral["test_metric"]), _difference(compared.loc[(rank, "spectral")])]  # fmt: skip
        else:
            cells += ["", "", ""]
        if len(adalora):
            counts = adalora["rank_pattern"].value_counts()
            cells += [f"{counts.index[0]} ({counts.iloc[0]}/{len(adalora)}), "
                      f"{adalora['adapter_params'].mean():,.0f}",
                      _cell(adalora["test_metric"]), _difference(compared.loc[(rank, "adalora")])]  # fmt: skip
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    base = results[(results["status"] == "ok")]
    frozen = base.loc[base["method"] == "frozen", "test_metric"]
    full = base.loc[base["method"] == "full", "test_metric"]
    seeds = sorted(base["seed"].unique())
    header = (
        f"seeds {seeds[0]}-{seeds[-1]}: frozen base {_cell(frozen)}, full fine-tuning {_cell(full)}"
    )
    return header + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/experiments/allocation_table.py SWEEP_FOLDER")
    print(table(load_results(Path(sys.argv[1]))))
