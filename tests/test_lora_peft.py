"""Parity of rankkit.lora with PEFT, the reference implementation, and file interchange.

The same base model gets the same A and B values in both libraries; outputs and merged
weights must then agree to 1e-6, and adapter files must load across the two.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip(
    "peft", reason="parity tests need PEFT: pip install -e '.[test]' (peft is in the test extra)"
)

from rankkit.checkpoints import load_state_dict  # noqa: E402
from rankkit.lora import (  # noqa: E402
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_adapter,
    merge_and_unload,
    save_adapter,
)

D, VOCAB, CLASSES, T = 16, 50, 3, 8
ATOL = 1e-6


class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        scores = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(x.shape[-1])
        return self.o(scores.softmax(-1) @ self.v(x))


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.attn = nn.LayerNorm(d), Attention(d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(D) for _ in range(2))
        self.head = nn.Linear(D, CLASSES)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


@pytest.fixture
def base():
    torch.manual_seed(0)
    return TinyTransformer().eval()


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (5, T), generator=torch.Generator().manual_seed(1))


CASES = {
    "plain": {"r": 4, "lora_alpha": 8},
    "rslora": {"r": 4, "lora_alpha": 8, "use_rslora": True},
    "patterns": {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"blocks.1.attn.q": 2, "fc1": 3},
        "alpha_pattern": {"v": 32},
    },
    "patterns+rslora": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "rank_pattern": {"fc1": 3},
        "alpha_pattern": {"blocks.0.attn.v": 2},
    },
}


def both(base, init_peft=False, init_rankkit="kaiming", **kwargs):
    """The same config in both libraries, on copies of ``base``."""
    kwargs = {"target_modules": ["q", "v", "fc1"], **kwargs}
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=init_peft, **kwargs)
    )
    ours = apply_lora(copy.deepcopy(base), LoraConfig(init_lora_weights=init_rankkit, **kwargs))
    return ours, theirs


def copy_peft_adapters(ours, theirs):
    """Put PEFT's A and B (non-zero: init_lora_weights=False) into rankkit's layers."""
    peft_params = dict(theirs.named_parameters())
    n = 0
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, LoRALinear):
                layer.lora_A.copy_(peft_params[f"base_model.model.{name}.lora_A.default.weight"])
                layer.lora_B.copy_(peft_params[f"base_model.model.{name}.lora_B.default.weight"])
                n += 1
    assert n == 6


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_adapters_same_outputs_and_merged_weights(base, tokens, case):
    ours, theirs = both(base, **CASES[case])
    copy_peft_adapters(ours, theirs)
    for name, layer in ours.named_modules():
        if isinstance(layer, LoRALinear):
            peft_layer = theirs.base_model.model.get_submodule(name)
            assert layer.r == peft_layer.r["default"]
            assert layer.scaling == pytest.approx(peft_layer.scaling["default"], rel=1e-12)
    out = ours(tokens)
    assert not torch.allclose(out, base(tokens), atol=1e-3)  # the adapters do change things
    close(out, theirs(tokens))

    merged_ours = merge_and_unload(ours).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert set(merged_ours) == set(merged_theirs)
    for key in merged_ours:
        close(merged_ours[key], merged_theirs[key])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_init_matches_peft(base, tokens, use_rslora):
    ours, theirs = both(
        base, init_peft="pissa", init_rankkit="pissa", r=3, lora_alpha=6, use_rslora=use_rslora
    )
    peft_state = theirs.state_dict()
    for name, value in ours.state_dict().items():
        peft_name = f"base_model.model.{name}".replace("lora_A", "lora_A.default.weight")
        peft_name = peft_name.replace("lora_B", "lora_B.default.weight")
        # singular vectors are defined up to sign; both libraries call the same SVD
        torch.testing.assert_close(value, peft_state[peft_name], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours(tokens), theirs(tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rankkit_adapter_loads_in_peft(base, tokens, tmp_path, case):
    ours = apply_lora(
        copy.deepcopy(base),
        LoraConfig(
            target_modules=["q", "v", "fc1"],
            modules_to_save=["head"],
            init_lora_weights=False,
            **CASES[case],
        ),
    )
    with torch.no_grad():
        ours.head.weight.mul_(1.5)  # modules_to_save must travel too
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    close(theirs(tokens), ours(tokens))
    for name, layer in ours.named_modules():
        if isinstance(layer, LoRALinear):
            peft_layer = theirs.base_model.model.get_submodule(name)
            close(peft_layer.get_delta_weight("default"), layer.delta_weight())


def test_rankkit_pissa_adapter_loads_in_peft_on_the_original_base(base, tokens, tmp_path):
    ours = apply_lora(
        copy.deepcopy(base), LoraConfig(target_modules=["q", "v"], r=2, init_lora_weights="pissa")
    )
    with torch.no_grad():  # stand-in for training
        for layer in ours.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.mul_(1.1)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(theirs(tokens), ours(tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_in_rankkit(base, tokens, tmp_path, case):
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(
            target_modules=["q", "v", "fc1"],
            modules_to_save=["head"],
            init_lora_weights=False,
            **CASES[case],
        ),
    )
    with torch.no_grad():
        theirs.base_model.model.head.modules_to_save["default"].weight.mul_(1.5)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    close(ours(tokens), theirs(tokens))
    assert not torch.allclose(ours(tokens), base(tokens), atol=1e-3)


def test_peft_pickle_format_adapter_loads_in_rankkit(base, tokens, tmp_path):
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["q"], r=2, init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path, safe_serialization=False)  # adapter_model.bin
    assert (tmp_path / "adapter_model.bin").exists()
    ours = load_adapter(copy.deepcopy(base), tmp_path)  # read with weights_only=True
    close(ours(tokens), theirs(tokens))


def test_same_file_layout_as_peft(base, tmp_path):
    ours, theirs = both(base, **CASES["patterns"], modules_to_save=["head"])
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ours_file = load_state_dict(tmp_path / "ours" / "adapter_model.safetensors")
    theirs_file = load_state_dict(tmp_path / "theirs" / "adapter_model.safetensors")
    assert set(ours_file) == set(theirs_file)
    for key in ours_file:
        assert ours_file[key].shape == theirs_file[key].shape, key


# peft 0.21 calls a transformers 5 method that transformers deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_parity_on_a_hugging_face_model(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs transformers (test extra)")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=48,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    base = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(0))

    def hidden(model):
        return model(input_ids=ids).last_hidden_state

    kwargs = {"target_modules": ["query", "value"], "r": 4, "lora_alpha": 8, "use_rslora": True}
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs)
    )
    ours = apply_lora(copy.deepcopy(base), LoraConfig(**kwargs))
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, LoRALinear):
                layer.lora_A.copy_(peft_params[f"base_model.model.{name}.lora_A.default.weight"])
                layer.lora_B.copy_(peft_params[f"base_model.model.{name}.lora_B.default.weight"])
    assert "encoder.layer.1.attention.self.value" in dict(ours.named_modules())
    close(hidden(ours), hidden(theirs))

    save_adapter(ours, tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    close(hidden(reloaded), hidden(ours))
