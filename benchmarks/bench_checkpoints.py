"""Benchmark: streaming checkpoint analysis -- memory, low-rank spectra, and scale.

Three measurements, each against a reference measured in the same run:

* memory -- peak RSS of ``rank_report`` on a pair of 48-layer checkpoints of 1024 x 1024
  float32 matrices minus that of a 1-layer pair (each in a fresh process), as a
  fraction of one checkpoint's size. Reference: the same analysis after loading both
  checkpoints whole (``load_state_dict``), as rank_report did before it streamed.
  Target: the streaming growth is at most 40% of one checkpoint.
* lowrank -- singular values of a 4096 x 4096 update s·B·A at r = 16 from its factors
  (``lowrank_singular_values``: QR of B and Aᵀ, SVD of an r x r product) against
  ``torch.linalg.svdvals`` of the formed float32 matrix. Target: at least 50x faster,
  same values.
* scale -- a 7B-shaped slice: ``--matrices`` of ``--blocks`` transformer blocks of a
  4096-wide model (q, k, v, o 4096 x 4096; gate, up 11008 x 4096; down 4096 x 11008) in
  bf16 safetensors, each analysed by ``rank_report`` (ΔW and W spectra): seconds per
  layer and the extrapolation to the 32 blocks of a 7B model.

Run: ``python benchmarks/bench_checkpoints.py [--only memory,lowrank,scale] [--blocks 1]``
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import rankkit
from rankkit.checkpoints import save_state_dict
from rankkit.spectra import lowrank_singular_values

MiB = 2**20


def write_pair(folder: Path, layers: int, d: int = 1024, dtype=torch.float32) -> tuple[Path, Path]:
    gen = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.weight": torch.randn(d, d, generator=gen).to(dtype) for i in range(layers)}
    tuned = {
        k: (v.float() + torch.randn(d, 4, generator=gen) @ torch.randn(4, d, generator=gen) / d).to(
            dtype
        )
        for k, v in base.items()
    }
    return save_state_dict(base, folder / "base.safetensors"), save_state_dict(
        tuned, folder / "tuned.safetensors"
    )


CHILD = """
import sys, rankkit

def status(field):  # kB; VmHWM is this process's peak RSS (ru_maxrss survives exec)
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(field)))

base, tuned, mode = sys.argv[1:4]
before = status("VmRSS")
if mode == "whole":
    base, tuned = rankkit.load_state_dict(base), rankkit.load_state_dict(tuned)
rankkit.rank_report(base, tuned)
print(status("VmHWM") - before)
"""


def peak_rss_mib(base: Path, tuned: Path, mode: str) -> float:
    """Peak RSS of an analysis above the RSS after ``import rankkit``, in a fresh process."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(base), str(tuned), mode],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    return int(out[-1]) / 1024


def bench_memory() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "one").mkdir()
        (tmp / "many").mkdir()
        one = write_pair(tmp / "one", 1)
        many = write_pair(tmp / "many", 48)
        size = many[0].stat().st_size / MiB
        print(f"memory: 48 x 1024x1024 float32 per checkpoint = {size:.0f} MiB each")
        for mode in ("stream", "whole"):
            small = peak_rss_mib(*one, mode)
            big = peak_rss_mib(*many, mode)
            growth = big - small
            print(
                f"  {mode:6s}: peak RSS above imports: 1-layer {small:5.0f} MiB, "
                f"48-layer {big:5.0f} MiB, "
                f"growth {growth:6.0f} MiB = {growth / size:5.0%} of one checkpoint"
            )


def bench_lowrank(repeats: int = 3) -> None:
    gen = torch.Generator().manual_seed(0)
    m = n = 4096
    r = 16
    B, A = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen) / n
    t_factor, t_formed = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours = lowrank_singular_values(B, A, 2.0)
        t_factor.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        formed = torch.linalg.svdvals(2.0 * B @ A).double().numpy()
        t_formed.append(time.perf_counter() - t0)
    f, g = statistics.median(t_factor), statistics.median(t_formed)
    rel = float(abs(ours[:r] - formed[:r]).max() / formed[0])
    print(
        f"lowrank: {m}x{n} s·B·A at r={r}: factors {f * 1e3:.2f} ms, formed svdvals {g:.2f} s "
        f"-> {g / f:.0f}x faster; top-{r} max relative difference {rel:.1e} "
        f"(float32 formed vs float64 factors); values past r: formed max {formed[r:].max():.1e}, "
        f"factors exactly 0"
    )


SHAPES_7B = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
             "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}  # fmt: skip


def bench_scale(blocks: int, matrices: list[str]) -> None:
    """rank_report on a 7B-shaped slice; seconds per layer, extrapolated to 32 blocks."""
    shapes = {name: SHAPES_7B[name] for name in matrices}
    gen = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for b in range(blocks):
        for name, shape in shapes.items():
            key = f"model.layers.{b}.{name}.weight"
            W = torch.randn(shape, generator=gen) * 0.02
            base[key] = W.to(torch.bfloat16)
            update = torch.randn(shape[0], 8, generator=gen) @ torch.randn(
                8, shape[1], generator=gen
            )
            tuned[key] = (W + 1e-4 * update).to(torch.bfloat16)
            del W, update
    with tempfile.TemporaryDirectory() as tmp:
        b_path = save_state_dict(base, Path(tmp) / "base.safetensors")
        t_path = save_state_dict(tuned, Path(tmp) / "tuned.safetensors")
        del base, tuned
        seconds: dict[str, list[float]] = {}
        for b in range(blocks):
            for name in shapes:
                # One layer per report, so each is timed alone; the Gaussian baseline of a
                # shape is computed in the first report of that shape and cached after.
                t0 = time.perf_counter()
                rankkit.rank_report(b_path, t_path, layers=rf"^model\.layers\.{b}\.{name}\.")
                seconds.setdefault(name, []).append(time.perf_counter() - t0)
        for name, times in seconds.items():
            print(
                f"scale: {name} {SHAPES_7B[name]} bf16: first {times[0]:.1f} s (with the "
                f"random baseline), then {statistics.median(times[1:] or times):.1f} s per layer"
            )
        steady = {n: statistics.median(t[1:] or t) for n, t in seconds.items()}
        if set(steady) == set(SHAPES_7B):
            per_block = sum(steady.values())
        else:  # q stands for the 4096 x 4096 matrices, gate for the MLP ones
            per_block = 4 * steady.get("q", 0) + 3 * steady.get("gate", 0)
        print(
            f"scale: one block (q, k, v, o, gate, up, down) about {per_block:.0f} s; 32 blocks "
            f"(a 7B model, ΔW and W spectra of every matrix) about {32 * per_block / 60:.0f} min"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="memory,lowrank,scale")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--matrices", default="q,gate", help="of q,k,v,o,gate,up,down")
    args = parser.parse_args()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, Python "
        f"{platform.python_version()}, load average {os.getloadavg()[0]:.1f}"
    )
    parts = args.only.split(",")
    if "memory" in parts:
        bench_memory()
    if "lowrank" in parts:
        bench_lowrank()
    if "scale" in parts:
        bench_scale(args.blocks, args.matrices.split(","))
    print(
        f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
