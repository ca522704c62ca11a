"""Batched multi-adapter training: every run equals the same run trained alone.

The reference is the single-run recipe of :func:`rankkit.sweep.run_one`
(:func:`rankkit.methods.prepare_run`, then ``fit``). A batched run must
reproduce its metrics, best epoch and adapter weights up to float rounding, on
the digits MLP and on a small transformer with dropout (where each run's dropout
masks must also be its own).
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import rankkit.batched as batched
import rankkit.stacked as stacked
import rankkit.tasks
from rankkit.batched import (
    MultiLinear,
    MultiLoRALinear,
    PerRunRandomness,
    fit_batched,
    max_batch_runs,
)
from rankkit.lora import LoraConfig, LoRALinear, lora_state_dict
from rankkit.methods import prepare_run
from rankkit.sweep import SweepConfig, run_sweep
from rankkit.tasks import get_task
from rankkit.tasks.base import Task
from rankkit.tasks.digits import DigitsTask
from rankkit.train import fit

ATOL = 1e-5  # adapter weights after training; the observed differences are ~1e-7

pytestmark = pytest.mark.usefixtures("one_thread")


class SmallDigits(DigitsTask):
    """The real digits task (model, base weights, all 3,000 training pairs), evaluated on
    the first 250 validation and test pairs: less time spent evaluating.

    Batched and single runs agree to ~1e-7 in their weights, not bit for bit. With all
    1,000 evaluation pairs that moved one or two pairs across a decision boundary after
    3-4 epochs (test accuracy 0.334 vs 0.336); on these 250 the metrics agree exactly, as
    the tests below assert. (Fewer training pairs leave (a + b) mod 10 unlearnt in a few
    epochs: a run's validation accuracy stays at chance.)
    """

    def splits(self):
        full = super().splits()
        sizes = {"train": 3000, "val": 250, "test": 250}
        return {k: TensorDataset(*(t[: sizes[k]] for t in v.tensors)) for k, v in full.items()}


def reference(task, config: LoraConfig, seed: int, **fit_kwargs):
    """The single-run recipe (what rankkit.sweep.run_one does) that batched training must match."""
    run = prepare_run(task, "lora", seed, lora_config=config)
    return run.model, fit(run.model, task, seed=seed, device="cpu", progress=False, **fit_kwargs)


def assert_same_run(batched_run, model, result, atol: float = ATOL):
    got = batched_run.result
    assert got.metrics == result.metrics
    assert got.best_epoch == result.best_epoch
    assert got.trainable_params == result.trainable_params
    assert got.total_params == result.total_params
    assert got.hparams == result.hparams
    assert len(got.history) == len(result.history)
    for a, b in zip(got.history, result.history):
        assert a.keys() == b.keys()
        for key in a:
            if key != "elapsed_s":
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    want, have = lora_state_dict(model), lora_state_dict(batched_run.model)
    assert want.keys() == have.keys()
    for key in want:
        torch.testing.assert_close(have[key], want[key], atol=atol, rtol=0, msg=key)


# --------------------------------------------------------------------------- a tiny transformer


class _Attention(nn.Module):
    def __init__(self, d: int, heads: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape

        def split(t):
            return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )  # fmt: skip
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), _Attention(d), nn.LayerNorm(d)
        self.fc1, self.fc2, self.drop = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.Dropout(0.1)

    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


class _TinyTransformer(nn.Module):
    """Embeddings, 2 pre-LN blocks with attention and MLP dropout, mean-pooled head."""

    def __init__(self, vocab: int = 16, d: int = 32, T: int = 12, classes: int = 4) -> None:
        super().__init__()
        self.emb, self.pos, self.drop = nn.Embedding(vocab, d), nn.Embedding(T, d), nn.Dropout(0.1)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(2))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, ids):
        x = self.drop(self.emb(ids) + self.pos(torch.arange(ids.shape[1])))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x).mean(1))


class TinyTransformerTask(Task):
    """A task with dropout everywhere, so per-run random numbers are put to the test."""

    name = "tiny-transformer"
    default_hparams = {  # noqa: RUF012
        "epochs": 3, "lr": 1e-2, "batch_size": 16, "weight_decay": 0.01,
        "schedule": "cosine", "warmup": 0.1,
    }  # fmt: skip

    def _make_model(self):
        return _TinyTransformer()

    def _base_state(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            state = _TinyTransformer().state_dict()
        return {k: v for k, v in state.items() if not k.startswith("head.")}

    def splits(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 16, (280, 12), generator=g)
        y = (x[:, 0] + x[:, -1]) % 4  # needs attention from the last position to the first
        return {
            "train": TensorDataset(x[:200], y[:200]),
            "val": TensorDataset(x[200:240], y[200:240]),
            "test": TensorDataset(x[240:], y[240:]),
        }


class _OwnEvaluate(TinyTransformerTask):
    """Overrides evaluate, so batched training must call it on each run's own model."""

    def evaluate(self, model, split="test", device=None, batch_size=256):
        return super().evaluate(model, split, device, batch_size=batch_size)


# --------------------------------------------------------------------------- equivalence


def test_batched_runs_match_single_runs_on_digits():
    task = SmallDigits()
    head = task.head_modules
    configs = [
        LoraConfig(r=1, lora_alpha=1, target_modules="all-linear", modules_to_save=head),
        LoraConfig(r=4, lora_alpha=8, target_modules=["fc1"], modules_to_save=head),
        LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                   modules_to_save=head),
        LoraConfig(r=16, lora_alpha=32, target_modules=["fc2"], modules_to_save=head),
    ]  # fmt: skip
    seeds = [0, 1, 2, 0]
    fit_kwargs = {"epochs": 4, "lr": 1e-2}
    runs = fit_batched(task, configs, seeds, device="cpu", **fit_kwargs)
    assert len(runs) == 4
    for config, seed, run in zip(configs, seeds, runs):
        model, result = reference(task, config, seed, **fit_kwargs)
        assert result.best_epoch > 0, "the run should have trained"
        assert_same_run(run, model, result)
        ranks = {m.r for m in run.model.modules() if isinstance(m, LoRALinear)}
        assert ranks == {config.r}  # a standalone model with the run's own ranks


def test_batched_transformer_with_dropout_matches_single_runs():
    task = TinyTransformerTask()
    configs = [
        LoraConfig(r=2, lora_alpha=2, target_modules=["q", "v"], modules_to_save=["head"]),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q", "v"], modules_to_save=["head"]),
        LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", modules_to_save=["head"]),
    ]
    seeds = [0, 1, 0]  # two runs with one seed: the same masks, different adapters
    runs = fit_batched(task, configs, seeds, device="cpu")
    for config, seed, run in zip(configs, seeds, runs):
        model, result = reference(task, config, seed)
        assert result.best_epoch > 0
        assert_same_run(run, model, result)


def test_a_task_with_its_own_evaluate_is_validated_run_by_run():
    task = _OwnEvaluate()
    configs = [
        LoraConfig(r=r, lora_alpha=r, target_modules=["q", "v"], modules_to_save=["head"])
        for r in (1, 4)
    ]
    runs = fit_batched(task, configs, [3, 4], device="cpu", epochs=2)
    for config, seed, run in zip(configs, [3, 4], runs):
        assert_same_run(run, *reference(task, config, seed, epochs=2))


@pytest.mark.slow
def test_batched_runs_match_single_runs_on_the_topics_transformer():
    class SmallTopics(type(get_task("topics"))):
        """The real topics model and data, on the first 320 training passages."""

        def splits(self):
            full = super().splits()
            return {**full, "train": TensorDataset(*(t[:320] for t in full["train"].tensors))}

    task = SmallTopics()
    configs = [
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q", "v"], modules_to_save=["head"])
        for r in (2, 8)
    ]
    runs = fit_batched(task, configs, [0, 1], device="cpu", epochs=1, lr=3e-3)
    for config, seed, run in zip(configs, [0, 1], runs):
        model, result = reference(task, config, seed, epochs=1, lr=3e-3)
        assert result.best_epoch == 1, "the run should have trained"
        # Adam divides each gradient by its running RMS, so where a gradient is near zero a
        # rounding difference of the batched products (bmm vs mm) moves the update by a
        # fraction of lr = 3e-3: after 10 steps r=8's lora_B differs by 1.6e-5 (its values
        # are ~0.02), so 1e-5 is too tight here; the metrics above still match exactly.
        assert_same_run(run, model, result, atol=1e-4)
    # A transformer step is compute-bound on a CPU: the sweep trains these runs one at a
    # time there, unless a batch size is asked for.
    assert max_batch_runs(task, configs[1], device="cpu", memory_bytes=10**12) == 1
    assert max_batch_runs(task, configs[1], device="cpu", memory_bytes=10**12, max_runs=4) == 4


# --------------------------------------------------------------------------- one loop, two paths


def test_fit_batched_with_one_run_is_fit_exactly():
    """K = 1 is fit itself: the same recipe and the same loop, bit for bit."""
    task = TinyTransformerTask()
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], modules_to_save=["head"])
    (run,) = fit_batched(task, [config], [3], device="cpu", epochs=2)
    model, result = reference(task, config, 3, epochs=2)
    assert run.result.metrics == result.metrics and run.result.best_epoch == result.best_epoch
    strip = [{k: v for k, v in row.items() if k != "elapsed_s"} for row in result.history]
    assert [{k: v for k, v in row.items() if k != "elapsed_s"} for row in run.result.history] == (
        strip
    )
    want, have = lora_state_dict(model), lora_state_dict(run.model)
    assert want.keys() == have.keys()
    assert all(torch.equal(have[k], want[k]) for k in want)


def _train(path: str, task, configs, seeds, **kwargs):
    """Train ``configs`` one by one with fit (the reference recipe), or together."""
    if path == "fit_batched":
        return [r.result for r in fit_batched(task, configs, seeds, device="cpu", **kwargs)]
    return [reference(task, c, s, **kwargs)[1] for c, s in zip(configs, seeds)]


@pytest.mark.parametrize("path", ["fit", "fit_batched"])
def test_lr_overrides_work_in_both_paths(path):
    task = SmallDigits()
    configs = [
        LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", modules_to_save=["head"])
        for r in (1, 4)
    ]
    # A head frozen in place (rate 1e-12) next to adapters at 1e-2: the head barely moves.
    results = _train(path, task, configs, [0, 1], epochs=1, lr=1e-2, lr_overrides={"head": 1e-12})
    assert all(r.hparams["lr_overrides"] == {"head": 1e-12} for r in results)
    if path == "fit_batched":  # the same runs trained alone, with the same override
        alone = _train(
            "fit", task, configs, [0, 1], epochs=1, lr=1e-2, lr_overrides={"head": 1e-12}
        )
        assert [r.metrics for r in results] == [r.metrics for r in alone]
    with pytest.raises(ValueError, match="lr_overrides key 'haed' matches no trainable"):
        _train(path, task, configs, [0, 1], epochs=1, lr_overrides={"haed": 0.1})


@pytest.mark.parametrize("path", ["fit", "fit_batched"])
def test_a_diverging_run_stops_with_advice_in_both_paths(path):
    task = SmallDigits()
    # alpha = inf: s * B A x = inf * 0 is NaN from the first step, in run 1 only.
    configs = [
        LoraConfig(r=2, lora_alpha=a, target_modules="all-linear", modules_to_save=["head"])
        for a in (2, math.inf)
    ]
    with pytest.raises(ValueError, match=r"diverged\. Lower the learning rate") as err:
        _train(path, task, configs, [0, 0], epochs=1)
    if path == "fit_batched":
        assert "run(s) [1]" in str(err.value)


# --------------------------------------------------------------------------- the pieces


def test_multi_lora_linear_equals_each_runs_lora_linear():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    singles = [
        LoRALinear(base, r=r, lora_alpha=a, init_lora_weights=False) for r, a in ((1, 2), (3, 3))
    ]
    multi = MultiLoRALinear(base, ranks=[1, 3, 0], scalings=[2.0, 1.0, 0.0])
    with torch.no_grad():
        for k, single in enumerate(singles):
            multi.lora_A[k, : single.r] = single.lora_A
            multi.lora_B[k, :, : single.r] = single.lora_B
    x = torch.randn(3 * 4, 5, 12)  # 3 runs x 4 sequences x 5 tokens
    out = multi(x)
    for k, single in enumerate(singles):
        torch.testing.assert_close(out[4 * k : 4 * (k + 1)], single(x[4 * k : 4 * (k + 1)]))
    torch.testing.assert_close(out[8:], base(x[8:]))  # run 2 does not adapt this layer


def test_padding_and_unadapted_runs_stay_exactly_zero_under_adamw():
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(8, 6), ranks=[1, 3, 0], scalings=[1.0, 0.5, 0.0])
    with torch.no_grad():
        layer.lora_A[0, :1].normal_()
        layer.lora_A[1, :3].normal_()
        layer.lora_B[1, :, :3].normal_()
    padding = torch.ones_like(layer.lora_A, dtype=torch.bool)
    padding[0, :1] = padding[1, :3] = False
    padding_b = torch.ones_like(layer.lora_B, dtype=torch.bool)
    padding_b[0, :, :1] = padding_b[1, :, :3] = False
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(3 * 7, 8)).square().sum().backward()
        opt.step()
    assert layer.lora_B[0, :, :1].abs().sum() > 0  # the real slices did train
    assert torch.all(layer.lora_A[padding] == 0) and torch.all(layer.lora_B[padding_b] == 0)


def test_multi_linear_applies_each_runs_head():
    heads = [nn.Linear(6, 3) for _ in range(2)]
    multi = MultiLinear(heads)
    x = torch.randn(2 * 5, 6)
    torch.testing.assert_close(multi(x), torch.cat([heads[0](x[:5]), heads[1](x[5:])]))


def test_per_run_randomness_gives_each_run_its_standalone_masks():
    x = torch.ones(3 * 4, 6, 8)
    with PerRunRandomness([torch.Generator().manual_seed(s) for s in (5, 6, 5)]):
        out = F.dropout(x, 0.3, training=True)
    for k, seed in enumerate((5, 6, 5)):
        torch.manual_seed(seed)
        torch.testing.assert_close(out[4 * k : 4 * (k + 1)], F.dropout(x[:4], 0.3, training=True))
    with pytest.raises(ValueError, match="first dimension is not the batch of 3 runs"):
        with PerRunRandomness([torch.Generator() for _ in range(3)]):
            F.dropout(torch.ones(4, 2), 0.5, training=True)


def test_gradient_clipping_is_per_run():
    K = 3
    params = [torch.zeros(K, 4, 5, requires_grad=True), torch.zeros(K, 7, requires_grad=True)]
    torch.manual_seed(0)
    for p, scale in zip(params, (1.0, 3.0)):
        p.grad = torch.randn_like(p) * scale
    p.grad[2] *= 1e-3  # run 2 is below the threshold: untouched
    expected = []
    for k in range(K):  # clip_grad_norm_ on run k's tensors alone
        alone = [torch.zeros_like(p[k], requires_grad=True) for p in params]
        for a, p in zip(alone, params):
            a.grad = p.grad[k].clone()
        torch.nn.utils.clip_grad_norm_(alone, 1.0)
        expected.append([a.grad for a in alone])
    stacked._clip_per_run(params, K, 1.0)
    for k in range(K):
        for p, want in zip(params, expected[k]):
            torch.testing.assert_close(p.grad[k], want)


def test_clear_errors():
    task = get_task("digits")
    good = LoraConfig(r=2, target_modules="all-linear", modules_to_save=["head"])
    with pytest.raises(ValueError, match="2 configs but 1 seeds"):
        fit_batched(task, [good, good], [0])
    with pytest.raises(ValueError, match="at least one"):
        fit_batched(task, [], [])
    with pytest.raises(TypeError, match="LoraConfig"):
        fit_batched(task, [{"r": 2}], [0])
    pissa = LoraConfig(r=2, target_modules="all-linear", modules_to_save=["head"],
                       init_lora_weights="pissa")  # fmt: skip
    with pytest.raises(ValueError, match=r"does not share the frozen base.*pissa"):
        fit_batched(task, [good, pissa], [0, 0], epochs=1)
    no_head = LoraConfig(r=2, target_modules="all-linear")
    with pytest.raises(ValueError, match="same modules_to_save"):
        fit_batched(task, [good, no_head], [0, 0], epochs=1)
    with pytest.raises(ValueError, match="does not share the frozen base"):
        fit_batched(task, [no_head, no_head], [0, 1], epochs=1)  # frozen heads differ by seed

    class WithBatchNorm(type(task)):
        def _make_model(self):
            model = super()._make_model()
            model.fc1 = nn.Sequential(model.fc1, nn.BatchNorm1d(256))
            return model

        def _base_state(self):
            return {}

        def _load_base(self, model, state):
            pass

    with pytest.raises(ValueError, match="batch normalisation"):
        fit_batched(WithBatchNorm(), [good, good], [0, 1], epochs=1)


def test_batch_size_follows_the_memory():
    task = get_task("digits")
    config = LoraConfig(r=32, target_modules="all-linear", modules_to_save=["head"])
    assert max_batch_runs(task, config, device="cpu", memory_bytes=10**4) == 1
    assert (
        max_batch_runs(task, config, device="cpu", memory_bytes=10**12)
        == batched.DEFAULT_MAX_RUNS["cpu"]
    )
    assert max_batch_runs(task, config, device="cpu", memory_bytes=10**12, max_runs=40) == 40
    assert 1 <= max_batch_runs(task, config, device="cpu") <= batched.DEFAULT_MAX_RUNS["cpu"]


# --------------------------------------------------------------------------- the sweep


# One epoch (47 steps): Adam divides by a gradient's running RMS, so over more steps the
# ~1e-7 rounding differences of the two paths grow (3 epochs: 1.6e-3 in a lora_B).
SWEEP = {"task": "digits", "ranks": [1, 2, 4], "seeds": [0, 1], "epochs": 1, "lr": 1e-2,
         "baselines": False}  # fmt: skip


@pytest.fixture
def small_digits(monkeypatch):
    """Sweeps of ``task="digits"`` in this process train :class:`SmallDigits`."""
    monkeypatch.setitem(rankkit.tasks.TASKS, "digits", SmallDigits)


def _sweep(tmp_path, name, **kwargs):
    config = SweepConfig(**{**SWEEP, **kwargs}, out=str(tmp_path / name))
    return run_sweep(config, progress=False, plot=False, log=lambda _: None)


@pytest.mark.usefixtures("small_digits")
def test_sweep_batches_and_gives_the_rows_of_single_runs(tmp_path, monkeypatch):
    monkeypatch.setitem(batched.DEFAULT_MAX_RUNS, "cpu", 4)
    calls = []
    real = batched.fit_batched
    monkeypatch.setattr(
        "rankkit.sweep.fit_batched", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
    )
    together = _sweep(tmp_path, "batched").results.set_index("run_id").sort_index()
    assert calls == [3, 3]  # 6 LoRA runs, at most 4 per batch: 2 even groups of 3
    calls.clear()
    alone = _sweep(tmp_path, "single", batch=False).results.set_index("run_id").sort_index()
    assert calls == []
    assert list(together.columns) == list(alone.columns)
    assert (together["status"] == "ok").all()
    same = ["task", "method", "rank", "alpha", "targets", "seed", "trainable_params",
            "total_params", "trainable_fraction", "val_metric", "test_metric", "metric", "adapter"]  # fmt: skip
    pd.testing.assert_frame_equal(together[same], alone[same])
    from rankkit.checkpoints import load_state_dict

    for adapter in together["adapter"]:
        a = load_state_dict(tmp_path / "batched" / adapter)
        b = load_state_dict(tmp_path / "single" / adapter)
        for key in b:
            torch.testing.assert_close(a[key], b[key], atol=ATOL, rtol=0)


@pytest.mark.usefixtures("small_digits")
def test_a_failing_batch_falls_back_to_single_runs(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected batch failure")

    monkeypatch.setattr("rankkit.sweep.fit_batched", broken)
    logged = []
    config = SweepConfig(**{**SWEEP, "ranks": [1, 2]}, out=str(tmp_path / "fallback"))
    result = run_sweep(config, progress=False, plot=False, log=logged.append)
    assert (result.results["status"] == "ok").all() and len(result.results) == 4
    assert any("injected batch failure" in line and "one by one" in line for line in logged)


@pytest.mark.usefixtures("small_digits")
def test_a_run_failing_after_batched_training_is_recorded_and_the_others_finish(
    tmp_path, monkeypatch
):
    import rankkit.lora

    real = rankkit.lora.save_adapter

    def flaky(model, directory, **kwargs):
        if "-r2-" in str(directory):
            raise OSError("injected disk failure")
        return real(model, directory, **kwargs)

    monkeypatch.setattr("rankkit.sweep.save_adapter", flaky)
    config = SweepConfig(**{**SWEEP, "ranks": [1, 2], "seeds": [0]}, out=str(tmp_path / "flaky"))
    rows = run_sweep(config, progress=False, plot=False, log=lambda _: None).results
    rows = rows.set_index("rank")
    assert rows.loc[2, "status"] == "error" and "injected disk failure" in rows.loc[2, "error"]
    assert rows.loc[1, "status"] == "ok"
    monkeypatch.setattr("rankkit.sweep.save_adapter", real)
    # Resuming retries only the failed run (alone: a batch needs two runs).
    again = run_sweep(config, progress=False, plot=False, log=lambda _: None)
    assert again.ran == ["lora-r2-a1.41421-all_linear-s0"]
    assert (again.results["status"] == "ok").all()
