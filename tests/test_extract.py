"""Extracting LoRA from a full fine-tune: planted ranks, PEFT round trips, optimal budgets.

Ground truth: a planted rank-k update must come back to noise level and be found by
rank="optimal"; the written adapter must load in PEFT and in rankkit and give
base + the truncated ΔW computed here independently; budget allocations must equal
brute force on small cases; bad input must name the problem and the fix.
"""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import rankkit
from rankkit.adapters import open_adapter
from rankkit.checkpoints import CheckpointError, save_state_dict
from rankkit.cli import main
from rankkit.extract import allocate_budget, extract_lora


def planted(shape, k, seed, strength=1.0, noise=1e-3, dtype=torch.float64):
    """(L, N): a rank-k matrix with singular values strength·(1 .. 0.4), and Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    L = U @ torch.diag(strength * torch.linspace(1.0, 0.4, k, dtype=torch.float64)) @ V.T
    N = noise * torch.randn(m, n, generator=gen, dtype=torch.float64)
    return L.to(dtype), N.to(dtype)


def truncate(dW, r):
    """Best rank-r approximation by numpy's SVD (independent of rankkit)."""
    U, s, Vt = np.linalg.svd(np.asarray(dW, dtype=np.float64), full_matrices=False)
    return (U[:, :r] * s[:r]) @ Vt[:r]


def factors(adapter, module):
    A = adapter.tensors[f"base_model.model.{module}.lora_A.weight"]
    B = adapter.tensors[f"base_model.model.{module}.lora_B.weight"]
    return B, A


# --------------------------------------------------------------------------- planted ranks

SHAPES = {"a.weight": ((64, 48), 1), "b.weight": ((48, 80), 3), "c.weight": ((96, 64), 6)}


@pytest.fixture(scope="module")
def planted_pair():
    base, tuned, parts = {}, {}, {}
    for i, (name, (shape, k)) in enumerate(SHAPES.items()):
        W = torch.randn(
            shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64
        )
        L, N = planted(shape, k, seed=i)
        base[name], tuned[name], parts[name] = W, W + L + N, (L, N)
    return base, tuned, parts


def test_optimal_rank_finds_the_planted_ranks_and_reconstructs_them_to_noise_level(planted_pair):
    base, tuned, parts = planted_pair
    adapter = extract_lora(base, tuned, rank="optimal")
    assert adapter.ranks == {name[: -len(".weight")]: k for name, (_, k) in SHAPES.items()}
    for name, (L, N) in parts.items():
        B, A = factors(adapter, name[: -len(".weight")])
        error = float(torch.linalg.norm(B @ A - L))
        # Eckart–Young: ||ΔW_k - ΔW|| <= ||N||, so ||ΔW_k - L|| <= 2 ||N||.
        assert error <= 2 * float(torch.linalg.norm(N))
        # To first order the estimate keeps the noise in its own row and column spaces,
        # k(m + n) - k^2 entries' worth: error ~ sigma sqrt(k(m + n)), below ||N||.
        (m, n), k = SHAPES[name]
        assert error < 1.5 * 1e-3 * (k * (m + n)) ** 0.5
        assert error < float(torch.linalg.norm(N))
        # Balanced factors: B and A share their singular values.
        np.testing.assert_allclose(
            torch.linalg.svdvals(B), torch.linalg.svdvals(A), rtol=1e-10, atol=1e-12
        )


def test_a_fixed_rank_keeps_exactly_the_eckart_young_energy(planted_pair):
    base, tuned, _ = planted_pair
    adapter = extract_lora(base, tuned, rank=2)
    assert set(adapter.ranks.values()) == {2}
    for row in adapter.layers.itertuples():
        dW = tuned[row.name] - base[row.name]
        B, A = factors(adapter, row.module)
        np.testing.assert_allclose(B @ A, truncate(dW, 2), atol=1e-10)
        s = np.linalg.svd(dW.numpy(), compute_uv=False)
        assert row.kept == pytest.approx(float((s[:2] ** 2).sum()), rel=1e-10)
        assert row.energy == pytest.approx(float((s**2).sum()), rel=1e-10)
        assert row.parameters == 2 * sum(dW.shape)
    assert adapter.n_parameters == sum(2 * sum(s) for s, _ in SHAPES.values())


def test_energy_rule_takes_the_smallest_rank_reaching_the_fraction(planted_pair):
    base, tuned, _ = planted_pair
    adapter = extract_lora(base, tuned, energy=0.8)
    for row in adapter.layers.itertuples():
        s2 = np.linalg.svd((tuned[row.name] - base[row.name]).numpy(), compute_uv=False) ** 2
        cumulative = np.cumsum(s2) / s2.sum()
        assert cumulative[row.rank - 1] >= 0.8 > (cumulative[row.rank - 2] if row.rank > 1 else 0)
        assert row.kept_fraction >= 0.8


def logged(state, label, log):
    """A lazy checkpoint that records every tensor read as (label, name)."""
    from rankkit.checkpoints import Checkpoint, TensorInfo

    def read(name):
        log.append((label, name))
        return state[name]

    info = {n: TensorInfo(tuple(t.shape), "float64", label) for n, t in state.items()}
    return Checkpoint(info, read, description=label, label=label)


@pytest.mark.parametrize(("rule", "passes"), [(dict(rank=2), 1), (dict(budget=2000), 2)])
def test_layers_are_read_one_at_a_time(planted_pair, rule, passes):
    base, tuned, _ = planted_pair
    log = []
    extract_lora(logged(base, "base", log), logged(tuned, "tuned", log), **rule)
    # Each pass reads layer by layer (base, then fine-tuned, then the next layer): never
    # all of one checkpoint first. budget= needs every spectrum first, so it reads twice.
    one_pass = [(side, name) for name in SHAPES for side in ("base", "tuned")]
    assert log == one_pass * passes


# --------------------------------------------------------------------------- PEFT round trip


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)


class Net(nn.Module):
    """``fc`` and ``head.fc`` share a suffix: PEFT's pattern rule must not confuse them."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 12)
        self.fc = nn.Linear(12, 16)
        self.head = Head()
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 5)

    def forward(self, tokens):
        h = self.emb(tokens).mean(1)
        return self.out(self.norm(torch.relu(self.head.fc(torch.relu(self.fc(h))))))


PLANTED = {"fc": 3, "head.fc": 2, "out": 2}


@pytest.fixture(scope="module")
def net_pair():
    torch.manual_seed(0)
    base = Net()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for i, (module, k) in enumerate(PLANTED.items()):
            weight = tuned.get_submodule(module).weight
            L, N = planted(tuple(weight.shape), k, seed=10 + i, strength=2.0, noise=1e-3)
            weight += (L + N).float()
            tuned.get_submodule(module).bias += 0.1  # not an update LoRA can hold
        tuned.emb.weight += 0.5  # skipped: an embedding, not a linear layer
    return base, tuned


def reference_output(base, tuned, ranks, tokens):
    """base with W + truncated ΔW (numpy SVD) in every extracted module; base biases."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for module, r in ranks.items():
            W0 = base.get_submodule(module).weight
            dW = tuned.get_submodule(module).weight - W0
            model.get_submodule(module).weight += torch.as_tensor(truncate(dW, r)).float()
    return model(tokens)


@pytest.mark.parametrize(
    "rule",
    [dict(rank="optimal"), dict(rank=2), dict(budget=250), dict(energy=0.95)],
    ids=["optimal", "rank2", "budget", "energy"],
)
def test_extracted_adapter_loads_in_peft_and_rankkit_and_equals_base_plus_truncated_delta(
    net_pair, rule, tmp_path
):
    peft = pytest.importorskip("peft")
    base, tuned = net_pair
    adapter = extract_lora(base, tuned, out=tmp_path, **rule)
    assert adapter.skipped["emb.weight"].startswith("not a linear layer: nn.Embedding")
    assert adapter.skipped["fc.bias"] == "1-D (bias or norm)"
    if rule == dict(rank="optimal"):
        assert adapter.ranks == PLANTED  # fc's own rank_pattern key must not leak to head.fc
    tokens = torch.randint(0, 10, (7, 5), generator=torch.Generator().manual_seed(1))
    expected = reference_output(base, tuned, adapter.ranks, tokens)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert sorted(config["rank_pattern"]) == sorted(config["alpha_pattern"])

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for module, r in adapter.ranks.items():  # PEFT resolved each rank; alpha = r, so s = 1
        layer = theirs.base_model.model.get_submodule(module)
        assert layer.r["default"] == r and layer.scaling["default"] == 1.0
    with torch.no_grad():
        ours = theirs(tokens)
        mine = rankkit.load_adapter(copy.deepcopy(base), tmp_path)(tokens)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(mine, expected, atol=1e-5, rtol=0)
    # And rankkit reads its own adapter back with the same ranks.
    assert {m: info.r for m, info in open_adapter(tmp_path).modules.items()} == adapter.ranks


def test_embeddings_in_files_are_flagged_and_skipped_by_type_with_a_module(net_pair):
    base, tuned = net_pair
    from_files = extract_lora(base.state_dict(), tuned.state_dict(), rank=2)
    assert "emb" in from_files.ranks  # a state dict does not say it is an nn.Embedding...
    assert len(from_files.warnings) == 1 and "emb looks like embeddings" in from_files.warnings[0]
    assert "warning: emb looks like" in from_files.summary()
    from_module = extract_lora(base, tuned.state_dict(), rank=2)  # ...a module does
    assert "emb" not in from_module.ranks and from_module.warnings == []


def test_a_module_left_out_gets_no_adapter_even_when_another_name_ends_like_it(net_pair, tmp_path):
    peft = pytest.importorskip("peft")
    base, tuned = net_pair
    adapter = extract_lora(base, tuned, rank=2, layers=r"^(fc|out)\.", out=tmp_path)
    assert adapter.ranks == {"fc": 2, "out": 2}
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    adapted = {n.removeprefix("base_model.model.") for n, m in model.named_modules()
               if hasattr(m, "lora_A") and len(m.lora_A)}  # fmt: skip
    assert adapted == {"fc", "out"}  # a list ["fc", "out"] would also adapt head.fc
    rankkit.load_adapter(copy.deepcopy(base), tmp_path)  # the same modules, or it raises


def test_modules_to_save_travel_in_full_and_load_in_peft_and_rankkit(net_pair, tmp_path):
    peft = pytest.importorskip("peft")
    base, tuned = net_pair
    # PEFT matches modules_to_save by a plain string suffix ("out" would also take
    # "fc.lora_dropout"), so the config lists full names: here "head.fc".
    adapter = extract_lora(base, tuned, rank=2, modules_to_save=["head.fc"], out=tmp_path)
    assert adapter.ranks == {"fc": 2, "out": 2}  # head.fc is saved, not factored
    assert adapter.config["modules_to_save"] == ["head.fc"]
    assert adapter.n_saved_parameters == 16 * 16 + 16
    assert "head.fc.bias" not in adapter.skipped
    tokens = torch.randint(0, 10, (7, 5), generator=torch.Generator().manual_seed(2))
    reference = copy.deepcopy(base)
    reference.head.fc = copy.deepcopy(tuned.head.fc)  # weight and bias as fine-tuned
    expected = reference_output(reference, tuned, adapter.ranks, tokens)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)(tokens)
        ours = rankkit.load_adapter(copy.deepcopy(base), tmp_path)(tokens)
    torch.testing.assert_close(theirs, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="modules_to_save 'classifier' matches no module"):
        extract_lora(base, tuned, rank=2, modules_to_save=["classifier"])


def test_an_adapter_folder_is_re_ranked_to_the_truncation_of_its_update(planted_pair, tmp_path):
    base, tuned, _ = planted_pair
    extract_lora(base, tuned, rank=5, layers="^[bc]", out=tmp_path / "r5")
    smaller = extract_lora(base, tmp_path / "r5", rank=2)  # ΔW = s·B·A of the adapter
    assert smaller.ranks == {"b": 2, "c": 2}
    for module in ("b", "c"):
        B5, A5 = (t.double() for t in open_adapter(tmp_path / "r5").factors(module)[:2])
        B2, A2 = factors(smaller, module)
        np.testing.assert_allclose(B2 @ A2, truncate(B5 @ A5, 2), atol=1e-6)


# --------------------------------------------------------------------------- budgets


def brute_force(spectra, costs, budget):
    best = 0.0
    for ranks in itertools.product(*(range(len(s) + 1) for s in spectra)):
        if sum(r * c for r, c in zip(ranks, costs)) <= budget:
            best = max(best, sum(float((s[:r] ** 2).sum()) for s, r in zip(spectra, ranks)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_budget_allocation_is_optimal_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    spectra = [np.sort(rng.exponential(1.0, size=rng.integers(2, 5)))[::-1] for _ in range(3)]
    costs = [int(c) for c in rng.choice([6, 8, 9, 12, 14], size=3)]
    for budget in range(min(costs), sum(len(s) * c for s, c in zip(spectra, costs)) + 2):
        optimum = brute_force(spectra, costs, budget)
        exact = allocate_budget(spectra, costs, budget, method="exact")
        assert exact.parameters <= budget
        assert exact.kept == pytest.approx(optimum, rel=1e-12)
        greedy = allocate_budget(spectra, costs, budget, method="greedy")
        assert greedy.parameters <= budget
        assert optimum - greedy.bound - 1e-12 <= greedy.kept <= optimum + 1e-12


def test_greedy_is_not_always_optimal_so_the_exact_programme_matters():
    # Layer 0: one unit, 10 parameters, energy 11 (1.1 per parameter); layer 1: two units
    # of 6 parameters, energy 6 each (1.0). Budget 12: the greedy takes layer 0 first and
    # then nothing fits (11); the optimum is both units of layer 1 (12).
    spectra, costs = [np.sqrt([11.0]), np.sqrt([6.0, 6.0])], [10, 6]
    exact = allocate_budget(spectra, costs, 12, method="exact")
    assert exact.ranks == [0, 2] and exact.kept == pytest.approx(12.0)
    greedy = allocate_budget(spectra, costs, 12, method="greedy")
    assert greedy.ranks == [1, 0] and greedy.kept == pytest.approx(11.0)
    assert greedy.bound == pytest.approx(6.0)  # 12 <= 11 + 6


def concentrated_pair():
    """Three 32x32 layers; layer 'big' holds almost all of ΔW's energy (rank 8)."""
    base, tuned = {}, {}
    for i, (name, strength) in enumerate((("big", 1.0), ("small1", 0.01), ("small2", 0.01))):
        W = torch.zeros(32, 32, dtype=torch.float64)
        L, N = planted((32, 32), 8, seed=20 + i, strength=strength, noise=1e-5)
        base[f"{name}.weight"], tuned[f"{name}.weight"] = W, W + L + N
    return base, tuned


def test_budget_keeps_more_than_uniform_rank_at_the_same_cost_when_one_layer_dominates():
    base, tuned = concentrated_pair()
    uniform = extract_lora(base, tuned, rank=2)
    budgeted = extract_lora(base, tuned, budget=uniform.n_parameters)
    assert budgeted.n_parameters <= uniform.n_parameters
    assert budgeted.kept_fraction > uniform.kept_fraction + 0.1
    assert budgeted.ranks["big"] > 2
    assert budgeted.allocation.method == "exact"


def test_large_problems_use_the_greedy_and_report_its_bound(monkeypatch):
    base, tuned = concentrated_pair()
    exact = extract_lora(base, tuned, budget=1000)
    monkeypatch.setattr(rankkit.allocation, "EXACT_ALLOCATION_MAX_STEPS", 0)
    greedy = extract_lora(base, tuned, budget=1000)
    assert greedy.allocation.method == "greedy" and "of the optimum's energy" in greedy.summary()
    assert greedy.n_parameters <= 1000
    kept = float(greedy.layers["kept"].sum())
    assert exact.allocation.kept - greedy.allocation.bound <= kept <= exact.allocation.kept + 1e-9


@pytest.mark.parametrize("budget", [64, 100, 300, 1000, 5000])
def test_extracted_parameters_never_exceed_the_budget(budget):
    base, tuned = concentrated_pair()
    adapter = extract_lora(base, tuned, budget=budget)
    assert 0 < adapter.n_parameters <= budget
    assert adapter.n_parameters == sum(int(t.numel()) for t in adapter.tensors.values())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (dict(budget=63), r"budget=63 is below one rank-1 adapter .* at least 64"),
        (dict(rank=33), r"rank=33 is above min\(out, in\) = 32 of 'big'"),
        (dict(rank=2, energy=0.9), r"exactly one rule .* got rank=2 and energy=0.9"),
        (dict(), r"exactly one rule .* got none"),
        (dict(rank="best"), r"rank must be a positive integer or 'optimal'"),
        (dict(rank=0), r"rank must be a positive integer"),
        (dict(energy=1.5), r"energy must be a fraction in \(0, 1\]"),
        (dict(budget=-5), r"budget must be a positive number"),
    ],
)
def test_bad_rules_name_the_problem_and_the_fix(rule, message):
    base, tuned = concentrated_pair()
    with pytest.raises(ValueError, match=message):
        extract_lora(base, tuned, **rule)


def test_checkpoints_with_nothing_in_common_are_refused():
    base = {f"encoder.{n}.weight": torch.zeros(4, 4) for n in ("q", "k", "v")}
    tuned = {f"decoder.{n}.weight": torch.ones(4, 4) for n in ("x", "y", "z")}
    with pytest.raises(CheckpointError, match="share no weight matrix"):
        extract_lora(base, tuned, rank=1)


def test_a_rule_that_gives_every_layer_rank_zero_says_so():
    gen = torch.Generator().manual_seed(0)
    base = {"noise.weight": torch.zeros(64, 64)}
    tuned = {"noise.weight": torch.randn(64, 64, generator=gen)}  # no signal at all
    with pytest.raises(ValueError, match="gives every layer rank 0"):
        extract_lora(base, tuned, rank="optimal")


# --------------------------------------------------------------------------- CLI


def test_cli_extract_writes_an_adapter_and_prints_ranks_parameters_and_energy(
    planted_pair, tmp_path, capsys
):
    base, tuned, _ = planted_pair
    save_state_dict(base, tmp_path / "base.safetensors")
    save_state_dict({f"model.{k}": v for k, v in tuned.items()}, tmp_path / "tuned.safetensors")
    out = tmp_path / "adapter"
    argv = ["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"),
            "--out", str(out), "--rank", "optimal"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert 'rank="optimal"' in printed and "kept" in printed
    total = sum(k * sum(shape) for shape, k in SHAPES.values())
    assert f"total: {total:,} adapter parameters" in printed
    report = rankkit.rank_report(tmp_path / "base.safetensors", out).set_index("name")
    assert {n: int(r) for n, r in report["dW_numerical"].items()} == {
        n: k for n, (_, k) in SHAPES.items()
    }

    assert main([*argv[:5], "--rank", "1", "--layers", "^c", "--modules-to-save", "a"]) == 0
    assert "plus 3,072 parameters of modules_to_save (a), copied in full" in capsys.readouterr().out
    assert main([*argv[:5], "--budget", "1000", "--layers", "^c"]) == 0
    assert "budget 1,000" in capsys.readouterr().out
    written = open_adapter(out)
    assert list(written.modules) == ["c"]
    assert 0 < sum(written.tensors[k].numel() for k in written.tensors) <= 1000

    assert main([*argv[:5], "--rank", "2", "--energy", "0.9"]) == 1
    assert "exactly one rule" in capsys.readouterr().err
    assert main([*argv[:5], "--rank", "two"]) == 1
    assert "rank must be a positive integer or 'optimal'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_extract_task_evaluates_each_budget_three_ways_next_to_the_baselines(tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "digits"
    threads = torch.get_num_threads()  # --threads 1 sets it for the whole process
    assert main(["extract", "--task", "digits", "--budgets", "896,2000", "--seeds", "0,1",
                 "--out", str(out), "--threads", "1"]) == 0  # fmt: skip
    torch.set_num_threads(threads)
    table = pd.read_csv(out / "extraction.csv")
    assert (out / "digits_extraction_budget_vs_quality.png").stat().st_size > 0
    model = rankkit.get_task("digits").build_model(pretrained=False)
    head = sum(p.numel() for p in model.head.parameters())  # copied in full
    unit = sum(m.in_features + m.out_features for m in (model.fc1, model.fc2))  # one rank in each
    assert head == 2570 and unit == 896  # fc1 256x128 and fc2 256x256: rank 1 costs 896
    lora = table[table["budget"].notna()]
    assert set(lora["allocation"]) == {"uniform", "energy", "budget"}
    assert ((lora["parameters"] - head) <= lora["budget"]).all()
    # Uniform rank 1 costs 896, so 2000 buys rank 2.
    uniform = lora[(lora["allocation"] == "uniform") & (lora["seed"] == 0)].set_index("budget")
    assert uniform.loc[896, "parameters"] == unit + head
    assert uniform.loc[2000, "ranks"] == "fc1:2 fc2:2"
    baselines = table[table["budget"].isna() & (table["seed"] == 0)].set_index("allocation")
    assert baselines.loc["frozen base", "parameters"] == head
    assert (
        baselines.loc["full fine-tuning", "parameters"]
        == rankkit.get_task("digits").num_parameters()
    )
    assert lora["test_accuracy"].between(0, 1).all()
    ceiling = baselines.loc["all of ΔW"]  # every adapted ΔW at full rank: all its energy
    assert ceiling["kept_fraction"] == pytest.approx(1.0, abs=1e-9)
    # At most the full ranks (a singular value holding < 1e-12 of the energy may be dropped).
    full_rank = sum(
        min(m.weight.shape) * (m.in_features + m.out_features) for m in (model.fc1, model.fc2)
    )
    assert ceiling["parameters"] <= full_rank + head
    # The printed verdicts follow from the CSV: paired differences and a t-test.
    printed = capsys.readouterr().out
    for budget in (896, 2000):
        for name in ("energy", "budget"):
            part = lora[lora["budget"] == budget].pivot(index="seed", columns="allocation",
                                                        values="test_accuracy")  # fmt: skip
            d = (part[name] - part["uniform"]).to_numpy()
            t_crit = 12.706  # t_0.975 with 1 degree of freedom (two seeds)
            if (d == 0).all():
                verdict = "identical on every seed"
            elif abs(d.mean()) < t_crit * d.std(ddof=1) / np.sqrt(2):
                verdict = "within seed noise"
            else:
                verdict = "better than uniform" if d.mean() > 0 else "worse than uniform"
            line = f"budget {budget:>7,} {name:>6}: {d.mean():+.4f}"
            assert line in printed and verdict in printed.split(line)[1].splitlines()[0]


def test_compare_with_uniform_pairs_seeds_and_uses_the_paired_t_test():
    """Hand-made tables whose paired t-test outcome is known."""
    import pandas as pd

    from rankkit.budgets import compare_with_uniform

    def table(uniform, budget_rule):
        rows = [
            {"budget": 832.0, "seed": s, "allocation": name, "test_accuracy": value}
            for name, values in (("uniform", uniform), ("budget", budget_rule))
            for s, value in enumerate(values)
        ]
        return pd.DataFrame(rows)

    # +0.010 on every seed but one (+0.011): sd tiny, the shift is resolved.
    (row,) = compare_with_uniform(table([0.90, 0.91, 0.92], [0.91, 0.92, 0.931]), "test_accuracy")
    assert row["verdict"] == "better than uniform" and row["seeds"] == 3
    # Unpaired these would look like noise (seed spread 0.01); paired they are not.
    (row,) = compare_with_uniform(table([0.90, 0.91, 0.92], [0.89, 0.899, 0.91]), "test_accuracy")
    assert row["verdict"] == "worse than uniform"
    # Differences of +0.02, -0.02, +0.01: mean 0.0033, t = 0.28, within noise.
    (row,) = compare_with_uniform(table([0.90, 0.91, 0.92], [0.92, 0.89, 0.93]), "test_accuracy")
    assert row["verdict"] == "within seed noise"
    (row,) = compare_with_uniform(table([0.9, 0.9], [0.9, 0.9]), "test_accuracy")
    assert row["verdict"] == "identical on every seed"
    (row,) = compare_with_uniform(table([0.9], [0.95]), "test_accuracy")
    assert row["verdict"] == "one seed, no noise estimate"


# --------------------------------------------------------------------------- docs/extraction.md


def test_docs_digits_extraction_table_and_verdicts_are_the_records():
    """docs/extraction.md's digits table is the recorded run's mean ± sd, and its verdicts hold.

    The records are what the two documented commands wrote (extraction.csv and the sweep's
    results.csv), copied into docs/records/.
    """
    import re
    from pathlib import Path

    import pandas as pd

    root = Path(__file__).resolve().parents[1]
    records = root / "docs" / "records"
    table = pd.read_csv(records / "digits-extraction.csv")
    sweep = pd.read_csv(records / "digits-extract-sweep.csv")
    doc = (root / "docs" / "extraction.md").read_text(encoding="utf-8")
    section = doc.split("## What each budget buys: digits")[1].split("## What each budget")[0]

    def acc(frame):
        values = frame.sort_values("seed")["test_accuracy"].to_numpy()
        assert len(values) == 3
        return values

    def cell(values):
        return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"

    def pick(allocation, budget=None):
        rows = table[table["allocation"] == allocation]
        return rows[rows["budget"].isna()] if budget is None else rows[rows["budget"] == budget]

    trained = {
        int(r): g.sort_values("seed")["test_metric"].to_numpy()
        for r, g in sweep[sweep["method"] == "lora"].groupby("rank")
    }
    full, frozen, ceiling = (acc(pick(a)) for a in ("full fine-tuning", "frozen base", "all of ΔW"))
    assert np.array_equal(full, sweep[sweep["method"] == "full"].sort_values("seed")["test_metric"])
    for name, values in (("Full fine-tuning", full), ("frozen base", frozen), ('ΔW"', ceiling)):
        assert re.search(re.escape(name) + r"[^\n]*\n?[^\n]*" + re.escape(cell(values)), section), (
            name
        )
    rows = re.findall(r"^\| ([\d,]+) \| (\d+) \| [\d,]+ \| [^|]+ \|(.*)\|$", section, re.M)
    assert [int(b.replace(",", "")) for b, _, _ in rows] == sorted(
        table["budget"].dropna().unique()
    )
    for budget, rank, rest in rows:
        budget, rank = int(budget.replace(",", "")), int(rank)
        uniform, energy, allocated = (acc(pick(a, budget)) for a in ("uniform", "energy", "budget"))
        expected = [cell(uniform), cell(energy), cell(allocated)]
        expected.append(cell(trained[rank]) if rank in trained else "–")
        assert [c.strip() for c in rest.split("|")] == expected, budget
        # Budget allocation does not beat uniform rank: no rule is higher on average.
        assert (energy - uniform).mean() <= 0 and (allocated - uniform).mean() <= 0, budget
        # A trained adapter beats the extracted one at the same rank, on every seed.
        if rank in trained:
            assert (trained[rank] > uniform).all(), rank
        # Below the frozen base up to rank 8 (every seed), above it from rank 16.
        if rank <= 8:
            assert (uniform < frozen.min()).all(), rank
        else:
            assert (uniform > frozen.max()).all(), rank
    # All of ΔW recovers the fine-tune to within a point on every seed.
    assert np.abs(ceiling - full).max() < 0.01
