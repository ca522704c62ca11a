"""Benchmark: rank_report over a whole model vs the bare SVD floor and WeightWatcher.

The model is transformer-shaped: ``--blocks`` blocks of q, k, v, o (d x d) and an MLP
(d x 3d, 3d x d), d = 512 by default, so 6 blocks give 36 matrices 512..1536 wide.
The fine-tuned copy adds a rank-8 update plus small noise to every matrix.

Three timings, each the median of ``--repeats`` runs, in one process:

* floor   -- ``torch.linalg.svdvals`` of every matrix rank_report decomposes (ΔW and W of
  each layer), batched per shape, in the same dtype rank_report uses: the least work any
  exact spectral report can do;
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
from rankkit.spectra import _compute_dtype


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


def floor(base: nn.Module, tuned: nn.Module) -> None:
    sd_b, sd_t = base.state_dict(), tuned.state_dict()
    by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
    for k, w in sd_t.items():
        if w.ndim == 2:
            by_shape.setdefault(tuple(w.shape), []).extend([w - sd_b[k], w])
    for shape, mats in by_shape.items():
        torch.linalg.svdvals(torch.stack(mats).to(_compute_dtype(shape)))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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

    t_floor = timed(lambda: floor(base, tuned), args.repeats)
    t_rankkit = timed(lambda: rankkit.rank_report(base, tuned), args.repeats)
    print(f"floor (bare svdvals of ΔW and W)   {t_floor:8.3f} s")
    print(
        f"rankkit.rank_report                {t_rankkit:8.3f} s   ratio to floor {t_rankkit / t_floor:.2f}x"
    )

    try:
        import weightwatcher as ww
    except ImportError:
        print("weightwatcher not installed: pip install weightwatcher (skipped)")
        return
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)

    def run_ww():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ww.WeightWatcher(model=tuned, base_model=base).analyze()

    t_ww = timed(run_ww, max(1, args.repeats // 2))
    print(
        f"weightwatcher analyze(base_model=)  {t_ww:8.3f} s   ratio to floor {t_ww / t_floor:.2f}x; "
        f"rankkit / weightwatcher = {t_rankkit / t_ww:.3f}"
    )


if __name__ == "__main__":
    main()
