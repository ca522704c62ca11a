"""Does longer language-model pretraining lower the fine-tuning d90 on ``code``?

Aghajanyan et al. (2020) track the intrinsic dimension of fine-tuning through pretraining
and find that it falls as pretraining goes on ("pre-training implicitly minimizes
intrinsic dimension"). This script asks the same of ``code``: it pretrains the task's
language model for ``E`` epochs (the task's recipe, seed 0; the shipped base has 4) and
measures the fine-tuning d90 from that base exactly as
``docs/intrinsic.md`` does for the shipped one (fastfood / DID, subspace lr 0.1 at
d = 1,000 scaled as sqrt(1000 / d), seeds 0-2, the task's 20 epochs, head in the subspace,
each base's own full fine-tuning as the baseline). No pretraining at all is the
``--from-scratch`` record of ``docs/intrinsic.md``.

    python docs/experiments/code_d90_pretraining.py 1 --out runs/intrinsic/code-pretrain-1
"""

import argparse
import json

import torch

from rankkit.intrinsic import TaskProblem, estimate_intrinsic_dimension
from rankkit.tasks.code import CodeTask


class CodeWithBase(CodeTask):
    """The ``code`` task fine-tuned from a base pretrained here for ``epochs`` epochs."""

    def __init__(self, epochs: int) -> None:
        super().__init__()
        self.pretrain_hparams = {**CodeTask.pretrain_hparams, "epochs": epochs}
        self.base, self.base_fields = self.pretrain(seed=0, progress=False)

    def _base_state(self) -> dict[str, torch.Tensor]:
        return self.base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("epochs", type=int, help="epochs of language-model pretraining (>= 1)")
    parser.add_argument("--dims", type=int, nargs="+", default=[100, 300, 1000, 3000])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error("epochs must be >= 1; no pretraining is the --from-scratch record")
    torch.set_num_threads(1)
    task = CodeWithBase(args.epochs)
    print(f"base after {args.epochs} epochs: {json.dumps(task.base_fields['metric'])}", flush=True)
    problem = TaskProblem(task, subspace_lr=0.1, lr_ref_d=1000, device="cpu")
    result = estimate_intrinsic_dimension(
        problem, dims=args.dims, seeds=(0, 1, 2), rtol=0.5, progress=False
    )
    print(result.summary())
    result.save(args.out)


if __name__ == "__main__":
    main()
