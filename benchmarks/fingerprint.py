"""Fingerprint training results: exact metrics and hashes of the trained weights.

Proves that a refactor changed nothing (issue 14): run the same commands on two
source trees (same machine, same thread count) and compare the two fingerprints.
Every metric is written with ``repr`` (17 significant digits), every weight file as a
SHA-256 of its tensors' bytes; wall times and paths are left out.

    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=<source tree>
    python -m rankkit sweep --out OUT/sweep --quiet                  # default: 24 runs
    python -m rankkit finetune --out OUT/finetune --quiet
    python -m rankkit intrinsic-dim --task toy --out OUT/intrinsic --quiet
    python -m rankkit sweep --task topics --ranks 4 --seeds 0 --targets q,v --epochs 2 \\
        --no-baselines --out OUT/topics --quiet
    python -m rankkit intrinsic-dim --task digits --dims 5 50 --seeds 0 --epochs 3 \\
        --train-head --out OUT/intrinsic_digits --quiet
    python -m rankkit finetune --frozen-base --epochs 5 --out OUT/finetune_frozen --quiet
    python benchmarks/fingerprint.py OUT > OUT/fingerprint.json
    python benchmarks/fingerprint.py --compare A/fingerprint.json B/fingerprint.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file


def tensors_sha(path: Path) -> str:
    """SHA-256 (first 16 hex digits) of a safetensors file's tensors, by name."""
    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(name.encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sweep(d: Path) -> dict:
    frame = pd.read_csv(d / "results.csv").sort_values("run_id")
    out = {}
    for _, r in frame.iterrows():
        adapter = d / "adapters" / r["run_id"] / "adapter_model.safetensors"
        out[r["run_id"]] = {
            "status": r["status"],
            "val": repr(float(r["val_metric"])),
            "test": repr(float(r["test_metric"])),
            "trainable": int(r["trainable_params"]),
            "adapter": tensors_sha(adapter) if adapter.exists() else None,
        }
    return out


def finetune(d: Path) -> dict:
    m = json.loads((d / "metrics.json").read_text())
    history = [{k: repr(v) for k, v in row.items() if k != "elapsed_s"} for row in m["history"]]
    return {
        "metrics": {k: repr(v) for k, v in m["metrics"].items()},
        "best_epoch": m["best_epoch"],
        "history": history,
        "weights": tensors_sha(d / "finetuned.safetensors"),
    }


def intrinsic(d: Path) -> dict:
    curve = pd.read_csv(d / "intrinsic_dimension.csv")
    info = json.loads((d / "intrinsic_dimension.json").read_text())
    columns = [c for c in curve.columns if c != "seconds"]
    return {
        "curve": [[repr(v) for v in row] for row in curve[columns].itertuples(index=False)],
        "summary": {k: v for k, v in info.items() if "time" not in k and k != "seconds"},
    }


READERS = {
    "sweep": sweep,
    "finetune": finetune,
    "intrinsic": intrinsic,
    "topics": sweep,
    "intrinsic_digits": intrinsic,
    "finetune_frozen": finetune,
}


def compare(a: dict, b: dict) -> bool:
    same = True
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, {}), b.get(key, {})
        differ = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
        same &= not differ
        print(f"{key:18s} {'identical' if not differ else 'DIFFERS in ' + ', '.join(differ)}")
    print("ALL IDENTICAL" if same else "SOME DIFFER")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="an output folder, or two fingerprints")
    parser.add_argument("--compare", action="store_true", help="compare two fingerprint files")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.paths)
        raise SystemExit(0 if compare(a, b) else 1)
    root = Path(args.paths[0])
    found = {k: read(root / k) for k, read in READERS.items() if (root / k).exists()}
    print(json.dumps(found, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
