"""``code``: a tiny GPT pretrained on Python's standard library, fine-tuned to fill in a blank.

This is the transformer task with a clear answer: a language model that already
*knows* the answer, and a downstream task that can only read it after fine-tuning.

Text. Python ships its standard library as ``.py`` source, so a code corpus needs
no download. Every ``.py`` file of the interpreter's ``Lib`` folder is read, except
tests, IDLE, tkinter, lib2to3, turtledemo, the codec tables of ``encodings``,
``pydoc_data``, ``_sysconfigdata*`` and any file whose two most frequent tokens
make up over 40% of it (a data table, not code). ``tokenize`` splits each file into
tokens; comments and blank lines are dropped, the end of a logical line, an indent
and a dedent become ``<nl>``, ``<indent>``, ``<dedent>``, and every string and
number literal becomes ``<str>`` / ``<num>``.

Files, not windows, are split. A CRC-32 of each file's path sends it to
pretraining (70%) or to the downstream train / val / test split (10% each), so the
base never reads a file the downstream task trains or evaluates on.

Pretraining. A causal language model over the pretraining files (about 0.78M
tokens on Python 3.11), next-token prediction in 33-token windows. The vocabulary
is ``<unk>``, ``<mask>`` and the 1,022 most frequent pretraining tokens (93%
coverage); ``<mask>`` never occurs in the pretraining text.

Downstream task. *Which token was blanked out?* A window of 32 consecutive tokens
of a downstream file in which the token ``BLANK_OFFSET`` = 3 positions before the
end is replaced by ``<mask>``; the answer is one of eight tokens::

    (   )   .   ,   :   =   <nl>   <str>

(each needs context: ``)`` or ``,`` depends on the argument list, ``:`` or
``<nl>`` on the statement, ``.`` or ``(`` or ``=`` on what follows). 100 / 60 /
100 windows per class are drawn for train / val / test (800 / 480 / 800), with a
seed per split and class, skipping a window already drawn (standard-library
files share some boilerplate, so no window is in two splits). The classifier reads the final position's state (GPT's
choice for a causal model: it is the only position that has seen the blank *and*
the three tokens after it).

Why it suits the question. The answer is in the pretrained network -- its own
next-token guess at the blank, restricted to the eight classes, is usually right
(``docs/tasks.md``) -- but not where a new head on the frozen last state can read
it; fine-tuning has to route it three positions forward. So full fine-tuning gains
a lot over the frozen base and the pretrained body is worth more than a random one
(``docs/tasks.md``); trained in a random subspace of 1,000 dimensions, the
pretrained start reaches far more than a random one (``docs/intrinsic.md``).

Frozen. The standard library differs between Python releases, so everything the
task reads -- the vocabulary, the pretraining token ids, the held-out LM sequences
and the downstream windows -- is built once from Python 3.11.7 and frozen into
``data/code-data.json.gz`` under the manifest's checksum; every Python reads that
file. ``python -m rankkit freeze-data code`` rebuilds it from the running
interpreter (and ``python -m rankkit pretrain code`` the base on top of it).

Model: :class:`~rankkit.tasks.transformer.TinyTransformer` with 2 blocks,
``d = 64``, 4 heads, MLP width 256, context 32, last-position pooling (168k
parameters with the head, 66k of them the embedding).
"""

from __future__ import annotations

import io
import os
import platform
import tokenize
import zlib
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from rankkit.checkpoints import CheckpointError
from rankkit.tasks.base import (
    Task,
    base_metadata,
    freeze_task_data,
    load_frozen_data,
    rebuild_command,
)
from rankkit.tasks.transformer import (
    LanguageModeling,
    TinyTransformer,
    TransformerConfig,
    Vocabulary,
    pretrain_language_model,
)

CLASSES = ("(", ")", ".", ",", ":", "=", "<nl>", "<str>")
MASK_TOKEN = "<mask>"
WINDOW = 32
BLANK_OFFSET = 3  # tokens after the blank, inside the window
PER_CLASS = {"train": 100, "val": 60, "test": 100}
LM_HELD_OUT = 512  # held-out LM sequences per split (val / test files)
VOCAB_SIZE = 1024
SPLIT_SEED = 0
SPLITS = ("train", "val", "test")

LEFT_OUT = ("site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo", "encodings", "pydoc_data")  # fmt: skip
SKIPPED_TYPES = (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER)
RENAMED_TYPES = {
    tokenize.NEWLINE: "<nl>", tokenize.INDENT: "<indent>", tokenize.DEDENT: "<dedent>",
    tokenize.STRING: "<str>", tokenize.NUMBER: "<num>",
}  # fmt: skip


# --------------------------------------------------------------------------- text


def code_tokens(source: str) -> list[str]:
    """The tokens of Python ``source`` as this task sees them (see the module docstring).

    >>> code_tokens("x = f(1, 'a')  # hi")
    ['x', '=', 'f', '(', '<num>', ',', '<str>', ')', '<nl>']
    """
    return [
        RENAMED_TYPES.get(tok.type, tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type not in SKIPPED_TYPES
    ]


def stdlib_files(lib: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """``{path relative to Lib: tokens}`` for the standard library's code files.

    ``lib`` defaults to the running interpreter's ``Lib`` folder. Files that do not
    tokenize, are shorter than 50 tokens, or look like data tables are skipped.
    """
    lib = Path(lib) if lib is not None else Path(os.__file__).parent
    files = {}
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if rel.parts[0] in LEFT_OUT or rel.name.startswith("_sysconfigdata"):
            continue
        if "test" in rel.parts or "tests" in rel.parts:
            continue
        try:
            tokens = code_tokens(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, tokenize.TokenError):
            continue
        top_two = sum(n for _, n in Counter(tokens).most_common(2))
        if len(tokens) >= 50 and top_two <= 0.4 * len(tokens):
            files[rel.as_posix()] = tokens
    return files


def file_group(path: str) -> str:
    """``"pretraining"`` (70%) or the downstream split (10% each), from a CRC-32 of the path."""
    bucket = zlib.crc32(path.encode()) % 10
    return ("train", "val", "test")[bucket] if bucket < 3 else "pretraining"


def build_code_data(lib: str | os.PathLike | None = None) -> dict:
    """Build the task's data from the standard library in ``lib``: the frozen payload.

    Only ``python -m rankkit freeze-data code`` calls this; the task reads the
    frozen result (:func:`code_data`).
    """
    files = stdlib_files(lib)
    groups = {g: [f for f in files if file_group(f) == g] for g in ("pretraining", *SPLITS)}
    vocab = Vocabulary.from_corpus(
        [t for f in groups["pretraining"] for t in files[f]], VOCAB_SIZE, reserved=(MASK_TOKEN,)
    )
    mask = vocab.ids[MASK_TOKEN]
    lm_train = [i for f in groups["pretraining"] for i in vocab.encode(files[f])]
    splits, lm_held_out = {}, {}
    taken: set[tuple[int, ...]] = set()  # no window twice, in one split or two
    for s_index, split in enumerate(SPLITS):
        encoded = [np.array(vocab.encode(files[f])) for f in groups[split]]
        # Language-model check: non-overlapping (WINDOW + 1)-token runs of these files.
        runs = [ids[i : i + WINDOW + 1] for ids in encoded for i in range(0, len(ids) - WINDOW, WINDOW + 1)]  # fmt: skip
        if split != "train":
            pick = np.random.default_rng([SPLIT_SEED, s_index]).permutation(len(runs))
            lm_held_out[split] = [runs[i].tolist() for i in sorted(pick[:LM_HELD_OUT])]
        # Downstream windows: every position whose token is a class, far enough from the ends.
        where: dict[str, list[tuple[int, int]]] = {c: [] for c in CLASSES}
        for k, f in enumerate(groups[split]):
            tokens = files[f]
            for i in range(WINDOW - 1 - BLANK_OFFSET, len(tokens) - BLANK_OFFSET):
                if tokens[i] in where:
                    where[tokens[i]].append((k, i))
        windows, labels = [], []
        for label, token in enumerate(CLASSES):
            rng = np.random.default_rng([SPLIT_SEED, s_index, label])
            drawn = []
            for j in rng.permutation(len(where[token])):
                k, i = where[token][j]
                start = i - (WINDOW - 1 - BLANK_OFFSET)
                window = encoded[k][start : start + WINDOW].tolist()
                window[WINDOW - 1 - BLANK_OFFSET] = mask
                if tuple(window) not in taken:  # boilerplate repeats across files
                    taken.add(tuple(window))
                    drawn.append((j, window))
                if len(drawn) == PER_CLASS[split]:
                    break
            for _, window in sorted(drawn):
                windows.append(window)
                labels.append(label)
        splits[split] = {"ids": windows, "labels": labels}
    return {
        "classes": list(CLASSES),
        "vocab": vocab.tokens,
        "files": groups,
        "lm": {"train": lm_train, **lm_held_out},
        "splits": splits,
    }


@lru_cache(maxsize=1)
def code_data() -> dict:
    """The frozen data (``data/code-data.json.gz``, checksum-verified), never this Python's."""
    return load_frozen_data("code")


@lru_cache(maxsize=1)
def vocabulary() -> Vocabulary:
    """The vocabulary the frozen token ids index."""
    return Vocabulary(code_data()["vocab"])


@lru_cache(maxsize=1)
def _code_splits() -> dict[str, TensorDataset]:
    splits = code_data()["splits"]
    return {
        s: TensorDataset(torch.tensor(splits[s]["ids"]), torch.tensor(splits[s]["labels"]))
        for s in SPLITS
    }


# --------------------------------------------------------------------------- task


class CodeTask(Task):
    """Which of eight tokens was blanked out of a 32-token window of standard-library code?"""

    name = "code"
    description = (
        "2-layer transformer LM-pretrained on Python's standard library (frozen copy), "
        "fine-tuned to fill in a blanked-out token"
    )
    default_hparams = {  # noqa: RUF012
        # Seed 0, val accuracy: full fine-tuning 0.71 / 0.76 / 0.76 / 0.79 at lr 1e-3 and
        # 3e-3 for 10 and 20 epochs; LoRA r = 8 on all-linear 0.77 at 1e-2, 0.66 at 3e-2.
        "epochs": 20,
        "lr": 3e-3,
        "lora_lr": 1e-2,
        "head_lr": 1e-2,
        "batch_size": 32,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup": 0.1,
    }
    config = TransformerConfig(
        vocab_size=VOCAB_SIZE,
        block_size=WINDOW,
        n_layer=2,
        n_head=4,
        d_model=64,
        d_mlp=256,
        dropout=0.1,
        pool="last",
    )
    pretrain_hparams = {  # noqa: RUF012
        "epochs": 4,
        "lr": 3e-3,
        "batch_size": 64,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup": 0.05,
    }

    def _make_model(self) -> nn.Module:
        return TinyTransformer(self.config, n_classes=len(CLASSES))

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(code_data()["classes"])

    def splits(self) -> dict[str, Dataset]:
        return _code_splits()

    def _base_state(self) -> dict[str, torch.Tensor]:
        # The embedding's rows are the frozen vocabulary's ids: a base pretrained on
        # another build of the data would read every token as a different one.
        if base_metadata(self.name).get("vocab") != code_data()["vocab"]:
            raise CheckpointError(
                "base weights of task 'code' were pretrained with another vocabulary than the "
                f"one in data/code-data.json.gz. Rebuild them with: {rebuild_command(self.name)}"
            )
        return super()._base_state()

    def language_modeling(self) -> LanguageModeling:
        """The pretraining task: next-token prediction over the pretraining files."""
        lm = code_data()["lm"]
        return LanguageModeling(
            "code-pretrain",
            torch.tensor(lm["train"]),
            {s: torch.tensor(lm[s]) for s in ("val", "test")},
            block_size=WINDOW,
            stride=WINDOW,
            hparams=self.pretrain_hparams,
        )

    def freeze_data(self) -> dict:
        """Rebuild the frozen data from this interpreter's standard library; return its entry."""
        payload = build_code_data()
        sizes = "/".join(str(len(payload["splits"][s]["labels"])) for s in SPLITS)
        n_files = {g: len(f) for g, f in payload["files"].items()}
        fields = {
            "data": (
                f"the standard library of Python {platform.python_version()}: "
                f"{sum(n_files.values())} files ({n_files['pretraining']} for pretraining, "
                f"{len(payload['lm']['train']):,} tokens); {sizes} train/val/test windows "
                f"from {n_files['train']}/{n_files['val']}/{n_files['test']} other files"
            ),
        }
        return freeze_task_data(self, payload, fields, (code_data, vocabulary, _code_splits))

    def pretrain(self, seed: int = 0, progress: bool = True, device: str = "cpu"):
        """Pretrain the language model; return ``(state, manifest_fields)``."""
        state, fields = pretrain_language_model(
            self.config, self.language_modeling(), seed, progress, device
        )
        train_ids = code_data()["lm"]["train"]
        unknown = sum(i == 0 for i in train_ids) / len(train_ids)
        fields["data"] = (
            f"data/code-data.json.gz: {len(train_ids):,} tokens of the standard library's "
            f"pretraining files, {unknown:.1%} of them <unk>"
        )
        fields["metadata"] = {"vocab": code_data()["vocab"]}
        return state, fields
