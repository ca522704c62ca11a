"""Where does LoRA's last 0.04 on ``code`` go? Full fine-tuning of only what LoRA adapts.

On ``code`` LoRA plateaus 0.04 below full fine-tuning from rank 4 (all-linear) on, even at
rank 64, where every adapted matrix can take any update. Full fine-tuning also trains the
token and position embeddings (66k of the 168k parameters), the LayerNorms and the
biases, which LoRA leaves frozen. This script fine-tunes fully but (a) with both embedding
tables frozen, (b) with only the ``nn.Linear`` layers (weights and biases, head included)
trainable, at the task's full fine-tuning defaults, seeds 0-2 (``docs/sweeps.md``).

    python docs/experiments/code_lora_gap.py
"""

import torch

from rankkit.methods import prepare_run
from rankkit.tasks import get_task
from rankkit.train import fit

torch.set_num_threads(1)
task = get_task("code")
for seed in (0, 1, 2):
    for label in ("embeddings frozen", "only the linear layers"):
        run = prepare_run(task, "full", seed, exclude=["tok_emb", "pos_emb"])
        if label == "only the linear layers":
            linear = {n for n, m in run.model.named_modules() if isinstance(m, torch.nn.Linear)}
            for name, p in run.model.named_parameters():
                p.requires_grad_(name.rsplit(".", 1)[0] in linear)
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        result = fit(run.model, task, lr=run.lr, seed=seed, progress=False, device="cpu")
        print(
            f"seed {seed}, full fine-tuning, {label} ({trainable:,} trainable): "
            f"val {result.metrics['val_accuracy']:.4f}, test {result.metrics['test_accuracy']:.4f}"
        )
