"""Where does LoRA's last 0.04 on ``code`` go? Each variant trains what LoRA leaves out.

On ``code`` LoRA plateaus 0.04 below full fine-tuning from rank 4 (all-linear) on, even at
rank 64, where every adapted matrix can take any update. Full fine-tuning also trains the
token and position embeddings (66k of the 168k parameters), the LayerNorms and the
biases, which LoRA leaves frozen; and ``<mask>``, the blank, is a token the language
model never read, so its embedding is whatever pretraining's output side left.

Variants (each at the task's defaults unless ``--lr`` / ``--epochs`` say otherwise):

* ``full-no-embeddings``: full fine-tuning with both embedding tables frozen;
* ``full-linear-only``: full fine-tuning of the ``nn.Linear`` layers only (weights and
  biases, head included): what LoRA at full rank could reach;
* ``full``: full fine-tuning itself (to rerun it at other epochs);
* ``lora``: all-linear LoRA at ``--rank`` (``lora_alpha = sqrt(r)``, the sweep's rule);
* ``lora+mask``: the same plus a trained offset on the ``<mask>`` embedding only
  (what PEFT's ``trainable_token_indices`` does for a new token);
* ``lora+embeddings``, ``lora+layernorms``, ``lora+both``: the same plus the embedding
  tables, the LayerNorms, or both, trained in full at the LoRA learning rate.

    python docs/experiments/code_lora_gap.py full-no-embeddings full-linear-only
    python docs/experiments/code_lora_gap.py lora lora+mask lora+both --seeds 0 1 2
    python docs/experiments/code_lora_gap.py lora --lr 5e-3 2e-2
    python docs/experiments/code_lora_gap.py full lora --epochs 40 60
"""

import argparse
import itertools

import torch

from rankkit.lora import LoraConfig
from rankkit.methods import prepare_run
from rankkit.tasks import get_task
from rankkit.tasks.code import MASK_TOKEN, vocabulary

VARIANTS = (
    "full", "full-no-embeddings", "full-linear-only",
    "lora", "lora+mask", "lora+embeddings", "lora+layernorms", "lora+both",
)  # fmt: skip


def train_only_linear_layers(model):
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, p in model.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[0] in linear)


def add_mask_offset(model):
    """A trained vector added to the embedding of every ``<mask>`` position."""
    embedding = next(m for n, m in model.named_modules() if n.endswith("tok_emb"))
    mask_id = vocabulary().ids[MASK_TOKEN]
    offset = torch.nn.Parameter(torch.zeros(embedding.embedding_dim))
    model.register_parameter("mask_offset", offset)

    def shift(module, inputs, output):
        return output + (inputs[0] == mask_id).unsqueeze(-1).to(output.dtype) * offset

    embedding.register_forward_hook(shift)


def unfreeze(model, kinds):
    for module in model.modules():
        if isinstance(module, kinds):
            module.requires_grad_(True)


def prepare(task, variant, seed, rank, lr):
    if variant.startswith("full"):
        exclude = ["tok_emb", "pos_emb"] if variant != "full" else []
        run = prepare_run(task, "full", seed, lr=lr, exclude=exclude)
        if variant == "full-linear-only":
            train_only_linear_layers(run.model)
        return run
    config = LoraConfig(r=rank, lora_alpha=rank**0.5, target_modules="all-linear",
                        modules_to_save=task.head_modules)  # fmt: skip
    run = prepare_run(task, "lora", seed, lr=lr, lora_config=config)
    extra = variant.partition("+")[2]
    if extra == "mask":
        add_mask_offset(run.model)
    kinds = {"embeddings": (torch.nn.Embedding,), "layernorms": (torch.nn.LayerNorm,)}
    kinds["both"] = kinds["embeddings"] + kinds["layernorms"]
    if extra in kinds:
        unfreeze(run.model, kinds[extra])
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", choices=VARIANTS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, nargs="+", default=[None])
    parser.add_argument("--epochs", type=int, nargs="+", default=[None])
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = get_task("code")
    for variant, lr, epochs, seed in itertools.product(
        args.variants, args.lr, args.epochs, args.seeds
    ):
        run = prepare(task, variant, seed, args.rank, lr)
        trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
        result = run.fit(task, epochs=epochs, progress=False, device="cpu")
        print(
            f"{variant} (r = {args.rank}) lr {run.lr:g}, {epochs or 'default'} epochs, "
            f"seed {seed}, {trainable:,} trainable: val {result.metrics['val_accuracy']:.4f}, "
            f"test {result.metrics['test_accuracy']:.4f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
