"""Permutation groups derived from the model itself.

The model is captured with ``torch.export`` (an fx graph of ATen ops with every shape known; it
handles Hugging Face models that ``torch.fx.symbolic_trace`` cannot), then each op ties tensor
axes together in a union-find over axes: a Linear ties its input's last axis to its weight's
columns and its output's last axis to its weight's rows and bias; a norm ties the channel to its
scale and shift; an elementwise op or a residual add ties its operands' aligned axes; a reshape
that splits a channel into (heads, dims) records the split, so that attention's ``q @ kᵀ`` ties
q's and k's head dims, ``attn @ v`` ties the heads of q, k and v, and a fused q/k/v projection's
rows fall into chunks. Axes that reach a model input or output, and axes an op cannot carry
(an unknown op, an index into a channel), are fixed. What is left are the groups: each a set of
(tensor, axis piece) that one permutation must reorder together (:mod:`alloykit.alignment.groups`).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alloykit.alignment.groups import ActivationSource, GroupTable, PermGroup, Piece
from alloykit.errors import CheckpointError

Axes = list[int]


class AxisSet:
    """Union-find over tensor axes with structure: an axis may be a split (a row-major product
    of sub-axes, e.g. channels = heads × dims) or chunks (a concatenation, e.g. fused q/k/v)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: dict[int, str] = {}  # root -> why it cannot be permuted
        self.struct: dict[int, tuple[str, list[int]]] = {}
        self.blocks: dict[int, int] = {}

    def new(self, size: int, fixed: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        a = len(self.parent) - 1
        if fixed:
            self.fixed[a] = fixed
        return a

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def fix(self, a: int, why: str) -> None:
        r = self.find(a)
        self.fixed.setdefault(r, why)

    def is_fixed(self, a: int) -> bool:
        return self.find(a) in self.fixed

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            self.fix(ra, "tied to an axis of another size")
            self.fix(rb, "tied to an axis of another size")
            return
        self.parent[rb] = ra
        if rb in self.fixed:
            self.fixed.setdefault(ra, self.fixed.pop(rb))
        if rb in self.blocks:
            b = self.blocks.pop(rb)
            if self.blocks.setdefault(ra, b) != b:
                self.fix(ra, "two different block structures")
        sa, sb = self.struct.pop(ra, None), self.struct.pop(rb, None)
        if sa is not None and sb is not None:
            same = sa[0] == sb[0] and [self.size[c] for c in sa[1]] == [self.size[c] for c in sb[1]]
            self.struct[ra] = sa
            if same:
                for ca, cb in zip(sa[1], sb[1], strict=True):
                    self.union(ca, cb)
            else:
                self.fix(ra, "split two different ways")
        elif sa is not None or sb is not None:
            self.struct[ra] = sa or sb

    def split(self, a: int, sizes: Sequence[int]) -> list[int]:
        """The sub-axes of a (row-major) split of axis ``a`` into ``sizes``."""
        r = self.find(a)
        st = self.struct.get(r)
        if st is not None:
            if st[0] == "split" and [self.size[c] for c in st[1]] == list(sizes):
                return list(st[1])
            self.fix(r, "split two different ways")
            return [self.new(s) for s in sizes]
        children = [self.new(s) for s in sizes]
        self.struct[r] = ("split", children)
        return children

    def merged(self, parts: Sequence[int]) -> int:
        """A new axis that is the row-major product of ``parts``."""
        size = 1
        for p in parts:
            size *= self.size[p]
        a = self.new(size)
        self.struct[a] = ("split", list(parts))
        return a

    def chunks(self, a: int, sizes: Sequence[int]) -> list[int]:
        r = self.find(a)
        st = self.struct.get(r)
        if st is not None:
            if st[0] == "chunks" and [self.size[c] for c in st[1]] == list(sizes):
                return list(st[1])
            if st[0] == "split" and self.size[st[1][0]] == len(sizes):
                return self._split_to_chunks(r)
            self.fix(r, "cut two different ways")
            return [self.new(s) for s in sizes]
        children = [self.new(s) for s in sizes]
        self.struct[r] = ("chunks", children)
        return children

    def _split_to_chunks(self, r: int) -> list[int]:
        """A split (S, A, B, …) whose first sub-axis S is indexed becomes S chunks, each a split
        (A', B', …) of fresh sub-axes: the q, k and v chunks of a fused projection must not
        share their dims."""
        first, *rest = self.struct[r][1]
        out = []
        for _ in range(self.size[first]):
            subs = [self.new(self.size[c]) for c in rest]
            if len(subs) == 1:
                out.append(subs[0])
            else:
                out.append(self.merged(subs))
        self.struct[r] = ("chunks", out)
        return out


@dataclass
class _Trace:
    axes: AxisSet = field(default_factory=AxisSet)
    env: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Axes] = field(default_factory=dict)
    roles: dict[tuple[str, int], str] = field(default_factory=dict)
    unsigned: set[str] = field(default_factory=set)
    # node, axis index, axis id, module path of the op (None when not a module call)
    consumers: list[tuple[str, int, int, str | None]] = field(default_factory=list)
    producers: list[tuple[str, int, int, str | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


class Tracer:
    """Builds the union-find over axes from an exported graph."""

    def __init__(self, gm: torch.fx.GraphModule, state_names: set[str]):
        self.gm = gm
        self.state_names = state_names
        self.t = _Trace()
        # leading sub-axis S of a split turned into chunks -> (the other sub-axes, chunk sub-axes)
        self.selections: dict[int, tuple[list[int], list[list[int]]]] = {}

    # -- helpers --------------------------------------------------------------------------------
    def new_axes(self, node: torch.fx.Node, fixed: str | None = None) -> Axes:
        shape = _shape(node.meta.get("val"))
        return [self.t.axes.new(s, fixed) for s in (shape or ())]

    def ax(self, arg: Any) -> Axes | None:
        if isinstance(arg, torch.fx.Node):
            v = self.t.env.get(arg.name)
            return v if isinstance(v, list) and (not v or isinstance(v[0], int)) else None
        return None

    def union_all(self, a: Axes, b: Axes) -> None:
        for x, y in zip(a, b, strict=True):
            self.t.axes.union(x, y)

    def fix_all(self, axes: Axes | None, why: str) -> None:
        for a in axes or []:
            self.t.axes.fix(a, why)

    def role(self, arg: Any, axis: int, role: str) -> None:
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            self.t.roles[(arg.target, axis)] = role

    def broadcast(self, out: Axes, inputs: list[Axes | None]) -> None:
        out_sizes = [self.t.axes.size[a] for a in out]
        for a in inputs:
            if a is None:
                continue
            for k in range(1, len(a) + 1):
                if k > len(out):
                    break
                if self.t.axes.size[a[-k]] == out_sizes[-k]:
                    self.t.axes.union(a[-k], out[-k])

    # -- the walk -------------------------------------------------------------------------------
    def run(self) -> _Trace:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.t.env[node.name] = self.new_axes(node, "touches a model input")
            elif node.op == "get_attr":
                target = str(node.target)
                if target in self.state_names:
                    if target not in self.t.params:
                        self.t.params[target] = self.new_axes(node)
                    self.t.env[node.name] = self.t.params[target]
                else:  # a constant outside the state dict cannot be permuted with the rest
                    self.t.env[node.name] = self.new_axes(node, f"constant {target} outside the state dict")
            elif node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                for arg in _flatten(node.args):
                    self.fix_all(self.ax(arg), "touches a model output")
            # call_module (export's guard function) and others carry no tensors to tie
        return self.t

    def call(self, node: torch.fx.Node) -> None:
        target = node.target
        if target is operator.getitem:
            src = self.t.env.get(node.args[0].name) if isinstance(node.args[0], torch.fx.Node) else None
            if isinstance(src, list) and src and isinstance(src[0], list):
                self.t.env[node.name] = src[node.args[1]]
            else:
                self.t.env[node.name] = self.new_axes(node, "an index the tracer cannot follow")
            return
        name = _op_name(target)
        handler = getattr(self, f"op_{name}", None)
        if handler is None:
            handler = _ALIASES.get(name)
            handler = getattr(self, handler) if handler else None
        out: Any
        if handler is None:
            out = self.unknown(node, name)
        else:
            out = handler(node, *node.args, **node.kwargs)
        self.t.env[node.name] = out

    def unknown(self, node: torch.fx.Node, name: str) -> Any:
        args = [a for a in _flatten(node.args) if self.ax(a) is not None]
        why = f"op {name} (node {node.name}) is not handled"
        for a in args:
            self.fix_all(self.ax(a), why)
        v = node.meta.get("val")
        if isinstance(v, tuple | list):
            return [[self.t.axes.new(s, why) for s in _shape(x) or ()] for x in v]
        if args or isinstance(v, torch.Tensor):
            self.t.notes.append(why + ": the axes it touches are left alone")
        return self.new_axes(node, why) if isinstance(v, torch.Tensor) else None

    # -- ops ------------------------------------------------------------------------------------
    def op_linear(self, node, x, w, b=None):
        xa, wa = self.ax(x), self.ax(w)
        out = self.new_axes(node)
        for i in range(len(out) - 1):
            self.t.axes.union(out[i], xa[i])
        self.t.axes.union(xa[-1], wa[1])
        self.t.axes.union(out[-1], wa[0])
        self.role(w, 1, "in")
        if b is not None:
            self.t.axes.union(self.ax(b)[0], wa[0])
        mod = _module_of(node, "Linear")
        self.t.consumers.append((x.name, len(xa) - 1, xa[-1], mod))
        self.t.producers.append((node.name, len(out) - 1, out[-1], mod))
        return out

    def op_convolution(self, node, x, w, b=None, stride=None, padding=None, dilation=None, *rest, groups=1):
        if rest:  # aten.convolution: (…, transposed, output_padding, groups)
            transposed, _, groups = rest[0], rest[1], rest[2]
            if transposed:
                return self.unknown(node, "conv_transpose")
        return self._conv(node, x, w, b, groups)

    def op_conv2d(self, node, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
        return self._conv(node, x, w, b, groups)

    op_conv1d = op_conv2d
    op_conv3d = op_conv2d

    def _conv(self, node, x, w, b, groups):
        xa, wa = self.ax(x), self.ax(w)
        out = self.new_axes(node)
        self.t.axes.union(out[0], xa[0])
        self.fix_all(wa[2:], "a convolution kernel's spatial axis")
        self.fix_all(out[2:], "a spatial axis")
        c_in, c_out = self.t.axes.size[xa[1]], self.t.axes.size[out[1]]
        if groups == 1:
            self.t.axes.union(xa[1], wa[1])
            self.role(w, 1, "in")
            self.t.axes.union(out[1], wa[0])
        elif groups == c_in == c_out and self.t.axes.size[wa[1]] == 1:  # depthwise
            self.t.axes.union(xa[1], out[1])
            self.t.axes.union(out[1], wa[0])
        else:
            why = f"grouped convolution (groups={groups}) at node {node.name}"
            self.fix_all([xa[1], out[1], wa[0], wa[1]], why)
        if b is not None:
            self.t.axes.union(self.ax(b)[0], wa[0])
        mod = _module_of(node, "Conv")
        self.t.consumers.append((x.name, 1, xa[1], mod))
        self.t.producers.append((node.name, 1, out[1], mod))
        return out

    def op_batch_norm(self, node, x, w=None, b=None, rm=None, rv=None, *rest):
        xa = self.ax(x)
        out = self.new_axes(node)
        v = node.meta.get("val")
        main = out if isinstance(v, torch.Tensor) else None
        if main is None:  # variants that return (out, mean, invstd)
            shapes = [_shape(s) for s in v]
            out = [[self.t.axes.new(s) for s in sh or ()] for sh in shapes]
            main = out[0]
        self.union_all(main, xa)
        for p in (w, b, rm, rv):
            if p is not None and self.ax(p):
                self.t.axes.union(self.ax(p)[0], xa[1])
        for p in (rm, rv):
            if isinstance(p, torch.fx.Node) and p.op == "get_attr":
                self.t.unsigned.add(str(p.target))
        return out

    op__native_batch_norm_legit_no_training = op_batch_norm
    op__native_batch_norm_legit = op_batch_norm
    op_native_batch_norm = op_batch_norm

    def op_layer_norm(self, node, x, normalized_shape, w=None, b=None, *rest):
        xa = self.ax(x)
        out = self.new_axes(node)
        self.union_all(out, xa)
        k = len(normalized_shape)
        for p in (w, b):
            if p is not None:
                pa = self.ax(p)
                for i in range(k):
                    self.t.axes.union(pa[i], xa[len(xa) - k + i])
        return out

    def op_native_layer_norm(self, node, x, normalized_shape, w=None, b=None, *rest):
        out = [[self.t.axes.new(s) for s in _shape(v) or ()] for v in node.meta["val"]]
        self.union_all(out[0], self.ax(x))
        main = self.op_layer_norm(node, x, normalized_shape, w, b)
        self.union_all(out[0], main)
        return out

    def op_group_norm(self, node, x, num_groups, w=None, b=None, *rest):
        xa = self.ax(x)
        out = self.new_axes(node)
        self.union_all(out, xa)
        for p in (w, b):
            if p is not None:
                self.t.axes.union(self.ax(p)[0], xa[1])
        r = self.t.axes.find(xa[1])
        if self.t.axes.blocks.setdefault(r, int(num_groups)) != int(num_groups):
            self.t.axes.fix(r, "two different group norms")
        return out

    def op_embedding(self, node, w, ids, *rest):
        wa, ia = self.ax(w), self.ax(ids)
        out = self.new_axes(node)
        for i in range(len(ia)):
            self.t.axes.union(out[i], ia[i])
        self.t.axes.union(out[-1], wa[1])
        self.t.axes.fix(wa[0], "embedding rows are indexed by input ids")
        self.t.producers.append((node.name, len(out) - 1, out[-1], _module_of(node, "Embedding")))
        return out

    def op_unary(self, node, x, *rest, **kw):
        xa = self.ax(x)
        out = self.new_axes(node)
        if xa is not None and len(xa) == len(out):
            self.union_all(out, xa)
        return out

    def op_binary(self, node, *args, **kw):
        out = self.new_axes(node)
        self.broadcast(out, [self.ax(a) for a in args])
        return out

    def op_tuple_unary(self, node, x, *rest):
        xa = self.ax(x)
        outs = [[self.t.axes.new(s) for s in _shape(v) or ()] for v in node.meta["val"]]
        if outs and xa is not None and len(outs[0]) == len(xa):
            self.union_all(outs[0], xa)
        return outs

    def op_where(self, node, cond, a=None, b=None):
        return self.op_binary(node, cond, a, b)

    def op_view(self, node, x, shape=None, *rest):
        xa = self.ax(x)
        return self.reshape(node, xa, _shape(x.meta["val"]), _shape(node.meta["val"]))

    def op_flatten(self, node, x, *rest):
        return self.op_view(node, x)

    def op_unflatten(self, node, x, *rest):
        return self.op_view(node, x)

    def reshape(self, node, xa: Axes, s_in: tuple[int, ...], s_out: tuple[int, ...]) -> Axes:
        axes = self.t.axes
        out: list[int | None] = [None] * len(s_out)
        i = j = 0
        while i < len(s_in) or j < len(s_out):
            if i < len(s_in) and s_in[i] == 1:
                i += 1
                continue
            if j < len(s_out) and s_out[j] == 1:
                out[j] = axes.new(1)
                j += 1
                continue
            if i >= len(s_in) or j >= len(s_out):
                break
            ii, jj = [i], [j]
            pi, pj = s_in[i], s_out[j]
            while pi != pj:
                if pi < pj:
                    i += 1
                    pi *= s_in[i]
                    ii.append(i)
                else:
                    j += 1
                    pj *= s_out[j]
                    jj.append(j)
            ii = [k for k in ii if s_in[k] != 1]
            ones = [k for k in jj if s_out[k] == 1]
            for k in ones:
                out[k] = axes.new(1)
            jj = [k for k in jj if s_out[k] != 1]
            if len(ii) == 1 and len(jj) == 1:
                out[jj[0]] = xa[ii[0]]
            elif len(ii) == 1:
                for k, c in zip(jj, axes.split(xa[ii[0]], [s_out[k] for k in jj]), strict=True):
                    out[k] = c
            elif len(jj) == 1:
                out[jj[0]] = axes.merged([xa[k] for k in ii])
            else:
                why = f"a reshape mixing axes at node {node.name}"
                self.fix_all([xa[k] for k in ii], why)
                for k in jj:
                    out[k] = axes.new(s_out[k], why)
            i += 1
            j += 1
        return [a if a is not None else axes.new(s_out[k]) for k, a in enumerate(out)]

    def op_permute(self, node, x, dims):
        xa = self.ax(x)
        return [xa[d] for d in _dims(dims, len(xa))]

    def op_transpose(self, node, x, d0, d1):
        xa = list(self.ax(x))
        d0, d1 = d0 % len(xa), d1 % len(xa)
        xa[d0], xa[d1] = xa[d1], xa[d0]
        return xa

    def op_t(self, node, x):
        xa = self.ax(x)
        return list(reversed(xa))

    def op_unsqueeze(self, node, x, dim):
        xa = list(self.ax(x))
        dim = dim % (len(xa) + 1)
        return xa[:dim] + [self.t.axes.new(1)] + xa[dim:]

    def op_squeeze(self, node, x, dims=None):
        xa = self.ax(x)
        s = _shape(x.meta["val"])
        if dims is None:
            drop = {i for i, n in enumerate(s) if n == 1}
        else:
            drop = {d % len(xa) for d in ([dims] if isinstance(dims, int) else dims) if s[d % len(xa)] == 1}
        return [a for i, a in enumerate(xa) if i not in drop]

    def op_expand(self, node, x, sizes, *rest):
        xa = self.ax(x)
        out = self.new_axes(node)
        for k in range(1, len(xa) + 1):
            if self.t.axes.size[xa[-k]] == self.t.axes.size[out[-k]]:
                self.t.axes.union(xa[-k], out[-k])
        return out

    def op_select(self, node, x, dim, index):
        xa = list(self.ax(x))
        dim = dim % len(xa)
        picked = self._pick_chunks(xa, dim)
        if picked is not None:
            return picked[index]
        if not self.t.axes.is_fixed(xa[dim]):
            self.t.axes.fix(xa[dim], f"one unit selected at node {node.name}")
        return xa[:dim] + xa[dim + 1 :]

    def op_unbind(self, node, x, dim=0):
        xa = list(self.ax(x))
        dim = dim % len(xa)
        picked = self._pick_chunks(xa, dim)
        if picked is not None:
            return picked
        self.t.axes.fix(xa[dim], f"unbound at node {node.name}")
        return [xa[:dim] + xa[dim + 1 :] for _ in range(self.t.axes.size[xa[dim]])]

    def _pick_chunks(self, xa: Axes, dim: int) -> list[Axes] | None:
        """If axis ``dim`` is the leading sub-axis S of a split (S, A, B, …) of some channel axis
        (a fused q/k/v projection reshaped to (…, 3, heads, dims)), selecting s along it yields
        chunk s of that channel: returns, for every s, the input's axes without S and with A,
        B, … replaced by chunk s's own sub-axes. None when S is not such an axis."""
        axes = self.t.axes
        s_root = axes.find(xa[dim])
        if s_root not in self.selections:
            for r, (kind, ch) in list(axes.struct.items()):
                if kind == "split" and len(ch) >= 2 and axes.find(r) == r and axes.find(ch[0]) == s_root:
                    rest = [axes.find(c) for c in ch[1:]]
                    chunks = axes._split_to_chunks(r)
                    subs = []
                    for c in chunks:
                        st = axes.struct.get(axes.find(c))
                        subs.append(list(st[1]) if len(rest) > 1 and st is not None else [c])
                    self.selections[s_root] = (rest, subs)
                    break
            else:
                return None
        rest, subs = self.selections[s_root]
        positions = []
        for c in rest:
            found = [k for k, a in enumerate(xa) if k != dim and axes.find(a) == c]
            if len(found) != 1:
                return None
            positions.append(found[0])
        out = []
        for sub in subs:
            new = list(xa)
            for pos, a in zip(positions, sub, strict=True):
                new[pos] = a
            out.append(new[:dim] + new[dim + 1 :])
        return out

    def op_slice(self, node, x, dim=0, start=None, end=None, step=1):
        xa = list(self.ax(x))
        dim = dim % len(xa)
        n = self.t.axes.size[xa[dim]]
        start = 0 if start is None else (start + n if start < 0 else start)
        end = n if end is None or end > n else (end + n if end < 0 else end)
        if start == 0 and end == n and step == 1:
            return xa
        length = end - start
        out = list(xa)
        if step == 1 and length > 0 and n % length == 0 and start % length == 0:
            out[dim] = self.t.axes.chunks(xa[dim], [length] * (n // length))[start // length]
        else:
            self.t.axes.fix(xa[dim], f"a partial slice at node {node.name}")
            out[dim] = self.t.axes.new(max(length, 0), f"a partial slice at node {node.name}")
        return out

    def op_split(self, node, x, split_size, dim=0):
        xa = list(self.ax(x))
        dim = dim % len(xa)
        n = self.t.axes.size[xa[dim]]
        sizes = (
            list(split_size)
            if isinstance(split_size, list | tuple)
            else [min(split_size, n - k) for k in range(0, n, split_size)]
        )
        parts = self.t.axes.chunks(xa[dim], sizes)
        return [xa[:dim] + [p] + xa[dim + 1 :] for p in parts]

    op_split_with_sizes = op_split

    def op_chunk(self, node, x, n_chunks, dim=0):
        n = self.t.axes.size[self.ax(x)[dim % len(self.ax(x))]]
        return self.op_split(node, x, -(-n // n_chunks), dim)

    def op_cat(self, node, tensors, dim=0):
        parts = [self.ax(t) for t in tensors]
        parts = [p for p in parts if p is not None and p]
        out = self.new_axes(node)
        dim = dim % len(out)
        for p in parts:
            for k in range(len(out)):
                if k != dim:
                    self.t.axes.union(out[k], p[k])
        out[dim] = self._concat([p[dim] for p in parts])
        return out

    def _concat(self, parts: Axes) -> int:
        axes = self.t.axes
        a = axes.new(sum(axes.size[p] for p in parts))
        axes.struct[a] = ("chunks", list(parts))
        return a

    def op_stack(self, node, tensors, dim=0):
        parts = [self.ax(t) for t in tensors]
        out = self.new_axes(node)
        dim = dim % len(out)
        rest = out[:dim] + out[dim + 1 :]
        for p in parts:
            self.union_all(rest, p)
        return out

    def op_matmul(self, node, a, b):
        aa, ba = self.ax(a), self.ax(b)
        out = self.new_axes(node)
        if len(aa) < 2 or len(ba) < 2:
            return self.unknown(node, "matmul of vectors")
        self.t.axes.union(aa[-1], ba[-2])
        self.role(b, len(ba) - 2, "in")
        self.t.axes.union(out[-2], aa[-2])
        self.t.axes.union(out[-1], ba[-1])
        self.broadcast(out[:-2], [aa[:-2], ba[:-2]])
        return out

    op_bmm = op_matmul
    op_mm = op_matmul

    def op_addmm(self, node, bias, a, b, **kw):
        out = self.op_matmul(node, a, b)
        self.broadcast(out, [self.ax(bias)])
        return out

    def op_scaled_dot_product_attention(self, node, q, k, v, attn_mask=None, *rest, **kw):
        qa, ka, va = self.ax(q), self.ax(k), self.ax(v)
        out = self.new_axes(node)
        self.t.axes.union(qa[-1], ka[-1])
        self.t.axes.union(ka[-2], va[-2])
        self.t.axes.union(out[-2], qa[-2])
        self.t.axes.union(out[-1], va[-1])
        self.broadcast(out[:-2], [qa[:-2], ka[:-2], va[:-2]])
        if attn_mask is not None and self.ax(attn_mask) is not None:
            ma = self.ax(attn_mask)
            self.broadcast(qa[:-1] + [ka[-2]], [ma])
        return out

    def op_reduce(self, node, x, dims=None, keepdim=False, *rest, **kw):
        xa = self.ax(x)
        if dims is None or (isinstance(dims, list | tuple) and len(dims) == 0):
            return self.new_axes(node)
        dims = {d % len(xa) for d in ([dims] if isinstance(dims, int) else dims)}
        if keepdim:
            return [self.t.axes.new(1) if i in dims else a for i, a in enumerate(xa)]
        return [a for i, a in enumerate(xa) if i not in dims]

    def op_pool(self, node, x, *rest, **kw):
        xa = self.ax(x)
        v = node.meta["val"]
        if isinstance(v, tuple | list):  # (values, indices)
            outs = [[self.t.axes.new(s) for s in _shape(t) or ()] for t in v]
            for o in outs:
                self.t.axes.union(o[0], xa[0])
                self.t.axes.union(o[1], xa[1])
                self.fix_all(o[2:], "a spatial axis")
            return outs
        out = self.new_axes(node)
        self.t.axes.union(out[0], xa[0])
        self.t.axes.union(out[1], xa[1])
        self.fix_all(out[2:], "a spatial axis")
        return out

    def op_constant(self, node, *args, **kw):
        v = node.meta.get("val")
        return self.new_axes(node, "a constant") if isinstance(v, torch.Tensor) else None


def _module_of(node: torch.fx.Node, kind: str) -> str | None:
    """The path of the ``kind`` module (Linear, Conv…) this op is the call of, if it is one."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, typ = list(stack.values())[-1]
    typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    return str(path) if kind in typ.rsplit(".", 1)[-1] else None


def _dims(dims: Sequence[int], n: int) -> list[int]:
    return [d % n for d in dims]


def _flatten(args: Any) -> list[Any]:
    out = []
    for a in args if isinstance(args, list | tuple) else [args]:
        if isinstance(a, list | tuple):
            out += _flatten(a)
        elif isinstance(a, dict):
            out += _flatten(list(a.values()))
        else:
            out.append(a)
    return out


def _op_name(target: Callable) -> str:
    name = getattr(target, "__name__", str(target))
    packet = getattr(target, "overloadpacket", None)
    if packet is not None:
        name = packet.__name__
    return name


_UNARY = """relu gelu tanh sigmoid silu hardtanh leaky_relu elu selu mish hardswish hardsigmoid
dropout feature_dropout alpha_dropout clone contiguous alias detach to _to_copy _to_dim_order_copy
neg abs exp log sqrt rsqrt reciprocal sign softmax _softmax log_softmax _log_softmax square erf
relu_ gelu_ dropout_ lift_fresh_copy type_as _assert_tensor_metadata""".split()
_BINARY = """add sub rsub mul div pow maximum minimum masked_fill eq ne lt le gt ge __and__ __or__
logical_and logical_or bitwise_and bitwise_or fmod remainder floor_divide""".split()
_REDUCE = "mean sum amax amin max min var std prod logsumexp norm linalg_vector_norm".split()
_POOL = """adaptive_avg_pool2d adaptive_avg_pool1d avg_pool2d avg_pool1d max_pool2d max_pool1d
max_pool2d_with_indices adaptive_max_pool2d""".split()
_CONSTANT = """arange zeros ones full new_ones new_zeros new_full empty empty_like scalar_tensor zeros_like
ones_like full_like sym_size""".split()

_ALIASES: dict[str, str] = {
    **{n: "op_unary" for n in _UNARY},
    **{n: "op_binary" for n in _BINARY},
    **{n: "op_reduce" for n in _REDUCE},
    **{n: "op_pool" for n in _POOL},
    **{n: "op_constant" for n in _CONSTANT},
    "reshape": "op_view",
    "_unsafe_view": "op_view",
    "native_dropout": "op_tuple_unary",
    "numpy_T": "op_t",
}


# ----------------------------------------------------------------------------- groups


@dataclass
class TraceResult:
    table: GroupTable
    graph_module: torch.fx.GraphModule
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any]


def export_model(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None):
    """``torch.export`` in eval mode (non-strict); a failure names the model and the reason."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*args, **dict(kwargs or {}))
    except Exception as e:  # the inputs do not fit: say so before blaming the tracer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        model.train(was)
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        raise CheckpointError(
            f"{type(model).__name__} rejects the example inputs (shapes {shapes}): "
            f"{type(e).__name__}: {first}"
        ) from None
    # torch logs a failed meta kernel with its traceback at ERROR level before raising; the raised
    # error is reported below, once
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        return torch.export.export(model, tuple(args), dict(kwargs or {}), strict=False).module()
    except Exception as e:  # torch raises many kinds; the message is what matters
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot trace {type(model).__name__} with torch.export ({type(e).__name__}: {first}); give a "
            "hand-written spec instead (GroupTable.from_spec)"
        ) from None
    finally:
        fake_log.setLevel(level)
        model.train(was)


def trace_groups(
    model: torch.nn.Module,
    example_args: tuple[Any, ...],
    example_kwargs: dict[str, Any] | None = None,
    *,
    align_outputs: bool = False,
) -> TraceResult:
    """The permutation groups of ``model``, derived from its exported graph on the example inputs.

    ``align_outputs``: also permute groups that reach the model's outputs (their output features
    then come out in the first model's order)."""
    gm = export_model(model, example_args, example_kwargs)
    state = dict(model.state_dict())
    tracer = Tracer(gm, set(state))
    t = tracer.run()
    axes = t.axes
    if align_outputs:
        for r, why in list(axes.fixed.items()):
            if why == "touches a model output":
                del axes.fixed[r]
    _settle(axes)
    table = _assemble(t, state, gm)
    return TraceResult(table, gm, tuple(example_args), dict(example_kwargs or {}))


def _settle(axes: AxisSet) -> None:
    """Fix what no transform can respect, until nothing changes: a fixed axis fixes its parts; a
    split can carry one free part (the others fixed: a flattened C × H × W) or a free (blocks,
    dims) pair; chunks can carry any of those; anything else is fixed whole."""
    changed = True
    while changed:
        changed = False
        for r, (kind, ch) in list(axes.struct.items()):
            if axes.find(r) != r:
                continue
            roots = [axes.find(c) for c in ch]
            if r in axes.fixed:
                for c in roots:
                    if c not in axes.fixed:
                        axes.fixed[c] = axes.fixed[r]
                        changed = True
                continue
            free = [c for c in roots if c not in axes.fixed and axes.size[c] > 1]
            ok = True
            if kind == "split":
                if len(free) == 2:
                    h, d = free
                    ok = (roots.index(d) == roots.index(h) + 1 and axes.struct.get(h) is None
                          and axes.struct.get(d) is None and h not in axes.blocks)  # fmt: skip
                elif len(free) > 2:
                    ok = False
                elif len(free) == 1:
                    st = axes.struct.get(free[0])
                    ok = st is None or (st[0] == "split" and len(roots) == 1)
            else:
                for c in free:
                    st = axes.struct.get(c)
                    if st is not None and st[0] == "chunks":
                        ok = False
            if not ok:
                why = "a reshape or split the groups cannot follow"
                axes.fixed[r] = why
                for c in roots:
                    axes.fixed.setdefault(c, why)
                changed = True
        # a dims axis must belong to one (blocks, dims) pair only
        pairs: dict[int, int] = {}
        for r, (kind, ch) in list(axes.struct.items()):
            if kind != "split" or axes.find(r) != r or r in axes.fixed:
                continue
            free = [
                axes.find(c) for c in ch if axes.find(c) not in axes.fixed and axes.size[axes.find(c)] > 1
            ]
            if len(free) == 2:
                h, d = free
                if pairs.setdefault(d, h) != h:
                    for a in (r, h, d):
                        if a not in axes.fixed:
                            axes.fixed[a] = "head dims shared by two different head axes"
                            changed = True


def _layout(axes: AxisSet, a: int) -> list[tuple[tuple, int, int, int]]:
    """The pieces of axis ``a``: (group key, offset, outer, inner); key ``("plain", root)`` or
    ``("block", heads root, dims root)``."""
    r = axes.find(a)
    if r in axes.fixed:
        return []
    st = axes.struct.get(r)
    if st is None:
        return [(("plain", r), 0, 1, 1)] if axes.size[r] > 1 else []
    kind, ch = st
    roots = [axes.find(c) for c in ch]
    if kind == "chunks":
        out, pos = [], 0
        for c in roots:
            for key, off, outer, inner in _layout(axes, c):
                out.append((key, pos + off, outer, inner))
            pos += axes.size[c]
        return out
    free = [c for c in roots if c not in axes.fixed and axes.size[c] > 1]
    if len(free) == 2:
        h, d = free
        i = roots.index(h)
        outer = _prod(axes.size[c] for c in roots[:i])
        inner = _prod(axes.size[c] for c in roots[i + 2 :])
        return [(("block", h, d), 0, outer, inner)]
    if len(free) == 1:
        i = roots.index(free[0])
        outer = _prod(axes.size[c] for c in roots[:i])
        inner = _prod(axes.size[c] for c in roots[i + 1 :])
        return [(key, off, outer * o, inner * n) for key, off, o, n in _layout(axes, free[0])]
    return []


def _prod(xs: Any) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def _assemble(t: _Trace, state: dict[str, torch.Tensor], gm: torch.fx.GraphModule) -> GroupTable:
    axes = t.axes
    pieces: dict[tuple, list[Piece]] = {}
    fixed: dict[str, str] = {}
    for param in state:
        pa = t.params.get(param)
        if pa is None:
            fixed[param] = "not used by the traced forward pass"
            continue
        any_piece = False
        for axis, a in enumerate(pa):
            for key, off, outer, inner in _layout(axes, a):
                role = t.roles.get((param, axis), "out")
                pieces.setdefault(key, []).append(Piece(param, axis, role, off, outer, inner))
                any_piece = True
        if not any_piece and state[param].dim() > 0:
            reasons = {axes.fixed.get(axes.find(a)) for a in pa} - {None}
            fixed[param] = "; ".join(sorted(reasons)) or "no axis to permute"
    groups: list[PermGroup] = []
    acts = _activations(t, axes)
    for key, ps in pieces.items():
        if not any(p.role == "out" for p in ps) or len(ps) < 2:
            continue  # nothing else moves with it: permuting it alone would change the function
        if key[0] == "plain":
            r = key[1]
            size, blocks, tie = axes.size[r], axes.blocks.get(r, 1), None
        else:
            h, d = key[1], key[2]
            size, blocks, tie = axes.size[h] * axes.size[d], axes.size[h], f"heads{h}"
        first = ps[0]
        name = f"{first.param}:{first.axis}" + (f"@{first.offset}" if first.offset else "")
        unsigned = sorted({p.param for p in ps if p.param in t.unsigned})
        groups.append(PermGroup(name, size, ps, blocks, tie, acts.get(key, []), unsigned))
    groups.sort(key=lambda g: _first_position(g, list(state)))
    tie_names: dict[str, str] = {}
    for g in groups:  # readable tie names: the first group of the tie
        if g.tie is not None:
            g.tie = tie_names.setdefault(g.tie, g.name)
    return GroupTable(groups, fixed, sorted(set(t.notes)))


def _first_position(g: PermGroup, order: list[str]) -> int:
    return min(order.index(p.param) for p in g.pieces)


def _activations(t: _Trace, axes: AxisSet) -> dict[tuple, list[ActivationSource]]:
    """Per group: the input of its last consumer (MuDSC's and ZipIt's default), else the outputs
    of its producers."""
    consumer: dict[tuple, list[ActivationSource]] = {}
    producer: dict[tuple, list[ActivationSource]] = {}
    for found, records, hook in ((consumer, t.consumers, "input"), (producer, t.producers, "output")):
        for node, axis_index, a, module in records:
            for key, off, outer, inner in _layout(axes, a):
                found.setdefault(key, []).append(
                    ActivationSource(node, axis_index, off, outer, inner, module, hook)
                )
    out = {}
    for key in set(consumer) | set(producer):
        if key in consumer:
            last = consumer[key][-1]
            out[key] = [s for s in consumer[key] if s.node == last.node and s.axis == last.axis]
        else:
            out[key] = producer[key]
    return out
