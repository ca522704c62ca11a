"""rankkit: measure and teach intrinsic rank.

Why can LoRA fine-tune a model by training a tiny low-rank update instead of
all of its weights? rankkit answers with measurements you can run on a laptop:

* :mod:`rankkit.spectra` -- singular-value spectra and effective rank of a matrix,
  against a random-matrix baseline, and the LoRA paper's section 7 analyses
  (subspace similarity, amplification).
* :mod:`rankkit.checkpoints`, :mod:`rankkit.adapters` and :mod:`rankkit.reports` --
  the checkpoints people have (files, shards, model folders, PEFT adapters), and
  :func:`rank_report` of ΔW = W_finetuned - W_pretrained, one layer at a time.
* :mod:`rankkit.tasks` and :mod:`rankkit.train` -- small pretrained models and one
  readable training loop shared by every fine-tuning method.
* :mod:`rankkit.lora` -- LoRA adapters in PEFT's vocabulary and file format.
* :mod:`rankkit.methods` -- one recipe per method (frozen base, full, LoRA, subspace):
  :func:`prepare_run`, and :func:`finetune` to checkpoints.
* :mod:`rankkit.intrinsic` -- random-subspace training θ = θ₀ + P θ_d.
* :mod:`rankkit.sweep` and :mod:`rankkit.batched` -- LoRA rank sweeps with baselines,
  several runs trained at once where that is faster; per-layer ranks from a pilot's
  spectra, and :mod:`rankkit.adalora` (PEFT's AdaLoRA) at the same budget.
* :mod:`rankkit.plots` -- figures that return matplotlib objects.
* :mod:`rankkit.stats` -- one rule for comparing two measured numbers: the standard
  error of a difference, Welch's and the paired t-test over seeds, and a verdict.

Everything public is re-exported here, so ``import rankkit`` is all a notebook
needs.
"""

__version__ = "0.1.0"

from rankkit.adapters import open_adapter
from rankkit.checkpoints import load_state_dict, open_checkpoint, save_state_dict
from rankkit.reports import delta_report, delta_weights, format_report, rank_report
from rankkit.spectra import (
    EFFECTIVE_RANK_METHODS,
    amplification_factor,
    effective_rank,
    gavish_donoho_threshold,
    lowrank_singular_values,
    principal_angles,
    random_baseline,
    singular_values,
    subspace_similarity,
    subspace_similarity_grid,
)

# Comparing two measured numbers
# isort: split
from rankkit.stats import (
    Comparison,
    binomial_se,
    compare_accuracies,
    compare_seeds,
    difference,
)

# Tasks and the training loop
# isort: split
from rankkit.tasks import TASKS, Task, get_task, list_tasks
from rankkit.train import (
    TrainResult,
    fit,
    freeze_all_but,
    head_only,
    resolve_device,
    set_seed,
)

# LoRA
# isort: split
from rankkit.lora import (
    LoraConfig,
    LoRALinear,
    apply_lora,
    count_parameters,
    load_adapter,
    lora_delta_weights,
    lora_state_dict,
    merge_and_unload,
    save_adapter,
)

# Extracting LoRA from a full fine-tune
# isort: split
from rankkit.extract import ExtractedAdapter, allocate_budget, extract_lora

# Intrinsic dimension
# isort: split
from rankkit.intrinsic import (
    HyperplaneProblem,
    IntrinsicDimensionResult,
    SubspaceModel,
    TaskProblem,
    estimate_intrinsic_dimension,
    search_intrinsic_dimension,
)
from rankkit.projections import fwht, make_projection

# One recipe per method, and fine-tuning to checkpoints
# isort: split
from rankkit.methods import METHODS, PreparedRun, finetune, prepare_run

# Sweeps, batched training and AdaLoRA
# isort: split
from rankkit.adalora import fit_adalora
from rankkit.batched import MultiLinear, MultiLoRALinear, fit_batched
from rankkit.sweep import (
    SweepConfig,
    compare_allocations,
    load_results,
    rank_for_gain,
    rank_for_gain_interval,
    run_sweep,
    summarize,
)

__all__ = [name for name in dir() if not name.startswith("_")]
