"""What a task is, and where its pretrained base weights live.

A *task* is everything needed to ask "how much does fine-tuning change this
model?": a model builder, pretrained base weights, a downstream data set with
train / validation / test splits, a loss and a metric (higher is better), and the
names of the weight matrices a method may target, grouped by *role*
(``q``, ``k``, ``v``, ``o``, ``fc1``, ``fc2``, ``head``).

Base weights are safetensors files in the top-level ``data/`` folder, which an
installed package carries as ``rankkit/data/`` (or in the directory named by the
``RANKKIT_DATA_DIR`` environment variable; see :func:`data_dir`). Each has an
entry in ``data/manifest.json``::

    {"digits": {"file": "digits.safetensors", "sha256": "...", "config": {...},
                "command": "python -m rankkit pretrain digits --seed 0",
                "metric": {...}, ...}}

The checksum is verified before every load, so a truncated, corrupt or stale
file is reported -- with the command that rebuilds it -- instead of silently
giving a different model. Files are read with safetensors only: nothing is ever
unpickled.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rankkit.checkpoints import CheckpointError, load_state_dict, save_state_dict, sha256_file

MANIFEST = "manifest.json"


class MissingExtraError(ImportError):
    """An optional dependency of a task is not installed; the message names the extra."""


def data_dir() -> Path:
    """Directory holding the pretrained base weights and ``manifest.json``.

    ``$RANKKIT_DATA_DIR`` if set; else ``rankkit/data/`` inside an installed package
    (a wheel or ``pip install .`` carries the top-level ``data/`` folder there); else
    the ``data/`` folder of the source tree (a checkout or an editable install).
    """
    env = os.environ.get("RANKKIT_DATA_DIR")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    installed = package / "data"
    return installed if (installed / MANIFEST).exists() else package.parent / "data"


def writable_data_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where ``pretrain`` / ``freeze-data`` may write: ``directory``, or :func:`data_dir`.

    Refuses the copy inside an installed package (a wheel or ``pip install .``):
    rewriting files there would silently change an installation other projects may
    share, and a reinstall would undo it.
    """
    if directory is not None:
        return Path(directory)
    default = data_dir()
    installed = default.parent == Path(__file__).resolve().parents[1]  # rankkit/data/
    if installed and not os.environ.get("RANKKIT_DATA_DIR"):
        raise PermissionError(
            f"rankkit is installed as a package, so its data folder ({default}) is not "
            "rewritten in place. Copy it to a folder of your own and set RANKKIT_DATA_DIR to "
            "that folder (pretrain also takes --out DIR); rankkit then reads and writes there."
        )
    return default


def read_manifest(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest of base weights as a dict (empty if there is none yet)."""
    path = Path(directory or data_dir()) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path} is not valid JSON ({err}). Restore it from git, or rebuild every base "
            "with 'python -m rankkit pretrain TASK'."
        ) from err


def write_manifest_entry(
    name: str, entry: Mapping[str, Any], directory: str | os.PathLike | None = None
) -> Path:
    """Set ``manifest[name] = entry`` (atomically; the other entries are kept)."""
    directory = writable_data_dir(directory)
    manifest = read_manifest(directory)
    manifest[name] = dict(entry)
    path = directory / MANIFEST
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=MANIFEST, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(dict(sorted(manifest.items())), fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    os.chmod(path, 0o644)  # mkstemp creates 0600; the manifest is meant to be shared
    return path


def rebuild_command(name: str, seed: int = 0) -> str:
    """The command line that regenerates the base weights of task ``name``."""
    return f"python -m rankkit pretrain {name} --seed {seed}"


def freeze_command(name: str) -> str:
    """The command line that regenerates the frozen data of task ``name``."""
    return f"python -m rankkit freeze-data {name}"


def frozen_data_key(name: str) -> str:
    """Manifest key of the frozen data of task ``name`` (its base weights use ``name``)."""
    return f"{name}-data"


def _verified_path(
    key: str,
    directory: str | os.PathLike | None = None,
    what: str | None = None,
    command: str | None = None,
) -> Path:
    """Path of the file recorded under ``key`` in the manifest, after checking its checksum.

    ``what`` names the file in messages and ``command`` rebuilds it (default: the base
    weights of task ``key`` and their ``pretrain`` command).
    """
    directory = Path(directory or data_dir())
    what = what or f"base weights of task {key!r}"
    entry = read_manifest(directory).get(key)
    command = (entry or {}).get("command") or command or rebuild_command(key)
    if entry is None:
        raise CheckpointError(
            f"no {what}: {directory / MANIFEST} has no entry {key!r}. Build them with: {command}"
        )
    path = directory / entry["file"]
    if not path.exists():
        raise CheckpointError(
            f"{what} are missing: no file {str(path)!r}. Rebuild them with: {command}"
        )
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise CheckpointError(
            f"{what} do not match the manifest: {str(path)!r} has "
            f"sha256 {actual[:16]}..., the manifest expects {entry['sha256'][:16]}.... The file "
            f"is truncated, corrupt or from another build. Rebuild it with: {command}"
        )
    return path


def save_frozen_data(
    name: str,
    payload: Mapping[str, Any],
    fields: Mapping[str, Any],
    directory: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Freeze a task's data as ``data/<name>-data.json.gz`` and record it in the manifest.

    Data a task derives from the running interpreter (text shipped with Python, which
    changes between releases) is written once, as canonical JSON (sorted keys), so
    every Python reads the same examples. The manifest entry ``<name>-data`` holds the
    file's SHA-256 (checked before every read), the SHA-256 of the JSON text, the
    command that rebuilt it, and ``fields`` (where the data came from).
    """
    directory = writable_data_dir(directory)
    text = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    path = directory / f"{frozen_data_key(name)}.json.gz"
    # mtime=0: the gzip header otherwise holds the time, and the checksum with it.
    blob = gzip.compress(text, compresslevel=9, mtime=0)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(blob)
    os.replace(tmp, path)
    os.chmod(path, 0o644)
    entry = {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "json_sha256": hashlib.sha256(text).hexdigest(),
        "command": freeze_command(name),
        **fields,
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
    }
    write_manifest_entry(frozen_data_key(name), entry, directory)
    return entry


def freeze_task_data(
    task: Task, payload: Mapping[str, Any], fields: Mapping[str, Any], caches=()
) -> dict[str, Any]:
    """Freeze ``payload`` as ``task``'s data and record the SHA-256 of the splits read back.

    ``caches`` are the task's ``lru_cache`` functions over its frozen data; they are
    cleared so the checksum is computed from the file just written, as every later
    run will read it (:func:`splits_sha256`, checked by ``python -m rankkit tasks``).
    """
    save_frozen_data(task.name, payload, fields)
    for cached in caches:
        cached.cache_clear()
    return save_frozen_data(
        task.name, payload, {**fields, "splits_sha256": splits_sha256(task.splits())}
    )


def load_frozen_data(name: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The frozen data of task ``name``, after checking the file against the manifest.

    Raises
    ------
    CheckpointError
        If the manifest has no entry for it, the file is missing or its checksum
        differs; the message names the command that rebuilds it.
    """
    what = f"frozen data of task {name!r}"
    path = _verified_path(frozen_data_key(name), directory, what, freeze_command(name))
    try:
        return json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, ValueError) as err:  # matching checksum, unreadable content
        raise CheckpointError(
            f"{what}: {str(path)!r} is not gzip-compressed JSON ({err}). Rebuild it with: "
            f"{freeze_command(name)}"
        ) from err


def splits_sha256(splits: Mapping[str, Dataset]) -> str:
    """SHA-256 of a task's splits: every tensor's dtype, shape and bytes, split by split.

    Two machines with the same checksum train and evaluate on identical examples.
    Recorded in the manifest when the data is frozen or the base is built, and
    re-computed by ``python -m rankkit tasks``.
    """
    digest = hashlib.sha256()
    for split in sorted(splits):
        for tensor in splits[split].tensors:
            digest.update(f"{split}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_base_weights(
    name: str, directory: str | os.PathLike | None = None
) -> dict[str, torch.Tensor]:
    """Read the base weights of task ``name`` after checking them against the manifest.

    Raises
    ------
    CheckpointError
        If the manifest has no entry for the task, the file is missing, its SHA-256
        differs from the manifest's, or it is not a readable safetensors file. The
        message gives the command that rebuilds the file.
    """
    path = _verified_path(name, directory)
    return load_state_dict(path, name=f"base weights of task {name!r}")


def base_metadata(name: str, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The metadata rankkit stored in the (verified) base weights file of task ``name``."""
    from safetensors import SafetensorError, safe_open

    path = _verified_path(name, directory)
    try:
        with safe_open(str(path), framework="pt") as fh:
            stored = (fh.metadata() or {}).get("rankkit", "{}")
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"base weights of task {name!r}: {str(path)!r} is not a readable safetensors file "
            f"({err}). Rebuild it with: {rebuild_command(name)}"
        ) from err
    try:
        return json.loads(stored)
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"base weights of task {name!r}: {str(path)!r} has unreadable metadata ({err}). "
            f"Rebuild it with: {rebuild_command(name)}"
        ) from err


def save_base_weights(
    name: str,
    state: Mapping[str, torch.Tensor],
    entry: Mapping[str, Any],
    directory: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``data/<name>.safetensors`` and its manifest entry; return the entry.

    ``entry["metadata"]`` (a JSON-able dict), if present, goes into the file's own
    metadata instead of the manifest, where the checksum covers it; read it back
    with :func:`base_metadata`.
    """
    directory = writable_data_dir(directory)
    path = directory / f"{name}.safetensors"
    entry = dict(entry)
    extra = {"task": name, "config": entry["config"], **entry.pop("metadata", {})}
    # One key only: safetensors stores the metadata map in hash order, so several
    # keys could come out in a different order each run and change the checksum.
    save_state_dict(state, path, metadata={"rankkit": json.dumps(extra, sort_keys=True)})
    os.chmod(path, 0o644)
    full = {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        **entry,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": f"{sys.platform}-{platform.machine()}",
    }
    write_manifest_entry(name, full, directory)
    return full


class Task:
    """A pretrained model plus a downstream task to adapt it to.

    Subclasses set the class attributes and implement :meth:`_make_model` and
    :meth:`splits`; classification tasks get :meth:`loss` and :meth:`evaluate`
    for free. A batch is always a tuple ``(inputs, labels)`` and
    ``model(inputs)`` returns logits.

    Attributes
    ----------
    name : str
        Registry name (``get_task(name)``).
    description : str
        One line: the model, the pretraining and the downstream task.
    metric_name : str
        Name of the quality metric returned by :meth:`evaluate`; higher is better.
    head_modules : list of str
        Modules trained in the *frozen base* baseline (the new task head).
    default_hparams : dict
        Fine-tuning defaults read by :func:`rankkit.train.fit` (``epochs``, ``lr``,
        ``batch_size``, ``weight_decay``, ``schedule``, ``warmup``), plus ``head_lr``:
        the learning rate of the frozen-base baseline (only the head trains).
    data_source : str, optional
        Where the data comes from, for a task whose data ships whole in a package and
        needs no frozen copy; ``python -m rankkit freeze-data NAME`` then records only the
        SHA-256 of its splits.
    data_from : str, optional
        The task whose frozen data this one reads (``minilm`` reads ``topics``').

    A task whose data is built from text shipped with Python also defines
    ``freeze_data()``, which writes ``data/<name>-data.json.gz`` (:func:`save_frozen_data`);
    its splits are then read from that file only, the same on every Python.
    """

    name: str = ""
    description: str = ""
    metric_name: str = "accuracy"
    head_modules: list[str] = ["head"]  # noqa: RUF012 -- read-only class default
    default_hparams: dict[str, Any] = {}  # noqa: RUF012
    #: Optional dependencies as (module, pip extra) pairs, checked by :meth:`check_available`.
    requires: tuple[tuple[str, str], ...] = ()

    # -- what subclasses provide ---------------------------------------------------

    def _make_model(self) -> nn.Module:
        """A freshly initialised model (random weights, global torch RNG)."""
        raise NotImplementedError

    def splits(self) -> dict[str, Dataset]:
        """``{"train", "val", "test"}`` datasets of ``(inputs, label)`` pairs, deterministic."""
        raise NotImplementedError

    def _base_state(self) -> dict[str, torch.Tensor]:
        """Pretrained weights for the body of the model (everything but the head)."""
        return load_base_weights(self.name)

    # -- shared behaviour ------------------------------------------------------------

    @property
    def roles(self) -> dict[str, list[str]]:
        """``role -> [module names]`` for every ``nn.Linear``, e.g. ``{"q": ["blocks.0.attn.q"]}``.

        Computed from a model on the ``meta`` device (no memory, no weights), by the
        last component of each module name, so PEFT-style suffix targeting and
        role targeting select the same modules.
        """
        return roles_by_suffix(self._meta_model())

    def num_parameters(self) -> int:
        """Parameter count of the fine-tuning model (computed without allocating it)."""
        return sum(p.numel() for p in self._meta_model().parameters())

    def _meta_model(self) -> nn.Module:
        self.check_available()
        with torch.device("meta"):
            return self._make_model()

    def check_available(self) -> None:
        """Raise :class:`MissingExtraError` naming the extra if a dependency is missing."""
        import importlib.util

        for module, extra in self.requires:
            if importlib.util.find_spec(module) is None:
                raise MissingExtraError(
                    f"task {self.name!r} needs the Python package {module!r}, which is not "
                    f"installed. Install the extra: pip install 'rankkit[{extra}]'"
                )

    def build_model(self, pretrained: bool = True, seed: int | None = 0) -> nn.Module:
        """The model for this task.

        Parameters
        ----------
        pretrained : bool
            Load the base weights (checksum-verified) into the body. The task head is
            always newly initialised: the downstream labels are new.
        seed : int or None
            Seed of the random initialisation (head, and the body when
            ``pretrained=False``). The global RNG is left untouched. ``None`` draws
            from the global RNG instead.
        """
        self.check_available()
        if seed is None:
            model = self._make_model()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = self._make_model()
        if pretrained:
            self._load_base(model, self._base_state())
        return model

    def _load_base(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        own = model.state_dict()
        heads = tuple(f"{h}." for h in self.head_modules)
        missing = [k for k in own if k not in state and not k.startswith(heads)]
        unexpected = [k for k in state if k not in own]
        wrong = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"base weights of task {self.name!r} do not fit its model (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}). They "
                f"were built for another configuration; rebuild them with: "
                f"{rebuild_command(self.name)}"
            )
        model.load_state_dict(state, strict=False)

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        """Mean cross-entropy of ``model(inputs)`` against the labels."""
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels)

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        split: str = "test",
        device: str | torch.device | None = None,
        batch_size: int = 256,
    ) -> float:
        """Accuracy of ``model`` on ``split`` (fraction of correct argmax predictions)."""
        data = self.splits()
        if split not in data:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(data)}.")
        if device is None:
            device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        correct = total = 0
        for inputs, labels in DataLoader(data[split], batch_size=batch_size):
            logits = model(inputs.to(device))
            correct += (logits.argmax(-1).cpu() == labels).sum().item()
            total += len(labels)
        model.train(was_training)
        return correct / total

    def info(self) -> dict[str, Any]:
        """Name, parameter count, metric and description, for listings."""
        try:
            params: int | None = self.num_parameters()
        except MissingExtraError:
            params = None
        return {
            "task": self.name,
            "params": params,
            "metric": self.metric_name,
            "description": self.description,
        }

    def __repr__(self) -> str:
        return f"<Task {self.name!r}: {self.description}>"


def roles_by_suffix(model: nn.Module) -> dict[str, list[str]]:
    """``role -> [module names]`` of every ``nn.Linear`` of ``model``, keyed by the name's last part."""
    roles: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            roles.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    return roles
