"""Permutation groups: which (tensor, axis) pieces must be reordered together, as one editable
table.

A *unit* is one hidden feature (a channel, a neuron, a (head, dim) pair). A group's ``size`` units
appear in every tensor listed in it, along one axis, possibly as a piece of that axis:

* ``Piece(param, axis, role, offset, outer, inner)``: along ``axis`` of ``param``, the elements
  ``offset + o·(size·inner) + u·inner + i`` (o < outer, i < inner) belong to unit u. A whole axis
  is ``offset=0, outer=1, inner=1``; a fused q/k/v row block has an ``offset``; a Linear reading a
  flattened C × H × W map has ``inner = H·W``.
* ``role``: ``out`` for axes that produce or carry the units (weight rows, biases, norm scales,
  running statistics, class and position tokens): a merge averages them; ``in`` for axes that
  read them (weight columns of the next layer): a merge sums what it fuses.
* ``blocks``: units split into this many contiguous blocks (attention heads, GroupNorm groups)
  that a valid transform maps onto whole blocks. ``tie``: groups with the same tie (the q/k and
  v/o groups of one attention layer, which share the head axis) must map blocks identically.
* ``activation``: where this group's units can be observed (a traced node and the piece of its
  axis), for activation statistics.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from alloykit.errors import ParameterError


@dataclass(frozen=True)
class Piece:
    param: str
    axis: int
    role: str = "out"  # "out" | "in"
    offset: int = 0
    outer: int = 1
    inner: int = 1

    def describe(self, size: int) -> str:
        where = f"{self.param}[{self.axis}]"
        if self.offset or self.outer != 1 or self.inner != 1:
            where += f"@{self.offset}" if self.offset else ""
            if self.outer != 1 or self.inner != 1:
                where += f"({self.outer}×{size}×{self.inner})"
        return where


@dataclass(frozen=True)
class ActivationSource:
    """Where a group's units can be observed: the ``input`` or ``output`` (``hook``) of a module
    (hooked on the real model, any batch shape), or else a node of the traced graph; along
    ``axis``, laid out as in :class:`Piece`."""

    node: str
    axis: int
    offset: int = 0
    outer: int = 1
    inner: int = 1
    module: str | None = None
    hook: str = "input"


@dataclass
class PermGroup:
    name: str
    size: int
    pieces: list[Piece]
    blocks: int = 1
    tie: str | None = None
    activation: list[ActivationSource] = field(default_factory=list)
    # tensors that move with the group but stay out of weight signatures (running statistics)
    unsigned: list[str] = field(default_factory=list)

    @property
    def block_size(self) -> int:
        return self.size // self.blocks

    def params(self) -> list[str]:
        return sorted({p.param for p in self.pieces})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PermGroup:
        return cls(
            d["name"],
            int(d["size"]),
            [Piece(**p) for p in d["pieces"]],
            int(d.get("blocks", 1)),
            d.get("tie"),
            [ActivationSource(**a) for a in d.get("activation", [])],
            list(d.get("unsigned", [])),
        )


@dataclass
class GroupTable:
    """Every permutation group of a model, plus what tracing left alone and why."""

    groups: list[PermGroup]
    # tensors, and why they are in no group (touch an input or output, an op that fixes them, …)
    fixed: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        seen: dict[tuple[str, int, int], str] = {}
        names = set()
        for g in self.groups:
            if g.name in names:
                raise ParameterError(f"group {g.name!r} appears twice")
            names.add(g.name)
            if g.size < 1 or g.blocks < 1 or g.size % g.blocks:
                raise ParameterError(
                    f"group {g.name!r}: size {g.size} is not a multiple of blocks {g.blocks}"
                )
            if not g.pieces:
                raise ParameterError(f"group {g.name!r} has no tensors")
            for p in g.pieces:
                if p.role not in ("out", "in"):
                    raise ParameterError(f"group {g.name!r}: role of {p.param} must be 'out' or 'in'")
                key = (p.param, p.axis, p.offset)
                if key in seen and (p.outer, p.inner) == (1, 1):
                    raise ParameterError(
                        f"{p.param} axis {p.axis} at {p.offset} is in groups {seen[key]} and {g.name}"
                    )
                seen[key] = g.name

    def by_param(self) -> dict[str, list[tuple[PermGroup, Piece]]]:
        out: dict[str, list[tuple[PermGroup, Piece]]] = {}
        for g in self.groups:
            for p in g.pieces:
                out.setdefault(p.param, []).append((g, p))
        return out

    def group(self, name: str) -> PermGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise ParameterError(f"no group {name!r}; groups: {', '.join(g.name for g in self.groups)}")

    # -- editing ------------------------------------------------------------------------------
    def without(self, names: Iterable[str]) -> GroupTable:
        """The table with these groups left alone (their tensors are averaged as they are)."""
        drop = set(names)
        missing = drop - {g.name for g in self.groups}
        if missing:
            raise ParameterError(f"no such groups: {sorted(missing)}")
        fixed = dict(self.fixed)
        for g in self.groups:
            if g.name in drop:
                for p in g.params():
                    fixed.setdefault(p, f"group {g.name} excluded by the user")
        return GroupTable([g for g in self.groups if g.name not in drop], fixed, list(self.notes))

    def to_json(self) -> str:
        return json.dumps(
            {"groups": [g.as_dict() for g in self.groups], "fixed": self.fixed, "notes": self.notes}, indent=1
        )

    @classmethod
    def from_json(cls, text: str) -> GroupTable:
        d = json.loads(text)
        return cls(
            [PermGroup.from_dict(g) for g in d["groups"]], dict(d.get("fixed", {})), list(d.get("notes", []))
        )

    @classmethod
    def from_spec(cls, spec: dict[str, Sequence[Any]], shapes: dict[str, Sequence[int]]) -> GroupTable:
        """A hand-written spec, Git Re-Basin style: ``{group: [[axis, "param", "in"?], ...]}``
        (an entry with a third item "in" is a consumer axis; optional ``{"blocks": g}`` as the
        last item of a group's list). The fallback when tracing cannot handle a model."""
        groups = []
        for name, entries in spec.items():
            blocks = 1
            pieces = []
            size = None
            for e in entries:
                if isinstance(e, dict):
                    blocks = int(e.get("blocks", 1))
                    continue
                axis, param = int(e[0]), str(e[1])
                role = "in" if len(e) > 2 and e[2] == "in" else "out"
                if param not in shapes:
                    raise ParameterError(f"spec group {name!r}: no tensor {param!r} in the model")
                n = shapes[param][axis]
                if size is not None and n != size:
                    raise ParameterError(
                        f"spec group {name!r}: {param} axis {axis} has {n} units, others {size}"
                    )
                size = n
                pieces.append(Piece(param, axis, role))
            groups.append(PermGroup(name, size or 0, pieces, blocks))
        return cls(groups)

    # -- printing -----------------------------------------------------------------------------
    def describe(self) -> str:
        lines = [f"{len(self.groups)} permutation groups"]
        for g in self.groups:
            block = f", {g.blocks} blocks of {g.block_size}" if g.blocks > 1 else ""
            tie = f", tied {g.tie}" if g.tie else ""
            lines.append(f"  {g.name}: {g.size} units{block}{tie}")
            outs = [p.describe(g.size) for p in g.pieces if p.role == "out"]
            ins = [p.describe(g.size) for p in g.pieces if p.role == "in"]
            lines.append(f"    out: {', '.join(outs) or '-'}")
            lines.append(f"    in:  {', '.join(ins) or '-'}")
            if g.activation:
                a = g.activation[0]
                lines.append(
                    f"    activations: node {a.node} axis {a.axis}" + (" …" if len(g.activation) > 1 else "")
                )
        if self.fixed:
            lines.append(f"left alone ({len(self.fixed)} tensors):")
            for p, why in sorted(self.fixed.items()):
                lines.append(f"  {p}: {why}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
