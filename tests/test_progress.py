"""Progress that a user can read: totals that hold, and batched groups that report epochs."""

from typing import ClassVar

import pytest
from tqdm.auto import tqdm

import rankkit.intrinsic
from rankkit.batched import fit_batched
from rankkit.intrinsic import search_intrinsic_dimension
from rankkit.lora import LoraConfig
from rankkit.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")


class RecordingBar(tqdm):
    """A tqdm bar that remembers (runs done, total) after every update."""

    bars: ClassVar[list["RecordingBar"]] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []
        RecordingBar.bars.append(self)

    def update(self, n=1):
        super().update(n)
        self.seen.append((self.n, self.total))


@pytest.mark.parametrize("d_true", [3, 37, 140, 999, 5000])
@pytest.mark.parametrize("rtol", [0.0, 0.05, 0.2])
def test_the_intrinsic_dimension_bar_has_a_total_it_never_overruns(monkeypatch, d_true, rtol):
    monkeypatch.setattr(rankkit.intrinsic, "tqdm", RecordingBar)
    RecordingBar.bars.clear()
    seeds = (0, 1)
    curve, d90, _ = search_intrinsic_dimension(
        lambda d, seed: float(d >= d_true), 0.5, D=100_000, seeds=seeds, rtol=rtol
    )
    (bar,) = RecordingBar.bars
    assert bar.seen[0][1] is not None, "the bar needs a total for an ETA"
    assert all(done <= total for done, total in bar.seen)
    assert bar.n == bar.total == len(curve)
    if rtol == 0:
        assert d90 == d_true


def test_a_batched_group_reports_every_epoch():
    task = get_task("digits")
    configs = [LoraConfig(r=r, lora_alpha=r, target_modules="all-linear") for r in (1, 2)]
    epochs = []
    fit_batched(task, configs, [0, 0], epochs=3, device="cpu",
                on_epoch=lambda epoch, total: epochs.append((epoch, total)))  # fmt: skip
    assert epochs == [(1, 3), (2, 3), (3, 3)]
