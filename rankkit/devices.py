"""Where tensors live: choosing a device, autocast, moving batches, peak memory.

The lowest layer of rankkit next to :mod:`rankkit.checkpoints`: the training loop
(:mod:`rankkit.train`) and the spectra (:mod:`rankkit.spectra`) both resolve
``device="auto"`` here, so every command picks the same device.
"""

from __future__ import annotations

import contextlib
import sys

import torch

__all__ = ["autocast_for", "peak_memory_mb", "resolve_device", "to_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) -> CUDA if available, else Apple MPS, else CPU; other names are checked.

    Raises
    ------
    ValueError
        If the name is not a device, or the requested device is not available here.
    """
    if isinstance(device, torch.device):
        device = str(device)
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(
            f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use 'auto' or 'cpu'.")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but MPS is not available; use 'auto' or 'cpu'.")
    return dev


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA devices that support it, a no-op context elsewhere."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(batch, device: torch.device):
    """``batch`` (a tensor, or lists, tuples and dicts of them) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory (CUDA, MPS), or the process's peak resident memory (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes vs KiB
