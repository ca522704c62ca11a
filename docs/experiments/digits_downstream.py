"""Which downstream task on sklearn's digits makes a pretrained base worth more than a random one?

Issue 15 asks that a frozen *pretrained* body with a trained head beat a frozen *random*
body with a trained head by at least 5 seed standard deviations, while full fine-tuning
keeps a large gain over the frozen base. ``digits_shift.py`` and ``digits_pretext.py``
found no shift and no pretraining objective that does this on the shipped downstream
task, which logistic regression on the raw pixels nearly solves. This script keeps the
MLP body (``fc1``, ``fc2``: the same LoRA targets) and changes the *downstream task*
instead, to ones that a linear read-out of random features should not solve.

The split idea stays: a fixed permutation (seed 0) of the 1,797 images; the base sees
images of the first half only; every downstream example is built from images of the
second half only, whose images are first split 60 / 20 / 20 into train / val / test
*pools*, so a test example uses only test-pool images (never seen in pretraining nor in
downstream training). Examples are drawn once, with seed 0.

Designs (``design`` argument):

``pairs-mod10``, ``pairs-gt``, ``pairs-absdiff``, ``pairs-sum``
    Two digits side by side (8x16 = 128 inputs). The base is pretrained on pairs of
    first-half images to name both digits (20 logits, two cross-entropies). Downstream
    label of a pair ``(a, b)``: ``(a + b) mod 10``; ``a > b`` (pairs with ``a == b``
    dropped); ``|a - b|``; ``a + b`` (19 classes). Suffix ``-rot`` rotates both
    downstream digits by 90 degrees.
``place12-up``, ``place12-rot``, ``place16-up``, ``place16-rot``
    One digit at a random position on a 12x12 or 16x16 canvas. The base is pretrained
    to classify all ten upright digits of the first half at random positions;
    downstream, second-half digits at new random positions, upright or rotated 90°.

For each design and width, one base is pretrained (seed 0, ``DigitsTask.pretrain_hparams``,
the whole schedule), then for seeds 0-2, with ``DigitsTask.default_hparams`` and model
selection on the val split (``prepare_run`` and ``fit``): the frozen pretrained body +
head, the frozen random body + head, full fine-tuning and training from scratch. Margin =
(frozen pretrained - frozen random) / the larger of their seed sds; gain = full - frozen
pretrained. Logistic regression on the raw inputs is a reference. Results: ``docs/tasks.md``.

``--head-epochs`` / ``--epochs`` override the 30 epochs of the head-only / other runs;
``--lora 1,4,16`` also runs LoRA on ``fc1``, ``fc2`` (``alpha = sqrt(r)``, the task's
``lora_lr``, head trained) and prints each rank's share of the full-FT gain.

    python docs/experiments/digits_downstream.py pairs-mod10,256 place16-rot,64,1000
    # design,hidden[,downstream training examples (default 3000)]
"""

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch.utils.data import TensorDataset

from rankkit.lora import LoraConfig
from rankkit.methods import prepare_run
from rankkit.tasks.base import Task
from rankkit.tasks.digits import SPLIT_SEED, DigitsMLP, DigitsTask, digit_halves
from rankkit.tasks.digits import image_pools as pools
from rankkit.train import fit

torch.set_num_threads(1)

SEEDS = (0, 1, 2)
SIZES = {"train": 3000, "val": 1000, "test": 1000}  # examples drawn per downstream split
PRETRAIN_SIZES = {"train": 8000, "val": 1000, "test": 1000}
LABELS = {  # pair label and number of classes
    "mod10": (lambda a, b: (a + b) % 10, 10),
    "gt": (lambda a, b: (a > b).astype(int), 2),
    "absdiff": (lambda a, b: np.abs(a - b), 10),
    "sum": (lambda a, b: a + b, 19),
}


def halves() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(images, labels)`` of the first and second half of the fixed permutation."""
    x_pre, y_pre, x_rest, y_rest = digit_halves()
    return (x_pre, y_pre), (x_rest, y_rest)


def draw_pairs(x, y, n, rng, label=None, rotate=False):
    """``n`` pairs of images of one pool side by side, flattened (8x16 = 128 inputs).

    ``label`` maps the two digits to the downstream label; None keeps both digits
    (an ``(n, 2)`` label, for pretraining). ``gt`` drops pairs of equal digits.
    """
    i, j = rng.integers(0, len(x), size=(2, 4 * n if label == "gt" else n))
    if label == "gt":
        keep = np.flatnonzero(y[i] != y[j])[:n]
        i, j = i[keep], j[keep]
    left, right = x[i], x[j]
    if rotate:
        left, right = np.rot90(left, 1, axes=(1, 2)), np.rot90(right, 1, axes=(1, 2))
    images = np.concatenate([left, right], axis=2).reshape(len(i), -1)
    a, b = y[i], y[j]
    target = np.stack([a, b], axis=1) if label is None else LABELS[label][0](a, b)
    return np.ascontiguousarray(images), target


def draw_placed(x, y, n, rng, size, rotate=False):
    """``n`` images of one pool, each at a random position on a ``size`` x ``size`` canvas."""
    pick = rng.integers(0, len(x), size=n)
    top, left = rng.integers(0, size - 8 + 1, size=(2, n))
    canvas = np.zeros((n, size, size), dtype=np.float32)
    images = np.rot90(x[pick], 1, axes=(1, 2)) if rotate else x[pick]
    for k in range(n):
        canvas[k, top[k] : top[k] + 8, left[k] : left[k] + 8] = images[k]
    return canvas.reshape(n, -1), y[pick]


def build_splits(x, y, fractions, sizes, draw) -> dict[str, TensorDataset]:
    """Split the images into pools, then draw each split's examples from its own pool.

    Each split has its own generator, so the val and test examples do not depend on
    how many training examples are drawn.
    """
    out = {}
    for k, (split, (a, b)) in enumerate(pools(x, y, fractions).items()):
        rng = np.random.default_rng([SPLIT_SEED, k])
        inputs, labels = draw(a, b, sizes[split], rng)
        out[split] = TensorDataset(torch.from_numpy(inputs), torch.from_numpy(labels).long())
    return out


class Pretext(Task):
    """The base's pretraining: name both digits of a pair, or classify a placed digit."""

    metric_name = "accuracy"
    default_hparams = DigitsTask.pretrain_hparams

    def __init__(self, kind: str) -> None:
        self.kind, self.name = kind, f"digits-pretext-{kind}"
        (x, y), _ = halves()
        if kind == "pairs":
            draw = lambda a, b, n, rng: draw_pairs(a, b, n, rng)  # noqa: E731
        else:
            draw = lambda a, b, n, rng: draw_placed(a, b, n, rng, int(kind[5:]))  # noqa: E731
        self.data = build_splits(x, y, (0.8, 0.1, 0.1), PRETRAIN_SIZES, draw)
        self.outputs = 20 if kind == "pairs" else 10
        self.inputs = self.data["train"].tensors[0].shape[1]

    def splits(self) -> dict[str, TensorDataset]:
        return self.data

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        if self.kind != "pairs":
            return super().loss(model, batch)
        logits = model(x)
        return F.cross_entropy(logits[:, :10], y[:, 0]) + F.cross_entropy(logits[:, 10:], y[:, 1])

    @torch.no_grad()
    def evaluate(self, model, split: str = "test", device=None) -> float:
        """Accuracy; for pairs, the fraction of pairs with both digits right."""
        if self.kind != "pairs":
            return super().evaluate(model, split, device)
        x, y = self.data[split].tensors
        was_training = model.training
        model.eval()
        logits = model(x)
        both = (logits[:, :10].argmax(-1) == y[:, 0]) & (logits[:, 10:].argmax(-1) == y[:, 1])
        model.train(was_training)
        return both.float().mean().item()


class Downstream(Task):
    """A downstream task built from second-half images only (cross-entropy, accuracy)."""

    metric_name = "accuracy"
    head_modules = ["head"]  # noqa: RUF012
    default_hparams = DigitsTask.default_hparams

    def __init__(self, design: str, n_train: int = SIZES["train"]) -> None:
        self.name = f"digits-{design}"
        _, (x, y) = halves()
        kind, label, *rot = design.split("-")
        rotate = bool(rot) or label == "rot"
        if kind == "pairs":
            draw = lambda a, b, n, rng: draw_pairs(a, b, n, rng, label, rotate)  # noqa: E731
            self.pretext, self.classes = "pairs", LABELS[label][1]
        else:
            size = int(kind[5:])
            draw = lambda a, b, n, rng: draw_placed(a, b, n, rng, size, rotate)  # noqa: E731
            self.pretext, self.classes = kind, 10
        sizes = {**SIZES, "train": n_train}
        self.data = build_splits(x, y, (0.6, 0.2, 0.2), sizes, draw)
        self.inputs = self.data["train"].tensors[0].shape[1]

    def splits(self) -> dict[str, TensorDataset]:
        return self.data


def check_disjoint() -> None:
    """Report downstream test images with an exact copy among the images seen before them.

    The halves and pools are disjoint by index (``halves``, ``pools``); sklearn's digits
    may still hold a few identical images, so count them rather than assume none.
    """
    (x_pre, _), (x_down, y_down) = halves()
    split = pools(x_down, y_down, (0.6, 0.2, 0.2))
    seen = {im.tobytes() for im in np.concatenate([x_pre, split["train"][0], split["val"][0]])}
    copies = sum(im.tobytes() in seen for im in split["test"][0])
    print(
        f"downstream test images with an exact copy among pretraining or downstream "
        f"train / val images: {copies} of {len(split['test'][0])}"
    )


BASES: dict[tuple[str, int], tuple[dict, float]] = {}


def pretrain(kind: str, hidden: int) -> tuple[dict[str, torch.Tensor], float]:
    """The body of a base pretrained on ``kind`` (seed 0, whole schedule), and its test score."""
    if (kind, hidden) not in BASES:
        pretext = Pretext(kind)
        torch.manual_seed(0)
        model = DigitsMLP(hidden=hidden, n_classes=pretext.outputs, n_inputs=pretext.inputs)
        epochs = pretext.default_hparams["epochs"]
        result = fit(model, pretext, seed=0, progress=False, device="cpu", eval_every=epochs)
        body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        BASES[kind, hidden] = body, result.metrics["test_accuracy"]
    return BASES[kind, hidden]


def builder(body, hidden: int, classes: int, inputs: int):
    """``model_fn(pretrained, seed)`` for ``prepare_run``, as ``DigitsTask.build_model`` does."""

    def build(pretrained: bool, seed: int) -> DigitsMLP:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsMLP(hidden=hidden, n_classes=classes, n_inputs=inputs)
        if pretrained:
            model.load_state_dict(body, strict=False)
        return model

    return build


RUNS = {
    "frozen": ("frozen", True),
    "random_frozen": ("frozen", False),
    "full": ("full", True),
    "scratch": ("full", False),
}


def measure(design: str, hidden: int, n_train: int, options: argparse.Namespace) -> dict:
    started = time.time()
    task = Downstream(design, n_train)
    body, pretext_score = pretrain(task.pretext, hidden)
    build = builder(body, hidden, task.classes, task.inputs)
    row = {"design": design, "hidden": hidden, "n_train": n_train}
    row["pretext_test"] = round(pretext_score, 3)
    run_seconds = []
    for name, (method, pretrained) in RUNS.items():
        epochs = options.head_epochs if method == "frozen" else options.epochs
        scores = []
        for seed in SEEDS:
            run = prepare_run(task, method, seed, pretrained=pretrained, model_fn=build)
            result = run.fit(task, epochs=epochs, progress=False, device="cpu")
            scores.append(round(result.metrics["test_accuracy"], 3))
            run_seconds.append(result.wall_time_s)
        row[name] = scores
    mean = {k: float(np.mean(row[k])) for k in RUNS}
    sds = {k: float(np.std(row[k], ddof=1)) for k in RUNS}
    sd = max(sds["frozen"], sds["random_frozen"], 1e-9)
    row["margin_sd"] = round((mean["frozen"] - mean["random_frozen"]) / sd, 1)
    row["gain"] = round(mean["full"] - mean["frozen"], 3)
    # full >= scratch "within noise": not below scratch by more than their larger sd
    row["full_ge_scratch"] = bool(
        mean["full"] >= mean["scratch"] - max(sds["full"], sds["scratch"])
    )
    row["chance"] = round(chance(task), 3)
    row["meets_all"] = bool(
        row["margin_sd"] >= 5 and row["gain"] >= 0.15 and row["full_ge_scratch"]
        and mean["full"] >= row["chance"] + 0.3
    )  # fmt: skip
    x_train, y_train = (t.numpy() for t in task.splits()["train"].tensors)
    x_test, y_test = (t.numpy() for t in task.splits()["test"].tensors)
    linear = LogisticRegression(max_iter=3000).fit(x_train, y_train)
    row["logreg"] = round(linear.score(x_test, y_test), 3)
    row["s_per_run"] = round(float(np.mean(run_seconds)), 1)
    for r in options.lora:
        # as ``python -m rankkit sweep``: every linear layer but the head, alpha = sqrt(r)
        config = LoraConfig(
            r=r, lora_alpha=r**0.5, target_modules=["fc1", "fc2"], modules_to_save=["head"]
        )
        scores = []
        for seed in SEEDS:
            run = prepare_run(task, "lora", seed, lora_config=config, model_fn=build)
            result = run.fit(task, epochs=options.epochs, progress=False, device="cpu")
            scores.append(round(result.metrics["test_accuracy"], 3))
        row[f"lora_r{r}"] = scores
        row[f"lora_r{r}_share_of_gain"] = round((np.mean(scores) - mean["frozen"]) / row["gain"], 2)
    row["seconds"] = round(time.time() - started, 1)
    return row


def chance(task: Downstream) -> float:
    """Test accuracy of always predicting the most frequent training label."""
    y_train = task.splits()["train"].tensors[1]
    y_test = task.splits()["test"].tensors[1]
    return (y_test == torch.bincount(y_train).argmax()).float().mean().item()


def table_row(row: dict) -> str:
    def cell(k):
        return f"{np.mean(row[k]):.3f} ± {np.std(row[k], ddof=1):.3f}"

    return (
        f"| {row['hidden']} | `{row['design']}` | {row['n_train']} | {row['pretext_test']:.3f} "
        f"| {row['chance']:.3f} | {row['logreg']:.3f} | {cell('frozen')} | {cell('random_frozen')} "
        f"| {row['margin_sd']:+.1f} | {cell('full')} | {row['gain']:+.3f} | {cell('scratch')} "
        f"| {'yes' if row['full_ge_scratch'] else 'no'} | {row['s_per_run']} |"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "variants", nargs="+", help="design,hidden[,downstream training examples (3000)]"
    )
    parser.add_argument("--epochs", type=int, help="full / scratch / LoRA epochs (task's: 30)")
    parser.add_argument("--head-epochs", type=int, help="frozen-body epochs (task's: 30)")
    parser.add_argument("--lora", default="", help="also LoRA on fc1, fc2 at ranks, e.g. 1,4,16")
    options = parser.parse_args()
    options.lora = [int(r) for r in options.lora.split(",") if r]
    return options


if __name__ == "__main__":
    options = parse_args()
    check_disjoint()
    rows = []
    for arg in options.variants:
        design, hidden, *n_train = arg.split(",")
        n = int(n_train[0]) if n_train else SIZES["train"]
        rows.append(measure(design, int(hidden), n, options))
        print(json.dumps(rows[-1]), flush=True)
    print(
        "| hidden | design | train examples | pretext test | chance | logreg raw "
        "| frozen pretrained + head | frozen random + head | margin (sd) | full FT | gain "
        "| scratch | full ≥ scratch | s/run |"
    )
    print("|---" * 14 + "|")
    for row in rows:
        print(table_row(row))
    for row in rows:
        for r in options.lora:
            scores = row[f"lora_r{r}"]
            print(
                f"{row['design']},{row['hidden']}: LoRA r = {r}: {np.mean(scores):.3f} ± "
                f"{np.std(scores, ddof=1):.3f}, {row[f'lora_r{r}_share_of_gain']:.0%} of the gain"
            )
    met = [f"{row['design']},{row['hidden']},{row['n_train']}" for row in rows if row["meets_all"]]
    print(
        "designs meeting all three (margin >= 5 sd, gain >= 0.15, full >= scratch within "
        "noise; and full FT >= chance + 0.3):",
        ", ".join(met) or "none",
    )
