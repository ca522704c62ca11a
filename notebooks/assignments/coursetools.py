"""Build student versions of the rankkit assignments and autograde notebooks.

This directory is an nbgrader course directory: the instructor versions (with
solutions and hidden tests) live in ``source/<assignment>/<notebook>.ipynb`` and
the student versions are generated into ``release/<assignment>/<notebook>.ipynb``.
You can use nbgrader itself (``nbgrader generate_assignment``, ``nbgrader
autograde``, the formgrader; see ``docs/teaching.md``), which keeps a gradebook
database. This module does the same two jobs without a database, for CI and for
instructors who only want the files:

* :func:`student_version` runs nbgrader's own preprocessors -- the ones
  ``nbgrader generate_assignment`` runs, minus the two that need a database or
  are unused here -- so solutions are replaced by ``raise NotImplementedError()``,
  hidden tests are removed, outputs are cleared and cells are locked exactly as
  nbgrader would.
* :func:`grade` executes a notebook with nbclient and scores every graded cell
  with nbgrader's own rule (:func:`nbgrader.utils.determine_grade`: a test cell
  earns its points unless it raised an error or wrote to stderr). For a student
  submission it first restores the instructor's test and read-only cells, hidden
  tests included, like ``nbgrader autograde`` does, so edited or deleted tests
  cannot earn points.

Note that ``nbgrader validate`` exits with status 0 even when a notebook fails
validation; :func:`grade` returns a report you can test (``report.full_marks``),
and ``grade.py --require-full-marks`` exits non-zero.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nbformat
from nbformat import NotebookNode

ASSIGNMENTS_DIR = Path(__file__).resolve().parent
SOURCE_DIR = ASSIGNMENTS_DIR / "source"
RELEASE_DIR = ASSIGNMENTS_DIR / "release"

#: Seconds a single cell may run before grading gives up on the notebook.
CELL_TIMEOUT = 600

#: nbgrader's ``generate_assignment`` pipeline (nbgrader 0.9), in order, minus
#: ``IncludeHeaderFooter`` (no header is configured), ``InstantiateTests`` (no
#: ``### AUTOTEST`` directives are used) and ``SaveCells`` (writes the gradebook
#: database; :func:`restore_locked_cells` reads the instructor notebook instead).
GENERATE_PIPELINE = (
    "LockCells",
    "ClearSolutions",
    "ClearOutput",
    "CheckCellMetadata",
    "ComputeChecksums",
    "ClearHiddenTests",
    "ClearMarkScheme",
    "ComputeChecksums",
    "CheckCellMetadata",
)


# --------------------------------------------------------------------------- notebooks


def source_notebooks() -> list[Path]:
    """Instructor notebooks, ``source/<assignment>/<name>.ipynb``, in assignment order."""
    return sorted(p for p in SOURCE_DIR.glob("*/*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def find_source(name: str | os.PathLike) -> Path:
    """The instructor notebook for an assignment name, a notebook file name or a path.

    ``"01_effective_rank"``, ``"effective_rank"``, ``"effective_rank.ipynb"`` and a
    student's ``.../effective_rank.ipynb`` all find
    ``source/01_effective_rank/effective_rank.ipynb``.
    """
    stem = Path(name).name.removesuffix(".ipynb")
    for path in source_notebooks():
        if stem in (path.stem, path.parent.name):
            return path
    known = ", ".join(f"{p.parent.name}/{p.name}" for p in source_notebooks())
    raise FileNotFoundError(f"no instructor notebook matches {str(name)!r}; known: {known}.")


def read(path: str | os.PathLike) -> NotebookNode:
    return nbformat.read(str(path), as_version=4)


def nbgrader_meta(cell: NotebookNode) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_test_cell(cell: NotebookNode) -> bool:
    """An autograder test cell: graded, not a solution (nbgrader's "Autograder tests")."""
    meta = nbgrader_meta(cell)
    return bool(meta.get("grade")) and not meta.get("solution") and cell.cell_type == "code"


def is_solution_cell(cell: NotebookNode) -> bool:
    return bool(nbgrader_meta(cell).get("solution"))


def max_points(nb: NotebookNode) -> float:
    return sum(float(nbgrader_meta(c)["points"]) for c in nb.cells if nbgrader_meta(c).get("grade"))


# --------------------------------------------------------------------------- release


def student_version(nb: NotebookNode) -> NotebookNode:
    """The student version of an instructor notebook, made by nbgrader's preprocessors.

    Raises ``nbgrader``'s ``ValidationError`` if the nbgrader metadata is invalid
    (a solution region in a cell not marked as a solution, a graded cell
    without points, duplicate ids...).
    """
    from nbgrader import preprocessors

    nb = copy.deepcopy(nb)
    resources: dict = {}
    for name in GENERATE_PIPELINE:
        nb, resources = getattr(preprocessors, name)().preprocess(nb, resources)
    return nb


def build_release(out_dir: str | os.PathLike = RELEASE_DIR) -> list[Path]:
    """Write the student version of every instructor notebook into ``out_dir``.

    The layout is nbgrader's: ``<out_dir>/<assignment>/<notebook>.ipynb``. Existing
    files are overwritten. Returns the paths written.
    """
    written = []
    for src in source_notebooks():
        target = Path(out_dir) / src.parent.name / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(student_version(read(src)), str(target))
        written.append(target)
    return written


# --------------------------------------------------------------------------- grading


def restore_locked_cells(submission: NotebookNode, source: NotebookNode) -> NotebookNode:
    """Put the instructor's version of every test and read-only cell back into a submission.

    What ``nbgrader autograde`` does with its database (``OverwriteCells``):
    cells are matched by ``grade_id``; test cells get their full source back,
    hidden tests included; a test cell the student deleted is re-inserted after
    the cell that precedes it in the instructor version. Solution cells are the
    student's and are left alone.
    """
    nb = copy.deepcopy(submission)
    source_cells = {nbgrader_meta(c)["grade_id"]: c for c in source.cells if nbgrader_meta(c)}
    for cell in nb.cells:
        grade_id = nbgrader_meta(cell).get("grade_id")
        original = source_cells.get(grade_id)
        if original is None or is_solution_cell(original):
            continue
        if is_test_cell(original) or nbgrader_meta(original).get("locked"):
            cell.cell_type = original.cell_type
            cell.source = original.source
            cell.metadata["nbgrader"] = copy.deepcopy(nbgrader_meta(original))
            if cell.cell_type == "code":
                cell.setdefault("outputs", [])
                cell.setdefault("execution_count", None)

    present = {nbgrader_meta(c).get("grade_id") for c in nb.cells}
    for i, original in enumerate(source.cells):
        grade_id = nbgrader_meta(original).get("grade_id")
        if not is_test_cell(original) or grade_id in present:
            continue
        earlier = {nbgrader_meta(c).get("grade_id") for c in source.cells[:i]} - {None}
        index = 0
        for j, cell in enumerate(nb.cells):
            if nbgrader_meta(cell).get("grade_id") in earlier:
                index = j + 1
        restored = copy.deepcopy(original)
        restored.outputs, restored.execution_count = [], None
        nb.cells.insert(index, restored)
        present.add(grade_id)
    return nb


def _this_python_kernel_manager():
    """A kernel manager whose ``python3`` kernel always runs *this* interpreter.

    A ``python3`` kernelspec installed in the user's Jupyter directory may point to
    another Python (without rankkit); ipykernel's built-in spec is this one.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class ThisPythonKernelManager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _kernel_spec_manager_default(self):
            return KernelSpecManager(kernel_dirs=[], parent=self)

    return ThisPythonKernelManager


def execute(
    nb: NotebookNode,
    cwd: str | os.PathLike | None = None,
    timeout: int = CELL_TIMEOUT,
) -> NotebookNode:
    """Run every code cell in a fresh kernel, recording errors instead of stopping.

    The kernel runs this Python interpreter (``sys.executable``) and inherits this
    process's environment; ``cwd`` is its working directory (the notebook's folder
    when grading a file).
    """
    from nbclient import NotebookClient

    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        kernel_manager_class=_this_python_kernel_manager(),
        allow_errors=True,
        resources={"metadata": {"path": str(cwd or ASSIGNMENTS_DIR)}},
    )
    client.execute()
    return nb


@dataclass
class CellResult:
    """The outcome of one graded cell."""

    grade_id: str
    points: float
    max_points: float
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.points == self.max_points


@dataclass
class GradeReport:
    """Per-cell scores of one executed notebook.

    Attributes
    ----------
    cells : list of CellResult
        One per graded cell, in notebook order.
    errors : dict
        ``{cell label: "Ename: message"}`` for *every* code cell that raised, graded
        or not; labels are grade ids, or ``cell[<index>]`` for cells without one.
    executed : NotebookNode
        The notebook with its outputs, e.g. to write out as feedback.
    """

    name: str
    cells: list[CellResult]
    errors: dict[str, str]
    executed: NotebookNode
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return sum(c.points for c in self.cells)

    @property
    def max_score(self) -> float:
        return sum(c.max_points for c in self.cells)

    @property
    def full_marks(self) -> bool:
        return bool(self.cells) and all(c.passed for c in self.cells)

    def result(self, grade_id: str) -> CellResult:
        for cell in self.cells:
            if cell.grade_id == grade_id:
                return cell
        raise KeyError(f"no graded cell {grade_id!r} in {self.name}")

    def format(self, width: int = 100) -> str:
        lines = [f"{self.name}: {self.score:g} / {self.max_score:g} points ({self.seconds:.0f}s)"]
        for c in self.cells:
            mark = "PASS" if c.passed else "FAIL"
            line = f"  {mark}  {c.grade_id:<28} {c.points:g}/{c.max_points:g}"
            if c.message:
                line += f"  {c.message}"
            lines.append(line if len(line) <= width else line[: width - 1] + "…")
        ungraded = {
            k: v for k, v in self.errors.items() if not any(k == c.grade_id for c in self.cells)
        }
        for label, message in ungraded.items():
            lines.append(f"  ERROR in ungraded cell {label}: {message}"[:width])
        return "\n".join(lines)


def _error_message(cell: NotebookNode) -> str | None:
    for out in cell.get("outputs", []):
        if out.output_type == "error":
            value = (out.evalue or "").strip()
            return f"{out.ename}: {value}" if value else out.ename
    return None


def _stderr_message(cell: NotebookNode) -> str | None:
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name == "stderr":
            first = out.text.strip().splitlines()[:1]
            return "wrote to stderr (nbgrader gives 0 points): " + (first[0] if first else "")
    return None


def score_executed(nb: NotebookNode, name: str = "notebook") -> GradeReport:
    """Score an executed notebook with nbgrader's ``determine_grade``."""
    from nbgrader.utils import determine_grade

    cells, errors = [], {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        label = nbgrader_meta(cell).get("grade_id") or f"cell[{index}]"
        error = _error_message(cell)
        if error:
            errors[label] = error
        if not is_test_cell(cell):
            continue
        points, out_of = determine_grade(cell)
        message = error or _stderr_message(cell) or ""
        if points is not None and 0 < points < out_of and not message:
            message = "partial credit from the cell's output"
        cells.append(CellResult(label, float(points or 0.0), float(out_of), message))
    return GradeReport(name=name, cells=cells, errors=errors, executed=nb)


def grade(
    notebook: str | os.PathLike | NotebookNode,
    source: str | os.PathLike | NotebookNode | Literal[False] | None = None,
    *,
    stop_after: str | None = None,
    cwd: str | os.PathLike | None = None,
    timeout: int = CELL_TIMEOUT,
    name: str | None = None,
) -> GradeReport:
    """Execute a notebook and score each graded cell.

    Parameters
    ----------
    notebook : path or NotebookNode
        An instructor notebook, a released student notebook, or a submission.
    source : path, NotebookNode or False, optional
        The instructor notebook whose test and read-only cells are restored into
        ``notebook`` before running (see :func:`restore_locked_cells`). By default
        it is found by the file name of ``notebook`` (:func:`find_source`), and a
        ``NotebookNode`` without ``source`` runs as it is; ``False`` always runs the
        notebook exactly as it is.
    stop_after : str, optional
        Only run the notebook up to and including the cell with this ``grade_id``
        (quick checks of one exercise).
    cwd : path, optional
        Working directory of the kernel; default the notebook's folder.
    timeout : int
        Seconds per cell.
    """
    if isinstance(notebook, NotebookNode):
        nb, label, folder = notebook, name or "notebook", cwd
    else:
        path = Path(notebook)
        nb, label, folder = read(path), name or str(path), cwd or path.parent
    if source is None and not isinstance(notebook, NotebookNode):
        source = find_source(Path(notebook).name)
    if source is not None and source is not False:
        src = source if isinstance(source, NotebookNode) else read(source)
        nb = restore_locked_cells(nb, src)
    if stop_after is not None:
        ids = [nbgrader_meta(c).get("grade_id") for c in nb.cells]
        if stop_after not in ids:
            raise KeyError(f"no cell with grade_id {stop_after!r}; ids: {[i for i in ids if i]}")
        nb = copy.deepcopy(nb)
        nb.cells = nb.cells[: ids.index(stop_after) + 1]
    start = time.perf_counter()
    executed = execute(nb, cwd=folder, timeout=timeout)
    report = score_executed(executed, name=label)
    report.seconds = time.perf_counter() - start
    return report
