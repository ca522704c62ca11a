"""Reading and writing weights safely.

A checkpoint here is a flat mapping ``name -> tensor`` (a PyTorch state dict).
rankkit reads three kinds of source:

* an ``nn.Module`` (its ``state_dict()``),
* a mapping of names to tensors or numpy arrays,
* a file: ``.safetensors`` (preferred: a plain tensor container, nothing executes
  on load) or a PyTorch ``.pt`` / ``.pth`` / ``.bin`` file, which is opened with
  ``torch.load(weights_only=True)`` so that no arbitrary Python object is ever
  unpickled.

Files are written with safetensors, atomically (a temporary file renamed into
place), so an interrupted write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

StateSource = nn.Module | Mapping | str | os.PathLike

_TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what was expected."""


def load_state_dict(source: StateSource, *, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return a ``{name: tensor}`` dict from a module, a mapping or a checkpoint file.

    Parameters
    ----------
    source : nn.Module, mapping or path
        Where the weights come from. Paths ending in ``.safetensors`` are read with
        safetensors; ``.pt``, ``.pth``, ``.bin`` and ``.ckpt`` with
        ``torch.load(weights_only=True)``.
    name : str
        How to call the source in error messages (``"base"``, ``"finetuned"``...).

    Returns
    -------
    dict of str to torch.Tensor
        Detached CPU tensors. Tensors are not copied when they already live on the CPU.

    Raises
    ------
    CheckpointError
        If the file does not exist, has an unknown suffix, or cannot be parsed.
    TypeError
        If ``source`` is none of the accepted kinds.
    """
    if isinstance(source, nn.Module):
        return {k: v.detach().cpu() for k, v in source.state_dict().items()}
    if isinstance(source, Mapping):
        out = {}
        for key, value in source.items():
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"{name}: entry {key!r} is a {type(value).__name__}, expected a tensor or "
                    "numpy array. Pass model.state_dict() or a flat {name: tensor} mapping."
                )
            out[str(key)] = value.detach().cpu()
        return out
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source), name)
    raise TypeError(
        f"{name}: cannot read weights from a {type(source).__name__}; pass an nn.Module, "
        "a state dict, or a path to a .safetensors / .pt file."
    )


def _load_file(path: Path, name: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{name}: no such file {str(path)!r}.")
    if path.is_dir():
        raise CheckpointError(
            f"{name}: {str(path)!r} is a directory; pass the weights file inside it "
            "(for example model.safetensors)."
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{name}: {str(path)!r} is not a readable safetensors file ({err}). "
                "It may be truncated or corrupt; regenerate it."
            ) from err
    if suffix in _TORCH_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many kinds here; all mean "unreadable"
            raise CheckpointError(
                f"{name}: could not read {str(path)!r} with torch.load(weights_only=True): "
                f"{err}. rankkit never unpickles arbitrary objects; if this file is a full "
                "pickled model, re-save its state_dict() or convert it to safetensors."
            ) from err
        if (
            isinstance(obj, Mapping)
            and "state_dict" in obj
            and isinstance(obj["state_dict"], Mapping)
        ):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"{name}: {str(path)!r} holds a {type(obj).__name__}, expected a state dict."
            )
        return load_state_dict(obj, name=name)
    raise CheckpointError(
        f"{name}: unknown checkpoint suffix {suffix!r} for {str(path)!r}; expected "
        f".safetensors or one of {', '.join(_TORCH_SUFFIXES)}."
    )


def save_state_dict(
    state: Mapping[str, torch.Tensor] | nn.Module,
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write weights to ``path`` as safetensors, atomically.

    Tensors are made contiguous and moved to the CPU; tensors that share memory
    (tied weights) are cloned so safetensors accepts them.

    Returns the path written.
    """
    if isinstance(state, nn.Module):
        state = state.state_dict()
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=dict(metadata) if metadata else None)
        # mkstemp creates 0600 files; give the checkpoint the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
