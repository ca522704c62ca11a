"""Which read-out should ``minilm-code``'s head use: the window's mean, or the state at [MASK]?

Until 2026-12-02 ``minilm-code`` classified the blanked-out token from the *mean* of
MiniLM's final hidden states (as sentence-transformers pools, and as ``minilm`` still
does). With that read-out a frozen pretrained MiniLM plus a new head scored *below* a
frozen random one (0.199 against 0.225, ``docs/tasks.md``). The blank is written as
``[MASK]``, the token BERT-style pretraining taught the model to fill in, so the answer
should sit in the hidden state *at the mask*. The task now reads there
(``EncoderClassifier(read_at=mask id)``); this script trains the same runs with either
read-out, everything else the task's (data, splits, hyper-parameters, seeds; frozen runs
at ``head_lr``, full ones at ``lr``), to compare them.

    python docs/experiments/minilm_code_readout.py frozen random --readout mask mean --seeds 0 1 2
    python docs/experiments/minilm_code_readout.py full --readout mask --seeds 0 1 2
"""

import argparse
import time

import torch

from rankkit.tasks import get_task
from rankkit.train import fit, head_only

RUNS = {
    "frozen": (True, True),  # (pretrained, head only)
    "random": (False, True),
    "full": (True, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", choices=sorted(RUNS))
    parser.add_argument("--readout", nargs="+", choices=("mask", "mean"), default=["mask"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    task = get_task("minilm-code")
    for readout, run, seed in (
        (r, run, s) for r in args.readout for run in args.runs for s in args.seeds
    ):
        pretrained, frozen = RUNS[run]
        model = task.build_model(pretrained=pretrained, seed=seed)
        if readout == "mean":
            model.read_at = None
        lr = task.default_hparams["head_lr" if frozen else "lr"]
        start = time.time()
        result = fit(head_only(model, task) if frozen else model, task, lr=lr,
                     epochs=args.epochs, seed=seed, progress=False)  # fmt: skip
        print(f"{readout} {run} seed {seed}: val {result.metrics['val_accuracy']:.4f} "
              f"test {result.metrics['test_accuracy']:.4f} ({time.time() - start:.0f} s)",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
