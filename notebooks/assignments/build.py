"""Build the student versions of every rankkit assignment.

    python notebooks/assignments/build.py            # -> notebooks/assignments/release/
    python notebooks/assignments/build.py --out DIR  # somewhere else

Reads the instructor notebooks in ``source/<assignment>/<notebook>.ipynb`` and
writes ``<out>/<assignment>/<notebook>.ipynb`` with nbgrader's preprocessors:
solutions replaced by ``raise NotImplementedError()``, hidden tests removed,
outputs cleared, test and read-only cells locked. Never edit a student version
by hand; change the instructor version and rebuild. The equivalent with
nbgrader's own command (which also records the assignment in its gradebook) is
``cd notebooks/assignments && nbgrader generate_assignment ASSIGNMENT``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import coursetools


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=coursetools.RELEASE_DIR,
        help=f"output directory (default: {coursetools.RELEASE_DIR})",
    )
    args = parser.parse_args(argv)
    for path in coursetools.build_release(args.out):
        nb = coursetools.read(path)
        n_todo = sum(coursetools.is_solution_cell(c) for c in nb.cells)
        print(f"wrote {path}  ({n_todo} cells to fill, {coursetools.max_points(nb):g} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
