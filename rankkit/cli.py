"""Command line: ``python -m rankkit <command> ...``.

Each subcommand is a thin layer over the public API: parse arguments, call the
library, print a readable result and write the files asked for. The library
functions it calls are the ones a notebook would call.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import torch

import rankkit
from rankkit.budgets import compare_with_uniform, extraction_study, summarize_study, trained_lora
from rankkit.intrinsic import HyperplaneProblem, TaskProblem, estimate_intrinsic_dimension
from rankkit.methods import finetune
from rankkit.sweep import parse_int_list, write_sweep_figures
from rankkit.tasks import DEFAULT_TASK, data_dir, freeze_data, pretrain_base, task_table


def _add_command(subparsers, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subparser whose ``--help`` ends with usage examples."""
    return subparsers.add_parser(
        name,
        help=help.replace("%", "%%"),  # argparse %-formats help strings ("90%" would break)
        description=help,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --------------------------------------------------------------------------- spectrum


def _register_spectrum(subparsers) -> None:
    p = _add_command(
        subparsers,
        "spectrum",
        "Singular-value spectra and effective rank of ΔW = W_finetuned - W_base, per layer, "
        "for two checkpoints (files, sharded model folders) or a LoRA adapter (ΔW = s·B·A).",
        """
        python -m rankkit spectrum --demo
        python -m rankkit spectrum base/ finetuned/             # two Hugging Face model folders
        python -m rankkit spectrum adapter/                     # a PEFT LoRA adapter alone
        python -m rankkit spectrum base/ adapter/               # ...with its base: W columns, amplification
        python -m rankkit spectrum base.safetensors tuned.pt --layers 'attn\\.(q|v)' --out report.csv --plot spectrum.png
        """,
    )
    p.add_argument(
        "sources", nargs="*", metavar="CHECKPOINT",
        help="BASE FINETUNED (files or model folders), ADAPTER_DIR, or BASE ADAPTER_DIR",
    )  # fmt: skip
    p.add_argument(
        "--demo",
        action="store_true",
        help="analyse a built-in pair: a random base plus planted updates of rank 1, 4, 8 and "
        "16 (one per layer) with noise",
    )
    p.add_argument("--layers", metavar="REGEX", help="only weight matrices whose name matches")
    p.add_argument("--out", metavar="CSV", help="write the full per-layer report as CSV")
    p.add_argument("--plot", metavar="PNG", help="write spectra vs random baseline (PNG or SVG)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default 0)")
    p.add_argument("--device", default="auto", help="where to run the SVDs: auto, cpu, cuda...")
    p.add_argument("--jobs", type=int, default=1, help="analyse layers in N processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_spectrum)


def _cmd_spectrum(args) -> int:
    from rankkit.adapters import is_adapter
    from rankkit.checkpoints import compile_layers
    from rankkit.devices import resolve_device
    from rankkit.plots import plot_spectra
    from rankkit.reports import format_report, plan_updates
    from rankkit.spectra import demo_pair

    if args.demo:
        if args.sources:
            raise SystemExit("spectrum: give either --demo or checkpoints, not both.")
        base, finetuned = demo_pair(seed=args.seed)
        print("demo: a random base plus planted updates of rank 1, 4, 8 and 16 with noise")
    elif len(args.sources) == 2:
        base, finetuned = args.sources
    elif len(args.sources) == 1 and is_adapter(args.sources[0]):
        base, finetuned = None, args.sources[0]
    else:
        raise SystemExit(
            "spectrum: give two checkpoints (BASE FINETUNED), a LoRA adapter folder (ADAPTER, "
            "optionally after its BASE), or --demo. See python -m rankkit spectrum --help."
        )
    # Everything that could fail after a long analysis is checked before it starts.
    compile_layers(args.layers)
    resolve_device(args.device)
    for option, path in (("--out", args.out), ("--plot", args.plot)):
        if path:
            _check_writable(option, path)

    report = rankkit.rank_report(
        base, finetuned, layers=args.layers, seed=args.seed, device=args.device,
        jobs=args.jobs, progress=not args.quiet,
    )  # fmt: skip
    print(f"read {report.attrs['source']}")
    print(format_report(report))
    if args.out:
        report.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    if args.plot:
        plan = plan_updates(base, finetuned, args.layers)
        first = {u.name: u.formed_delta() for u in plan.layers[:12]}  # the figure shows 12
        fig = plot_spectra(first, seed=args.seed)
        fig.savefig(args.plot, dpi=150, bbox_inches="tight")
        print(f"wrote {args.plot}")
    return 0


def _check_writable(option: str, path: str) -> None:
    import os
    from pathlib import Path

    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise ValueError(
            f"{option} {path}: the folder {str(folder)!r} does not exist; create it first."
        )
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{option} {path}: the folder {str(folder)!r} is not writable.")


# --------------------------------------------------------------------------- extract


def _register_extract(subparsers) -> None:
    p = _add_command(
        subparsers,
        "extract",
        "Extract a LoRA adapter from a full fine-tune: the best rank-r approximation of each "
        "layer's ΔW (truncated SVD), with ranks from one rule; writes a PEFT adapter folder. "
        "With --task: what each budget buys (uniform, energy and budget ranks, test metric).",
        """
        python -m rankkit extract base/ finetuned/ --out adapter/ --rank 8
        python -m rankkit extract base.safetensors tuned.safetensors --out adapter/ --rank optimal
        python -m rankkit extract base/ finetuned/ --out adapter/ --energy 0.9 --layers 'attn'
        python -m rankkit extract base/ finetuned/ --out adapter/ --budget 200000
        python -m rankkit extract runs/digits-full/base.safetensors runs/digits-full/finetuned.safetensors --out adapter/ --rank 4 --modules-to-save head
        python -m rankkit extract --task digits --budgets 896,1792,3584,7168,14336 --seeds 0,1,2 --out runs/digits-extract
        """,
    )
    p.add_argument("base", nargs="?", metavar="BASE", help="pretrained weights (file or folder)")
    p.add_argument("finetuned", nargs="?", metavar="FINETUNED", help="fully fine-tuned weights")
    p.add_argument("--out", required=True, metavar="DIR", help="adapter folder (--task: runs)")
    rule = p.add_argument_group("rank rule (exactly one)")
    rule.add_argument(
        "--rank", metavar="N|optimal",
        help="N in every layer, or 'optimal': the Gavish-Donoho rank of each ΔW",
    )  # fmt: skip
    rule.add_argument(
        "--energy", type=float, metavar="F",
        help="smallest rank keeping fraction F of each layer's ||ΔW||_F^2",
    )  # fmt: skip
    rule.add_argument(
        "--budget", type=int, metavar="P",
        help="at most P adapter parameters, allocated to keep the most total energy",
    )  # fmt: skip
    p.add_argument("--layers", metavar="REGEX", help="only weight matrices whose name matches")
    p.add_argument(
        "--modules-to-save", nargs="+", metavar="NAME",
        help="modules copied in full from the fine-tune (a new head), as PEFT's "
        "modules_to_save (--task: default the task's head)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="where to run the SVDs: auto, cpu, cuda...")
    task = p.add_argument_group("what each budget buys (instead of BASE FINETUNED and a rule)")
    task.add_argument("--task", help="fine-tune this built-in task in full, then extract")
    task.add_argument("--budgets", metavar="LIST", help="adapter parameter budgets, e.g. 832,1664")
    task.add_argument("--seeds", metavar="LIST", default="0", help="fine-tuning seeds (default 0)")
    task.add_argument(
        "--sweep", metavar="DIR",
        help="a sweep folder of the same task: its trained LoRA runs join the figure",
    )  # fmt: skip
    _add_threads(p)
    p.set_defaults(func=_cmd_extract)


def _cmd_extract(args) -> int:
    from rankkit.checkpoints import compile_layers
    from rankkit.devices import resolve_device
    from rankkit.extract import extract_lora, rank_rule

    if args.task or args.budgets:
        return _extract_task(args)
    if not (args.base and args.finetuned):
        raise SystemExit(
            "extract: give BASE FINETUNED and one rule (--rank, --energy, --budget), or "
            "--task T --budgets LIST. See python -m rankkit extract --help."
        )
    rank = int(args.rank) if args.rank is not None and args.rank.isdigit() else args.rank
    # Everything that could fail after reading the checkpoints is checked first.
    rank_rule(rank, args.energy, args.budget)
    compile_layers(args.layers)
    resolve_device(args.device)
    _check_writable("--out", args.out)
    adapter = extract_lora(
        args.base, args.finetuned, rank=rank, energy=args.energy, budget=args.budget,
        layers=args.layers, modules_to_save=args.modules_to_save, out=args.out,
        device=args.device,
    )  # fmt: skip
    print(adapter.summary())
    print(f"wrote {args.out} (adapter_config.json, adapter_model.safetensors)")
    return 0


def _extract_task(args) -> int:
    """Full fine-tune per seed; extract at each budget three ways; evaluate; CSV + figure."""
    if args.base or args.finetuned or args.rank or args.energy or args.budget:
        raise SystemExit("extract --task: give --budgets, not BASE FINETUNED or a rule.")
    if not (args.task and args.budgets):
        raise SystemExit("extract: --task and --budgets go together.")
    budgets = parse_int_list(args.budgets, "--budgets")
    seeds = parse_int_list(args.seeds, "--seeds", minimum=0)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = rankkit.get_task(args.task)
    saved = args.modules_to_save or list(task.head_modules)
    out = Path(args.out)
    metric = f"test_{task.metric_name}"
    table = extraction_study(task, budgets, seeds, out, modules_to_save=saved,
                             layers=args.layers, device=args.device)  # fmt: skip
    table.to_csv(out / "extraction.csv", index=False)
    summary = summarize_study(table, metric)
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"against uniform ranks at the same budget, paired by seed ({metric}):")
    for row in compare_with_uniform(table, metric):
        print(f"  budget {row['budget']:>7,.0f} {row['allocation']:>6}: {row['difference']:+.4f} "
              f"± {row['sd']:.4f} (sd over {row['seeds']} seeds): {row['verdict']}")  # fmt: skip
    trained = None
    if args.sweep:
        trained = trained_lora(rankkit.load_results(args.sweep), task.name)
        print("trained LoRA (sweep):")
        print(trained.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    from rankkit.plots import plot_extraction_budgets  # matplotlib only when a figure is drawn

    figure = out / f"{task.name}_extraction_budget_vs_quality.png"
    fig = plot_extraction_budgets(summary, task_name=task.name, metric_name=task.metric_name,
                                  saved=saved, trained=trained)  # fmt: skip
    fig.savefig(figure, dpi=150, bbox_inches="tight")
    print(f"wrote {out / 'extraction.csv'} and {figure}")
    return 0


# --------------------------------------------------------------------------- sweep / plot


def _register_sweep(subparsers) -> None:
    p = _add_command(
        subparsers,
        "sweep",
        "Train LoRA at many ranks (x seeds x target sets) next to full fine-tuning and the "
        "frozen base; write results.csv, adapters and trade-off figures.",
        """
        python -m rankkit sweep                                   # default task, ranks 1..32, 3 seeds
        python -m rankkit sweep --task topics --targets q v q,v q,k,v,o --ranks 1,2,4,8,64
        python -m rankkit sweep --ranks 1,4,16 --seeds 0 --alpha 2r --rslora --out runs/quick
        python -m rankkit sweep --config sweep.toml --jobs 2      # flags override the file
        python -m rankkit sweep --executor ray --ray-address auto --gpus-per-run 0.25
        python -m rankkit sweep --out runs/shared          # in two terminals at once: they share the runs
        python -m rankkit sweep --allocation spectral --adalora   # per-layer ranks from a pilot; AdaLoRA
        """,
    )
    p.add_argument("--config", metavar="TOML", help="sweep config file (same keys as the flags)")
    p.add_argument("--task", help="task name (python -m rankkit tasks); default digits")
    p.add_argument(
        "--ranks", nargs="+", metavar="R", help="LoRA ranks: 1,2,4 or 1 2 4 (default 1,2,4,8,16,32)"
    )
    p.add_argument("--seeds", nargs="+", metavar="S", help="seeds: 0,1,2 or 0 1 2 (default 0,1,2)")
    p.add_argument(
        "--targets", nargs="+", metavar="SET",
        help="target sets to compare, each comma-separated roles ('q,v') or 'all-linear'",
    )  # fmt: skip
    p.add_argument(
        "--alpha",
        help="lora_alpha rule: 'sqrt(r)' (scale 1/sqrt(r), default), 'r' (scale 1), a number "
        "(e.g. 8, PEFT's default) or a multiple such as '2r'",
    )
    p.add_argument("--rslora", action="store_true", default=None, help="scale by alpha/sqrt(r)")
    p.add_argument("--epochs", type=int, help="training epochs (default: the task's)")
    p.add_argument("--lr", type=float, help="LoRA learning rate (default: the task's)")
    p.add_argument("--full-lr", type=float, help="learning rate of the baselines")
    p.add_argument("--no-baselines", dest="baselines", action="store_false", default=None,
                   help="skip full fine-tuning and frozen-base runs")  # fmt: skip
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument(
        "--out", metavar="DIR",
        help="output directory (default runs/<task>-sweep); re-run to resume, or run the same "
        "command in other terminals to share the work",
    )  # fmt: skip
    p.add_argument("--jobs", type=int, help="local worker processes (default 1)")
    p.add_argument("--executor", help="local (default) or ray")
    p.add_argument("--ray-address", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--cpus-per-run", type=float, help="Ray CPUs per run (default 1)")
    p.add_argument("--gpus-per-run", type=float, help="Ray GPUs per run, fractions allowed")
    p.add_argument("--no-batch", dest="batch", action="store_false", default=None,
                   help="train runs one at a time even where batching applies")  # fmt: skip
    p.add_argument(
        "--allocation",
        help="uniform (default): rank r in every layer; spectral: also spend each rank's "
        "parameters on per-layer ranks from a pilot full fine-tune's spectra",
    )
    p.add_argument("--adalora", action="store_true", default=None,
                   help="also train PEFT's AdaLoRA at each rank's final budget (needs "
                   "pip install 'rankkit[peft]')")  # fmt: skip
    _add_threads(p)
    p.add_argument("--force", action="store_true", help="continue a directory whose config differs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args) -> int:
    from rankkit.sweep import SweepConfig, SweepInterrupted, format_summary, run_sweep

    values = SweepConfig.from_toml(args.config).__dict__ if args.config else {}
    flags = {
        "task": args.task, "ranks": args.ranks, "seeds": args.seeds, "targets": args.targets,
        "alpha": args.alpha, "rslora": args.rslora, "epochs": args.epochs, "lr": args.lr,
        "full_lr": args.full_lr, "baselines": args.baselines, "device": args.device,
        "out": args.out, "jobs": args.jobs, "executor": args.executor,
        "ray_address": args.ray_address, "cpus_per_run": args.cpus_per_run,
        "gpus_per_run": args.gpus_per_run, "batch": args.batch,
        "allocation": args.allocation, "adalora": args.adalora,
    }  # fmt: skip
    values.update({k: v for k, v in flags.items() if v is not None})
    config = SweepConfig.from_dict(values, source="sweep options")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = run_sweep(config, force=args.force, progress=not args.quiet)
    except KeyboardInterrupt as err:  # Ctrl-C: one line on what was saved, no traceback
        saved = str(err) if isinstance(err, SweepInterrupted) else ""
        print(saved or "\ninterrupted before training started; nothing to resume", file=sys.stderr)
        return 130
    except ImportError as err:  # a task's optional dependency (the message names the extra)
        raise SystemExit(f"error: {err}") from None
    print()
    print(format_summary(result.results))
    print()
    print(f"results: {result.directory / 'results.csv'}")
    print(f"config:  {result.directory / 'config.json'}")
    if (result.directory / "adapters").exists():
        print(f"adapters: {result.directory / 'adapters'}/<run_id>/adapter_model.safetensors")
    for path in result.figures:
        print(f"figure:  {path}")
    failed = (result.results["status"] == "error").sum() if len(result.results) else 0
    return 1 if failed else 0


def _register_plot(subparsers) -> None:
    p = _add_command(
        subparsers,
        "plot",
        "Redraw a sweep's trade-off figures (rank vs quality, parameters vs quality).",
        """
        python -m rankkit plot runs/digits-sweep
        """,
    )
    p.add_argument("run_dir", help="a sweep output directory (holds results.csv)")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args) -> int:
    from rankkit.sweep import write_sweep_figures

    for path in write_sweep_figures(args.run_dir):
        print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- intrinsic-dim


def _register_intrinsic_dim(subparsers) -> None:
    p = _add_command(
        subparsers,
        "intrinsic-dim",
        "Intrinsic dimension d90: the smallest random subspace θ = θ₀ + P θ_d whose training "
        "reaches 90% of normal training (Li et al. 2018; Aghajanyan et al. 2020).",
        """
        python -m rankkit intrinsic-dim --task toy                      # Li et al.'s toy: d90 = 10
        python -m rankkit intrinsic-dim --lr-ref-d 1000 --dims 300 1000 3000 10000 30000 --rtol 0.5   # fine-tune digits' base
        python -m rankkit intrinsic-dim --from-scratch --lr-ref-d 1000 --dims 300 1000 3000 10000 30000 --seeds 0 1 2
        python -m rankkit intrinsic-dim --task topics --dims 100 1000 10000 --seeds 0 --lr 0.1 --lr-ref-d 1000
        python -m rankkit intrinsic-dim --mode said --projection sparse --dims 10 100 1000
        python -m rankkit intrinsic-dim --projection dense --baseline 0.9 --out runs/digits-sweep
        """,
    )
    p.add_argument("--task", default="digits", help="a task name, or 'toy' (default digits)")
    p.add_argument("--projection", default="fastfood", help="fastfood (default), sparse or dense")
    p.add_argument("--mode", default="did", help="did (default) or said (+ a scale per tensor)")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="θ₀ = random init, baseline = training from scratch (default: pretrained base, "
        "baseline = full fine-tuning)",
    )
    p.add_argument(
        "--dims", nargs="+", metavar="D", help="grid of d: 10,100 or 10 100 (default 1,2,5,...)"
    )
    p.add_argument(
        "--seeds", nargs="+", metavar="S", help="seeds per d: 0,1,2 or 0 1 2 (default 0,1,2)"
    )
    p.add_argument("--fraction", type=float, default=0.9, help="fraction of baseline (0.9)")
    p.add_argument(
        "--baseline", type=float, help="a fixed 'global' baseline instead of measuring one"
    )
    p.add_argument("--rtol", type=float, default=0.05, help="bisection tolerance (default 0.05)")
    p.add_argument("--epochs", type=int, help="epochs (default: the task's)")
    p.add_argument("--lr", type=float, help="learning rate of subspace training")
    p.add_argument(
        "--lr-ref-d",
        type=int,
        metavar="D0",
        help="--lr is the rate at d = D0; other d use lr * sqrt(D0 / d)",
    )
    p.add_argument("--exclude-head", action="store_true", help="keep the head out of the subspace")
    p.add_argument(
        "--train-head",
        action="store_true",
        help="train the head directly, outside the subspace (d counts the body only)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/<task>-intrinsic)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_intrinsic_dim)


def _cmd_intrinsic_dim(args) -> int:
    if args.task.lower() in ("toy", "hyperplane"):
        problem = HyperplaneProblem()
    else:
        problem = TaskProblem(
            args.task,
            from_scratch=args.from_scratch,
            exclude_head=args.exclude_head,
            train_head=args.train_head,
            epochs=args.epochs,
            subspace_epochs=args.epochs,
            subspace_lr=args.lr,
            lr_ref_d=args.lr_ref_d,
            device=args.device,
        )
    seeds = parse_int_list(args.seeds, "--seeds", minimum=0) if args.seeds else [0, 1, 2]
    result = estimate_intrinsic_dimension(
        problem,
        projection=args.projection,
        mode=args.mode,
        fraction=args.fraction,
        dims=parse_int_list(args.dims, "--dims") if args.dims else None,
        seeds=seeds,
        baseline=args.baseline,
        rtol=args.rtol,
        progress=not args.quiet,
    )
    print(result.summary())
    print(result.by_d().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    out = Path(args.out or f"runs/{args.task}-intrinsic")
    paths = result.save(out)
    from rankkit.plots import plot_intrinsic_dimension

    fig = plot_intrinsic_dimension(result)
    paths["png"] = out / "intrinsic_dimension.png"
    fig.savefig(paths["png"], dpi=150, bbox_inches="tight")
    for path in paths.values():
        print(f"wrote {path}")
    if (out / "results.csv").exists():  # a sweep directory: redraw its figures with d90
        config = out / "config.json"
        sweep_task = json.loads(config.read_text()).get("task") if config.exists() else None
        if sweep_task not in (None, args.task):
            print(f"note: the sweep in {out} is on task {sweep_task!r}, d90 on {args.task!r}")
        for path in write_sweep_figures(out):
            print(f"redrew {path}")
        print("the sweep's params_vs_quality figure now marks d90")
    return 0


# --------------------------------------------------------------------------- tasks / pretrain / finetune


def _register_tasks(subparsers) -> None:
    p = _add_command(
        subparsers,
        "tasks",
        "List the built-in tasks: parameters, metric, base-weight status, what they measure.",
        """
        python -m rankkit tasks
        """,
    )
    p.set_defaults(func=_cmd_tasks)


def _cmd_tasks(args) -> int:
    for row in task_table():
        params = f"{row['params']:,}" if row["params"] is not None else "?"
        default = " (default)" if row["task"] == DEFAULT_TASK else ""
        print(f"{row['task']}{default}: {params} parameters, metric {row['metric']}")
        print(f"    {row['description']}")
        print(f"    base weights: {row['base']}")
        print(f"    data: {row['data']}")
    return 0


def _add_threads(p) -> None:
    p.add_argument(
        "--threads", type=int, metavar="N",
        help="torch CPU threads (on a shared machine, 1 is often fastest)",
    )  # fmt: skip


def _register_pretrain(subparsers) -> None:
    p = _add_command(
        subparsers,
        "pretrain",
        "Rebuild a task's pretrained base weights (data/TASK.safetensors + manifest entry) "
        "from a seed.",
        """
        python -m rankkit pretrain digits                # seconds
        python -m rankkit pretrain topics --threads 1    # ~10 minutes on a laptop CPU
        python -m rankkit pretrain code --threads 1      # ~1-2 minutes
        python -m rankkit pretrain digits --out /tmp/bases --seed 1
        """,
    )
    p.add_argument("task", help="task name (see python -m rankkit tasks)")
    p.add_argument("--seed", type=int, default=0, help="seed of the whole run (default 0)")
    p.add_argument("--out", metavar="DIR", help="directory for weights + manifest (default data/)")
    p.add_argument("--device", default="cpu", help="cpu (default; reproducible), auto, cuda, mps")
    _add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pretrain)


def _cmd_pretrain(args) -> int:
    try:
        entry = pretrain_base(
            args.task, seed=args.seed, directory=args.out, progress=not args.quiet,
            device=args.device, threads=args.threads,
        )  # fmt: skip
    except (ImportError, PermissionError) as err:
        raise SystemExit(f"error: {err}") from None
    directory = args.out or data_dir()
    print(f"wrote {directory}/{entry['file']} (sha256 {entry['sha256'][:16]}..., "
          f"{entry['bytes'] / 2**20:.1f} MiB) in {entry['wall_time_s']}s")  # fmt: skip
    print(f"pretraining metric: {json.dumps(entry['metric'])}")
    return 0


def _register_freeze_data(subparsers) -> None:
    p = _add_command(
        subparsers,
        "freeze-data",
        "Record a task's data under the manifest's checksum: topics and code freeze what they "
        "build from this Python (its reference text, its standard library's sources), digits "
        "the pairs it draws with this numpy, into data/TASK-data.json.gz, which every Python "
        "then reads. 'rankkit tasks' re-checks them.",
        """
        python -m rankkit freeze-data topics
        python -m rankkit freeze-data code
        python -m rankkit freeze-data digits
        """,
    )
    p.add_argument("task", help="task name (see python -m rankkit tasks)")
    p.set_defaults(func=_cmd_freeze_data)


def _cmd_freeze_data(args) -> int:
    try:
        entry = freeze_data(args.task)
    except (ValueError, PermissionError) as err:
        raise SystemExit(f"error: {err}") from None
    if "file" in entry:
        print(f"wrote {data_dir()}/{entry['file']} (sha256 {entry['sha256'][:16]}..., "
              f"{entry['bytes'] / 2**10:.0f} KiB)")  # fmt: skip
    print(f"{args.task}: {entry['data']}")
    print(f"recorded in {data_dir()}/manifest.json: splits sha256 {entry['splits_sha256'][:16]}...")
    return 0


def _register_finetune(subparsers) -> None:
    p = _add_command(
        subparsers,
        "finetune",
        "Fine-tune a task's pretrained base (all weights, or only the head: the frozen base); "
        "write base and fine-tuned weights (safetensors) and metrics.json.",
        """
        python -m rankkit finetune                                  # digits, full fine-tuning
        python -m rankkit finetune --task digits --frozen-base      # only the head trains
        python -m rankkit finetune --task topics --epochs 8 --lr 1e-3 --out runs/topics-full
        python -m rankkit finetune --task minilm --model /path/to/hf/model --device auto
        python -m rankkit spectrum runs/digits-full/base.safetensors runs/digits-full/finetuned.safetensors
        """,
    )
    p.add_argument("--task", default="digits", help="task name (default digits)")
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/TASK-METHOD)")
    p.add_argument(
        "--frozen-base", "--head-only", dest="frozen_base", action="store_true",
        help="the frozen-base baseline: train only the task head",
    )  # fmt: skip
    p.add_argument("--from-scratch", action="store_true", help="random init instead of the base")
    p.add_argument("--epochs", type=int, help="default: the task's")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the task's)")
    p.add_argument("--batch-size", type=int, help="default: the task's")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: the task's)")
    p.add_argument("--schedule", choices=["cosine", "constant"], help="default: the task's")
    p.add_argument("--warmup", type=float, help="warm-up fraction of all steps")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, mps")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--model", metavar="PATH", help="minilm: a local Hugging Face model directory")
    _add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"model": args.model} if args.model else {}
    method = "frozen" if args.frozen_base else "full"
    name = method if args.frozen_base or not args.from_scratch else "scratch"
    out = args.out or f"runs/{args.task}-{name}"
    try:
        result, paths = finetune(
            args.task, out, task_options=options, method=method,
            pretrained=not args.from_scratch, epochs=args.epochs, lr=args.lr,
            batch_size=args.batch_size, weight_decay=args.weight_decay,
            schedule=args.schedule, warmup=args.warmup, device=args.device, seed=args.seed,
            progress=not args.quiet,
        )  # fmt: skip
    except ImportError as err:
        raise SystemExit(f"error: {err}") from None
    print(result)
    for path in paths.values():
        print(f"wrote {path}")
    print(f"next: python -m rankkit spectrum {paths['base']} {paths['finetuned']}")
    return 0


# --------------------------------------------------------------------------- main

_REGISTRARS = [
    _register_spectrum,
    _register_extract,
    _register_sweep,
    _register_plot,
    _register_intrinsic_dim,
    _register_tasks,
    _register_pretrain,
    _register_freeze_data,
    _register_finetune,
]


# --------------------------------------------------------------------------- figures


def _register_figures(subparsers) -> None:
    p = _add_command(
        subparsers,
        "figures",
        "Regenerate the README's figures (spectra, rank sweep, subspace similarity, intrinsic "
        "dimension) by training everything they show on the digits task.",
        """
        python -m rankkit figures                         # published settings, into figures/
        python -m rankkit figures --quick --out /tmp/fig  # smoke test: tiny runs, a minute or two
        python -m rankkit figures --jobs 2 --threads 1 --keep-runs runs/figures
        python -m rankkit figures --intrinsic-from docs/records   # digits' d90 from the records
        """,
    )
    p.add_argument("--out", default="figures", metavar="DIR", help="output directory (figures/)")
    p.add_argument("--quick", action="store_true", help="tiny runs (not for publication)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes for the rank sweep")
    p.add_argument("--keep-runs", metavar="DIR", help="keep the sweep's runs here (default: temp)")
    p.add_argument(
        "--intrinsic-from",
        metavar="DIR",
        help="draw digits' intrinsic dimension from DIR/digits-intrinsic-{finetune,scratch} "
        "(intrinsic-dim --out folders) instead of training it",
    )
    _add_threads(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_figures)


def _cmd_figures(args) -> int:
    # Drawing modules load matplotlib (seconds); only the commands that draw import them,
    # after choosing the file-only backend.
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    from rankkit.figures import FIGURES, make_figures

    if args.threads:
        torch.set_num_threads(args.threads)
    paths = make_figures(
        args.out, quick=args.quick, jobs=args.jobs, work_dir=args.keep_runs,
        intrinsic_from=args.intrinsic_from, progress=not args.quiet,
    )  # fmt: skip
    print()
    for path in paths:
        print(f"{path}: {FIGURES.get(path.name, '')}")
    return 0


_REGISTRARS.append(_register_figures)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rankkit",
        description="rankkit: measure and teach intrinsic rank (LoRA, spectra, intrinsic dimension).",
        epilog="Run 'python -m rankkit COMMAND --help' for the options and examples of a command.",
    )
    parser.add_argument("--version", action="version", version=f"rankkit {rankkit.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in _REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
        # Library errors already say what went wrong and how to fix it: show the
        # message, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
