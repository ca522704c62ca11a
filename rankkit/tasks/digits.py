"""``digits``: an MLP pretrained to read two digits, fine-tuned to add them modulo 10.

Data: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download).
Every example is a **pair**: two images side by side, an 8x16 picture flattened to
128 inputs in [0, 1].

* A fixed permutation (seed 0) splits the images into two disjoint halves; the
  base only ever sees images of the first half, fine-tuning only images of the
  second.
* Each half is split by image into stratified train / val / test *pools*
  (80 / 10 / 10 for pretraining, 60 / 20 / 20 for fine-tuning), and each split's
  pairs are drawn (seeded) from its own pool, so no test image is seen in training.
* The drawn pairs, as indices into ``load_digits``, are frozen in
  ``data/digits-data.json.gz`` (``python -m rankkit freeze-data digits``): neither numpy's
  random stream nor scikit-learn's splitting is promised to stay the same across
  versions, so every machine reads the pairs instead of drawing them.
* **Pretraining** (8,000 / 1,000 / 1,000 pairs): name both digits ``(a, b)``. The
  model has 20 logits, ten per position, and the loss is the sum of the two
  cross-entropies.
* **Fine-tuning** (3,000 / 1,000 / 1,000 pairs): a new 10-way head predicts
  ``(a + b) mod 10``.

Why this task. The pretrained features name both digits, yet ``(a + b) mod 10`` is
not a linear function of "which digit is left" and "which digit is right": each
label needs ten conjunctions such as "left is 3 and right is 4", which a linear
head on a frozen body cannot form. So:

* a frozen pretrained body with a trained head gets about halfway (0.56 test
  accuracy), far above a frozen *random* body (0.27) -- pretraining is worth
  something;
* full fine-tuning, where the hidden layers build those conjunctions, reaches
  0.86, and beats training the same network from scratch (0.80);
* LoRA must add what the head cannot, which takes a few ranks, not one.

Numbers: ``docs/tasks.md`` (three seeds each). The model is
``x -> fc1 -> ReLU -> fc2 -> ReLU -> head`` with 256 hidden units (101k
parameters); a full fine-tune (30 epochs) takes a couple of seconds on one CPU core.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from rankkit.tasks.base import Task, freeze_task_data, load_frozen_data
from rankkit.train import fit

HIDDEN = 256
N_CLASSES = 10
N_INPUTS = 128  # two 8x8 images side by side
SPLIT_SEED = 0
PRETRAIN_PAIRS = {"train": 8000, "val": 1000, "test": 1000}
FINETUNE_PAIRS = {"train": 3000, "val": 1000, "test": 1000}


class DigitsMLP(nn.Module):
    """Two hidden ReLU layers and a linear head, on flattened images scaled to [0, 1]."""

    def __init__(self, hidden: int = HIDDEN, n_classes: int = N_CLASSES, n_inputs: int = N_INPUTS):
        super().__init__()
        self.fc1 = nn.Linear(n_inputs, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@lru_cache(maxsize=1)
def load_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images of ``load_digits``, ``(n, 8, 8)`` in [0, 1], and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target


def half_indices() -> tuple[np.ndarray, np.ndarray]:
    """Indices of the two disjoint halves of the images, from a fixed permutation (seed 0)."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(load_images()[0]))
    half = len(order) // 2
    return order[:half], order[half:]


def digit_halves() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two disjoint halves of ``load_digits``: ``(x_pre, y_pre, x_ft, y_ft)``.

    No image the base is pretrained on appears in fine-tuning.
    """
    (images, labels), (pre, ft) = load_images(), half_indices()
    return images[pre], labels[pre], images[ft], labels[ft]


def image_pools(
    x: np.ndarray, y: np.ndarray, fractions: tuple[float, float, float]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified, deterministic train / val / test pools of single images (or their indices)."""
    from sklearn.model_selection import train_test_split

    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=fractions[0], stratify=y, random_state=SPLIT_SEED
    )
    val_share = fractions[1] / (fractions[1] + fractions[2])
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=val_share, stratify=y_rest, random_state=SPLIT_SEED
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


SPLITS = ("train", "val", "test")
#: Which half of the images each stage's pairs come from, and how that half is pooled.
STAGES = {
    "pretrain": (0, (0.8, 0.1, 0.1), PRETRAIN_PAIRS),
    "finetune": (1, (0.6, 0.2, 0.2), FINETUNE_PAIRS),
}


def draw_pair_indices() -> dict[str, dict[str, list[list[int]]]]:
    """Draw every pair: ``{stage: {split: [[left, right], ...]}}``, indices into ``load_digits``.

    Each stage's half of the images is split into pools, and each split's pairs are drawn
    from its own pool with its own generator (seeded ``[SPLIT_SEED, k]``), so the val and
    test pairs do not depend on how many training pairs are drawn. numpy's random stream
    and scikit-learn's splitting are used here only; :meth:`DigitsTask.freeze_data`
    freezes the result, which every machine then reads.
    """
    labels, halves = load_images()[1], half_indices()
    indices = {}
    for stage, (half, fractions, sizes) in STAGES.items():
        pools = image_pools(halves[half], labels[halves[half]], fractions)
        indices[stage] = {}
        for k, split in enumerate(SPLITS):
            pool = pools[split][0]
            rng = np.random.default_rng([SPLIT_SEED, k])
            indices[stage][split] = pool[
                rng.integers(0, len(pool), size=(2, sizes[split]))
            ].T.tolist()
    return indices


def pair_splits(pairs: dict[str, list[list[int]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each split's pairs side by side: ``(n, 128)`` inputs and ``(n, 2)`` digits."""
    images, labels = load_images()
    out = {}
    for split in SPLITS:
        left, right = np.asarray(pairs[split]).T
        inputs = np.concatenate([images[left], images[right]], axis=2).reshape(len(left), -1)
        out[split] = (np.ascontiguousarray(inputs), np.stack([labels[left], labels[right]], axis=1))
    return out


@lru_cache(maxsize=1)
def frozen_pairs() -> dict[str, dict[str, list[list[int]]]]:
    """The frozen pair indices (checksum-verified), as :func:`draw_pair_indices` drew them."""
    return load_frozen_data("digits")["pairs"]


def _tensors(inputs: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(inputs), torch.from_numpy(labels).long())


@lru_cache(maxsize=1)
def _finetune_splits() -> dict[str, TensorDataset]:
    pairs = pair_splits(frozen_pairs()["finetune"])
    return {split: _tensors(a, b.sum(axis=1) % 10) for split, (a, b) in pairs.items()}


@lru_cache(maxsize=1)
def _pretrain_splits() -> dict[str, TensorDataset]:
    pairs = pair_splits(frozen_pairs()["pretrain"])
    return {split: _tensors(a, b) for split, (a, b) in pairs.items()}


class DigitsTask(Task):
    """Pairs of 8x8 digits: read both, then add them mod 10 (see the module docstring)."""

    name = "digits"
    description = (
        "MLP 128-256-256-10 pretrained to name both digits of a pair of 8x8 digits, "
        "fine-tuned to predict their sum mod 10"
    )
    metric_name = "accuracy"
    head_modules = ["head"]  # noqa: RUF012
    default_hparams = {  # noqa: RUF012
        "epochs": 30,
        # The best measured rate for full fine-tuning and for LoRA alike (seed 0;
        # docs/records/digits-full-lr.csv). Pretraining keeps its own (below).
        "lr": 1e-2,
        "lora_lr": 1e-2,
        "head_lr": 3e-2,  # frozen-base baseline: a new head alone wants a higher rate
        "batch_size": 64,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup": 0.05,
    }
    pretrain_hparams = {  # noqa: RUF012
        "epochs": 40,
        "lr": 3e-3,
        "batch_size": 64,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup": 0.05,
    }

    def _make_model(self) -> nn.Module:
        return DigitsMLP()

    def splits(self) -> dict[str, TensorDataset]:
        return _finetune_splits()

    def freeze_data(self) -> dict:
        """Draw the pairs with this numpy and freeze their indices; return the manifest entry."""
        pairs = draw_pair_indices()
        sizes = {stage: "/".join(str(len(p[s])) for s in SPLITS) for stage, p in pairs.items()}
        fields = {
            "data": (
                "scikit-learn's bundled load_digits (1,797 images), halves and pools split "
                f"with seed 0; pairs drawn with seeds [0, split]: {sizes['pretrain']} "
                f"pretraining and {sizes['finetune']} fine-tuning train/val/test pairs"
            ),
        }
        caches = (frozen_pairs, _finetune_splits, _pretrain_splits)
        return freeze_task_data(self, {"pairs": pairs}, fields, caches)

    def pretrain(self, seed: int = 0, progress: bool = True, device: str = "cpu"):
        """Train the base to name both digits of a pair; return ``(body_state, manifest_fields)``."""
        pretext = DigitPairsTask()
        model = pretext.build_model(pretrained=False, seed=seed)
        result = fit(model, pretext, seed=seed, progress=progress, device=device)
        # The base's own head is dropped: fine-tuning always starts a new one.
        body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        return body, {
            "config": {"hidden": HIDDEN, "n_inputs": N_INPUTS, "pretrain_outputs": 2 * N_CLASSES},
            "data": "sklearn load_digits: pairs of images of the pretraining half (seed 0), "
            "8,000 / 1,000 / 1,000 pairs drawn from 80/10/10 image pools; target: both digits",
            "hparams": result.hparams,
            "metric": {
                "both_digits_val_accuracy": round(result.metrics["val_accuracy"], 4),
                "both_digits_test_accuracy": round(result.metrics["test_accuracy"], 4),
            },
            "wall_time_s": round(result.wall_time_s, 1),
        }


class DigitPairsTask(DigitsTask):
    """The pretraining objective: name both digits of a pair of first-half images.

    The model has 20 logits, ten for the left digit and ten for the right; the loss
    is the sum of the two cross-entropies, and the metric is the fraction of pairs
    with *both* digits right.
    """

    name = "digits-pretrain"

    def _make_model(self) -> nn.Module:
        return DigitsMLP(n_classes=2 * N_CLASSES)

    def splits(self) -> dict[str, TensorDataset]:
        return _pretrain_splits()

    @property
    def default_hparams(self):  # type: ignore[override]
        return self.pretrain_hparams

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        inputs, digits = batch
        logits = model(inputs)
        left, right = logits[:, :N_CLASSES], logits[:, N_CLASSES:]
        return F.cross_entropy(left, digits[:, 0]) + F.cross_entropy(right, digits[:, 1])

    @torch.no_grad()
    def evaluate(self, model, split="test", device=None, batch_size=256) -> float:
        """Fraction of pairs whose left *and* right digits are both predicted right."""
        if device is None:
            device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        correct = total = 0
        for inputs, digits in DataLoader(self.splits()[split], batch_size=batch_size):
            logits = model(inputs.to(device)).cpu()
            left = logits[:, :N_CLASSES].argmax(-1) == digits[:, 0]
            right = logits[:, N_CLASSES:].argmax(-1) == digits[:, 1]
            correct += (left & right).sum().item()
            total += len(digits)
        model.train(was_training)
        return correct / total
