"""A sentence encoder (mean-pooled, L2-normalised, as sentence-transformers' MiniLM), frozen
prototype heads, and full fine-tuning of the encoder under a frozen head.

Inputs are tokenised once per split and batched by length (little padding), so evaluating a
merged backbone costs one forward pass per example.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Batches:
    """A split tokenised once: batches sorted by length, and the order that undoes the sort."""

    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (input_ids, attention_mask)
    order: torch.Tensor  # position of each sorted example in the original split


class SentenceEncoder:
    """Wraps a Hugging Face encoder (``AutoModel``) and its tokenizer."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_len: int, batch_size: int = 128) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.batch_size = batch_size

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        self.model.load_state_dict(dict(state), strict=True)

    def tokenize(self, texts: Sequence[str], batch_size: int | None = None, sort: bool = True) -> Batches:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_len, padding=False)
        ids = enc["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i])) if sort else list(range(len(ids)))
        size = batch_size or self.batch_size
        pad = self.tokenizer.pad_token_id or 0
        batches = []
        for s in range(0, len(order), size):
            chunk = [ids[i] for i in order[s : s + size]]
            width = max(len(c) for c in chunk)
            x = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, c in enumerate(chunk):
                x[r, : len(c)] = torch.tensor(c)
                mask[r, : len(c)] = 1
            batches.append((x, mask))
        return Batches(batches, torch.tensor(order, dtype=torch.long))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)

    @torch.inference_mode()
    def embed(self, batches: Batches) -> torch.Tensor:
        self.model.eval()
        parts = [self.forward(ids, mask) for ids, mask in batches.batches]
        out = torch.empty(len(batches.order), parts[0].shape[1])
        out[batches.order] = torch.cat(parts)
        return out


def prototype_head(
    embeddings: torch.Tensor, labels: Sequence[int], n_classes: int, shots: int
) -> torch.Tensor:
    """Class prototypes: the normalised mean of the first ``shots`` embeddings of each class.

    Like CLIP's zero-shot heads, the head is built once from the *base* encoder and frozen, so a
    merged backbone is judged with the same head as every fine-tune.
    """
    y = torch.as_tensor(labels)
    rows = []
    for c in range(n_classes):
        idx = torch.nonzero(y == c).flatten()[:shots]
        if idx.numel() == 0:
            raise ValueError(f"class {c} has no training example for its prototype")
        rows.append(embeddings[idx].mean(0))
    return F.normalize(torch.stack(rows), dim=-1)


def predict(embeddings: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    return (embeddings @ head.T).argmax(-1)


@dataclass
class FineTuneLog:
    steps: int
    seconds: float
    final_loss: float


def fine_tune(
    encoder: SentenceEncoder,
    texts: Sequence[str],
    labels: Sequence[int],
    head: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    scale: float,
    seed: int,
    weight_decay: float = 0.01,
) -> FineTuneLog:
    """Full fine-tune of the encoder (in place) with cross-entropy on ``scale · cos(emb, head)``.

    AdamW, constant learning rate, the head frozen; examples reshuffled each epoch from ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    model = encoder.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    y_all = torch.as_tensor(labels)
    t0, steps, loss_value = time.perf_counter(), 0, math.nan
    for _ in range(epochs):
        perm = torch.randperm(len(texts), generator=gen).tolist()
        for s in range(0, len(perm), batch_size):
            idx = perm[s : s + batch_size]
            ((ids, mask),) = encoder.tokenize(
                [texts[i] for i in idx], batch_size=len(idx), sort=False
            ).batches
            logits = scale * encoder.forward(ids, mask) @ head.T
            loss = F.cross_entropy(logits, y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            loss_value = float(loss.detach())
    model.eval()
    return FineTuneLog(steps, time.perf_counter() - t0, loss_value)
