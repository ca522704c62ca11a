"""Benchmark: rank_report over a whole model vs the bare SVD floor and WeightWatcher.

The model is transformer-shaped: ``--blocks`` blocks of q, k, v, o (d x d) and an MLP
(d x 3d, 3d x d), d = 512 by default, so 6 blocks give 36 matrices 512..1536 wide.
The fine-tuned copy adds a rank-8 update plus small noise to every matrix.

Three timings, each the median of ``--repeats`` runs, in one process:

* floor   -- ``torch.linalg.svdvals`` of every matrix rank_report decomposes (ΔW and W of
  each layer), batched per shape, in the same dtype rank_report uses: the least work any
  exact spectral report can do. A second floor transposes wide matrices first, as
  rank_report does (same singular values; LAPACK is ~2x faster on tall matrices);
* rankkit -- ``rankkit.rank_report(base, tuned)`` (ΔW, all measures for ΔW and W, random
  baseline per shape, DataFrame);
* weightwatcher -- ``WeightWatcher(model=tuned, base_model=base).analyze()``, its default
  analysis of the same deltas (needs ``pip install weightwatcher``; skipped otherwise).

Run: ``python benchmarks/bench_spectra.py [--blocks 6] [--width 512] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings

import torch
from torch import nn

import rankkit
from rankkit.spectra import svd_dtype


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 3 * d), nn.Linear(3 * d, d)


def make_pair(blocks: int, d: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    base = nn.Sequential(*(Block(d) for _ in range(blocks)))
    tuned = nn.Sequential(*(Block(d) for _ in range(blocks)))
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in tuned.parameters():
            if p.ndim == 2:
                update = torch.randn(p.shape[0], 8) @ torch.randn(8, p.shape[1]) / p.shape[1]
                p += update + 1e-3 * torch.randn_like(p)
    return base, tuned


def floor(base: nn.Module, tuned: nn.Module, tall: bool = False) -> None:
    sd_b, sd_t = base.state_dict(), tuned.state_dict()
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for k, w in sd_t.items():
        if w.ndim == 2:
            by_shape.setdefault(tuple(w.shape), []).extend([w - sd_b[k], w])
    for shape, mats in by_shape.items():
        stack = torch.stack(mats).to(svd_dtype(shape))
        torch.linalg.svdvals(stack.mT if tall and shape[0] < shape[1] else stack)


def interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Time each function once per round, rounds repeated: A B C A B C ...

    Interleaving keeps a comparison fair on a noisy, shared machine: a slow spell hits
    every contender in the same round, and per-round ratios cancel it.
    """
    for fn in fns.values():
        fn()  # warm-up (allocations, lazy imports, MP-median cache)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base, tuned = make_pair(args.blocks, args.width)
    n_mats = sum(1 for p in base.parameters() if p.ndim == 2)
    print(
        f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}, CUDA {'yes' if torch.cuda.is_available() else 'no'}"
    )
    print(
        f"model: {args.blocks} blocks x 6 matrices = {n_mats} matrices, width {args.width}..{3 * args.width}"
    )

    fns = {
        "floor": lambda: floor(base, tuned),
        "floor_tall": lambda: floor(base, tuned, tall=True),
        "rankkit": lambda: rankkit.rank_report(base, tuned),
    }
    try:
        import weightwatcher as ww

        logging.getLogger("weightwatcher").setLevel(logging.ERROR)

        def run_ww():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ww.WeightWatcher(model=tuned, base_model=base).analyze()

        fns["weightwatcher"] = run_ww
    except ImportError:
        print("weightwatcher not installed: pip install weightwatcher (its row is skipped)")

    times = interleaved(fns, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'':38s}{'median s':>10s}{'ratio to floor':>16s}")
    labels = {
        "floor": "floor: bare svdvals of ΔW and W",
        "floor_tall": "floor, wide matrices transposed",
        "rankkit": "rankkit.rank_report",
        "weightwatcher": "WeightWatcher analyze(base_model=)",
    }
    for name in times:
        ratio = median_ratio(times[name], times["floor"])
        print(f"{labels[name]:38s}{med[name]:10.3f}{ratio:15.2f}x")
    if "weightwatcher" in times:
        print(
            "rankkit / WeightWatcher (median of per-round ratios): "
            f"{median_ratio(times['rankkit'], times['weightwatcher']):.2f}"
        )


if __name__ == "__main__":
    main()
