"""Each run's data order, and the batches a step trains on.

Every run draws its epoch's shuffled order from its own generator, seeded with
the run's seed, exactly as ``DataLoader(train, batch_size, shuffle=True,
generator=torch.Generator().manual_seed(seed))`` would; a step of K runs trains
on run ``k``'s batch in the ``k``-th block of rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate

__all__ = ["DataOrders", "gather"]


class _Indices(Dataset):
    """The dataset ``0, 1, ..., n-1``, fetched a whole batch at a time."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def __getitems__(self, indices: list[int]) -> list[int]:
        return list(indices)


class DataOrders:
    """Every run's data order, exactly as a shuffled ``DataLoader`` seeded with its seed draws it.

    The order depends only on the dataset's length and the generator, and the batches
    are consecutive pieces of one permutation per epoch. A loader over the indices
    ``0..n-1`` with ``batch_size=n`` and an identically seeded generator draws that
    same permutation (and advances the generator the same way) in one call per
    epoch, instead of one call per step.

    Parameters
    ----------
    n : int
        Number of training examples.
    batch_size : int
        Examples per run and step.
    seeds : sequence of int
        One per run.
    """

    def __init__(self, n: int, batch_size: int, seeds: Sequence[int]) -> None:
        self.batch_size = batch_size
        self.steps_per_epoch = -(-n // batch_size)
        self.loaders = [
            DataLoader(
                _Indices(n),
                batch_size=n,
                shuffle=True,
                generator=torch.Generator().manual_seed(s),
                collate_fn=torch.tensor,
            )
            for s in seeds
        ]

    def epoch(self) -> Iterator[torch.Tensor]:
        """Yield, per step, the indices of all runs' batches: run ``k``'s are the ``k``-th block."""
        # Exhausting each loader (list) matters: the sampler's last call advances the generator.
        perms = torch.stack([torch.cat(list(loader)) for loader in self.loaders])  # (K, n)
        for block in perms.split(self.batch_size, dim=1):
            yield block.reshape(-1)


def gather(dataset, index: torch.Tensor):
    """The examples ``index`` of ``dataset`` as one batch, as a ``DataLoader`` collates them."""
    if isinstance(dataset, TensorDataset):
        return tuple(t[index] for t in dataset.tensors)
    return default_collate([dataset[i] for i in index.tolist()])
