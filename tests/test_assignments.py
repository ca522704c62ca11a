"""The course assignments in notebooks/assignments: nbgrader format, student versions, grading.

For every assignment, CI checks that

* the instructor version passes every graded cell, and no other cell fails;
* the generated student version fails at, and only at, the cells a student must fill
  (every test cell fails; nothing else but the students' own cells raises);
* autograding the instructor version gives full marks;
* typical mistakes (squared singular values in the entropy rank, a forgotten alpha / r,
  a non-normalised projection...) lose the points of the right cell, with a helpful message.

The tests that execute notebooks are marked ``slow`` (each notebook runs in well under a
minute); the format checks are fast. They need the ``notebooks`` extra
(``pip install -e '.[notebooks]'``) and are skipped without it.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbgrader")
pytest.importorskip("nbclient")

ASSIGNMENTS = Path(__file__).resolve().parents[1] / "notebooks" / "assignments"


def _load(name: str, module_name: str):
    """Import ``notebooks/assignments/<name>.py`` without adding the folder to ``sys.path``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(module_name, ASSIGNMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# build.py and grade.py `import coursetools`, which finds this module in sys.modules.
coursetools = _load("coursetools", "coursetools")

SOURCES = coursetools.source_notebooks()
IDS = [p.parent.name for p in SOURCES]


def _cells(nb, predicate):
    return [c for c in nb.cells if predicate(c)]


def _grade_id(cell) -> str:
    return coursetools.nbgrader_meta(cell).get("grade_id", "")


@pytest.fixture(scope="module")
def digits_weights():
    """Skip the notebook runs if the digits task's base weights cannot be loaded."""
    from rankkit.tasks import base_status, get_task

    status = base_status(get_task("digits"))
    if not status.startswith("ok"):
        pytest.skip(f"digits base weights unavailable: {status}")


@functools.cache
def _instructor_report(path: Path) -> coursetools.GradeReport:
    """Grade an instructor notebook once per test session (several tests read the report)."""
    return coursetools.grade(path)


# --------------------------------------------------------------------------- format (fast)


def test_at_least_three_assignments():
    assert {p.parent.name for p in SOURCES} >= {
        "01_effective_rank",
        "02_lora_by_hand",
        "03_random_subspace",
    }
    assert len({p.name for p in SOURCES}) == len(SOURCES), "notebook file names must be unique"


@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_source_is_stored_without_outputs(path):
    nb = coursetools.read(path)
    dirty = [
        _grade_id(c) or i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, f"strip the outputs of {path.name} before committing (cells {dirty})"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_nbgrader_metadata(path):
    nb = coursetools.read(path)
    coursetools.student_version(nb)  # runs nbgrader's CheckCellMetadata: raises if invalid
    ids = [_grade_id(c) for c in nb.cells if coursetools.nbgrader_meta(c)]
    assert len(ids) == len(set(ids)), "grade ids must be unique"

    tests = _cells(nb, coursetools.is_test_cell)
    solutions = _cells(nb, coursetools.is_solution_cell)
    assert len(tests) >= 5 and solutions
    for cell in tests:
        meta = coursetools.nbgrader_meta(cell)
        assert meta["points"] > 0 and meta["locked"], _grade_id(cell)
        visible, _, rest = cell.source.partition("### BEGIN HIDDEN TESTS")
        assert "assert" in visible, f"{_grade_id(cell)}: no visible tests"
        assert "### END HIDDEN TESTS" in rest and "assert" in rest, (
            f"{_grade_id(cell)}: no hidden tests"
        )
    for cell in solutions:
        assert cell.cell_type == "code" and "### BEGIN SOLUTION" in cell.source, _grade_id(cell)
        assert not coursetools.nbgrader_meta(cell).get("grade"), "answers are graded by test cells"


@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_student_version_hides_solutions_and_hidden_tests(path):
    source = coursetools.read(path)
    student = coursetools.student_version(source)
    assert len(student.cells) == len(source.cells)
    text = "\n".join(c.source for c in student.cells)
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    for cell in _cells(student, coursetools.is_solution_cell):
        assert "raise NotImplementedError()" in cell.source, _grade_id(cell)
    for cell in _cells(student, coursetools.is_test_cell):
        assert cell.metadata["editable"] is False and cell.metadata["deletable"] is False
        assert "checksum" in coursetools.nbgrader_meta(cell)
    # Everything outside solution regions and hidden tests is the same text.
    for before, after in zip(source.cells, student.cells):
        if not coursetools.is_solution_cell(before) and not coursetools.is_test_cell(before):
            assert before.source == after.source


def test_build_writes_every_student_version(tmp_path):
    build = _load("build", "_assignments_build")
    assert build.main(["--out", str(tmp_path)]) == 0
    for src in SOURCES:
        written = coursetools.read(tmp_path / src.parent.name / src.name)
        assert written == coursetools.student_version(coursetools.read(src))


def test_restore_locked_cells_undoes_tampering():
    source = coursetools.read(SOURCES[0])
    submission = coursetools.student_version(source)
    tests = [i for i, c in enumerate(submission.cells) if coursetools.is_test_cell(c)]
    submission.cells[tests[0]].source = "pass  # the test was in my way"
    del submission.cells[tests[1]]
    solution = next(c for c in submission.cells if coursetools.is_solution_cell(c))
    solution.source = "def entropy_rank(s):\n    return 42.0"

    restored = coursetools.restore_locked_cells(submission, source)
    by_id = {_grade_id(c): c for c in restored.cells if coursetools.nbgrader_meta(c)}
    for cell in source.cells:
        if coursetools.is_test_cell(cell) or coursetools.nbgrader_meta(cell).get("locked"):
            assert by_id[_grade_id(cell)].source == cell.source, _grade_id(cell)
    assert by_id[_grade_id(solution)].source == solution.source, "answers are the student's"
    order = [_grade_id(c) for c in restored.cells if coursetools.nbgrader_meta(c)]
    assert order == [_grade_id(c) for c in source.cells if coursetools.nbgrader_meta(c)]


# --------------------------------------------------------------------------- the runner


def _tiny_notebook():
    """An nbgrader notebook with one passing, one failing and one stderr-writing test."""
    from nbformat.v4 import new_code_cell, new_notebook

    def cell(grade_id, source, **meta):
        c = new_code_cell(source)
        c.metadata["nbgrader"] = {
            "grade": False,
            "solution": False,
            "locked": False,
            "schema_version": 3,
            "task": False,
            "grade_id": grade_id,
            **meta,
        }
        return c

    test = {"grade": True, "locked": True}
    nb = new_notebook(
        cells=[
            cell(
                "answer",
                "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
                solution=True,
            ),
            cell(
                "test_ok",
                "assert double(2) == 4\n### BEGIN HIDDEN TESTS\nassert double(0) == 0\n### END HIDDEN TESTS",
                points=2,
                **test,
            ),
            cell(
                "test_bad",
                "assert double(3) == 7, 'three doubled is six, not seven'",
                points=1,
                **test,
            ),
            cell("test_stderr", "import sys\nprint('careful', file=sys.stderr)", points=1, **test),
        ]
    )
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "language": "python",
        "display_name": "Python 3",
    }
    return nb


def test_grade_scores_cells_like_nbgrader(tmp_path):
    nb = _tiny_notebook()
    report = coursetools.grade(nb, source=False, cwd=tmp_path)
    assert [(c.grade_id, c.points, c.max_points) for c in report.cells] == [
        ("test_ok", 2.0, 2.0),
        ("test_bad", 0.0, 1.0),
        ("test_stderr", 0.0, 1.0),
    ]
    assert report.result("test_bad").message == "AssertionError: three doubled is six, not seven"
    assert "stderr" in report.result("test_stderr").message
    assert report.score == 2 and report.max_score == 4 and not report.full_marks
    assert "FAIL  test_bad" in report.format()

    # A student submission: solution removed, a test "fixed" by the student. Grading restores it.
    student = coursetools.student_version(nb)
    student.cells[2].source = "pass"
    nbformat.write(student, tmp_path / "tiny.ipynb")
    nbformat.write(nb, tmp_path / "tiny_source.ipynb")
    report = coursetools.grade(tmp_path / "tiny.ipynb", source=tmp_path / "tiny_source.ipynb")
    assert report.score == 0
    assert report.result("test_ok").message == "NotImplementedError"


def test_grade_cli_exit_status(tmp_path, capsys):
    grade = _load("grade", "_assignments_grade")
    nb = _tiny_notebook()
    nb.cells = nb.cells[:2]  # only the passing test
    nbformat.write(nb, tmp_path / "tiny.ipynb")
    args = [str(tmp_path / "tiny.ipynb"), "--source", str(tmp_path / "tiny.ipynb")]
    assert grade.main([*args, "--require-full-marks", "--csv", str(tmp_path / "g.csv")]) == 0
    assert "2 / 2 points" in capsys.readouterr().out
    assert "test_ok" in (tmp_path / "g.csv").read_text()

    nb.cells[0].source = "def double(x):\n    return x"
    nbformat.write(nb, tmp_path / "wrong.ipynb")
    args = [str(tmp_path / "wrong.ipynb"), "--source", str(tmp_path / "tiny.ipynb")]
    assert grade.main([*args, "--require-full-marks"]) == 1


# --------------------------------------------------------------------------- nbgrader itself


@pytest.mark.slow
def test_matches_nbgrader_generate_assignment(tmp_path):
    """``nbgrader generate_assignment`` (with its gradebook) writes exactly what build.py writes."""
    course = tmp_path / "course"
    (course / "source").mkdir(parents=True)
    (course / "nbgrader_config.py").write_text((ASSIGNMENTS / "nbgrader_config.py").read_text())
    for src in SOURCES:
        (course / "source" / src.parent.name).mkdir(exist_ok=True)
        (course / "source" / src.parent.name / src.name).write_bytes(src.read_bytes())
    env = dict(os.environ)
    # nbgrader runs the `alembic` executable installed next to this interpreter.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for src in SOURCES:
        run = subprocess.run(
            [sys.executable, "-m", "nbgrader", "generate_assignment", src.parent.name],
            cwd=course,
            env=env,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        released = coursetools.read(course / "release" / src.parent.name / src.name)
        assert released == coursetools.student_version(coursetools.read(src))


# --------------------------------------------------------------------------- running (slow)


@pytest.mark.slow
@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_instructor_version_passes_every_graded_cell(path, digits_weights):
    report = _instructor_report(path)
    failed = [c.grade_id for c in report.cells if not c.passed]
    assert not failed, report.format()
    assert not report.errors, f"cells raised in the instructor version: {report.errors}"
    assert report.seconds < 120, (
        f"{path.name} took {report.seconds:.0f}s; keep it under two minutes"
    )


@pytest.mark.slow
@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_autograding_instructor_version_gives_full_marks(path, digits_weights):
    report = _instructor_report(path)
    source = coursetools.read(path)
    assert report.full_marks, report.format()
    assert report.score == coursetools.max_points(source) > 0
    assert [c.grade_id for c in report.cells] == [
        _grade_id(c) for c in source.cells if coursetools.is_test_cell(c)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_student_version_fails_only_where_students_work(path, digits_weights):
    student = coursetools.student_version(coursetools.read(path))
    report = coursetools.grade(student, source=False, cwd=path.parent, name=f"student {path.name}")
    passed = [c.grade_id for c in report.cells if c.points > 0]
    assert not passed, f"test cells that pass without any student work: {passed}"
    mine = {
        _grade_id(c)
        for c in student.cells
        if coursetools.is_solution_cell(c) or coursetools.is_test_cell(c)
    }
    elsewhere = {cell: error for cell, error in report.errors.items() if cell not in mine}
    assert not elsewhere, f"cells that students do not fill failed: {elsewhere}"
    for cell in report.cells:
        assert cell.message.startswith(("NotImplementedError", "NameError")), (
            cell.grade_id,
            cell.message,
        )


class Mistake(NamedTuple):
    """A typical wrong answer: ``right`` replaced by ``wrong`` in solution cell ``cell``."""

    notebook: str
    cell: str
    right: str
    wrong: str
    test: str  # the test cell that must fail...
    message: str  # ...with this in its message


MISTAKES = {
    "entropy-rank-squared": Mistake(
        notebook="01_effective_rank",
        cell="entropy_rank",
        right="p = s / total",
        wrong="p = s**2 / (s**2).sum()",
        test="test_entropy_rank",
        message="SQUARED singular values",
    ),
    "energy-rank-not-squared": Mistake(
        notebook="01_effective_rank",
        cell="energy_rank",
        right="energy = np.sort(s)[::-1] ** 2",
        wrong="energy = np.sort(s)[::-1]",
        test="test_energy_rank",
        message="the energy is the squared singular values",
    ),
    "lora-missing-alpha-over-r": Mistake(
        notebook="02_lora_by_hand",
        cell="lora_layer",
        right="return out + self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)",
        wrong="return out + (x @ self.lora_A.T) @ self.lora_B.T",
        test="test_lora_forward",
        message="without the scaling",
    ),
    "lora-merged-forward-double-counts": Mistake(
        notebook="02_lora_by_hand",
        cell="lora_layer",
        right="        if self.merged:\n            return out\n",
        wrong="",
        test="test_lora_merge",
        message="adds the update a second time",
    ),
    "projection-not-normalised": Mistake(
        notebook="03_random_subspace",
        cell="dense_projection",
        right="return P / P.norm(dim=0, keepdim=True)",
        wrong="return P",
        test="test_dense_projection",
        message="P is not normalised",
    ),
    "projection-divided-by-sqrt-D": Mistake(
        notebook="03_random_subspace",
        cell="dense_projection",
        right="return P / P.norm(dim=0, keepdim=True)",
        wrong="return P / D**0.5",
        test="test_dense_projection",
        message="normalise each column by its own norm",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("mistake", MISTAKES.values(), ids=MISTAKES.keys())
def test_common_mistake_loses_points_with_helpful_message(mistake, digits_weights):
    source_path = coursetools.find_source(mistake.notebook)
    source = coursetools.read(source_path)
    submission = coursetools.student_version(source)
    instructor_cells = {_grade_id(c): c for c in source.cells if coursetools.nbgrader_meta(c)}
    for cell in submission.cells:
        if coursetools.is_solution_cell(cell):  # a student who solved everything...
            cell.source = instructor_cells[_grade_id(cell)].source
    target = next(c for c in submission.cells if _grade_id(c) == mistake.cell)
    assert mistake.right in target.source
    target.source = target.source.replace(mistake.right, mistake.wrong)  # ...but this
    # and who "fixed" the failing test: grading restores the instructor's test cell.
    next(c for c in submission.cells if _grade_id(c) == mistake.test).source = "pass"

    report = coursetools.grade(
        submission, source=source, stop_after=mistake.test, cwd=source_path.parent
    )
    result = report.result(mistake.test)
    assert result.points == 0, report.format()
    assert mistake.message in result.message, result.message
    others = [c.grade_id for c in report.cells if c.grade_id != mistake.test and not c.passed]
    assert not others, f"only {mistake.test} should fail: {report.format()}"
