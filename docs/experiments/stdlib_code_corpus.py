"""Token streams and statements of the standard library's own sources (issue 15 probes).

Python ships its standard library as ``.py`` source, so a code corpus needs no download.
This script reads every ``.py`` file under the running interpreter's ``Lib`` folder,
leaving out tests, IDLE, tkinter, lib2to3, turtledemo, the codec tables of
``encodings``, ``pydoc_data`` and ``_sysconfigdata``, plus any file whose two most
frequent tokens are over 40% of it (data tables, not code). Each file becomes:

* ``tokens``: its ``tokenize`` tokens, with comments and blank lines dropped, newlines,
  indents and dedents kept as ``<nl>``, ``<indent>``, ``<dedent>``, and every string and
  number literal replaced by ``<str>`` / ``<num>``;
* ``stmts``: ``(token index, kind)`` for each statement found by ``ast`` (kinds: assign,
  expr, docstring, return, if, loop, raise, import, def, class, try, with).

On Python 3.11.7: 404 files, 1,138,915 tokens. The sources differ between Python
versions, so a task built from them must be frozen into ``data/`` as ``topics`` is.

    python docs/experiments/stdlib_code_corpus.py /tmp/stdlib_code.json
"""

import ast
import io
import json
import os
import sys
import tokenize
from collections import Counter
from pathlib import Path

LIB = Path(os.__file__).parent
LEFT_OUT = ("site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo", "encodings", "pydoc_data")  # fmt: skip
KINDS = {
    "Assign": "assign", "AugAssign": "assign", "AnnAssign": "assign", "Expr": "expr",
    "Return": "return", "If": "if", "For": "loop", "While": "loop", "Raise": "raise",
    "Import": "import", "ImportFrom": "import", "FunctionDef": "def",
    "AsyncFunctionDef": "def", "ClassDef": "class", "Try": "try", "With": "with",
}  # fmt: skip
SKIPPED_TYPES = (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER)
RENAMED_TYPES = {
    tokenize.NEWLINE: "<nl>", tokenize.INDENT: "<indent>", tokenize.DEDENT: "<dedent>",
    tokenize.STRING: "<str>", tokenize.NUMBER: "<num>",
}  # fmt: skip


def tokens_of(source: str) -> list[tuple[str, tuple[int, int]]]:
    """``(token, (row, col))`` for every kept token of ``source``."""
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in SKIPPED_TYPES:
            out.append((RENAMED_TYPES.get(tok.type, tok.string), tok.start))
    return out


def statements(tree: ast.AST, where: dict[tuple[int, int], int]) -> list[tuple[int, str]]:
    """``(index of the statement's first token, kind)`` for the statements of ``tree``."""
    found = []
    for node in ast.walk(tree):
        kind = KINDS.get(type(node).__name__)
        if kind is None or getattr(node, "decorator_list", None):
            continue  # a decorated definition starts at its decorator
        value = getattr(node, "value", None)
        if kind == "expr" and isinstance(value, ast.Constant) and isinstance(value.value, str):
            kind = "docstring"
        start = (node.lineno, node.col_offset)
        if start in where:
            found.append((where[start], kind))
    return sorted(found)


def corpus() -> dict[str, dict]:
    files = {}
    for path in sorted(LIB.rglob("*.py")):
        rel = path.relative_to(LIB)
        if rel.parts[0] in LEFT_OUT or rel.name.startswith("_sysconfigdata"):
            continue
        if "test" in rel.parts or "tests" in rel.parts:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            toks, tree = tokens_of(source), ast.parse(source)
        except (SyntaxError, tokenize.TokenError):
            continue
        words = [t for t, _ in toks]
        top_two = sum(n for _, n in Counter(words).most_common(2))
        if len(words) < 50 or top_two > 0.4 * len(words):
            continue  # a data table, not code
        where = {pos: i for i, (_, pos) in enumerate(toks)}
        files[str(rel)] = {"tokens": words, "stmts": statements(tree, where)}
    return files


if __name__ == "__main__":
    files = corpus()
    n_tokens = sum(len(f["tokens"]) for f in files.values())
    kinds = Counter(k for f in files.values() for _, k in f["stmts"])
    print(f"{len(files)} files, {n_tokens:,} tokens; statements: {kinds.most_common()}")
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps({"files": files}))
