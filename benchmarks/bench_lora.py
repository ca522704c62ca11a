"""Benchmark: rankkit LoRA against PEFT LoRA and full fine-tuning, and merged inference.

On rankkit's ``topics`` task (a small pretrained transformer) with the same data,
the same LoRA config (r=8, alpha=16 on q and v -- the paper's GPT-3 setting -- with
the classifier head in ``modules_to_save``) and the same AdamW optimiser:

* training-step time (forward + backward + optimiser step) of full fine-tuning,
  rankkit LoRA and PEFT LoRA, measured in rounds that alternate the three methods so
  that CPU contention hits them alike; the median per-step time of each is reported
  with the ratio rankkit / PEFT (target <= 1.0);
* peak tensor memory of a training step: parameters and AdamW moments, plus the
  transient peak (activations, gradients) recorded by the PyTorch profiler's CPU
  memory tracking;
* inference latency (no grad, eval mode) of the base model, the rankkit LoRA model
  unmerged, and the rankkit model after ``merge_and_unload``; ratio merged / base
  (target 1.00 +- noise);
* the adapter file next to a full checkpoint of the merged model.

Run: ``python benchmarks/bench_lora.py [--threads 1] [--rounds 15] [--steps 5]``
(``--local-model`` benchmarks a locally built transformer of the same shape when
``rankkit.tasks`` is unavailable).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import statistics
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import torch
from torch import nn

from rankkit.checkpoints import CheckpointError, save_state_dict
from rankkit.lora import LoraConfig, apply_lora, count_parameters, merge_and_unload, save_adapter

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q", "v"]}
METHODS = ("full", "rankkit", "peft")


# --------------------------------------------------------------------------- workload


class _LocalTask:
    """Stand-in with the topics task's module names, used only with --local-model."""

    head_modules = ("head",)

    def __init__(self, d=128, blocks=4, vocab=2000, seq=64, classes=4, n=512):
        self.shape = (d, blocks, vocab, seq, classes)
        g = torch.Generator().manual_seed(0)
        self.data = list(
            zip(
                torch.randint(0, vocab, (n, seq), generator=g),
                torch.randint(0, classes, (n,), generator=g),
            )
        )

    def build_model(self, pretrained=True):
        torch.manual_seed(0)
        d, blocks, vocab, _, classes = self.shape
        return _LocalTransformer(d, blocks, vocab, classes)

    def splits(self):
        return {"train": self.data, "val": self.data, "test": self.data}

    def loss(self, model, batch):
        tokens, labels = batch
        return nn.functional.cross_entropy(model(tokens), labels)


class _Attn(nn.Module):
    def __init__(self, d, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = (
            m(x).view(B, T, self.heads, -1).transpose(1, 2) for m in (self.q, self.k, self.v)
        )
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = (
            nn.LayerNorm(d),
            _Attn(d),
            nn.LayerNorm(d),
            _MLP(d),
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _LocalTransformer(nn.Module):
    def __init__(self, d, blocks, vocab, classes):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(1))


def get_workload(local: bool):
    if local:
        return _LocalTask(), "local transformer (same module names as topics)"
    from rankkit.tasks import get_task

    return get_task("topics"), "rankkit.tasks 'topics'"


def batches(task, batch_size, n=8):
    loader = torch.utils.data.DataLoader(
        task.splits()["train"], batch_size=batch_size, shuffle=False
    )
    return list(islice(loader, n))


def build(method: str, task, pretrained=True):
    """A fresh model for ``method`` with its optimiser (AdamW over trainable parameters)."""
    model = task.build_model(pretrained=pretrained)
    saved = list(task.head_modules)
    if method == "rankkit":
        model = apply_lora(model, LoraConfig(**LORA, modules_to_save=saved))
    elif method == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA, modules_to_save=saved))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-3)


def train_step(model, opt, task, batch):
    opt.zero_grad(set_to_none=True)
    task.loss(model, batch).backward()
    opt.step()


# --------------------------------------------------------------------------- measurements


def time_training(task, data, rounds, steps, warmup, pretrained):
    setups = {m: build(m, task, pretrained) for m in METHODS}
    stream = {m: cycle(data) for m in METHODS}
    for m, (model, opt) in setups.items():
        for _ in range(warmup):
            train_step(model, opt, task, next(stream[m]))
    per_step = {m: [] for m in METHODS}
    for r in range(rounds):
        # rotate the order each round so no method always runs right after another
        order = METHODS[r % 3 :] + METHODS[: r % 3]
        for m in order:
            model, opt = setups[m]
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(model, opt, task, next(stream[m]))
            per_step[m].append((time.perf_counter() - t0) / steps)
    return per_step, setups


@torch.no_grad()
def time_inference(models, task, batch, rounds, reps):
    for model in models.values():
        model.eval()
        for _ in range(3):
            task.loss(model, batch)
    times = {name: [] for name in models}
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(reps):
                task.loss(models[name], batch)
            times[name].append((time.perf_counter() - t0) / reps)
    return times


def step_peak_bytes(model, opt, task, batch):
    """Peak tensor memory of one training step: persistent state + transient peak.

    Persistent: every parameter plus the AdamW moments (present after warm-up steps).
    Transient: activations, gradients (``zero_grad(set_to_none=True)`` frees them
    between steps) and temporaries, as the maximum of the CPU allocator's running
    total recorded by the PyTorch profiler -- the CPU analogue of
    ``torch.cuda.max_memory_allocated``.
    """
    persistent = sum(p.numel() * p.element_size() for p in model.parameters())
    for state in opt.state.values():
        persistent += sum(
            t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t)
        )
    with tempfile.TemporaryDirectory() as tmp, _quiet_stderr():
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            train_step(model, opt, task, batch)
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return persistent, max(totals, default=0)


@contextlib.contextmanager
def _quiet_stderr():
    # the profiler's C++ side prints start/stop lines straight to fd 2
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


# --------------------------------------------------------------------------- report


def med(xs):
    return statistics.median(xs)


def spread(xs):
    q = statistics.quantiles(xs, n=4)
    return f"IQR {1e3 * q[0]:.2f}-{1e3 * q[2]:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-model", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import peft

    task, label = get_workload(args.local_model)
    data = batches(task, args.batch_size)
    load0 = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch.set_num_threads({args.threads}), torch {torch.__version__}, peft {peft.__version__}, "
        f"python {platform.python_version()}; load average at start {load0[0]:.2f}"
    )
    pretrained = True
    try:
        base = task.build_model(pretrained=True)
    except CheckpointError as err:
        # step time and memory do not depend on the weights' values, only on shapes
        print(f"note: no pretrained weights ({err}); timing randomly initialised weights")
        pretrained = False
        base = task.build_model(pretrained=False)
    print(
        f"workload: {label}, {count_parameters(base).total:,} parameters, batch {args.batch_size}; "
        f"LoRA {LORA} + modules_to_save={list(task.head_modules)}"
    )

    per_step, setups = time_training(task, data, args.rounds, args.steps, args.warmup, pretrained)
    print(
        f"\ntraining step (median of {args.rounds} rounds x {args.steps} steps, methods interleaved)"
    )
    for m in METHODS:
        model = setups[m][0]
        c = count_parameters(model)
        print(
            f"  {m:8s} {1e3 * med(per_step[m]):8.2f} ms/step  ({spread(per_step[m])})  "
            f"trainable {c.trainable:>9,} ({100 * c.fraction:.2f}%)"
        )
    ratio = med(per_step["rankkit"]) / med(per_step["peft"])
    paired = med([a / b for a, b in zip(per_step["rankkit"], per_step["peft"])])
    print(
        f"  ratio rankkit / peft = {ratio:.3f}   (target <= 1.0; median of per-round ratios "
        f"{paired:.3f})"
    )
    print(f"  ratio rankkit / full = {med(per_step['rankkit']) / med(per_step['full']):.3f}")
    print(f"  ratio peft    / full = {med(per_step['peft']) / med(per_step['full']):.3f}")

    print("\npeak tensor memory of a training step (params + AdamW state, + transient peak)")
    for m in METHODS:
        model, opt = setups[m]
        persistent, transient = step_peak_bytes(model, opt, task, data[0])
        print(
            f"  {m:8s} {(persistent + transient) / 2**20:7.2f} MiB  = {persistent / 2**20:6.2f} "
            f"persistent + {transient / 2**20:6.2f} transient (activations, grads)"
        )

    lora_model = setups["rankkit"][0]
    merged = merge_and_unload(copy.deepcopy(lora_model))
    models = {"base": base, "rankkit unmerged": lora_model, "rankkit merged": merged}
    inf_rounds = 2 * args.rounds
    times = time_inference(models, task, data[0], inf_rounds, reps=10)
    print(
        f"\ninference, no grad, batch {args.batch_size} (median of {inf_rounds} rounds x 10 calls)"
    )
    for name, ts in times.items():
        print(f"  {name:17s} {1e3 * med(ts):8.3f} ms  ({spread(ts)})")
    merged_paired = med([a / b for a, b in zip(times["rankkit merged"], times["base"])])
    print(
        f"  ratio merged / base   = {med(times['rankkit merged']) / med(times['base']):.3f}   "
        f"(target 1.00 +- noise; median of per-round ratios {merged_paired:.3f})"
    )
    print(f"  ratio unmerged / base = {med(times['rankkit unmerged']) / med(times['base']):.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        saved = save_adapter(lora_model, Path(tmp) / "adapter")
        full = save_state_dict(merged, Path(tmp) / "model.safetensors").stat().st_size
    print(
        f"\nfiles: adapter_model.safetensors {saved.adapter_bytes / 2**10:.1f} KiB "
        f"(LoRA q,v + head) vs full checkpoint {full / 2**10:.1f} KiB "
        f"= {100 * saved.adapter_bytes / full:.2f}%"
    )
    load1 = os.getloadavg()
    print(
        f"\nload average at end {load1[0]:.2f} on {os.cpu_count()} cores"
        + (
            "  (other processes competed for the CPU; compare ratios, not absolute times)"
            if max(load0[0], load1[0]) > (os.cpu_count() or 1) * 0.75
            else ""
        )
    )
    assert math.isfinite(ratio)


if __name__ == "__main__":
    main()
