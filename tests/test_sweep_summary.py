"""The sweep summary's verdicts, computed from hand-made results with known answers."""

from __future__ import annotations

import pandas as pd
import pytest

from rankkit.sweep import format_summary, rank_for_gain, rank_for_gain_interval, summarize


def results(full: list[float], frozen: list[float], lora: dict[int, list[float]]) -> pd.DataFrame:
    """A results table: one row per seed of full fine-tuning, the frozen base and each rank."""
    rows = [{"method": "full", "rank": None, "test_metric": v} for v in full]
    rows += [{"method": "frozen", "rank": None, "test_metric": v} for v in frozen]
    rows += [{"method": "lora", "rank": r, "test_metric": v} for r, vs in lora.items() for v in vs]
    frame = pd.DataFrame(rows)
    frame["targets"] = frame["method"].map(lambda m: "q,v" if m == "lora" else None)
    frame["status"], frame["metric"] = "ok", "accuracy"
    frame["alpha"] = frame["rank"]
    frame["trainable_params"] = frame["trainable_fraction"] = 1.0
    frame["run_id"] = [f"run{i}" for i in range(len(frame))]
    return frame


def test_a_rank_exactly_on_the_threshold_reaches_it():
    # 0.5 + 0.9 * (0.9 - 0.5) = 0.86 exactly; as a ratio (0.86 - 0.5) / 0.4 = 0.8999999999999999.
    assert (0.86 - 0.5) / (0.9 - 0.5) < 0.9  # the round-off the comparison must survive
    table = results(full=[0.9], frozen=[0.5], lora={1: [0.8], 2: [0.86], 4: [0.9]})
    assert rank_for_gain(table, 0.9) == 2
    assert rank_for_gain(table, 0.95) == 4
    just_below = results(full=[0.9], frozen=[0.5], lora={1: [0.8], 2: [0.8599], 4: [0.9]})
    assert rank_for_gain(just_below, 0.9) == 4


def test_the_bootstrap_interval_uses_the_same_threshold():
    table = results(full=[0.9, 0.9], frozen=[0.5, 0.5], lora={1: [0.8, 0.8], 2: [0.86, 0.86]})
    assert rank_for_gain_interval(table, 0.9) == (2.0, 2.0)


def test_full_fine_tuning_below_the_frozen_base_is_said_as_it_is():
    # LoRA beats both baselines; full fine-tuning is below the frozen base.
    table = results(full=[0.6, 0.6], frozen=[0.7, 0.7], lora={1: [0.65, 0.65], 4: [0.8, 0.8]})
    assert "gain" not in summarize(table)  # no sign-flipped gain
    assert rank_for_gain(table, 0.9) is None
    text = format_summary(table)
    assert "did not beat the frozen base" in text
    assert "LoRA's best mean is 0.8 (targets q,v, r=4), above both baselines" in text
    assert "warning" not in text and "90% of the full-FT gain" not in text


@pytest.mark.parametrize(
    ("lora", "verdict"),
    [
        ({1: [0.65]}, "above full fine-tuning, below the frozen base"),
        ({1: [0.5]}, "below both baselines"),
    ],
)
def test_the_full_below_frozen_verdict_follows_the_numbers(lora, verdict):
    text = format_summary(results(full=[0.6], frozen=[0.7], lora=lora))
    assert verdict in text


def test_a_collapsed_lora_run_is_still_flagged_when_full_beats_frozen():
    table = results(full=[0.9], frozen=[0.5], lora={1: [0.86], 32: [0.1]})
    text = format_summary(table)
    assert "90% of the full-FT gain at rank 1" in text
    assert "warning: LoRA scored far below the frozen base at q,v r=32" in text


def test_a_gain_not_reached_names_the_largest_rank_swept():
    # Gains 0.5 and 0.8 at r = 1, 4: neither reaches 90%, and the line says up to which rank.
    text = format_summary(
        results(full=[0.9, 0.9], frozen=[0.5, 0.5], lora={1: [0.7, 0.7], 4: [0.82, 0.82]})
    )
    assert (
        "90% of the full-FT gain not reached by rank 4 [not reached], 95% not reached by rank 4"
        in text
    )
    assert "at rank not reached" not in text
