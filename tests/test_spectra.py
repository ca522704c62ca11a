"""Spectral analysis against ground truth: planted ranks, invariants, hand computations."""

import copy
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

import rankkit
from rankkit.checkpoints import CheckpointError, save_state_dict
from rankkit.reports import format_report
from rankkit.spectra import (
    EFFECTIVE_RANK_METHODS,
    demo_pair,
    marchenko_pastur_median,
    random_singular_values,
    top_singular_subspace,
)


def planted(m, n, k, sigma, seed=0, strength=None):
    """M = U diag(s) V^T + sigma Z with exactly k signal directions."""
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((m, k)))[0]
    V = np.linalg.qr(rng.standard_normal((n, k)))[0]
    s = np.linspace(2.0, 1.0, k) * (strength if strength else 1.0)
    return U @ np.diag(s) @ V.T + sigma * rng.standard_normal((m, n))


# --------------------------------------------------------------------------- singular values


def test_singular_values_match_numpy_and_are_descending():
    M = np.random.default_rng(0).standard_normal((30, 17))
    s = rankkit.singular_values(M)
    np.testing.assert_allclose(s, np.linalg.svd(M, compute_uv=False), rtol=1e-12)
    assert np.all(np.diff(s) <= 0)
    assert s.dtype == np.float64


def test_large_matrices_use_float32_small_float64():
    small = torch.randn(64, 64, dtype=torch.float64)
    big = torch.randn(1024, 600, dtype=torch.float64)
    exact = np.linalg.svd(big.numpy(), compute_uv=False)
    np.testing.assert_allclose(
        rankkit.singular_values(small), np.linalg.svd(small.numpy())[1], rtol=1e-12
    )
    s_big = rankkit.singular_values(big)
    # float32 accuracy, not float64: close but not to 1e-12.
    np.testing.assert_allclose(s_big, exact, rtol=1e-4)
    assert np.max(np.abs(s_big - exact) / exact) > 1e-12


def test_bf16_and_fp16_are_upcast():
    M = torch.randn(40, 20)
    for dtype in (torch.bfloat16, torch.float16):
        low = M.to(dtype)
        expected = np.linalg.svd(low.to(torch.float64).numpy(), compute_uv=False)
        np.testing.assert_allclose(rankkit.singular_values(low), expected, rtol=1e-10)


def test_conv_kernel_is_reshaped_to_out_by_fan_in():
    kernel = torch.randn(8, 3, 3, 3, dtype=torch.float64)
    expected = np.linalg.svd(kernel.reshape(8, 27).numpy(), compute_uv=False)
    np.testing.assert_allclose(rankkit.singular_values(kernel), expected, rtol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_rejected(bad):
    M = torch.randn(5, 5)
    M[2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        rankkit.singular_values(M)
    with pytest.raises(ValueError, match="NaN or Inf"):
        rankkit.effective_rank(M)


def test_one_dimensional_input_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="biases"):
        rankkit.singular_values(torch.randn(10))


# --------------------------------------------------------------------------- effective ranks


def test_planted_rank_is_recovered_by_optimal_hard_threshold():
    for m, n, k in [(200, 100, 5), (100, 100, 1), (64, 300, 12)]:
        # Signal well above the detection edge sigma * (sqrt(m) + sqrt(n)).
        sigma = 0.01
        M = planted(m, n, k, sigma, seed=k, strength=5 * sigma * (math.sqrt(m) + math.sqrt(n)))
        assert rankkit.effective_rank(M, "optimal") == k
        assert rankkit.effective_rank(M, "optimal", sigma=sigma) == k


def test_optimal_rank_of_pure_noise_is_small_and_signal_below_edge_is_invisible():
    Z = np.random.default_rng(1).standard_normal((300, 150))
    assert rankkit.effective_rank(Z, "optimal") <= 1
    # A spike far below the bulk edge cannot be detected.
    weak = planted(300, 150, 3, sigma=1.0, strength=0.5)
    assert rankkit.effective_rank(weak, "optimal", sigma=1.0) == 0


def test_gavish_donoho_constants():
    # Square matrices: lambda* = 4/sqrt(3) and omega(1) ~= 2.858 (Gavish & Donoho 2014).
    n = 100
    assert rankkit.gavish_donoho_threshold(np.ones(n), shape=(n, n), sigma=1.0) == pytest.approx(
        4 / math.sqrt(3) * math.sqrt(n)
    )
    omega = rankkit.gavish_donoho_threshold(np.ones(n), shape=(n, n))
    assert omega == pytest.approx(2.858, abs=1e-3)
    # Their polynomial approximation omega(beta) ~ 0.56b^3 - 0.95b^2 + 1.82b + 1.43.
    for beta in (0.1, 0.25, 0.5, 0.8):
        m = int(1000 * beta)
        exact = rankkit.gavish_donoho_threshold(np.ones(m), shape=(m, 1000))
        approx = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
        assert exact == pytest.approx(approx, rel=0.01)
    # MP median of the square case, from the CDF definition.
    assert marchenko_pastur_median(1.0) == pytest.approx(0.6528, abs=1e-4)


def test_numerical_rank_matches_numpy_matrix_rank():
    rng = np.random.default_rng(3)
    for k in (1, 3, 7, 20):
        M = rng.standard_normal((40, k)) @ rng.standard_normal((k, 25))
        assert rankkit.effective_rank(M, "numerical") == np.linalg.matrix_rank(M)
        M32 = M.astype(np.float32)
        assert rankkit.effective_rank(M32, "numerical") == np.linalg.matrix_rank(M32)


def test_energy_rank_matches_hand_computation():
    s = np.array([4.0, 2.0, 1.0, 1.0])  # s^2 = 16, 4, 1, 1 -> total 22
    # cumulative fractions: 16/22 = .727, 20/22 = .909, 21/22 = .955, 1
    assert rankkit.effective_rank(s, "energy", threshold=0.7) == 1
    assert rankkit.effective_rank(s, "energy", threshold=0.9) == 2
    assert rankkit.effective_rank(s, "energy", threshold=0.95) == 3
    assert rankkit.effective_rank(s, "energy", threshold=0.96) == 4
    assert rankkit.effective_rank(s, "energy", threshold=1.0) == 4


def test_entropy_rank_uses_singular_values_not_their_squares():
    s = np.array([3.0, 1.0])
    p = s / s.sum()
    expected = math.exp(-(p * np.log(p)).sum())
    q = s**2 / (s**2).sum()
    wrong = math.exp(-(q * np.log(q)).sum())
    assert rankkit.effective_rank(s, "entropy") == pytest.approx(expected)
    assert abs(expected - wrong) > 0.1


def test_stable_and_participation_hand_values():
    s = np.array([3.0, 4.0])  # sorted -> 4, 3
    assert rankkit.effective_rank(s, "stable") == pytest.approx(25 / 16)
    assert rankkit.effective_rank(s, "participation") == pytest.approx(625 / (256 + 81))


@pytest.mark.parametrize("n", [1, 5, 64])
def test_identity_has_full_rank_under_every_measure(n):
    I = np.eye(n)
    assert rankkit.effective_rank(I, "entropy") == pytest.approx(n)
    assert rankkit.effective_rank(I, "stable") == pytest.approx(n)
    assert rankkit.effective_rank(I, "participation") == pytest.approx(n)
    assert rankkit.effective_rank(I, "numerical") == n
    assert rankkit.effective_rank(I, "energy", threshold=1.0) == n


@pytest.mark.parametrize("seed", range(5))
def test_orderings_hold(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 20))
    M = planted(50, 40, k, sigma=float(rng.uniform(0, 0.3)), seed=seed)
    stable = rankkit.effective_rank(M, "stable")
    part = rankkit.effective_rank(M, "participation")
    num = rankkit.effective_rank(M, "numerical")
    assert 1 - 1e-12 <= stable <= part + 1e-12
    assert part <= num + 1e-12


@pytest.mark.parametrize("method", EFFECTIVE_RANK_METHODS)
def test_every_measure_is_invariant_to_scale_and_transpose(method):
    M = planted(60, 35, 6, sigma=0.05, seed=2)
    ref = rankkit.effective_rank(M, method)
    assert rankkit.effective_rank(7.5 * M, method) == pytest.approx(ref, rel=1e-9)
    assert rankkit.effective_rank(1e-3 * M, method) == pytest.approx(ref, rel=1e-9)
    assert rankkit.effective_rank(M.T, method) == pytest.approx(ref, rel=1e-9)


def test_zero_matrix_has_rank_zero():
    for method in EFFECTIVE_RANK_METHODS:
        assert rankkit.effective_rank(np.zeros((4, 6)), method) == 0


def test_bad_method_and_options_are_explained():
    with pytest.raises(ValueError, match="did you mean 'entropy'"):
        rankkit.effective_rank(np.eye(3), "entropi")
    with pytest.raises(TypeError, match="threshold"):
        rankkit.effective_rank(np.eye(3), "stable", threshold=0.9)
    with pytest.raises(ValueError, match="shape"):
        rankkit.effective_rank([3.0, 2.0, 1.0], "optimal")
    with pytest.raises(ValueError, match="non-negative"):
        rankkit.effective_rank([3.0, -2.0], "entropy")


# --------------------------------------------------------------------------- random baseline


def test_random_baseline_is_seeded_scaled_and_high_rank():
    a = rankkit.random_baseline((128, 64), seed=1)
    b = rankkit.random_baseline((128, 64), seed=1)
    assert a == b
    scaled = rankkit.random_baseline((128, 64), norm=3.0, seed=1)
    assert scaled["frobenius_norm"] == pytest.approx(3.0)
    for method in EFFECTIVE_RANK_METHODS:
        if method != "energy":
            assert scaled[method] == pytest.approx(a[method])
    # No structure: Gavish-Donoho finds ~nothing, most energy needs most directions.
    assert a["optimal"] <= 1
    assert a["energy90"] > 0.6 * 64
    assert a["numerical"] == 64
    # Marchenko-Pastur: largest singular value of a Gaussian m x n ~ sqrt(m) + sqrt(n).
    s = random_singular_values((400, 100), seed=0)
    assert s[0] == pytest.approx(math.sqrt(400) + math.sqrt(100), rel=0.05)


# --------------------------------------------------------------------------- delta weights


def two_mlps(seed=0):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8))
    tuned = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8))
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned[0].weight += torch.outer(torch.randn(32), torch.randn(16))  # rank-1 update
        tuned[2].weight += 0.1 * torch.randn(8, 32)
    return base, tuned


def test_delta_weights_from_modules_state_dicts_and_files(tmp_path):
    base, tuned = two_mlps()
    from_modules = rankkit.delta_weights(base, tuned)
    assert list(from_modules) == ["0.weight", "2.weight"]
    torch.testing.assert_close(from_modules["0.weight"], tuned[0].weight - base[0].weight)
    assert set(from_modules.skipped) == {"0.bias", "2.bias", "3.weight", "3.bias"}
    assert rankkit.effective_rank(from_modules["0.weight"], "numerical") == 1

    save_state_dict(base, tmp_path / "base.safetensors")
    torch.save(tuned.state_dict(), tmp_path / "tuned.pt")
    from_files = rankkit.delta_weights(tmp_path / "base.safetensors", tmp_path / "tuned.pt")
    for k in from_modules:
        torch.testing.assert_close(from_files[k], from_modules[k])
    only_first = rankkit.delta_weights(base.state_dict(), tuned.state_dict(), layers=r"^0\.")
    assert list(only_first) == ["0.weight"]


def test_mismatched_checkpoints_are_reported_not_fatal():
    base, tuned = two_mlps()
    sd = tuned.state_dict()
    sd["extra.weight"] = torch.zeros(2, 2)
    del sd["2.weight"]
    deltas = rankkit.delta_weights(base, sd)
    assert list(deltas) == ["0.weight"]
    assert deltas.skipped["2.weight"] == "only in base"
    assert deltas.skipped["extra.weight"].startswith("only in fine-tuned")
    wide = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 9), nn.LayerNorm(8))
    deltas = rankkit.delta_weights(base, wide)
    assert list(deltas) == ["0.weight"]
    assert deltas.skipped["2.weight"] == "shape changed: (8, 32) -> (9, 32)"


def test_checkpoints_with_nothing_in_common_show_names_from_both_sides():
    base, _ = two_mlps()
    other = {"encoder.dense.weight": torch.zeros(4, 4)}
    with pytest.raises(
        CheckpointError, match=r"share no weight matrix(.|\n)*0\.weight(.|\n)*encoder\.dense"
    ):
        rankkit.delta_weights(base, other)


def test_nan_weights_name_the_parameter():
    base, tuned = two_mlps()
    with torch.no_grad():
        tuned[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'2\.weight' contains NaN"):
        rankkit.delta_weights(base, tuned)


def test_corrupt_and_pickled_files_give_clear_errors(tmp_path):
    base, tuned = two_mlps()
    good = save_state_dict(base, tmp_path / "base.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        rankkit.delta_weights(truncated, tuned)

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"0.weight": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        rankkit.delta_weights(base, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        rankkit.delta_weights(tmp_path / "absent.safetensors", tuned)


def test_layers_regex_that_matches_nothing_lists_candidates():
    base, tuned = two_mlps()
    with pytest.raises(ValueError, match=r"candidates are: 0\.weight, 2\.weight"):
        rankkit.delta_weights(base, tuned, layers="attn")


# --------------------------------------------------------------------------- rank report


def test_rank_report_recovers_planted_ranks_of_the_demo():
    base, tuned = demo_pair()
    report = rankkit.rank_report(base, tuned)
    planted_ranks = {"layer0.q.weight": 1, "layer0.v.weight": 4, "layer1.fc1.weight": 8,
                     "layer1.fc2.weight": 16}  # fmt: skip
    assert dict(zip(report["name"], report["dW_optimal"])) == planted_ranks
    # The random baseline of each shape is far higher.
    assert (report["rand_energy90"] > 2 * report["dW_energy90"]).all()
    row = report.set_index("name").loc["layer1.fc1.weight"]
    assert row["rows"] == 256 and row["cols"] == 64 and row["shape"] == "256x64"
    assert row["rel_change"] == pytest.approx(row["norm_dW"] / row["norm_W"])
    dW = tuned["layer1.fc1.weight"] - base["layer1.fc1.weight"]
    assert row["norm_dW"] == pytest.approx(float(torch.linalg.norm(dW)), rel=1e-5)
    assert row["dW_entropy"] == pytest.approx(rankkit.effective_rank(dW, "entropy"), rel=1e-5)
    assert row["W_numerical"] == 64
    assert len(report.attrs["skipped"]) == 4
    text = format_report(report)
    assert "layer1.fc1.weight" in text and "4 1-D (bias or norm)" in text


def test_rank_report_batches_same_shape_layers_exactly():
    # Batched SVD over a stack must equal per-matrix SVD.
    base, tuned = demo_pair(seed=3)
    report = rankkit.rank_report(base, tuned)
    for _, row in report.iterrows():
        dW = tuned[row["name"]] - base[row["name"]]
        assert row["dW_stable"] == pytest.approx(rankkit.effective_rank(dW, "stable"), rel=1e-6)


# --------------------------------------------------------------------------- section 7


def test_subspace_similarity_identical_orthogonal_and_partial():
    rng = np.random.default_rng(0)
    Q = np.linalg.qr(rng.standard_normal((20, 20)))[0]
    A = (Q[:, :4] * [4.0, 3.0, 2.0, 1.0]).T  # 4 x 20, right singular vectors Q[:, :4]
    B = (Q[:, 4:8] * [4.0, 3.0, 2.0, 1.0]).T
    assert rankkit.subspace_similarity(A, A, 4, 4) == pytest.approx(1.0)
    assert rankkit.subspace_similarity(A, 3 * A, 2, 4) == pytest.approx(1.0)  # nested
    assert rankkit.subspace_similarity(A, B, 4, 4) == pytest.approx(0.0, abs=1e-12)
    # Half of the top-2 directions shared: phi = 1/2.
    C = (np.stack([Q[:, 0], Q[:, 5]], axis=1) * [2.0, 1.0]).T
    assert rankkit.subspace_similarity(A, C, 2, 2) == pytest.approx(0.5)


def test_subspace_similarity_grid_matches_pointwise():
    rng = np.random.default_rng(1)
    A1, A2 = rng.standard_normal((8, 30)), rng.standard_normal((6, 30))
    grid = rankkit.subspace_similarity_grid(A1, A2)
    assert grid.shape == (8, 6)
    for i in (1, 3, 8):
        for j in (1, 4, 6):
            assert grid[i - 1, j - 1] == pytest.approx(rankkit.subspace_similarity(A1, A2, i, j))
    assert np.all((grid >= -1e-12) & (grid <= 1 + 1e-12))


def test_principal_angles_match_scipy():
    rng = np.random.default_rng(2)
    X, Y = rng.standard_normal((30, 4)), rng.standard_normal((30, 6))
    np.testing.assert_allclose(
        rankkit.principal_angles(X, Y), np.sort(scipy.linalg.subspace_angles(X, Y)), atol=1e-10
    )
    # Tiny angles are accurate (arccos alone would round them to ~1e-8).
    Y2 = X + 1e-10 * rng.standard_normal(X.shape)
    np.testing.assert_allclose(
        rankkit.principal_angles(X, Y2), np.sort(scipy.linalg.subspace_angles(X, Y2)), atol=1e-12
    )


def test_amplification_factor_hand_built():
    W = np.diag([10.0, 5.0, 2.0, 1.0])
    dW = np.zeros((4, 4))
    dW[3, 3] = 6.0  # ΔW amplifies W's weakest direction e4, where W has 1.0
    assert rankkit.amplification_factor(dW, W, r=1) == pytest.approx(6.0)
    dW[0, 0] = 8.0  # now rank 2: ||ΔW||_F = 10, projection of W onto {e1, e4} = diag(10, 1)
    assert rankkit.amplification_factor(dW, W, r=2) == pytest.approx(10.0 / math.sqrt(101))
    with pytest.raises(ValueError, match="between 1 and 4"):
        rankkit.amplification_factor(dW, W, r=5)


def test_top_singular_subspace_sides():
    M = np.random.default_rng(4).standard_normal((7, 3))
    assert top_singular_subspace(M, 2, "left").shape == (7, 2)
    assert top_singular_subspace(M, 2, "right").shape == (3, 2)
    with pytest.raises(ValueError, match="side"):
        top_singular_subspace(M, 2, "up")


# --------------------------------------------------------------------------- delta_report


def _lora_model(r: int = 3):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("fc1", nn.Linear(40, 64))
    base.add_module("fc2", nn.Linear(64, 48))
    model = rankkit.apply_lora(
        copy.deepcopy(base),
        rankkit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["fc1", "fc2"],
                           init_lora_weights=False),  # random B too: a full-rank-r update
        seed=1,
    )  # fmt: skip
    return base, model


def test_delta_report_of_a_lora_update_finds_its_rank_and_matches_rank_report():
    r = 3
    base, model = _lora_model(r)
    deltas = rankkit.lora_delta_weights(model)  # {module name: s·BA}
    report = rankkit.delta_report(deltas).set_index("name")
    assert list(report.index) == ["fc1", "fc2"]
    assert (report["dW_numerical"] == r).all()  # rank(BA) = r exactly
    assert "norm_W" not in report and not any(c.startswith("W_") for c in report)

    # The same numbers as merging a copy and comparing checkpoints.
    merged = rankkit.merge_and_unload(copy.deepcopy(model))
    full = rankkit.rank_report(base, merged).set_index("name")
    with_weights = rankkit.delta_report(
        deltas, weights={m: merged.get_submodule(m).weight for m in deltas}
    ).set_index("name")
    for module in deltas:
        a, b = with_weights.loc[module], full.loc[f"{module}.weight"]
        # Not dW_optimal: Gavish-Donoho estimates the noise level from the median singular
        # value, and an exact s·BA has none (merged - base carries float32 rounding noise).
        for column in ("norm_W", "W_stable", "dW_numerical", "rand_stable"):
            assert a[column] == pytest.approx(b[column], rel=1e-6), column
        for column in ("norm_dW", "dW_stable", "dW_entropy", "dW_energy90"):
            assert a[column] == pytest.approx(b[column], rel=1e-3), column


def test_delta_report_errors_and_skips():
    _, model = _lora_model()
    deltas = rankkit.lora_delta_weights(model)
    report = rankkit.delta_report({**deltas, "fc1.bias": torch.zeros(64)})
    assert len(report) == 2 and "fc1.bias" in report.attrs["skipped"]
    with pytest.raises(KeyError, match="weights has no entry 'fc2'"):
        rankkit.delta_report(deltas, weights={"fc1": torch.zeros(64, 40)})
    with pytest.raises(ValueError, match=r"fc1: update shape \(64, 40\) differs"):
        rankkit.delta_report(deltas, weights={"fc1": torch.zeros(40, 64), "fc2": deltas["fc2"]})
    bad = {k: v.clone() for k, v in deltas.items()}
    bad["fc2"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc2"):
        rankkit.delta_report(bad)
