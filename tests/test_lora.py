"""rankkit.lora on its own: init, merge, training, patterns, files and errors.

Parity with the reference implementation (PEFT) lives in test_lora_peft.py.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from torch import nn

from rankkit.checkpoints import load_state_dict
from rankkit.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapter,
    lora_delta_weights,
    lora_state_dict,
    merge_and_unload,
    save_adapter,
)

D, VOCAB, CLASSES, T = 16, 50, 3, 8


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(x.shape[-1])
        return self.o(scores.softmax(-1) @ self.v(x))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2, self.mlp = (
            nn.LayerNorm(d),
            Attention(d),
            nn.LayerNorm(d),
            MLP(d),
        )

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Module names as in rankkit's ``topics`` task: blocks.{i}.attn.q/k/v/o, mlp.fc1/fc2, head."""

    def __init__(self, d: int = D, n_blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n_blocks))
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


@pytest.fixture
def base():
    torch.manual_seed(0)
    return TinyTransformer()


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (5, T), generator=torch.Generator().manual_seed(1))


def lora(base, **kwargs):
    kwargs.setdefault("target_modules", ["q", "v"])
    return apply_lora(copy.deepcopy(base), LoraConfig(**kwargs))


def train_steps(model, tokens, steps=3, lr=1e-2):
    labels = torch.arange(tokens.shape[0]) % CLASSES
    # Every parameter goes to the optimiser, weight decay included: only requires_grad
    # may decide what moves.
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        opt.step()


# --------------------------------------------------------------------------- the layer


def test_forward_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 5), r=2, lora_alpha=3, init_lora_weights=False)
    x = torch.randn(4, 6)
    W, b, A, B = layer.base_layer.weight, layer.base_layer.bias, layer.lora_A, layer.lora_B
    assert A.shape == (2, 6) and B.shape == (5, 2)
    expected = x @ W.T + b + (3 / 2) * x @ A.T @ B.T
    torch.testing.assert_close(layer(x), expected)
    assert not W.requires_grad and not b.requires_grad and A.requires_grad and B.requires_grad


@pytest.mark.parametrize("init", ["kaiming", True, "gaussian"])
def test_fresh_adapter_is_bit_identical_to_base(base, tokens, init):
    model = lora(base, target_modules="all-linear", init_lora_weights=init, r=3, lora_alpha=16)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            assert layer.lora_A.abs().sum() > 0  # A random, so only B = 0 keeps the output
            assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.equal(model(tokens), base(tokens))


def test_init_distributions():
    torch.manual_seed(0)
    big = nn.Linear(400, 300)
    kaiming = LoRALinear(big, r=64, init_lora_weights="kaiming").lora_A
    bound = 1 / math.sqrt(400)  # kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert kaiming.abs().max() <= bound and kaiming.abs().max() > 0.99 * bound
    gaussian = LoRALinear(big, r=64, init_lora_weights="gaussian").lora_A
    assert gaussian.std().item() == pytest.approx(1 / 64, rel=0.05)


def test_seeded_apply_lora_is_reproducible_and_leaves_the_global_generator_alone(base):
    def a_matrices(model):
        return [m.lora_A.detach().clone() for m in model.modules() if isinstance(m, LoRALinear)]

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = a_matrices(
        apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q", "v"]), seed=7)
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drawn from it
    again = a_matrices(
        apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q", "v"]), seed=7)
    )
    other = a_matrices(
        apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q", "v"]), seed=8)
    )
    assert len(first) == 2 * len(base.blocks)  # q and v of every block
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))
    # Without a seed the global generator decides, as before.
    torch.manual_seed(5)
    unseeded = a_matrices(
        apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q", "v"]))
    )
    torch.manual_seed(5)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            unseeded,
            a_matrices(apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q", "v"]))),
        )
    )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_keeps_output_and_puts_top_singular_triplets_in_the_adapter(base, tokens, use_rslora):
    model = lora(base, init_lora_weights="pissa", r=3, lora_alpha=5, use_rslora=use_rslora)
    torch.testing.assert_close(model(tokens), base(tokens), rtol=0, atol=1e-5)
    layer = model.blocks[0].attn.q
    W = base.blocks[0].attn.q.weight.detach()
    U, S, Vh = torch.linalg.svd(W)
    top = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    with torch.no_grad():
        torch.testing.assert_close(layer.delta_weight(), top, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight, W - top, rtol=0, atol=1e-5)
        # the residual's spectrum is W's with the top 3 values removed
        torch.testing.assert_close(
            torch.linalg.svdvals(layer.base_layer.weight)[: D - 3], S[3:], rtol=0, atol=1e-5
        )


# --------------------------------------------------------------------------- merging


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_and_unmerged_forwards_agree(base, tokens, use_rslora):
    model = lora(
        base,
        target_modules="all-linear",
        init_lora_weights=False,
        r=3,
        lora_alpha=7,
        use_rslora=use_rslora,
        lora_dropout=0.1,
    ).eval()
    unmerged = model(tokens)
    assert not torch.allclose(unmerged, base(tokens), atol=1e-3)  # the adapters do something
    q = model.blocks[0].attn.q
    W0 = q.base_layer.weight.detach().clone()
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            layer.merge()
    torch.testing.assert_close(model(tokens), unmerged, rtol=0, atol=1e-5)
    scaling = 7 / math.sqrt(3) if use_rslora else 7 / 3
    torch.testing.assert_close(q.base_layer.weight, W0 + scaling * q.lora_B @ q.lora_A)

    merged_weight = q.base_layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        q.merge()
    assert torch.equal(q.base_layer.weight, merged_weight)  # a second merge is a no-op

    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            layer.unmerge()
    torch.testing.assert_close(q.base_layer.weight, W0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(tokens), unmerged, rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="not merged"):
        q.unmerge()


def test_merged_forward_does_not_touch_the_adapter():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), r=2, init_lora_weights=False)
    x = torch.randn(3, 8)
    layer.merge()
    expected = layer.base_layer(x)
    with torch.no_grad():
        layer.lora_A.fill_(float("nan"))  # any use of A would now poison the output
    assert torch.equal(layer(x), expected)


def test_merge_and_unload_leaves_a_plain_model(base, tokens):
    model = lora(base, target_modules="all-linear", init_lora_weights=False, r=2)
    expected = model(tokens)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    assert type(plain.blocks[1].mlp.fc2) is nn.Linear
    assert set(plain.state_dict()) == set(base.state_dict())
    assert not hasattr(plain, "rankkit_lora_config")
    torch.testing.assert_close(plain(tokens), expected, rtol=0, atol=1e-5)
    # a fresh TinyTransformer accepts the merged weights: the checkpoint is plain
    TinyTransformer().load_state_dict(plain.state_dict())


# --------------------------------------------------------------------------- training


def test_only_adapters_and_modules_to_save_change(base, tokens):
    model = lora(base, target_modules=["q", "v", "fc1"], modules_to_save=["head"], r=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, tokens)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k for k in before if k.endswith(("lora_A", "lora_B")) or k.startswith("head.")}
    assert changed == trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_count_parameters(base):
    model = lora(base, target_modules=["q", "fc1"], r=2, modules_to_save=["head"])
    trainable = 2 * (2 * (D + D) + 2 * (D + 2 * D)) + (D * CLASSES + CLASSES)
    total = sum(p.numel() for p in base.parameters()) + 2 * (2 * (D + D) + 2 * (D + 2 * D))
    count = count_parameters(model)
    assert (count.trainable, count.total) == (trainable, total)
    assert count.fraction == pytest.approx(trainable / total)


def test_lora_delta_weights_equal_merged_minus_base(base, tokens):
    model = lora(base, r=2, lora_alpha=3, use_rslora=True)
    train_steps(model, tokens)
    deltas = lora_delta_weights(model)
    assert sorted(deltas) == sorted(f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q", "v"))
    merged = merge_and_unload(copy.deepcopy(model)).state_dict()
    for name, delta in deltas.items():
        assert delta.dtype == torch.float32 and delta.shape == (D, D)
        assert torch.linalg.matrix_rank(delta) <= 2
        torch.testing.assert_close(
            delta, merged[f"{name}.weight"] - base.state_dict()[f"{name}.weight"], atol=1e-6, rtol=0
        )


def test_lora_state_dict_restores_the_adapter(base, tokens):
    model = lora(base, modules_to_save=["head"], r=2)
    train_steps(model, tokens)
    state = lora_state_dict(model)
    assert set(state) == {
        *(f"blocks.{i}.attn.{p}.lora_{m}" for i in range(2) for p in "qv" for m in "AB"),
        "head.weight",
        "head.bias",
    }
    fresh = lora(base, modules_to_save=["head"], r=2)
    assert not torch.equal(fresh(tokens), model(tokens))
    fresh.load_state_dict(state, strict=False)
    assert torch.equal(fresh(tokens), model(tokens))


# --------------------------------------------------------------------------- targets and patterns


def names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))


def test_target_module_forms(base):
    q_and_v = [f"blocks.{i}.attn.{p}" for i in range(2) for p in "qv"]
    assert names(lora(base, target_modules=["q", "v"])) == q_and_v
    assert names(lora(base, target_modules=r"blocks\.\d\.attn\.(q|v)")) == q_and_v
    assert names(lora(base, target_modules=["blocks.0.mlp.fc2"])) == ["blocks.0.mlp.fc2"]
    everything = names(lora(base, target_modules="all-linear", r=2))
    assert len(everything) == 2 * 6 + 1 and "head" in everything
    # the classifier head trained in full is not also given an adapter
    with_head = lora(base, target_modules="all-linear", modules_to_save=["head"], r=2)
    assert names(with_head) == sorted(set(everything) - {"head"})
    assert with_head.head.weight.requires_grad


def test_roles_resolve_names_that_are_not_suffixes(base):
    roles = {"query": ["blocks.0.attn.q", "blocks.1.attn.q"], "classifier": ["head"]}
    config = LoraConfig(target_modules=["query", "fc2"], modules_to_save=["classifier"])
    model = apply_lora(copy.deepcopy(base), config, roles=roles)
    assert names(model) == [
        "blocks.0.attn.q",
        "blocks.0.mlp.fc2",
        "blocks.1.attn.q",
        "blocks.1.mlp.fc2",
    ]
    assert model.rankkit_lora_config.modules_to_save == ["head"]

    class Task:  # anything with a .roles mapping, e.g. rankkit.tasks.get_task("topics")
        pass

    Task.roles = roles
    model = apply_lora(copy.deepcopy(base), LoraConfig(target_modules=["query"]), roles=Task())
    assert names(model) == ["blocks.0.attn.q", "blocks.1.attn.q"]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns(base, use_rslora):
    model = lora(
        base,
        target_modules=["q", "v", "fc1"],
        r=4,
        lora_alpha=8,
        use_rslora=use_rslora,
        rank_pattern={"blocks.1.attn.q": 2, "fc1": 3},
        alpha_pattern={"v": 32},
    )
    expected = {  # name: (r, alpha, in, out)
        "blocks.0.attn.q": (4, 8, D, D),
        "blocks.1.attn.q": (2, 8, D, D),
        "blocks.0.attn.v": (4, 32, D, D),
        "blocks.1.attn.v": (4, 32, D, D),
        "blocks.0.mlp.fc1": (3, 8, D, 2 * D),
        "blocks.1.mlp.fc1": (3, 8, D, 2 * D),
    }
    assert names(model) == sorted(expected)
    for name, (r, alpha, n_in, n_out) in expected.items():
        layer = model.get_submodule(name)
        assert layer.lora_A.shape == (r, n_in) and layer.lora_B.shape == (n_out, r)
        assert layer.scaling == pytest.approx(alpha / (math.sqrt(r) if use_rslora else r))


# --------------------------------------------------------------------------- files


def test_save_load_round_trip_is_exact(base, tokens, tmp_path):
    model = lora(
        base,
        target_modules=["q", "v", "fc1"],
        modules_to_save=["head"],
        rank_pattern={"fc1": 2},
        alpha_pattern={"blocks.1.attn.v": 3},
        use_rslora=True,
        r=4,
    )
    train_steps(model, tokens)
    saved = save_adapter(model, tmp_path / "adapter")

    keys = set(load_state_dict(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.blocks.0.attn.q.lora_A.weight" in keys
    assert "base_model.model.blocks.1.mlp.fc1.lora_B.weight" in keys
    assert "base_model.model.head.weight" in keys and len(keys) == 6 * 2 + 2
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_rslora"] is True
    assert config["rank_pattern"] == {"blocks.0.mlp.fc1": 2, "blocks.1.mlp.fc1": 2}
    assert config["alpha_pattern"] == {"blocks.1.attn.v": 3}
    assert saved.adapter_bytes < saved.full_model_bytes

    for target in (copy.deepcopy(base), lora(base, **_config_kwargs(model))):
        loaded = load_adapter(target, tmp_path / "adapter")
        assert torch.equal(loaded(tokens), model(tokens))
        assert names(loaded) == names(model)


def _config_kwargs(model):
    config = model.rankkit_lora_config
    return {
        "target_modules": config.target_modules,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "use_rslora": config.use_rslora,
        "r": config.r,
    }


def test_pissa_adapter_reloads_onto_the_original_base(base, tokens, tmp_path):
    model = lora(base, init_lora_weights="pissa", r=2)
    train_steps(model, tokens)
    save_adapter(model, tmp_path)
    loaded = load_adapter(copy.deepcopy(base), tmp_path)  # recomputes the same residual
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=1e-5)


def test_load_tolerates_unknown_peft_keys_but_not_unsupported_features(base, tmp_path):
    save_adapter(lora(base, r=2), tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(
        json.dumps({**config, "peft_version": "9.9", "megatron_core": "x", "eva_config": None})
    )
    load_adapter(copy.deepcopy(base), tmp_path)
    path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(copy.deepcopy(base), tmp_path)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("r", [0, -1, 2.5, True])
def test_bad_rank(r):
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoraConfig(r=r)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRALinear(nn.Linear(4, 4), r=r)


def test_rank_larger_than_the_layer(base):
    with pytest.raises(ValueError, match=r"r=9 exceeds min\(in_features=8, out_features=4\)"):
        LoRALinear(nn.Linear(8, 4), r=9)
    with pytest.raises(ValueError, match=r"blocks.0.attn.q.*r=17 exceeds"):
        lora(base, r=17)
    with pytest.raises(ValueError, match=r"head.*r=4 exceeds"):
        lora(base, target_modules=["head"], r=4)  # head is 16 -> 3


@pytest.mark.parametrize("alpha", [0, -2.0, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
        LoraConfig(lora_alpha=alpha)
    with pytest.raises(ValueError, match="lora_alpha must be a positive number"):
        LoraConfig(alpha_pattern={"q": alpha})


def test_target_matching_nothing_lists_candidates(base):
    with pytest.raises(ValueError, match="'query' matches no module") as err:
        lora(base, target_modules=["q", "query"])
    message = str(err.value)
    assert "blocks.0.attn.q" in message and "fc1" in message and "head" in message
    with pytest.raises(ValueError, match=r"'fc_1' \(did you mean 'fc1'\?\) matches no module"):
        lora(base, target_modules=["fc_1"])
    with pytest.raises(ValueError, match="matches no module"):
        lora(base, target_modules=r"decoder\..*")
    with pytest.raises(ValueError, match="target_modules is not set"):
        lora(base, target_modules=None)


def test_other_bad_targets(base):
    with pytest.raises(ValueError, match=r"nn.Linear only.*blocks.0.attn \(Attention\)"):
        lora(base, target_modules=["attn"])
    with pytest.raises(ValueError, match="rank_pattern key 'fc9' matches none"):
        lora(base, rank_pattern={"fc9": 2})
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(lora(base), LoraConfig(target_modules=["k"]))
    with pytest.raises(ValueError, match="modules_to_save entry 'classifier' matches no module"):
        lora(base, modules_to_save=["classifier"])


def test_bad_config_values():
    with pytest.raises(ValueError, match="did you mean 'lora_alpha'"):
        LoraConfig(lora_apha=8)
    with pytest.raises(TypeError, match="did you mean 'r'"):
        LoraConfig(rank=8)
    with pytest.raises(ValueError, match="init_lora_weights must be one of"):
        LoraConfig(init_lora_weights="olora")
    with pytest.raises(ValueError, match="bias='all' is not supported"):
        LoraConfig(bias="all")
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraConfig(lora_dropout=1.0)


def test_adapter_with_wrong_shapes_names_the_module(base, tmp_path):
    save_adapter(lora(base, r=2), tmp_path)
    torch.manual_seed(0)
    wider = TinyTransformer(d=24)
    with pytest.raises(ValueError, match=r"module 'blocks.0.attn.q': lora_A .* shape \(2, 16\)"):
        load_adapter(wider, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in wider.modules())  # nothing half-done

    other_targets = lora(base, target_modules=["k"], r=2)
    with pytest.raises(ValueError, match="disagree on which modules"):
        load_adapter(other_targets, tmp_path)


def test_saving_requires_adapters(base, tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(base, tmp_path)


def test_no_warning_on_normal_use(base, tokens, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = lora(base, r=2)
        model(tokens)
        save_adapter(model, tmp_path)
        load_adapter(copy.deepcopy(base), tmp_path)
