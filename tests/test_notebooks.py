"""The tutorial notebooks in notebooks/ (and the figures command they share code paths with).

Fast checks, on the stored files:

* the seven numbered notebooks exist and are listed in notebooks/README.md;
* each is stored with its outputs stripped (reviewable diffs);
* each has the quick switch ``QUICK = os.environ.get("RANKKIT_QUICK", "0") == "1"`` in its
  first code cell, and a "Check your understanding" section followed by code;
* none calls a private rankkit helper (a name starting with an underscore);
* the cell that answers "Check your understanding" asserts what it prints (at least one
  ``assert`` statement), so an answer that stops being true fails the run instead of
  being printed; the quick-mode runs below execute those asserts, and claims that only
  full mode's numbers support are asserted as ``assert QUICK or <claim>``;
* no notebook re-spells the standard error of an accuracy: comparisons go through
  :mod:`rankkit.stats` (one rule for the noise of a difference).

Slow checks (marked ``slow``, still run in CI), which need the ``notebooks`` extra:

* every notebook runs top to bottom in quick mode (``RANKKIT_QUICK=1``) in a fresh kernel
  running this Python; any cell error fails the test;
* notebook 7 stops cleanly, with install instructions, when the ``hf`` extra is missing;
* ``python -m rankkit figures --quick`` writes every figure.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
QUICK_SWITCH = 'QUICK = os.environ.get("RANKKIT_QUICK", "0") == "1"'
STRIP_HINT = (
    "store notebooks without outputs: jupyter nbconvert --clear-output --inplace notebooks/0*.ipynb"
)


def _cells(path: Path) -> list[dict]:
    # Plain JSON: the format checks must not need the notebooks extra.
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def test_seven_numbered_notebooks_in_reading_order():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06", "07"], [
        p.name for p in NOTEBOOKS
    ]


def test_readme_lists_every_notebook():
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in NOTEBOOKS if p.name not in readme]
    assert not missing, f"notebooks/README.md does not mention {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_stored_without_outputs(path):
    dirty = [
        i
        for i, cell in enumerate(_cells(path))
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; {STRIP_HINT}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_quick_switch_in_first_code_cell(path):
    first = next(c for c in _cells(path) if c["cell_type"] == "code")
    assert QUICK_SWITCH in _source(first), f"{path.name}: first code cell lacks {QUICK_SWITCH!r}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_check_your_understanding_section(path):
    cells = _cells(path)
    heading = [
        i
        for i, c in enumerate(cells)
        if c["cell_type"] == "markdown"
        and re.search(r"^#+\s*Check your understanding", _source(c), re.M | re.I)
    ]
    assert heading, f"{path.name}: no 'Check your understanding' heading"
    section = _source(cells[heading[-1]])
    questions = re.findall(r"^\s*\d+\.\s+\S", section, re.M)
    assert len(questions) >= 3, f"{path.name}: fewer than 3 numbered questions"
    assert any(c["cell_type"] == "code" for c in cells[heading[-1] + 1 :]), (
        f"{path.name}: the questions should be followed by a cell that computes the answers"
    )


def _answer_cell(cells: list[dict]) -> dict:
    """The first code cell after the last "Check your understanding" heading."""
    heading = max(
        i
        for i, c in enumerate(cells)
        if c["cell_type"] == "markdown"
        and re.search(r"^#+\s*Check your understanding", _source(c), re.M | re.I)
    )
    return next(c for c in cells[heading + 1 :] if c["cell_type"] == "code")


def _asserts(source: str) -> int:
    """Number of ``assert`` statements in a code cell (IPython magics are left out)."""
    code = "\n".join(
        line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))
    )
    return sum(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(code)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_answers_assert_what_they_print(path):
    answers = _source(_answer_cell(_cells(path)))
    assert _asserts(answers) >= 1, (
        f"{path.name}: the 'Check your understanding' answer cell prints claims without asserting "
        "any; compute each verdict from an inequality and assert it (assert QUICK or ... for "
        "claims that only full mode's numbers support)"
    )


def test_the_assert_guard_finds_asserts_and_only_asserts():
    assert _asserts("x = 1\nif x:\n    assert x == 1, 'x'\nprint('assert')") == 1
    assert _asserts("print('assert x')\n# assert y") == 0
    cells = [
        {"cell_type": "markdown", "source": "## Check your understanding\n1. a"},
        {"cell_type": "code", "source": "print(1)"},
    ]
    assert _source(_answer_cell(cells)) == "print(1)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_standard_errors_come_from_rankkit_stats(path):
    # sqrt(p * (1 - p) / n) written out by hand, instead of rankkit.binomial_se / compare_accuracies
    respelled = re.compile(r"sqrt\(\s*[\w\[\]\"' .]+\*\s*\(\s*1\s*-")
    hits = [
        m.group(0)
        for c in _cells(path)
        if c["cell_type"] == "code"
        for m in respelled.finditer(_source(c))
    ]
    assert not hits, (
        f"{path.name}: use rankkit.binomial_se / rankkit.compare_accuracies, not {hits}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_uses_public_api_only(path):
    # One leading underscore marks a private helper (dunders such as __version__ are public).
    private = re.compile(
        r"rankkit(\.\w+)*\._[^\W_]\w*|from rankkit[\w.]* import [^\n]*\b_[^\W_]\w*"
    )
    hits = [
        m.group(0)
        for c in _cells(path)
        if c["cell_type"] == "code"
        for m in private.finditer(_source(c))
    ]
    assert not hits, f"{path.name} uses private rankkit helpers: {hits}"


# --------------------------------------------------------------------------- execution


def _kernel_manager_class():
    """A kernel manager whose ``python3`` kernel runs *this* interpreter (ipykernel's own
    spec), whatever ``python3`` kernelspec the user's Jupyter directories hold."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return KernelSpecManager(kernel_dirs=[], parent=self)

    return ThisPythonKernelManager


def _execute(path: Path, timeout: int = 900):
    """Run every cell of ``path`` in a fresh kernel; raise on the first cell error."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        kernel_manager_class=_kernel_manager_class(),
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()
    return nb, time.perf_counter() - start


def _text_outputs(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif "text/plain" in out.get("data", {}):
                parts.append(out["data"]["text/plain"])
    return "\n".join(parts)


@pytest.fixture
def quick_mode(monkeypatch):
    """Kernels inherit this environment: quick mode, and no GPU surprises."""
    monkeypatch.setenv("RANKKIT_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_quick_mode(path, quick_mode, capsys):
    nb, seconds = _execute(path)
    text = _text_outputs(nb)
    assert "quick mode: True" in text, f"{path.name} did not see RANKKIT_QUICK=1"
    with capsys.disabled():
        print(f"\n{path.name}: {seconds:.0f}s in quick mode", end="")


@pytest.mark.slow
def test_notebook_7_stops_cleanly_without_the_hf_extra(quick_mode, monkeypatch, tmp_path):
    """Hide transformers behind a stub that fails to import, as if it were not installed."""
    stub = tmp_path / "transformers"
    stub.mkdir()
    (stub / "__init__.py").write_text(
        "raise ImportError(\"No module named 'transformers' (hidden by test_notebooks.py)\")\n"
    )
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    path = next(p for p in NOTEBOOKS if p.name.startswith("07"))
    nb, _ = _execute(path)
    text = _text_outputs(nb)
    assert "pip install 'rankkit[hf]'" in text
    assert "Skipped" in text
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert not images, "without the hf extra, notebook 7 should skip all of its work"


# --------------------------------------------------------------------------- figures


def test_figures_command_is_registered():
    from rankkit.cli import build_parser

    args = build_parser().parse_args(["figures", "--quick", "--out", "x"])
    assert args.quick and args.out == "x" and callable(args.func)


@pytest.mark.slow
def test_figures_quick_writes_every_figure(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from rankkit.figures import FIGURES, make_figures

    monkeypatch.chdir(tmp_path)
    paths = make_figures(tmp_path / "figures", quick=True, progress=False, log=lambda *_: None)
    assert sorted(p.name for p in paths) == sorted(FIGURES)
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000, p
    assert not (tmp_path / "runs").exists(), "quick figures must not leave runs behind"


def test_figures_refuse_saved_intrinsic_searches_under_the_wrong_label(tmp_path):
    """``--intrinsic-from`` reads the records it names, and checks them before any training."""
    import shutil

    from rankkit.figures import INTRINSIC_RUNS, make_figures
    from rankkit.intrinsic import IntrinsicDimensionResult

    records = ROOT / "docs" / "records"
    (_, finetune), (_, scratch) = INTRINSIC_RUNS.values()
    saved = IntrinsicDimensionResult.load(records / finetune)
    assert saved.problem == "digits (fine-tuning)" and saved.d90 in saved.curve["d"].tolist()
    # The same two folders swapped: the fine-tuning label would get the scratch curve.
    shutil.copytree(records / finetune, tmp_path / scratch)
    shutil.copytree(records / scratch, tmp_path / finetune)
    with pytest.raises(ValueError, match="holds the search of 'digits \\(from scratch\\)'"):
        make_figures(tmp_path / "figures", intrinsic_from=tmp_path, log=lambda *_: None)
    assert not (tmp_path / "figures").exists() or not any((tmp_path / "figures").iterdir())


if __name__ == "__main__":  # pragma: no cover - run one notebook by hand
    sys.exit(pytest.main([__file__, "-v", "-k", sys.argv[1] if len(sys.argv) > 1 else ""]))
