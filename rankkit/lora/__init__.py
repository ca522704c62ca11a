r"""LoRA adapters: inject, train, merge, save -- in PEFT's vocabulary and file format.

The idea (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685): freeze a pretrained linear layer of weight ``W`` (out x in) and
learn only a low-rank update

.. math::

    W' = W + s \, B A, \qquad A \in \mathbb{R}^{r \times in},\;
    B \in \mathbb{R}^{out \times r},\; r \ll \min(in, out),

so the forward pass is ``h = W x + s * B (A x)`` and a layer trains
``r * (in + out)`` numbers instead of ``in * out``.

Scaling ``s``
    ``s = lora_alpha / r`` (the paper). With rank-stabilised LoRA
    (``use_rslora=True``; Kalajdzievski 2023, "A Rank Stabilization Scaling Factor
    for Fine-Tuning with LoRA", arXiv:2312.03732) ``s = lora_alpha / sqrt(r)``,
    which keeps the update's magnitude from collapsing as ``r`` grows.

Initialisation (``init_lora_weights``)
    ``"kaiming"`` (PEFT's ``True``, the reference default): ``A`` kaiming-uniform
    with ``a = sqrt(5)`` (PyTorch's ``nn.Linear`` default), ``B = 0``. Since
    ``B = 0``, ``B A = 0`` and the adapted model starts *exactly* at the
    pretrained one, while gradients still reach ``B`` (``dL/dB = s (dL/dh)(A x)^T``).

    ``"gaussian"``: ``A ~ N(0, std=1/r)``, ``B = 0`` (PEFT's convention: the
    standard deviation, not the variance, is ``1/r``).

    ``"pissa"`` (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular
    Vectors Adaptation", arXiv:2404.02948): with the SVD ``W = U S V^T``,
    ``A = sqrt(S_r / s) V_r^T`` and ``B = U_r sqrt(S_r / s)``, so ``s B A`` is the
    best rank-``r`` approximation of ``W``; the frozen weight keeps the residual
    ``W - s B A``. The initial output is unchanged (up to float rounding) but the
    adapter now trains the principal directions of ``W``.

    ``False``: ``A`` and ``B`` both kaiming-uniform, so the adapter starts
    *non-zero* (useful to test merging; not for training).

Merging
    ``merge()`` folds the update into the weight, ``W <- W + s B A``; the forward is
    then one matmul, so a merged LoRA model has no extra inference latency.
    ``unmerge()`` subtracts it again.

File format
    :func:`save_adapter` writes ``adapter_model.safetensors`` and
    ``adapter_config.json`` with PEFT's key names
    (``base_model.model.<module>.lora_A.weight``), so
    ``peft.PeftModel.from_pretrained(base, DIR)`` loads a rankkit adapter, and
    :func:`load_adapter` reads adapters written by PEFT.

The package
    Each part in its own module, every public name importable from here:
    :mod:`rankkit.lora.layer` (:class:`LoRALinear`), :mod:`rankkit.lora.config`
    (:class:`LoraConfig`, with PEFT's ``adapter_config.json``),
    :mod:`rankkit.lora.model` (:func:`apply_lora` and the rest of the model surgery)
    and :mod:`rankkit.lora.save_and_load` (the adapter files), as in PEFT's
    ``peft.tuners.lora``.

Example
-------
>>> import torch
>>> from torch import nn
>>> from rankkit.lora import LoraConfig, apply_lora, count_parameters
>>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
>>> _ = apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
>>> count_parameters(model).trainable        # 2 * (16 + 16)
64
"""

from __future__ import annotations

from rankkit.lora.config import LoraConfig
from rankkit.lora.layer import INIT_METHODS as INIT_METHODS
from rankkit.lora.layer import LoRALinear
from rankkit.lora.model import apply_lora, lora_delta_weights, lora_state_dict, merge_and_unload
from rankkit.lora.save_and_load import SavedAdapter, load_adapter, save_adapter
from rankkit.utils import ParameterCount, count_parameters
from rankkit.utils import set_submodule as set_submodule  # switched off by the assignments

__all__ = [
    "LoRALinear",
    "LoraConfig",
    "ParameterCount",
    "SavedAdapter",
    "apply_lora",
    "count_parameters",
    "load_adapter",
    "lora_delta_weights",
    "lora_state_dict",
    "merge_and_unload",
    "save_adapter",
]
