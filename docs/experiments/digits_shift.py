"""Which pretraining/fine-tuning shift makes the digits base worth more than a random one?

Issue 15 asks that a frozen *pretrained* body with a trained head beat a frozen *random*
body with a trained head by at least 5 seed standard deviations, on every task. This
script measures candidate variants of the ``digits`` task (hidden width, rotation of
the fine-tuning images in degrees, number of upright classes the base is pretrained
on) without changing the shipped task: each variant pretrains its own base in memory
(seed 0, the task's pretraining recipe) and then runs, for seeds 0-2, the frozen base
(head only), the frozen random body (head only), full fine-tuning and training from
scratch, with the task's default hyper-parameters. Results: ``docs/tasks.md``.

    python docs/experiments/digits_shift.py 256,90,5 64,0,7     # hidden,degrees,classes
"""

import json
import sys
import time

import numpy as np
import torch
from scipy.ndimage import rotate

from rankkit.methods import prepare_run
from rankkit.tasks import digits as D
from rankkit.train import fit

torch.set_num_threads(1)


def variant(hidden: int, degrees: int, pretrain_classes: int) -> D.DigitsTask:
    """The digits task with another width, rotation and pretraining label set."""

    class Pretext(D.UprightDigitsTask):
        def _make_model(self):
            return D.DigitsMLP(hidden=hidden, n_classes=pretrain_classes)

        def splits(self):
            x, y, _, _ = D.digit_halves()
            keep = y < pretrain_classes
            return D.stratified_splits(x[keep], y[keep], fractions=(0.8, 0.1, 0.1))

    pretext = Pretext()
    model = pretext.build_model(pretrained=False, seed=0)
    fit(model, pretext, seed=0, progress=False, device="cpu")
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    _, _, x, y = D.digit_halves()
    if degrees == 90:
        x = D.rotate90(x)
    elif degrees:
        x = rotate(x, degrees, axes=(1, 2), reshape=False, order=1).clip(0, 1)
    splits = D.stratified_splits(x.astype(np.float32), y)

    class Variant(D.DigitsTask):
        def _make_model(self):
            return D.DigitsMLP(hidden=hidden)

        def splits(self):
            return splits

        def _base_state(self):
            return body

    return Variant()


RUNS = {
    "frozen": ("frozen", True),
    "random_frozen": ("frozen", False),
    "full": ("full", True),
    "scratch": ("full", False),
}

for arg in sys.argv[1:]:
    hidden, degrees, classes = map(int, arg.split(","))
    started = time.time()
    task = variant(hidden, degrees, classes)
    row = {"hidden": hidden, "degrees": degrees, "pretrain_classes": classes}
    for name, (method, pretrained) in RUNS.items():
        scores = []
        for seed in (0, 1, 2):
            run = prepare_run(task, method, seed, pretrained=pretrained)
            result = fit(run.model, task, lr=run.lr, seed=seed, progress=False, device="cpu")
            scores.append(round(result.metrics["test_accuracy"], 3))
        row[name] = scores
    mean = {k: float(np.mean(row[k])) for k in RUNS}
    sd = max(np.std(row["frozen"], ddof=1), np.std(row["random_frozen"], ddof=1), 1e-9)
    row["margin_sd"] = round((mean["frozen"] - mean["random_frozen"]) / sd, 1)
    row["gain"] = round(mean["full"] - mean["frozen"], 3)
    row["seconds"] = round(time.time() - started, 1)
    print(json.dumps(row), flush=True)
