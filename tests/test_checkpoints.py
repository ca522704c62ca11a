"""The checkpoints people have: model folders, shards, wrapper prefixes, new heads, adapters.

Ground truth: planted rank-k updates must be found through every layout, an adapter's
spectra from its factors must equal svdvals of PEFT's own merged ΔW, and every broken
input must name the file and the fix.
"""

from __future__ import annotations

import gc
import json
import math
import weakref

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import rankkit
from rankkit.adapters import open_adapter
from rankkit.checkpoints import (
    Checkpoint,
    CheckpointError,
    TensorInfo,
    match_checkpoints,
    open_checkpoint,
    save_state_dict,
)
from rankkit.cli import main
from rankkit.spectra import demo_pair, lowrank_singular_values


def planted(shape, k, seed, strength=0.5, noise=1e-4):
    """A rank-k matrix with singular values strength·(1, 0.8, 0.6, ...) plus Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    U = torch.linalg.qr(torch.randn(m, k, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=gen))[0]
    s = strength * torch.linspace(1.0, 0.4, k)
    return U @ torch.diag(s) @ V.T + noise * torch.randn(m, n, generator=gen)


class Block(nn.Module):
    def __init__(self, d=24):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc = nn.Linear(d, 2 * d)
        self.norm = nn.LayerNorm(2 * d)

    def forward(self, x):
        h = self.o(torch.softmax(self.q(x) @ self.k(x).mT, -1) @ self.v(x))
        return self.norm(self.fc(h))


# --------------------------------------------------------------------------- layouts


def test_prefixes_new_heads_dropped_buffers_and_resized_matrices_are_reported(tmp_path):
    torch.manual_seed(0)
    base = {
        "embeddings.word.weight": torch.randn(50, 24),
        "embeddings.position_ids": torch.arange(16)[None],
        "encoder.0.q.weight": torch.randn(24, 24),
        "encoder.0.q.bias": torch.randn(24),
        "encoder.0.fc.weight": torch.randn(48, 24),
    }
    tuned = {"bert." + k: v.clone() for k, v in base.items() if k != "embeddings.position_ids"}
    tuned["bert.embeddings.word.weight"] = torch.randn(52, 24)  # resized vocabulary
    tuned["bert.encoder.0.q.weight"] += planted((24, 24), 2, seed=1)
    tuned["bert.encoder.0.fc.weight"] += planted((48, 24), 3, seed=2)
    tuned["classifier.weight"] = torch.randn(5, 24)
    save_state_dict(base, tmp_path / "base.safetensors")
    save_state_dict(tuned, tmp_path / "tuned.safetensors")

    report = rankkit.rank_report(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    assert dict(zip(report["name"], report["dW_optimal"])) == {
        "encoder.0.q.weight": 2,
        "encoder.0.fc.weight": 3,
    }
    skipped = report.attrs["skipped"]
    assert skipped["embeddings.position_ids"] == "only in base"
    assert skipped["classifier.weight"].startswith("only in fine-tuned")
    assert skipped["embeddings.word.weight"] == "shape changed: (50, 24) -> (52, 24)"
    assert skipped["encoder.0.q.bias"] == "1-D (bias or norm)"
    assert "removing 'bert.' from finetuned" in report.attrs["source"]


@pytest.mark.parametrize(
    ("base_prefix", "tuned_prefix"),
    [("", ""), ("", "model."), ("base_model.model.", ""), ("transformer.", "model.decoder.")],
)
def test_wrapper_prefix_is_detected_from_the_names(base_prefix, tuned_prefix):
    names = [f"layers.{i}.{p}.weight" for i in range(3) for p in ("q", "v")] + ["lm_head.weight"]
    base = Checkpoint(
        {base_prefix + n: TensorInfo((4, 4), "float32", "b") for n in names}, read=None,
        description="b",
    )  # fmt: skip
    tuned = Checkpoint(
        {tuned_prefix + n: TensorInfo((4, 4), "float32", "t") for n in names}, read=None,
        description="t",
    )  # fmt: skip
    matching = match_checkpoints(base, tuned)
    assert (matching.base_prefix, matching.finetuned_prefix) == (base_prefix, tuned_prefix)
    assert sorted(p.name for p in matching.pairs) == sorted(names)
    assert not matching.skipped


def test_a_prefix_never_strips_names_down_to_their_last_component():
    def ckpt(names):
        return Checkpoint({n: TensorInfo((4, 4), "float32", "x") for n in names}, None, "x")

    with pytest.raises(CheckpointError, match="share no weight matrix"):
        match_checkpoints(ckpt(["encoder.q.weight"]), ckpt(["decoder.k.weight"]))
    matching = match_checkpoints(ckpt(["fc.weight", "out.weight"]),
                                 ckpt(["model.fc.weight", "model.out.weight"]))  # fmt: skip
    assert matching.finetuned_prefix == "model." and len(matching.pairs) == 2


def test_sharded_safetensors_and_sharded_bin_folders_read_like_one_file(tmp_path):
    block = Block()
    state = {k: v.detach().clone() for k, v in block.state_dict().items()}
    keys = list(state)
    for kind, save in (
        ("safetensors", lambda part, path: save_state_dict(part, path)),
        ("bin", lambda part, path: torch.save(part, path)),
    ):
        folder = tmp_path / kind
        folder.mkdir()
        name = "model" if kind == "safetensors" else "pytorch_model"
        weight_map = {}
        for i, chunk in enumerate((keys[:5], keys[5:])):
            shard = f"{name}-0000{i + 1}-of-00002.{kind}"
            save({k: state[k] for k in chunk}, folder / shard)
            weight_map.update(dict.fromkeys(chunk, shard))
        (folder / f"{name}.{kind}.index.json").write_text(json.dumps({"weight_map": weight_map}))
        ckpt = open_checkpoint(folder)
        assert "2 " in ckpt.description and sorted(ckpt) == sorted(keys)
        for k in keys:
            torch.testing.assert_close(ckpt[k], state[k], rtol=0, atol=0)


def test_analysis_reads_one_layer_at_a_time():
    """Each pair of tensors is read, analysed and released before the next is read."""
    d, n_layers = 32, 6
    gen = torch.Generator().manual_seed(0)
    weights = {f"l{i}.weight": torch.randn(d, d, generator=gen) for i in range(n_layers)}
    alive: list[weakref.ref] = []
    reads: list[tuple[str, int]] = []

    def reader(shift):
        def read(key):
            gc.collect()
            reads.append((key, sum(r() is not None for r in alive)))
            tensor = weights[key] + shift * torch.eye(d)  # a fresh tensor every read
            alive.append(weakref.ref(tensor))
            return tensor

        return read

    info = {k: TensorInfo((d, d), "float32", "memory") for k in weights}
    base = Checkpoint(info, reader(0.0), "lazy base")
    tuned = Checkpoint(info, reader(1.0), "lazy tuned")
    report = rankkit.rank_report(base, tuned)
    assert (report["dW_numerical"] == d).all()  # ΔW = I
    # Never more than the current layer's base, tuned and W tensors alive at a read.
    assert max(n for _, n in reads) <= 2
    assert len(reads) == 3 * n_layers  # base + tuned for ΔW, tuned again for W


# --------------------------------------------------------------------------- MiniLM


@pytest.fixture(scope="module")
def minilm_pair(tmp_path_factory):
    """MiniLM's packaged folder and a classifier fine-tune saved sharded by transformers."""
    transformers = pytest.importorskip("transformers")
    from rankkit.tasks.minilm import packaged_model_dir

    try:
        base_dir = packaged_model_dir()
    except Exception as err:  # the hf extra is not installed
        pytest.skip(f"MiniLM package not installed: {err}")
    config = transformers.AutoConfig.from_pretrained(base_dir, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    base_state = open_checkpoint(base_dir)
    missing, _ = model.bert.load_state_dict({k: base_state[k] for k in base_state}, strict=False)
    assert not missing
    k = 3
    with torch.no_grad():
        for i, (_, param) in enumerate(model.bert.encoder.named_parameters()):
            if param.ndim == 2:
                param += planted(tuple(param.shape), k, seed=i)
    out = tmp_path_factory.mktemp("minilm") / "classifier"
    model.save_pretrained(out, max_shard_size="30MB")
    return base_dir, out, k


@pytest.mark.slow
def test_minilm_folder_against_a_sharded_classifier_finds_the_planted_rank(minilm_pair, capsys):
    base_dir, tuned_dir, k = minilm_pair
    assert (tuned_dir / "model.safetensors.index.json").exists()
    report = rankkit.rank_report(base_dir, tuned_dir)
    encoder = report[report["name"].str.startswith("encoder.")]
    assert len(encoder) == 6 * 6  # q, k, v, attention out, intermediate, output per layer
    assert (encoder["dW_optimal"] == k).all(), encoder[["name", "dW_optimal"]]
    skipped = report.attrs["skipped"]
    assert skipped["classifier.weight"].startswith("only in fine-tuned")
    assert skipped["embeddings.position_ids"] == "only in base"
    assert "shard" in report.attrs["source"]

    assert main(["spectrum", str(base_dir), str(tuned_dir), "--quiet", "--layers", "query"]) == 0
    out = capsys.readouterr().out
    assert "layer.5.attention.self.query.weight" in out and "'bert.' from finetuned" in out
    assert "only in fine-tuned (a new head or module): classifier.bias, classifier.weight" in out


# --------------------------------------------------------------------------- PEFT adapters


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """Adapters written by PEFT itself, with random B (init_lora_weights=False)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(Block(), Block())
    out = {}
    cases = {
        "plain": dict(r=4, lora_alpha=8),
        "patterns": dict(r=4, lora_alpha=8, rank_pattern={"fc": 2, "0.v": 6},
                         alpha_pattern={"o": 32}),
        "rslora": dict(r=8, lora_alpha=4, use_rslora=True),
    }  # fmt: skip
    for name, kw in cases.items():
        torch.manual_seed(1)
        config = peft.LoraConfig(target_modules=["q", "v", "o", "fc"], init_lora_weights=False,
                                 **kw)  # fmt: skip
        model = peft.get_peft_model(_copy(base), config)
        path = tmp_path_factory.mktemp("adapters") / name
        model.save_pretrained(path)
        merged = model.merge_and_unload()
        deltas = {
            f"{n}.weight": (m.weight - base.get_submodule(n).weight).detach().double()
            for n, m in merged.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ("q", "v", "o", "fc")
        }
        out[name] = (path, deltas, kw)
    base_path = tmp_path_factory.mktemp("base") / "base.safetensors"
    save_state_dict(base, base_path)
    return base, base_path, out


def _copy(module):
    import copy

    return copy.deepcopy(module)


@pytest.mark.parametrize("case", ["plain", "patterns", "rslora"])
def test_adapter_spectra_from_factors_equal_svdvals_of_peft_merged_update(peft_adapters, case):
    _, _, adapters = peft_adapters
    path, deltas, kw = adapters[case]
    adapter = open_adapter(path)
    assert sorted(f"{m}.weight" for m in adapter.modules) == sorted(deltas)
    for module, info in adapter.modules.items():
        truth = torch.linalg.svdvals(deltas[f"{module}.weight"]).numpy()
        B, A, scale = adapter.factors(module)
        ours = lowrank_singular_values(B, A, scale)
        np.testing.assert_allclose(ours, truth, rtol=1e-5, atol=1e-5 * truth[0])
        expected_r = kw["r"]
        for key, r in kw.get("rank_pattern", {}).items():
            if module.endswith(key):
                expected_r = r
        assert info.r == expected_r
    report = rankkit.rank_report(path)
    assert dict(zip(report["name"], report["dW_numerical"])) == {
        f"{m}.weight": info.r for m, info in adapter.modules.items()
    }
    for _, row in report.iterrows():
        dW = deltas[row["name"]]
        assert row["norm_dW"] == pytest.approx(float(torch.linalg.norm(dW)), rel=1e-5)
        assert row["dW_entropy"] == pytest.approx(rankkit.effective_rank(dW), rel=1e-5)


def test_adapter_with_its_base_adds_weight_columns_and_amplification(peft_adapters):
    base, base_path, adapters = peft_adapters
    path, deltas, _ = adapters["patterns"]
    report = rankkit.rank_report(base_path, path).set_index("name")
    for name, dW in deltas.items():
        W0 = base.state_dict()[name].double()
        row = report.loc[name]
        r = int(row["lora_r"])
        assert row["amplification"] == pytest.approx(
            rankkit.amplification_factor(dW, W0, r), rel=1e-5
        )
        assert row["W_stable"] == pytest.approx(rankkit.effective_rank(W0 + dW, "stable"), rel=1e-5)
        assert row["norm_W"] == pytest.approx(float(torch.linalg.norm(W0 + dW)), rel=1e-5)
    skipped = report.attrs["skipped"]
    assert skipped["0.k.weight"] == skipped["0.norm.weight"] == "not adapted"


def test_adapter_cli_alone_and_with_base(peft_adapters, capsys):
    _, base_path, adapters = peft_adapters
    path = adapters["plain"][0]
    assert main(["spectrum", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "LoRA modules" in out and "1.fc.weight" in out
    assert main(["spectrum", str(base_path), str(path), "--quiet"]) == 0
    assert "amplif." in capsys.readouterr().out


def test_lowrank_singular_values_handle_wide_and_tall_factors():
    gen = torch.Generator().manual_seed(0)
    for m, r, n in ((40, 3, 7), (5, 8, 30), (6, 6, 6)):
        B, A = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
        np.testing.assert_allclose(
            lowrank_singular_values(B, A, 0.5),
            torch.linalg.svdvals(0.5 * (B.double() @ A.double())).numpy(),
            rtol=1e-10,
            atol=1e-12,
        )


# --------------------------------------------------------------------------- bad input


def test_folder_without_weights_names_the_folder_and_what_is_expected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds no weights.*model\.safetensors"):
        rankkit.rank_report(tmp_path, tmp_path)


def test_index_naming_a_missing_shard(tmp_path):
    save_state_dict({"a.weight": torch.ones(2, 2)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                            "b.weight": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing: model-00002-of-00002\.safetensors"):
        open_checkpoint(tmp_path)


def test_truncated_shard_names_the_shard(tmp_path):
    shards = {"model-00001-of-00002.safetensors": "a.weight",
              "model-00002-of-00002.safetensors": "b.weight"}  # fmt: skip
    for shard, key in shards.items():
        save_state_dict({key: torch.ones(64, 64)}, tmp_path / shard)
    index = {"weight_map": {key: shard for shard, key in shards.items()}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(open_checkpoint(tmp_path)) == 2
    second = tmp_path / "model-00002-of-00002.safetensors"
    second.write_bytes(second.read_bytes()[:-100])  # an interrupted download
    with pytest.raises(
        CheckpointError, match=r"model-00002-of-00002\.safetensors.*truncated or corrupt.*download"
    ):
        open_checkpoint(tmp_path)


def test_a_text_file_renamed_pt_never_suggests_unpickling(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        open_checkpoint(path)
    assert "weights_only=False" not in str(err.value)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"peft_type": "LOHA"}, r"peft_type is 'LOHA'"),
        ({"use_dora": True}, r"use_dora=True: DoRA"),
        ({"rank_pattern": {"q": 3}}, r"rank 3 \(rank_pattern\['q'\]\) but its lora_A has 4 rows"),
    ],
)
def test_adapters_rankkit_cannot_read_faithfully_are_refused(peft_adapters, tmp_path, setting,
                                                             message):  # fmt: skip
    import shutil

    source = peft_adapters[2]["plain"][0]
    shutil.copytree(source, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(setting)
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        rankkit.rank_report(tmp_path / "adapter")


def test_adapter_that_does_not_fit_the_base(peft_adapters):
    _, _, adapters = peft_adapters
    wrong_base = {f"{i}.{p}.weight": torch.randn(30, 30) for i in (0, 1) for p in "qkvo"}
    with pytest.raises(CheckpointError, match=r"does not fit this base.*Pass the base model"):
        rankkit.rank_report(wrong_base, adapters["plain"][0])


def test_fp8_weights_are_refused_with_the_file_and_the_fix(tmp_path):
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        pytest.skip("this torch has no float8")
    save_state_dict({"w.weight": torch.randn(8, 8)}, tmp_path / "base.safetensors")
    save_state_dict({"w.weight": torch.randn(8, 8).to(fp8)}, tmp_path / "fp8.safetensors")
    with pytest.raises(CheckpointError, match=r"fp8\.safetensors.*F8_E4M3.*dequantize"):
        rankkit.rank_report(tmp_path / "base.safetensors", tmp_path / "fp8.safetensors")


@pytest.mark.slow
def test_layers_in_worker_processes_equal_one_process(tmp_path):
    base, tuned = demo_pair(seed=1)
    save_state_dict(base, tmp_path / "base.safetensors")
    save_state_dict(tuned, tmp_path / "tuned.safetensors")
    one = rankkit.rank_report(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
    two = rankkit.rank_report(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", jobs=2)
    # Worker processes use fewer threads, so LAPACK may round differently in the last bits.
    pd.testing.assert_frame_equal(one, two, rtol=1e-6)
    assert one.attrs == two.attrs
    assert not math.isnan(one["dW_entropy"].iloc[0])
