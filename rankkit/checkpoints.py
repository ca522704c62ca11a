"""Reading and writing weights safely, from the checkpoints people actually have.

A checkpoint here is a flat mapping ``name -> tensor`` (a PyTorch state dict).
rankkit reads it from

* an ``nn.Module`` (its ``state_dict()``) or a mapping of names to tensors/arrays;
* a file: ``.safetensors`` (preferred: a plain tensor container, nothing executes
  on load) or a PyTorch ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file, opened with
  ``torch.load(weights_only=True)`` so that no arbitrary Python object is ever
  unpickled;
* a model folder as Hugging Face writes it: ``model.safetensors``, a sharded
  ``model.safetensors.index.json`` (``weight_map: name -> shard file``),
  ``pytorch_model.bin`` or its sharded index;
* a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``),
  read by :func:`rankkit.adapters.open_adapter` as factors ``(B, A, s)`` with ``ΔW = s·B·A``.

Checkpoints are opened lazily (:func:`open_checkpoint`): the names, shapes and
dtypes are read from the file headers, and a tensor is read only when it is asked
for, so an analysis can walk a model larger than memory one layer at a time.
safetensors files are reopened (memory-mapped) for every tensor and closed again,
so the pages of tensors already analysed do not stay mapped; PyTorch files are
memory-mapped one shard at a time.

Two checkpoints of the same model rarely have identical names: a classifier
fine-tuned from a base model wraps it (``bert.``, ``model.``, ``base_model.model.``),
adds a head, drops a buffer or resizes the vocabulary. :func:`match_checkpoints`
pairs the tensors after removing the wrapper prefix it detects from the names,
and reports everything it cannot pair instead of failing.

Files are written with safetensors, atomically (a temporary file renamed into
place), so an interrupted write never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

StateSource = nn.Module | Mapping | str | os.PathLike

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT wraps the user's model twice (PeftModel -> LoraModel), hence this prefix on every key.
PEFT_PREFIX = "base_model.model."

# A model folder's weights, in the order Hugging Face's from_pretrained looks for them.
FOLDER_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)

# safetensors dtype names rankkit can upcast to float32/float64 for an SVD (integer
# and boolean tensors are read too: they are buffers, reported and skipped).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what was expected."""


# --------------------------------------------------------------------------- lazy checkpoints


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """What a checkpoint header says about one tensor, before it is read."""

    shape: tuple[int, ...]
    dtype: str  # torch dtype name ("float32", "bfloat16"...) or the file's own ("F8_E4M3")
    file: str  # where it lives, for error messages

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float64", "float32", "float16", "bfloat16")

    @property
    def eps(self) -> float:
        """Machine epsilon of the stored floating dtype (float32's for anything else).

        It sets what "numerically zero" means for a spectrum of these numbers.
        """
        return float(
            torch.finfo(getattr(torch, self.dtype) if self.is_float else torch.float32).eps
        )

    @property
    def is_supported(self) -> bool:
        """Readable as numbers rankkit can analyse or skip (not fp8, complex, ...)."""
        return self.is_float or self.dtype in ("int64", "int32", "int16", "int8", "uint8", "bool")


class Checkpoint(Mapping):
    """A read-only ``{name: tensor}`` view that reads one tensor when it is asked for.

    ``ckpt.info[name]`` gives the shape and dtype without reading anything;
    ``ckpt[name]`` reads the tensor (a CPU tensor in its stored dtype). Iterating
    gives the names in file order. Build one with :func:`open_checkpoint`.
    """

    def __init__(
        self,
        info: dict[str, TensorInfo],
        read: Callable[[str], torch.Tensor],
        description: str,
        label: str = "checkpoint",
        paths: tuple[str, ...] = (),
    ):
        self.info = info
        self._read = read
        self.description = description
        self.label = label
        self.paths = paths  # the files behind it (empty for in-memory weights)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.info:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.info)

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"<Checkpoint {self.label}: {len(self)} tensors, {self.description}>"


def open_checkpoint(source: StateSource, *, name: str = "checkpoint") -> Checkpoint:
    """Open weights lazily from a module, a mapping, a file or a model folder.

    Parameters
    ----------
    source : nn.Module, mapping, or path
        A module or ``{name: tensor}`` mapping (used in place, not copied); a
        ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt`` file; a sharded
        ``*.index.json``; or a model folder holding one of :data:`FOLDER_WEIGHT_FILES`.
    name : str
        How to call the source in error messages (``"base"``, ``"finetuned"``...).

    Returns
    -------
    Checkpoint

    Raises
    ------
    CheckpointError
        If a file is missing, truncated or not a checkpoint, a folder holds no
        weights (or is a LoRA adapter, see :func:`rankkit.adapters.open_adapter`), or an index names a
        shard that is missing or lacks the tensors the index promises.
    TypeError
        If ``source`` is none of the accepted kinds.
    """
    if isinstance(source, Checkpoint):
        return source
    if isinstance(source, nn.Module):
        return _in_memory(source.state_dict(keep_vars=False), name, f"{type(source).__name__}")
    if isinstance(source, Mapping):
        return _in_memory(source, name, "state dict")
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), name)
    raise TypeError(
        f"{name}: cannot read weights from a {type(source).__name__}; pass an nn.Module, a "
        "state dict, a .safetensors / .pt file, or a model folder."
    )


def load_state_dict(source: StateSource, *, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Return a ``{name: tensor}`` dict of detached CPU tensors, reading everything.

    Accepts every source of :func:`open_checkpoint`. Prefer :func:`open_checkpoint`
    for large models: this reads the whole checkpoint into memory.
    """
    checkpoint = open_checkpoint(source, name=name)
    return {key: checkpoint[key] for key in checkpoint}


def _in_memory(state: Mapping, label: str, description: str) -> Checkpoint:
    tensors = {}
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{label}: entry {key!r} is a {type(value).__name__}, expected a tensor or "
                "numpy array. Pass model.state_dict() or a flat {name: tensor} mapping."
            )
        tensors[str(key)] = value.detach()
    info = {
        k: TensorInfo(tuple(v.shape), str(v.dtype).removeprefix("torch."), description)
        for k, v in tensors.items()
    }
    return Checkpoint(info, lambda k: tensors[k].cpu(), description, label)


def _open_path(path: Path, label: str) -> Checkpoint:
    if not path.exists():
        raise CheckpointError(f"{label}: no such file or folder {str(path)!r}.")
    if path.is_dir():
        if (path / ADAPTER_CONFIG_NAME).is_file():
            raise CheckpointError(
                f"{label}: {str(path)!r} is a LoRA adapter (it holds {ADAPTER_CONFIG_NAME}), "
                "not a full model. Pass it as the fine-tuned side of rank_report / "
                "`rankkit spectrum BASE ADAPTER`, or alone for the adapter's own spectra."
            )
        path = _folder_weights(path, label)
    if path.name.endswith(".index.json"):
        return _open_index(path, label)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        info = _safetensors_info(path, label)
        return Checkpoint(
            info, lambda k: _read_safetensors(path, k, label), "safetensors file", label,
            (str(path),),
        )  # fmt: skip
    if suffix in TORCH_SUFFIXES:
        shard = _TorchShards(label)
        info = shard.info(path)
        return Checkpoint(info, lambda k: shard.read(path, k), "PyTorch file", label, (str(path),))
    raise CheckpointError(
        f"{label}: unknown checkpoint suffix {suffix!r} for {str(path)!r}; expected "
        f".safetensors, one of {', '.join(TORCH_SUFFIXES)}, an *.index.json or a model folder."
    )


def _folder_weights(folder: Path, label: str) -> Path:
    """The weights file (or index) of a Hugging Face style model folder."""
    for name in FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    candidates = sorted(
        p.name
        for p in folder.iterdir()
        if p.name.endswith((".safetensors", ".index.json")) or p.suffix in TORCH_SUFFIXES
    )
    indexes = [c for c in candidates if c.endswith(".index.json")]
    if len(indexes) == 1:
        return folder / indexes[0]
    if len(candidates) == 1:
        return folder / candidates[0]
    if candidates:
        raise CheckpointError(
            f"{label}: {str(folder)!r} holds several weight files ({', '.join(candidates[:6])}) "
            "and no index saying how they fit together; pass the one you mean."
        )
    raise CheckpointError(
        f"{label}: the folder {str(folder)!r} holds no weights. rankkit looks for "
        f"{', '.join(FOLDER_WEIGHT_FILES)}, or {ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME} "
        "for a LoRA adapter. Pass the folder save_pretrained wrote, or the weights file itself."
    )


def _open_index(index: Path, label: str) -> Checkpoint:
    """A sharded checkpoint: ``{"weight_map": {tensor name: shard file}}``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        raise CheckpointError(
            f"{label}: {str(index)!r} is not a shard index (a JSON object with a "
            f"'weight_map'): {err!r}. Re-save the model, or pass a single weights file."
        ) from err
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{label}: the index {str(index)!r} names shard(s) that are missing: "
            f"{', '.join(missing[:5])}. Download or copy every shard into {str(index.parent)!r}."
        )
    torch_shards = _TorchShards(label)
    info: dict[str, TensorInfo] = {}
    for shard in shards:
        path = index.parent / shard
        if path.suffix.lower() == ".safetensors":
            shard_info = _safetensors_info(path, label)
        else:
            shard_info = torch_shards.info(path)
        wanted = [k for k, s in weight_map.items() if s == shard]
        absent = [k for k in wanted if k not in shard_info]
        if absent:
            raise CheckpointError(
                f"{label}: the index {str(index)!r} puts {absent[0]!r} (and {len(absent) - 1} "
                f"more) in {shard}, which does not hold it; the shard and the index come from "
                "different saves. Re-download the model."
            )
        info.update((k, shard_info[k]) for k in wanted)

    def read(key: str) -> torch.Tensor:
        path = index.parent / weight_map[key]
        if path.suffix.lower() == ".safetensors":
            return _read_safetensors(path, key, label)
        return torch_shards.read(path, key)

    kind = "safetensors" if all(s.endswith(".safetensors") for s in shards) else "PyTorch"
    paths = tuple(str(index.parent / s) for s in shards)
    return Checkpoint(info, read, f"{len(shards)} {kind} shard(s)", label, paths)


def _dtype_name(safetensors_dtype: str) -> str:
    """torch's name for a safetensors dtype ("BF16" -> "bfloat16"); the file's own otherwise."""
    dtype = _SAFETENSORS_DTYPES.get(safetensors_dtype)
    return str(dtype).removeprefix("torch.") if dtype is not None else safetensors_dtype


def _safetensors_info(path: Path, label: str) -> dict[str, TensorInfo]:
    try:
        with safe_open(str(path), framework="pt") as fh:  # checks the file covers its header
            views = {key: fh.get_slice(key) for key in fh.keys()}
            return {
                key: TensorInfo(tuple(v.get_shape()), _dtype_name(v.get_dtype()), str(path))
                for key, v in views.items()
            }
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{label}: {str(path)!r} is not a readable safetensors file ({err}). It may be "
            "truncated or corrupt (an interrupted download or copy); regenerate or re-download it."
        ) from err


def _read_safetensors(path: Path, key: str, label: str) -> torch.Tensor:
    # Reopened per tensor: the memory map is released as soon as the tensor is copied out.
    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.get_tensor(key)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(
            f"{label}: could not read {key!r} from {str(path)!r} ({err}); the file may be "
            "truncated or corrupt. Regenerate or re-download it."
        ) from err


class _TorchShards:
    """PyTorch checkpoint files, memory-mapped one at a time (``weights_only=True``)."""

    def __init__(self, label: str):
        self.label = label
        self.path: Path | None = None
        self.state: dict[str, torch.Tensor] = {}

    def load(self, path: Path) -> dict[str, torch.Tensor]:
        if self.path != path:
            self.state = {}  # drop the previous shard before mapping the next
            self.state = _torch_load(path, self.label)
            self.path = path
        return self.state

    def info(self, path: Path) -> dict[str, TensorInfo]:
        state = self.load(path)
        return {
            k: TensorInfo(tuple(v.shape), str(v.dtype).removeprefix("torch."), str(path))
            for k, v in state.items()
        }

    def read(self, path: Path, key: str) -> torch.Tensor:
        return self.load(path)[key]


def _torch_load(path: Path, label: str) -> dict[str, torch.Tensor]:
    def load(mmap: bool):
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)

    try:
        try:
            obj = load(mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = load(mmap=False)  # the legacy (pre-zip) format cannot be memory-mapped
    except Exception as err:  # torch raises many kinds here; all mean "unreadable"
        # Never pass on torch's advice to retry with weights_only=False: that would
        # execute whatever the file contains.
        reason = str(err).split("\n")[0][:200]
        raise CheckpointError(
            f"{label}: {str(path)!r} is not a tensor checkpoint rankkit can read safely "
            f"({type(err).__name__}: {reason}). rankkit opens PyTorch files with "
            "torch.load(weights_only=True) and never unpickles other objects. If this is a "
            "pickled model from a source you trust, load it yourself and pass "
            "model.state_dict(), or convert it to safetensors."
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{label}: {str(path)!r} holds a {type(obj).__name__}, expected a state dict."
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{label}: {str(path)!r} entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, not a "
            "tensor; save model.state_dict() rather than a training checkpoint."
        )
    return {str(k): v for k, v in obj.items()}


# --------------------------------------------------------------------------- pairing two models


@dataclasses.dataclass(frozen=True)
class TensorPair:
    """One weight matrix found in both checkpoints: ``name`` without any wrapper prefix."""

    name: str
    base_key: str
    finetuned_key: str
    shape: tuple[int, ...]


@dataclasses.dataclass
class Matching:
    """How two checkpoints' tensors were paired (see :func:`match_checkpoints`)."""

    pairs: list[TensorPair]
    skipped: dict[str, str]  # name -> why it was not analysed
    base_prefix: str
    finetuned_prefix: str


# Why a tensor was not analysed; the CLI groups the skip list by these.
SKIP_REASONS = {
    "only_base": "only in base",
    "only_finetuned": "only in fine-tuned (a new head or module)",
    "shape": "shape changed",
    "vector": "1-D (bias or norm)",
    "buffer": "integer or boolean buffer",
    "filtered": "filtered out by layers=",
}


def match_checkpoints(
    base: Checkpoint,
    finetuned: Checkpoint,
    layers: str | None = None,
    *,
    require_pairs: bool = True,
) -> Matching:
    """Pair the weight matrices of two checkpoints of the same model by name.

    A wrapper prefix that one side has and the other lacks (``bert.``, ``model.``,
    ``base_model.model.``...) is detected from the names: among the prefixes of up to
    three dotted components, the pair of prefixes whose removal makes the most names
    agree wins (no prefix on either side if nothing does better). Every floating
    tensor with at least two dimensions present in both with the same shape is
    paired. Everything else is listed in ``skipped`` with its reason
    (:data:`SKIP_REASONS`), never fatal.

    Parameters
    ----------
    base, finetuned : Checkpoint
    layers : str, optional
        Regular expression (``re.search``) on the prefix-free names; others are skipped.
    require_pairs : bool
        Raise if nothing pairs (the caller may want to explain it its own way).

    Raises
    ------
    CheckpointError
        If no weight matrix is shared (the message shows names from both sides), or a
        paired tensor is stored in a dtype rankkit cannot analyse (fp8, complex...).
    ValueError
        If ``layers`` is not a valid regular expression or selects nothing.
    """
    pattern = compile_layers(layers)
    pb, pf = _detect_prefixes(list(base), list(finetuned))
    base_names = {_strip(k, pb): k for k in base}
    ft_names = {_strip(k, pf): k for k in finetuned}
    pairs, skipped = [], {}
    for name, bkey in base_names.items():
        b_info = base.info[bkey]
        if name not in ft_names:
            skipped[name] = SKIP_REASONS["only_base"]
            continue
        f_info = finetuned.info[ft_names[name]]
        if not (b_info.is_float and f_info.is_float):
            _check_supported(name, (base, b_info), (finetuned, f_info))
            skipped[name] = SKIP_REASONS["buffer"]
        elif len(b_info.shape) < 2:
            skipped[name] = SKIP_REASONS["vector"]
        elif b_info.shape != f_info.shape:
            skipped[name] = f"{SKIP_REASONS['shape']}: {b_info.shape} -> {f_info.shape}"
        elif pattern is not None and not pattern.search(name):
            skipped[name] = SKIP_REASONS["filtered"]
        else:
            pairs.append(TensorPair(name, bkey, ft_names[name], b_info.shape))
    for name in ft_names:
        if name not in base_names:
            skipped[name] = SKIP_REASONS["only_finetuned"]
    if not pairs and require_pairs:
        _explain_no_pairs(base, finetuned, layers, skipped)
    return Matching(pairs, skipped, pb, pf)


def compile_layers(layers: str | None) -> re.Pattern | None:
    """``layers=`` as a compiled regular expression, with a readable error."""
    if not layers:
        return None
    try:
        return re.compile(layers)
    except re.error as err:
        raise ValueError(
            f"layers={layers!r} is not a valid regular expression ({err}). Escape special "
            r"characters, e.g. layers='attn\.(q|v)'."
        ) from None


def _check_supported(name: str, *sides: tuple[Checkpoint, TensorInfo]) -> None:
    for checkpoint, info in sides:
        if not info.is_supported:
            hint = (
                "fp8 weights are stored with separate scales; dequantize the model to "
                "bf16/fp32 first (e.g. load it with transformers and save_pretrained)"
                if re.match(r"(F8|float8)", info.dtype)
                else "convert the checkpoint to float32, float16 or bfloat16"
            )
            raise CheckpointError(
                f"{checkpoint.label}: {name!r} in {info.file!r} is stored as {info.dtype}, which "
                f"rankkit cannot analyse: {hint}."
            )


def _prefix_candidates(keys: list[str], depth: int = 3) -> set[str]:
    """Prefixes of up to ``depth`` dotted components shared by at least half the keys.

    A prefix always leaves at least two components (``module.weight``): removing more
    would pair ``encoder.q.weight`` with ``decoder.k.weight`` as ``weight``.
    """
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(1, min(depth, len(parts) - 2) + 1):
            prefix = ".".join(parts[:i]) + "."
            counts[prefix] = counts.get(prefix, 0) + 1
    return {""} | {p for p, n in counts.items() if 2 * n >= len(keys)}


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) :] if prefix and key.startswith(prefix) else key


def _detect_prefixes(base_keys: list[str], ft_keys: list[str]) -> tuple[str, str]:
    """The (base, fine-tuned) wrapper prefixes whose removal pairs the most names."""

    def names(keys: list[str], prefix: str) -> set[str]:
        return {_strip(k, prefix) for k in keys}

    best, best_score = ("", ""), len(set(base_keys) & set(ft_keys))
    for pb in sorted(_prefix_candidates(base_keys)):
        for pf in sorted(_prefix_candidates(ft_keys)):
            if pb and pf and pb == pf:
                continue  # the same wrapper on both sides changes nothing
            score = len(names(base_keys, pb) & names(ft_keys, pf))
            if score > best_score:
                best, best_score = (pb, pf), score
    return best


def _explain_no_pairs(
    base: Checkpoint, finetuned: Checkpoint, layers: str | None, skipped: dict[str, str]
) -> None:
    matrices = [n for n, why in skipped.items() if why == SKIP_REASONS["filtered"]]
    if layers and matrices:
        raise ValueError(
            f"layers={layers!r} matches no weight matrix; candidates are: {short_list(matrices)}."
        )

    def sample(ckpt: Checkpoint) -> str:
        two_d = [k for k, i in ckpt.info.items() if len(i.shape) >= 2] or list(ckpt)
        return short_list(two_d, limit=4)

    raise CheckpointError(
        "the two checkpoints share no weight matrix, even after removing a wrapper prefix.\n"
        f"  base ({base.description}): {sample(base)}\n"
        f"  finetuned ({finetuned.description}): {sample(finetuned)}\n"
        "Are they the same architecture? If the names differ by more than a prefix (e.g. a "
        "renamed layer), rename the keys of one state dict before comparing; if one is a LoRA "
        "adapter, pass its folder (with adapter_config.json)."
    )


def short_list(items: list[str], limit: int = 8, sep: str = ", ") -> str:
    """``a, b, c, ... (n more)``: the first ``limit`` items of a list for a message."""
    head = sep.join(items[:limit])
    return head + (f"{sep}... ({len(items) - limit} more)" if len(items) > limit else "")


# --------------------------------------------------------------------------- writing


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
