"""Benchmark: a LoRA rank sweep trained batched vs one run at a time (rankkit and PEFT).

Workloads (``--workload``), each the LoRA part of a ``python -m rankkit sweep``:

* ``digits`` -- the default sweep: the digits MLP, ranks 1, 2, 4, 8, 16, 32 x seeds
  0, 1, 2, ``all-linear``, alpha = r, the task's default epochs (30) and learning rate;
* ``topics`` -- the small transformer (4 blocks, width 128), the same 6 ranks x 3 seeds
  on ``q,v``, alpha = r; by default **one** epoch per run (``--epochs``; the task's
  default is 10), so that the sequential contenders finish in minutes on 2 CPU cores.

Contenders, on exactly the same runs:

* ``batched``  -- :func:`rankkit.batched.fit_batched` on the groups the sweep forms
  (``rankkit.sweep.batch_groups``: sized from free memory, capped per device). On a
  CPU the sweep does not batch runs with large steps (``CPU_SMALL_STEP_BYTES``: the
  topics runs), so there ``--max-runs K`` forces groups of up to K;
* ``rankkit``  -- each run alone, the sweep's reference recipe
  (:func:`rankkit.methods.prepare_run`, then ``fit``), as ``--no-batch`` trains them;
* ``peft``     -- each run alone with PEFT: the same base model, ``peft.get_peft_model``
  with the same target modules, rank, alpha and ``modules_to_save``, trained by the
  same ``fit``.

Every contender's time covers building the models, training, per-epoch validation and
the final val/test evaluation (not writing adapter files). A *round* is one batched
group: the three contenders train that group's runs back to back, in an order rotated
from round to round, so that CPU contention hits them alike; ``--repeats`` goes over
the whole sweep several times. Printed: per-round times and ratios, the median of the
per-round ratios, the ratio of total times, and the achieved FLOP rate (training
FLOPs counted with ``torch.utils.flop_counter`` on one step per rank).

Run::

    python benchmarks/bench_batched.py --workload digits --threads 1
    python benchmarks/bench_batched.py --workload topics --threads 1 --max-runs 6
    python benchmarks/bench_batched.py --workload topics --device cuda --epochs 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import rankkit.batched as batched
from rankkit.lora import apply_lora
from rankkit.methods import method_lr, prepare_run
from rankkit.sweep import SweepConfig, batch_groups, lora_config_for, plan_runs, run_one
from rankkit.tasks import get_task
from rankkit.train import fit, resolve_device, set_seed

WORKLOADS = {
    "digits": {"task": "digits", "targets": "all-linear", "epochs": None},
    "topics": {"task": "topics", "targets": "q,v", "epochs": 1},
}
CONTENDERS = ("batched", "rankkit", "peft")
#: Dense bf16 tensor-core peak in TFLOP/s, for --device cuda (override with --peak-tflops).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


# --------------------------------------------------------------------------- contenders


def train_batched(task, specs, config):
    runs = batched.fit_batched(
        task, [lora_config_for(s, config, task) for s in specs], [s.seed for s in specs],
        epochs=config.epochs, lr=method_lr(task, "lora", config.lr), device=config.device,
    )  # fmt: skip
    return [r.result.metrics for r in runs]


def train_rankkit(task, specs, config):
    out = []
    for spec in specs:
        lora = lora_config_for(spec, config, task)
        run = prepare_run(task, "lora", spec.seed, lr=config.lr, lora_config=lora)
        result = run.fit(task, epochs=config.epochs, device=config.device, progress=False)
        out.append(result.metrics)
    return out


def train_peft(task, specs, config):
    import peft

    out = []
    for spec in specs:
        lora = lora_config_for(spec, config, task)
        probe = apply_lora(task.build_model(pretrained=False), lora, roles=task.roles)
        names = list(probe.rankkit_lora_config.target_modules)  # the exact modules rankkit adapts
        set_seed(spec.seed)
        model = task.build_model(pretrained=True, seed=spec.seed)
        model = peft.get_peft_model(
            model,
            peft.LoraConfig(
                r=lora.r, lora_alpha=lora.lora_alpha, target_modules=names,
                use_rslora=lora.use_rslora, modules_to_save=list(task.head_modules),
            ),
        )  # fmt: skip
        result = fit(model, task, epochs=config.epochs, lr=method_lr(task, "lora", config.lr),
                     device=config.device, seed=spec.seed, progress=False)  # fmt: skip
        out.append(result.metrics)
    return out


TRAIN = {"batched": train_batched, "rankkit": train_rankkit, "peft": train_peft}


# --------------------------------------------------------------------------- FLOPs


def training_flops(task, specs, config) -> float:
    """FLOPs of all training steps of ``specs`` (forward + backward, no evaluation)."""
    from torch.utils.flop_counter import FlopCounterMode

    train = task.splits()["train"]
    hp = dict(task.default_hparams)
    batch_size, epochs = hp.get("batch_size", 32), config.epochs or hp.get("epochs", 10)
    inputs, labels = (t[:batch_size] for t in train.tensors)
    per_sample = {}
    for rank in sorted({s.rank for s in specs}):
        spec = next(s for s in specs if s.rank == rank)
        model = apply_lora(task.build_model(pretrained=True), lora_config_for(spec, config, task),
                           roles=task.roles)  # fmt: skip
        counter = FlopCounterMode(display=False)
        with counter:
            task.loss(model, (inputs, labels)).backward()
        per_sample[rank] = counter.get_total_flops() / batch_size
    return sum(per_sample[s.rank] for s in specs) * len(train) * epochs


# --------------------------------------------------------------------------- main


def machine(args, device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(
                line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch.set_num_threads({args.threads}){gpu}; "
        f"torch {torch.__version__}, Python {platform.python_version()}; load average {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="digits")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: see above)")
    parser.add_argument("--ranks", default="1,2,4,8,16,32")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=1, help="passes over the whole sweep")
    parser.add_argument("--max-runs", type=int, help="runs per batch, even where the sweep "
                        "would not batch (default: as the sweep decides)")  # fmt: skip
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--peak-tflops", type=float, help="device peak for the utilisation line")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    work = WORKLOADS[args.workload]
    epochs = args.epochs if args.epochs is not None else work["epochs"]
    config = SweepConfig(
        task=work["task"], ranks=args.ranks, seeds=args.seeds, targets=[work["targets"]],
        epochs=epochs, baselines=False, device=str(device),
    ).validated()  # fmt: skip
    task = get_task(config.task)
    if args.max_runs:  # force this batch size, also where the sweep would not batch (CPU)
        batched.DEFAULT_MAX_RUNS[device.type] = args.max_runs
        batched.CPU_SMALL_STEP_BYTES = float("inf")
    groups = batch_groups(plan_runs(config), config, run_one, log=lambda _: None)
    contenders = [c for c in args.contenders.split(",") if c]
    epochs_shown = epochs or task.default_hparams.get("epochs")
    print(f"workload {args.workload}: task {task.name}, targets {work['targets']}, ranks "
          f"{config.ranks} x seeds {config.seeds} = {sum(map(len, groups))} runs, {epochs_shown} "
          f"epoch(s) each, lr {method_lr(task, 'lora', config.lr)}, device {device}")  # fmt: skip
    print(
        f"batches: {[len(g) for g in groups]} runs (ranks {[[s.rank for s in g] for g in groups]})"
    )
    print(f"machine: {machine(args, device)}")

    for c in contenders:  # warm-up: imports, first-call allocations, base-weight reads
        TRAIN[c](task, groups[0][:1], SweepConfig(**{**config.__dict__, "epochs": 1}))

    times = {c: [] for c in contenders}
    metrics: dict[str, list] = {c: [] for c in contenders}
    rounds = [g for _ in range(args.repeats) for g in groups]
    for i, group in enumerate(rounds):
        order = contenders[i % len(contenders) :] + contenders[: i % len(contenders)]
        line = []
        for c in order:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            metrics[c].extend(TRAIN[c](task, group, config))
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[c].append(time.perf_counter() - start)
            line.append(f"{c} {times[c][-1]:.2f}s")
        ratios = [f"{c}/batched {times[c][-1] / times['batched'][-1]:.2f}"
                  for c in contenders if c != "batched" and "batched" in times]  # fmt: skip
        print(f"round {i + 1}/{len(rounds)} ({len(group)} runs): {', '.join(line)} | {', '.join(ratios)}",
              flush=True)  # fmt: skip

    total = {c: sum(t) for c, t in times.items()}
    print()
    print("total time per contender (whole sweep x repeats):")
    for c in contenders:
        print(f"  {c:8s} {total[c]:8.2f} s   ({total[c] / len(metrics[c]):.3f} s per run)")
    if "batched" in times:
        for c in contenders:
            if c == "batched":
                continue
            per_round = statistics.median(a / b for a, b in zip(times[c], times["batched"]))
            print(f"  speed-up batched vs {c}: {total[c] / total['batched']:.2f}x total, "
                  f"{per_round:.2f}x median of per-round ratios")  # fmt: skip
    if "batched" in metrics and "rankkit" in metrics:
        same = sum(a == b for a, b in zip(metrics["batched"], metrics["rankkit"]))
        print(
            f"  identical val/test metrics, batched vs rankkit: {same} of {len(metrics['batched'])} runs"
        )

    flops = training_flops(task, [s for g in groups for s in g], config) * args.repeats
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    print(f"training FLOPs (forward + backward, counted): {flops / 1e12:.3f} TFLOP")
    for c in contenders:
        rate = flops / total[c] / 1e12
        share = f" = {100 * rate / peak:.2f}% of the {peak:g} TFLOP/s peak" if peak else ""
        print(
            f"  {c:8s} achieved {rate * 1e3:8.2f} GFLOP/s{share} (whole-run time incl. evaluation)"
        )


if __name__ == "__main__":
    main()
