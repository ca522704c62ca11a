"""Benchmark: AdamW fused vs the per-tensor loop, in fit and in fit_batched (digits).

``rankkit.train.optim.configure_optimizer`` fuses AdamW on CPU and CUDA for every run;
this measures that choice. Contenders alternate within each round (so that a loaded
machine slows them alike); printed are the median times per contender.

    .venv/bin/python benchmarks/bench_fused.py --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import rankkit.train.loop as loop
from rankkit.batched import fit_batched
from rankkit.lora import LoraConfig
from rankkit.methods import prepare_run
from rankkit.tasks import get_task
from rankkit.train.optim import param_groups


def optimizer_factory(fused: bool):
    """``configure_optimizer`` with the fused kernel forced on or off."""

    def configure(named, lr, weight_decay, device, *, lr_overrides=None, run_dims=0):
        groups = param_groups(named, lr, weight_decay, lr_overrides, run_dims)
        return torch.optim.AdamW(groups, lr=lr, fused=fused)

    return configure


def lora_config(r: int) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", modules_to_save=["head"])


def workloads(task, epochs: int):
    def single(method: str):
        config = lora_config(8) if method == "lora" else None
        run = prepare_run(task, method, 0, lora_config=config)
        run.fit(task, epochs=epochs, device="cpu", progress=False)

    def batched():
        configs = [lora_config(r) for r in (1, 2, 4, 8, 16, 32)]
        fit_batched(task, configs, [0] * 6, epochs=epochs, device="cpu")

    return {
        "fit, full fine-tuning": lambda: single("full"),
        "fit, LoRA r=8": lambda: single("lora"),
        "fit_batched, 6 LoRA runs": batched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = get_task("digits")
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.rounds):
        for name, work in workloads(task, args.epochs).items():
            for fused in (False, True):
                loop.configure_optimizer = optimizer_factory(fused)
                start = time.perf_counter()
                work()
                times.setdefault((name, fused), []).append(time.perf_counter() - start)
    print(f"digits, {args.epochs} epochs, {args.threads} thread(s), load {os.getloadavg()[0]:.1f}")
    for name in workloads(task, args.epochs):
        plain, fused = (statistics.median(times[name, f]) for f in (False, True))
        print(f"{name:26s} loop {plain:.3f}s  fused {fused:.3f}s  fused/loop {fused / plain:.2f}")


if __name__ == "__main__":
    main()
