"""Command line: ``python -m rankkit <command> ...``.

Each subcommand is a thin layer over the public API: parse arguments, call the
library, print a readable result and write the files asked for. The library
functions it calls are the ones a notebook would call.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

import rankkit


def _add_command(subparsers, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subparser whose ``--help`` ends with usage examples."""
    return subparsers.add_parser(
        name,
        help=help,
        description=help,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# --------------------------------------------------------------------------- spectrum


def _register_spectrum(subparsers) -> None:
    p = _add_command(
        subparsers,
        "spectrum",
        "Singular-value spectra and effective rank of ΔW = W_finetuned - W_base, per layer.",
        """
        python -m rankkit spectrum --demo
        python -m rankkit spectrum base.safetensors finetuned.safetensors
        python -m rankkit spectrum base.pt tuned.pt --layers 'attn\\.(q|v)' --out report.csv --plot spectrum.png
        """,
    )
    p.add_argument("base", nargs="?", help="base (pretrained) checkpoint: .safetensors or .pt")
    p.add_argument("finetuned", nargs="?", help="fine-tuned checkpoint with the same keys")
    p.add_argument(
        "--demo",
        action="store_true",
        help="analyse a built-in pair: a random base plus a planted rank-4 update with noise",
    )
    p.add_argument("--layers", metavar="REGEX", help="only weight matrices whose name matches")
    p.add_argument("--out", metavar="CSV", help="write the full per-layer report as CSV")
    p.add_argument("--plot", metavar="PNG", help="write spectra vs random baseline (PNG or SVG)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default 0)")
    p.set_defaults(func=_cmd_spectrum)


def _cmd_spectrum(args) -> int:
    from rankkit.spectra import demo_pair, format_report

    if args.demo:
        if args.base or args.finetuned:
            raise SystemExit("spectrum: give either --demo or BASE FINETUNED, not both.")
        base, finetuned = demo_pair(seed=args.seed)
    elif args.base and args.finetuned:
        base, finetuned = args.base, args.finetuned
    else:
        raise SystemExit(
            "spectrum: give two checkpoints (BASE FINETUNED) or --demo. "
            "See python -m rankkit spectrum --help."
        )
    report = rankkit.rank_report(base, finetuned, layers=args.layers, seed=args.seed)
    print(format_report(report))
    if args.out:
        report.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    if args.plot:
        from rankkit.plots import plot_spectra

        fig = plot_spectra(
            rankkit.delta_weights(base, finetuned, layers=args.layers), seed=args.seed
        )
        fig.savefig(args.plot, dpi=150, bbox_inches="tight")
        print(f"wrote {args.plot}")
    return 0


# --------------------------------------------------------------------------- main

_REGISTRARS = [
    _register_spectrum,
]


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
