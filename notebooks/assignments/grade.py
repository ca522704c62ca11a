"""Autograde notebooks: run them and score every graded cell, without a gradebook.

    python notebooks/assignments/grade.py                       # all instructor notebooks
    python notebooks/assignments/grade.py alice/effective_rank.ipynb bob/effective_rank.ipynb
    python notebooks/assignments/grade.py submissions/*/lora_by_hand.ipynb --csv grades.csv

Each notebook is matched to its instructor version by file name; the
instructor's test cells (hidden tests included) and read-only cells are put
back before running, as ``nbgrader autograde`` does, and every test cell earns
its points unless it raises or writes to stderr. Prints one line per graded
cell with the failure message. ``--require-full-marks`` exits with status 1
unless every notebook scores full marks (CI runs this on the instructor
versions).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import coursetools
import nbformat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "notebooks",
        nargs="*",
        type=Path,
        help="notebooks to grade (default: every instructor notebook)",
    )
    parser.add_argument(
        "--source",
        type=Path,
        help="instructor notebook to restore tests from (default: matched by file name)",
    )
    parser.add_argument("--csv", type=Path, help="also write one row per notebook and cell here")
    parser.add_argument(
        "--feedback",
        type=Path,
        help="write each executed notebook (with outputs) into this directory",
    )
    parser.add_argument(
        "--require-full-marks",
        action="store_true",
        help="exit with status 1 unless every notebook gets full marks",
    )
    parser.add_argument(
        "--timeout", type=int, default=coursetools.CELL_TIMEOUT, help="seconds per cell"
    )
    args = parser.parse_args(argv)

    paths = args.notebooks or coursetools.source_notebooks()
    rows, all_full = [], True
    for path in paths:
        report = coursetools.grade(path, source=args.source, timeout=args.timeout)
        print(report.format())
        all_full &= report.full_marks
        for cell in report.cells:
            rows.append(
                {
                    "notebook": str(path),
                    "grade_id": cell.grade_id,
                    "points": cell.points,
                    "max_points": cell.max_points,
                    "message": cell.message,
                }
            )
        if args.feedback:
            target = args.feedback / f"{path.parent.name}__{path.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(report.executed, str(target))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["notebook"])
            writer.writeheader()
            writer.writerows(rows)
    if args.require_full_marks and not all_full:
        print("not every notebook got full marks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
