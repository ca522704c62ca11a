"""A GPT-style transformer small enough for a laptop CPU, and its pretraining objective.

The model of the ``topics`` and ``code`` tasks (nanoGPT-style, pre-LayerNorm)::

    h₀ = E[x] + P[pos]                                       (x: token ids)
    h  ← h + o(softmax(q(ĥ) k(ĥ)ᵀ / √d_head + causal mask) v(ĥ)),  ĥ = LN(h)
    h  ← h + fc2(GELU(fc1(LN(h))))                                  (n_layer blocks)
    LM:         logits = LN(h) Eᵀ              (tied input / output embedding)
    classifier: logits = head(pool_t LN(h)_t)  (pool: mean over t, or the last t)

Separate ``q``, ``k``, ``v``, ``o`` projections, so targeting them means what it
means for GPT-3 in the LoRA paper. Pretraining is next-token prediction
(:class:`LanguageModeling`, a task for :func:`rankkit.train.fit`) over windows of
a token stream (:class:`TokenWindows`); a :class:`Vocabulary` maps tokens to the
embedding's rows.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from rankkit.train import fit

UNK = 0
UNK_TOKEN = "<unk>"
POOLING = ("mean", "last")


class Vocabulary:
    """Token <-> id; id 0 is ``<unk>`` for every token outside the vocabulary.

    Built from the pretraining text only (:meth:`from_corpus`). A task stores the
    list with its base weights or frozen data (covered by a checksum), so the ids
    always match the embedding rows.
    """

    def __init__(self, tokens: list[str]):
        if not tokens or tokens[0] != UNK_TOKEN or len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary is a list of distinct tokens starting with '<unk>'.")
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def from_corpus(
        cls, tokens: list[str], size: int, reserved: tuple[str, ...] = ()
    ) -> Vocabulary:
        """``<unk>``, the ``reserved`` tokens, then the most frequent tokens (ties alphabetical)."""
        counts = Counter(t for t in tokens if t not in reserved)
        ranked = sorted(counts, key=lambda t: (-counts[t], t))[: size - 1 - len(reserved)]
        return cls([UNK_TOKEN, *reserved, *ranked])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.ids.get(t, UNK) for t in tokens]

    def decode(self, ids) -> str:
        return " ".join(self.tokens[int(i)] for i in ids)


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a :class:`TinyTransformer` (the defaults are the ``topics`` model).

    ``pool`` is how a classifier reads the sequence: ``"mean"`` averages the final
    states over positions; ``"last"`` takes the final position's state, which in a
    causal model is the only one that has seen every token (GPT's choice for
    classification).
    """

    vocab_size: int = 2048
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_mlp: int = 512
    dropout: float = 0.1
    pool: str = "mean"

    def __post_init__(self):
        if self.pool not in POOLING:
            raise ValueError(f"pool={self.pool!r}; expected one of {POOLING}.")


class Attention(nn.Module):
    """Multi-head causal self-attention with separate q, k, v, o projections."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.o = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape

        def heads(t):  # (B, T, C) -> (B, n_head, T, C / n_head)
            return t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)),
            heads(self.k(x)),
            heads(self.v(x)),
            is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_mlp)
        self.fc2 = nn.Linear(cfg.d_mlp, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyTransformer(nn.Module):
    """A GPT-style model: a language model, or a classifier if ``n_classes`` is set.

    ``forward(ids)`` takes ``(batch, time)`` token ids and returns next-token
    logits ``(batch, time, vocab)`` (language model) or class logits
    ``(batch, n_classes)`` (the pooled final states through ``head``; see
    :class:`TransformerConfig`).
    """

    def __init__(self, cfg: TransformerConfig = TransformerConfig(), n_classes: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, n_classes) if n_classes else None
        self.apply(self._init)
        # GPT-2: scale the projections that write into the residual stream so its
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states, ``(batch, time, d_model)``."""
        T = ids.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size={self.cfg.block_size}.")
        x = self.drop(self.tok_emb(ids) + self.pos_emb(torch.arange(T, device=ids.device)))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.hidden(ids)
        if self.head is None:
            return h @ self.tok_emb.weight.T
        pooled = h[:, -1] if self.cfg.pool == "last" else h.mean(dim=1)
        return self.head(pooled)


class TokenWindows(Dataset):
    """Windows of ``block_size + 1`` tokens every ``stride``: (input, next-token target)."""

    def __init__(self, ids: torch.Tensor, block_size: int, stride: int):
        self.ids, self.block_size = ids, block_size
        self.starts = range(0, len(ids) - block_size - 1, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i):
        w = self.ids[self.starts[i] : self.starts[i] + self.block_size + 1]
        return w[:-1], w[1:]


class LanguageModeling:
    """Next-token prediction on a token stream: the pretraining task for ``fit``.

    Parameters
    ----------
    name : str
        Shown in progress bars and records (e.g. ``"topics-pretrain"``).
    train_ids : 1-d LongTensor
        The pretraining stream, read in windows of ``block_size + 1`` tokens
        every ``stride`` tokens.
    held_out : dict of str to 2-d LongTensor
        ``"val"`` and ``"test"`` sequences, each scored on predicting every token
        from the ones before it (text the model is never trained on).
    block_size, stride : int
        Context length and window step.
    hparams : dict
        ``fit``'s defaults for this pretraining (epochs, lr, batch size, ...).
    """

    metric_name = "next_token_accuracy"

    def __init__(
        self,
        name: str,
        train_ids: torch.Tensor,
        held_out: dict[str, torch.Tensor],
        block_size: int,
        stride: int,
        hparams: dict[str, Any],
    ):
        self.name = name
        self.default_hparams = dict(hparams)
        self._splits = {
            "train": TokenWindows(train_ids, block_size, stride),
            **{s: TensorDataset(t[:, :-1], t[:, 1:]) for s, t in held_out.items()},
        }

    def splits(self) -> dict[str, Dataset]:
        return self._splits

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def _scores(self, model: nn.Module, split: str, device=None) -> tuple[float, float]:
        x, y = self._splits[split].tensors
        device = device or next(model.parameters()).device
        was_training = model.training
        model.eval()
        logits = model(x.to(device)).float().cpu()
        model.train(was_training)
        nll = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
        return (logits.argmax(-1) == y).float().mean().item(), math.exp(nll)

    def evaluate(self, model: nn.Module, split: str = "test", device=None) -> float:
        return self._scores(model, split, device)[0]

    def perplexity(self, model: nn.Module, split: str = "test") -> float:
        return self._scores(model, split)[1]


def pretrain_language_model(
    config: TransformerConfig,
    lm: LanguageModeling,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pretrain a :class:`TinyTransformer` language model on ``lm`` from ``seed``.

    The one pretraining recipe of the ``topics`` and ``code`` tasks: a model
    initialised under ``seed`` (the global RNG untouched), trained by
    :func:`rankkit.train.fit` with ``lm``'s hyperparameters. Returns the weights and
    the manifest fields every such base records (config, hyperparameters, held-out
    next-token accuracy and perplexity, history, wall time); the task adds where its
    data came from and its vocabulary.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyTransformer(config)
    result = fit(model, lm, seed=seed, progress=progress, device=device)
    model.cpu().eval()
    return model.state_dict(), {
        "config": asdict(config),
        "hparams": result.hparams,
        "metric": {
            "val_next_token_accuracy": round(result.metrics["val_next_token_accuracy"], 4),
            "test_next_token_accuracy": round(result.metrics["test_next_token_accuracy"], 4),
            "val_perplexity": round(lm.perplexity(model, "val"), 2),
            "test_perplexity": round(lm.perplexity(model, "test"), 2),
        },
        "history": [
            {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
            for row in result.history
        ],
        "wall_time_s": round(result.wall_time_s, 1),
    }
