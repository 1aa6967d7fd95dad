"""A task: labelled examples in disjoint train / validation / test splits, and class names.

The test split can be *sealed*: while sealed, reading it raises :class:`SealedSplitError`. The
harness seals every task while it selects hyperparameters, so selection provably never looks at
test data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from alloykit.errors import AlloykitError


class SealedSplitError(AlloykitError):
    """Something read a test split while hyperparameters were being selected."""


@dataclass(frozen=True)
class Split:
    inputs: list[Any]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels):
            raise ValueError(f"split has {len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Task:
    name: str
    classes: list[str]
    train: Split
    validation: Split
    _test: Split = field(repr=False)
    _sealed: int = field(default=0, repr=False)

    @property
    def test(self) -> Split:
        if self._sealed:
            raise SealedSplitError(
                f"task {self.name!r}: the test split was read during hyperparameter selection"
            )
        return self._test

    def split(self, name: str) -> Split:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"unknown split {name!r}: train, validation or test")
        return getattr(self, name)

    @contextmanager
    def sealed(self) -> Iterator[Task]:
        self._sealed += 1
        try:
            yield self
        finally:
            self._sealed -= 1

    def fingerprint(self) -> str:
        """Hash of the task's names, classes and all three splits (cache keys)."""
        h = hashlib.sha256(json.dumps([self.name, self.classes]).encode())
        for s in (self.train, self.validation, self._test):
            h.update(json.dumps([list(map(str, s.inputs)), list(s.labels)]).encode())
        return h.hexdigest()


def make_splits(
    name: str,
    inputs: Sequence[Any],
    labels: Sequence[int],
    classes: Sequence[str],
    *,
    n_train: int,
    n_validation: int,
    n_test: int,
    seed: int = 0,
) -> Task:
    """Shuffle (seeded) and cut into disjoint test, validation and train splits, in that order.

    Duplicate inputs are dropped first (an input seen with two labels is dropped entirely), so no
    input is in two splits. The test split gets up to ``n_test`` examples, validation up to
    ``n_validation``, train up to ``n_train`` of the rest. Raises if fewer than
    ``n_test + n_validation + 1`` distinct examples remain.
    """
    first: dict[str, int] = {}
    conflicted: set[str] = set()
    keep: list[int] = []
    for i, (x, y) in enumerate(zip(inputs, labels, strict=True)):
        key = str(x)
        if key in first:
            if labels[first[key]] != y:
                conflicted.add(key)
            continue
        first[key] = i
        keep.append(i)
    keep = [i for i in keep if str(inputs[i]) not in conflicted]
    if len(keep) < n_test + n_validation + 1:
        raise ValueError(
            f"task {name!r}: {len(keep)} distinct examples, "
            f"need more than {n_test} test + {n_validation} validation"
        )
    digest = hashlib.sha256(f"{name}:{seed}".encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(keep))
    chosen = [keep[i] for i in order]

    def take(idx: list[int]) -> Split:
        return Split([inputs[i] for i in idx], [int(labels[i]) for i in idx])

    test = take(chosen[:n_test])
    validation = take(chosen[n_test : n_test + n_validation])
    train = take(chosen[n_test + n_validation : n_test + n_validation + n_train])
    return Task(name, list(classes), train, validation, test)
