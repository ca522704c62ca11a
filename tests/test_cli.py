"""The command line, run as users run it: a real subprocess of ``python -m rankkit``."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

import rankkit
from rankkit.checkpoints import save_state_dict
from rankkit.cli import main


def run_cli(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "rankkit", *args], capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_version_and_help():
    assert run_cli("--version").stdout.strip() == f"rankkit {rankkit.__version__}"
    out = run_cli("--help").stdout
    assert "spectrum" in out


def test_every_subcommand_help_has_examples():
    parser = __import__("rankkit.cli", fromlist=["build_parser"]).build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert "spectrum" in subcommands
    for name, sub in subcommands.items():
        assert "examples:" in sub.format_help(), name
        assert "python -m rankkit" in sub.format_help(), name


def test_spectrum_demo_writes_report_and_plot(tmp_path):
    csv, png = tmp_path / "report.csv", tmp_path / "spectrum.png"
    out = run_cli("spectrum", "--demo", "--out", str(csv), "--plot", str(png)).stdout
    assert "layer1.fc1.weight" in out
    report = pd.read_csv(csv)
    assert list(report["dW_optimal"]) == [1, 4, 8, 16]
    assert png.stat().st_size > 10_000


def test_spectrum_on_checkpoint_files(tmp_path, capsys):
    base, tuned = rankkit.spectra.demo_pair()
    save_state_dict(base, tmp_path / "base.safetensors")
    torch.save(tuned, tmp_path / "tuned.pt")
    code = main(
        ["spectrum", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.pt"),
         "--layers", r"layer0\.", "--out", str(tmp_path / "r.csv")]
    )  # fmt: skip
    assert code == 0
    assert list(pd.read_csv(tmp_path / "r.csv")["name"]) == ["layer0.q.weight", "layer0.v.weight"]


def test_spectrum_errors_are_messages_not_tracebacks(tmp_path):
    proc = run_cli(
        "spectrum", str(tmp_path / "nope.safetensors"), str(tmp_path / "x.pt"), check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: base: no such file")
    assert "Traceback" not in proc.stderr
    proc = run_cli("spectrum", check=False)
    assert proc.returncode != 0 and "--demo" in proc.stderr


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_plot_functions_return_figures(fmt, tmp_path):
    from rankkit.plots import (
        plot_effective_rank,
        plot_energy,
        plot_spectra,
        plot_subspace_similarity,
    )

    base, tuned = rankkit.spectra.demo_pair()
    deltas = rankkit.delta_weights(base, tuned)
    report = rankkit.rank_report(base, tuned)
    figs = [
        plot_spectra(deltas),
        plot_energy(deltas),
        plot_effective_rank(report, "optimal"),
        plot_subspace_similarity(rankkit.subspace_similarity_grid(*list(deltas.values())[:2])),
    ]
    for i, fig in enumerate(figs):
        fig.savefig(tmp_path / f"f{i}.{fmt}")
        assert (tmp_path / f"f{i}.{fmt}").stat().st_size > 1000
    with pytest.raises(ValueError, match="available methods"):
        plot_effective_rank(report, "bogus")


@pytest.mark.parametrize(
    "argv, option, expected",
    [
        (["sweep", "--seeds", "0", "1", "2"], "seeds", [0, 1, 2]),
        (["sweep", "--seeds", "0,1,2"], "seeds", [0, 1, 2]),
        (["sweep", "--ranks", "1,2", "4", "--seeds", "0"], "ranks", [1, 2, 4]),
        (["intrinsic-dim", "--dims", "10", "100,1000"], "dims", [10, 100, 1000]),
        (["intrinsic-dim", "--seeds", "0,1", "2"], "seeds", [0, 1, 2]),
    ],
)
def test_list_options_take_spaces_commas_or_both(argv, option, expected):
    from rankkit.cli import build_parser
    from rankkit.sweep import parse_int_list

    args = build_parser().parse_args(argv)
    assert parse_int_list(getattr(args, option), option, minimum=0) == expected


def test_a_bad_list_item_is_one_error_line(tmp_path):
    proc = run_cli("sweep", "--seeds", "0", "x", "--out", str(tmp_path / "s"), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: seeds: 'x' is not an integer."
    assert not (tmp_path / "s").exists()
