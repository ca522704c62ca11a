"""``digits``: an MLP pretrained on upright digits 0-4, fine-tuned on all ten rotated.

Data: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download).
A fixed permutation (seed 0) splits them into two disjoint halves:

* **pretraining**: upright images of the digits 0-4 from the first half
  (5 classes, 80 / 10 / 10 train / val / test);
* **fine-tuning**: all images of the second half, all ten digits, **rotated by
  90 degrees** counter-clockwise, split 60 / 20 / 20 into train / val / test,
  stratified by label.

Why this shift. It changes both what the hidden layers must detect and where
they must look:

* New classes: the base only ever had to tell 0-4 apart, so its features keep
  what separates those and discard what separates, say, 5 from 9.
* A new orientation: a rotation is a fixed permutation ``P`` of the 64 pixels,
  so the first layer sees ``W1 (P x)`` -- its stroke detectors, tuned to upright
  strokes, now look at the wrong pixels, and nothing on top of them can undo that.

A new head on the frozen features therefore plateaus far below what the model
can do once its hidden layers adapt (measured in ``docs/tasks.md``: 0.77 test
accuracy for the best frozen-base run, 0.94 for full fine-tuning). The
shift keeps the digits' strokes, loops and corners, so the base is still a
reasonable starting point: full fine-tuning matches or beats training the same
network from scratch. It is not a *necessary* one, though: a frozen random
network of the same shape with a trained head also reaches about 0.92 test
accuracy, so on 8x8 digits pretraining saves little (which is why this task
cannot show pretraining's effect on intrinsic dimension; ``docs/intrinsic.md``).

The model is ``x -> fc1 -> ReLU -> fc2 -> ReLU -> head`` with 256 hidden units
(85k parameters); one full fine-tune (30 epochs) takes one to a few seconds on
one CPU core, so a whole rank sweep fits in a couple of minutes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from rankkit.tasks.base import Task
from rankkit.train import fit

HIDDEN = 256
N_CLASSES = 10
PRETRAIN_CLASSES = 5  # digits 0-4
SPLIT_SEED = 0


class DigitsMLP(nn.Module):
    """Two hidden ReLU layers and a linear head, on flattened 8x8 images scaled to [0, 1]."""

    def __init__(self, hidden: int = HIDDEN, n_classes: int = N_CLASSES, n_inputs: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(n_inputs, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def rotate90(images: np.ndarray) -> np.ndarray:
    """Rotate ``(n, 8, 8)`` images by 90 degrees counter-clockwise."""
    return np.rot90(images, k=1, axes=(1, 2)).copy()


@lru_cache(maxsize=1)
def digit_halves() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two disjoint halves of ``load_digits``: ``(x_pre, y_pre, x_ft, y_ft)``.

    Images are ``(n, 8, 8)`` in [0, 1], upright; a fixed permutation (seed 0) splits them,
    so nothing the base is pretrained on appears in fine-tuning.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    half = len(images) // 2
    pre, ft = order[:half], order[half:]
    return images[pre], digits.target[pre], images[ft], digits.target[ft]


def stratified_splits(
    x: np.ndarray, y: np.ndarray, fractions=(0.6, 0.2, 0.2)
) -> dict[str, TensorDataset]:
    """Stratified, deterministic train / val / test split."""
    from sklearn.model_selection import train_test_split

    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=fractions[0], stratify=y, random_state=SPLIT_SEED
    )
    val_share = fractions[1] / (fractions[1] + fractions[2])
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=val_share, stratify=y_rest, random_state=SPLIT_SEED
    )

    def tensors(a, b):
        return TensorDataset(torch.from_numpy(a.reshape(len(a), -1)), torch.from_numpy(b).long())

    return {
        "train": tensors(x_train, y_train),
        "val": tensors(x_val, y_val),
        "test": tensors(x_test, y_test),
    }


@lru_cache(maxsize=1)
def _finetune_splits() -> dict[str, TensorDataset]:
    _, _, x, y = digit_halves()
    return stratified_splits(rotate90(x), y)


@lru_cache(maxsize=1)
def _pretrain_splits() -> dict[str, TensorDataset]:
    x, y, _, _ = digit_halves()
    keep = y < PRETRAIN_CLASSES
    return stratified_splits(x[keep], y[keep], fractions=(0.8, 0.1, 0.1))


class DigitsTask(Task):
    """Upright -> rotated 8x8 digits with a 64-256-256-10 MLP (see the module docstring)."""

    name = "digits"
    description = (
        "MLP 64-256-256-10 pretrained on upright 8x8 digits 0-4, fine-tuned on all ten "
        "digits rotated 90°"
    )
    metric_name = "accuracy"
    head_modules = ["head"]  # noqa: RUF012
    data_source = "scikit-learn's bundled load_digits (1,797 images); split with seed 0"
    default_hparams = {  # noqa: RUF012
        "epochs": 30,
        "lr": 3e-3,
        # LoRA trains far fewer, zero-initialised parameters and wants a larger rate:
        # 1e-2 beat 3e-3 and 3e-2 at ranks 1, 8 and 32 (one seed each).
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

    def pretrain(self, seed: int = 0, progress: bool = True, device: str = "cpu"):
        """Train the base on upright digits 0-4; return ``(body_state, manifest_fields)``."""
        pretext = UprightDigitsTask()
        model = pretext.build_model(pretrained=False, seed=seed)
        result = fit(model, pretext, seed=seed, progress=progress, device=device)
        # The base's own head is dropped: fine-tuning always starts a new one.
        body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        return body, {
            "config": {"hidden": HIDDEN, "n_inputs": 64, "pretrain_classes": PRETRAIN_CLASSES},
            "data": "sklearn load_digits: upright digits 0-4 of the pretraining half (seed 0), "
            "80/10/10 split",
            "hparams": result.hparams,
            "metric": {
                "upright_0_4_val_accuracy": round(result.metrics["val_accuracy"], 4),
                "upright_0_4_test_accuracy": round(result.metrics["test_accuracy"], 4),
            },
            "wall_time_s": round(result.wall_time_s, 1),
        }


class UprightDigitsTask(DigitsTask):
    """The pretraining objective: classify upright digits 0-4 of the other half."""

    name = "digits-pretrain"

    def _make_model(self) -> nn.Module:
        return DigitsMLP(n_classes=PRETRAIN_CLASSES)

    def splits(self) -> dict[str, TensorDataset]:
        return _pretrain_splits()

    @property
    def default_hparams(self):  # type: ignore[override]
        return self.pretrain_hparams
