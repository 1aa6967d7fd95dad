"""Accuracy and normalized accuracy (merged ÷ the task's own fine-tuned model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def accuracy(predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Fraction of predictions equal to the labels."""
    p = torch.as_tensor(predictions)
    y = torch.as_tensor(labels)
    if p.shape != y.shape:
        raise ValueError(f"{p.numel()} predictions for {y.numel()} labels")
    if y.numel() == 0:
        raise ValueError("accuracy of an empty split")
    return float((p == y).double().mean())


def normalized(merged: Mapping[str, float], individual: Mapping[str, float]) -> dict[str, float]:
    """Per task: merged accuracy ÷ that task's fine-tuned accuracy (the papers' normalized accuracy)."""
    missing = set(merged) - set(individual)
    if missing:
        raise KeyError(f"no fine-tuned accuracy for task(s) {sorted(missing)}")
    out = {}
    for task, acc in merged.items():
        if individual[task] <= 0:
            raise ValueError(f"task {task!r}: fine-tuned accuracy is {individual[task]}, cannot normalize")
        out[task] = acc / individual[task]
    return out


def mean(values: Mapping[str, float]) -> float:
    """Unweighted mean over tasks (each task counts once, whatever its test size)."""
    if not values:
        raise ValueError("mean over no tasks")
    return sum(values.values()) / len(values)
