"""Running data through a model and keeping what data-aware merges need: the uncentred input Gram
XᵀX of every linear layer (ESM, RegMean), or the diagonal Fisher of every parameter (Fisher
merging).

Activation statistics: forward hooks on every ``nn.Linear`` (and GPT-2's ``Conv1D``, whose weight
is stored transposed), selected by include/exclude regexes on the module name. A hook flattens the
layer's input to rows (tokens), drops padding rows (the batch's ``attention_mask``), and adds
XᵀX in float64 with the exact row count, so batches of any size weigh exactly. Layers that read the
same input tensor (q/k/v, gate/up) are found by a probe forward and share one Gram. While a layer
has seen fewer rows than its input width, the rows themselves are kept instead (smaller and
exact). When the Grams of all layers exceed ``max_memory``, the layers are split into passes over
the data, each forward stopping after the last layer it needs.

Fisher: per-example gradients of log p(y|x) (one forward per batch, one backward per example),
squared and averaged: the empirical Fisher with the batch's labels, or the expected Fisher
Σ_y p(y|x) (∂ log p(y|x))² over the model's own predictive distribution.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alloykit.calibration.statistics import Statistics, weight_signature
from alloykit.errors import CheckpointError, ParameterError

Batch = Any
Progress = Callable[[str, int, int], None]


@dataclass
class Target:
    """A layer whose input statistics are collected."""

    module: str  # module name in the model
    param: str  # name of its weight in the model's state dict
    layer: nn.Module
    transposed: bool  # weight stored d_in × d_out (Conv1D)

    @property
    def d_in(self) -> int:
        w = self.layer.weight
        return int(w.shape[0] if self.transposed else w.shape[1])


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x @ W + b with W (d_in, d_out); matched by name so that
    # transformers stays optional.
    return type(module).__name__ == "Conv1D" and hasattr(module, "weight") and module.weight.dim() == 2


def linear_layers(
    model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] | None = None
) -> list[Target]:
    """Every ``nn.Linear``/``Conv1D`` whose module name matches an ``include`` regex (all when
    none) and no ``exclude`` regex, in module order."""
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]
    out = []
    for name, module in model.named_modules():
        conv1d = _is_conv1d(module)
        if not (isinstance(module, nn.Linear) or conv1d):
            continue
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        out.append(Target(name, f"{name}.weight" if name else "weight", module, conv1d))
    return out


def call_model(model: nn.Module, batch: Batch) -> Any:
    """A batch is a mapping (keyword arguments), a tuple/list (positional) or one tensor."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The input as rows (N × d_in), padding rows dropped where the mask lines up with x."""
    if x.dim() == 1:
        return x.reshape(1, -1)
    if mask is not None and x.dim() == mask.dim() + 1 and tuple(x.shape[:-1]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


class _Partial:
    """One layer's statistics over one group of batches: XᵀX in float64, summed batch by batch from
    the first batch's product (0 + P = P exactly: no zeros are added), or the rows themselves while
    fewer than the input width (``store='auto'``; always with ``store='inputs'``)."""

    def __init__(self, d_in: int, store: str):
        self.d_in = d_in
        self.store = store
        self.rows: list[torch.Tensor] = []
        self.n_rows = 0
        self.gram: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        if x.shape[0] == 0:
            return
        if x.shape[1] != self.d_in:
            raise CheckpointError(f"a layer input has width {x.shape[1]}, its weight expects {self.d_in}")
        x = x.detach()
        if self.keeps_rows(x.shape[0]):
            # rows keep float32 or float64 (half precision widened), as the forward made them
            keep = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            self.rows.append(x.to(keep).cpu().clone())
            self.n_rows += x.shape[0]
            return
        if self.gram is None:  # on the device the model runs on: the product is the cost
            self.gram = _gram_of(self.rows, x.device)
            self.rows = []
        self.gram = _plus(self.gram, _product(x))
        self.n_rows += x.shape[0]

    def keeps_rows(self, more: int) -> bool:
        return self.store == "inputs" or (
            self.store == "auto" and self.gram is None and self.n_rows + more <= self.d_in
        )

    def entry(self, dtype: torch.dtype) -> dict[str, Any]:
        if self.gram is not None:
            return {"gram": self.gram.to("cpu", dtype), "tokens": self.n_rows}
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, self.d_in)
        return {"inputs": rows, "tokens": self.n_rows}


def _product(x: torch.Tensor) -> torch.Tensor:
    xd = x.double()
    return xd.T @ xd


def _plus(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    """total + term, in place; no total yet: the term itself (bit for bit what 0 + term gives)."""
    if total is None:
        return term
    return total.add_(term.to(total.device))


def _gram_of(rows: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """Σ rᵀr over the kept row blocks, in the order they came (None when there are none)."""
    gram = None
    for r in rows:
        gram = _plus(gram, _product(r.to(device)))
    return gram


def fold_partial(total: _Partial | None, part: _Partial, device: torch.device | str = "cpu") -> _Partial:
    """``total`` followed by ``part`` (the next group of batches): rows joined while they may stay
    rows, else Grams added (rows first turned into their Gram on ``device``, the model's). Folding
    per-batch partials gives the bits of summing batch by batch; folding the partials of groups
    in group order gives the same bits wherever each group was summed."""
    if total is None:
        return part
    if total.gram is None and part.gram is None and total.keeps_rows(part.n_rows):
        total.rows += part.rows
        total.n_rows += part.n_rows
        return total
    if total.gram is None:
        total.gram = _gram_of(total.rows, torch.device(device))
        total.rows = []
    term = part.gram if part.gram is not None else _gram_of(part.rows, torch.device(device))
    if term is not None:
        total.gram = _plus(total.gram, term)
    total.n_rows += part.n_rows
    return total


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: its first parameter's device, or (a model streamed from its
    checkpoint, whose parameters wait on ``meta``) its first buffer's, else the CPU."""
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


class _StopForward(Exception):
    """Raised by the last hook a pass needs: the rest of the forward is not computed."""


def _groups(model: nn.Module, targets: list[Target], probe: Batch, mask_of: Callable) -> list[list[Target]]:
    """Targets grouped by the very input tensor they read in a probe forward, in firing order.
    The inputs are held until grouping is done, so no tensor id can be reused meanwhile."""
    seen: list[tuple[Target, torch.Tensor]] = []
    handles = []

    def hook(target: Target) -> Callable:
        def fn(module: nn.Module, args: tuple, output: Any) -> None:
            if args:
                seen.append((target, args[0]))

        return fn

    for t in targets:
        handles.append(t.layer.register_forward_hook(hook(t)))
    try:
        with torch.inference_mode():
            call_model(model, probe)
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[Target]]] = []
    fired = set()
    for target, x in seen:
        if target.module in fired:
            continue  # a layer used twice in one forward (weight sharing): first use only
        fired.add(target.module)
        for held, members in groups:
            if held is x:
                members.append(target)
                break
        else:
            groups.append((x, [target]))
    missing = [t.module for t in targets if t.module not in fired]
    if missing:
        raise CheckpointError(
            f"{len(missing)} selected layers never ran in a forward pass, e.g. {missing[:3]}; "
            "exclude them (exclude=...) or give data that reaches them"
        )
    return [members for _, members in groups]


def collect_activation_statistics(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    store: str = "auto",
    dtype: torch.dtype = torch.float64,
    max_memory: int | None = 2 << 30,
    mask_key: str = "attention_mask",
    rename: Callable[[str], str] | None = None,
    progress: Progress | None = None,
    group_batches: int = 1,
    executor: str = "thread",
    ray_address: str | None = None,
    workers: int | None = None,
    task_model: Any = None,
    sink: Callable[[str, dict[str, Any], str | None], None] | None = None,
    weight_of: Callable[[str], torch.Tensor] | None = None,
) -> Statistics:
    """Input Gram matrices (or rows) of every selected linear layer of ``model`` over ``batches``.

    ``store``: ``auto`` keeps rows while fewer than d_in, then the Gram; ``gram`` always the
    Gram; ``inputs`` always the rows (as the forward made them, half precision widened to
    float32). ``dtype``: the stored Gram's dtype (accumulation is float64). float64 by default:
    a Gram squares the condition number of the data, so a float32 Gram perturbs the weak
    directions at ESM's cut by ε₃₂·κ² (measured: up to 3·10⁻⁵ on a merged weight of a small
    model, against 10⁻¹⁰ with float64); float32 halves the file.
    ``max_memory``: bytes of float64 Grams held at once (more layers make more passes; one
    layer's Gram always fits). ``rename`` maps the model's parameter names to the checkpoint's.

    ``group_batches``: the batches are cut into contiguous groups of this many; each group's Gram
    is summed on its own (from its first batch's product) and the groups' Grams are added in group
    order. With 1 (the default) that is the plain batch-by-batch sum. ``executor="ray"`` runs each
    group (of each pass) as a Ray task (``ray_address``: a running cluster; ``workers``: tasks
    in flight, default the cluster's CPUs) and folds the groups on the driver in the same order,
    so the statistics are the same bytes as in this process, for any number of workers.
    ``task_model``: how a task gets the model (an object with a ``module()`` method, e.g.
    :class:`alloykit.calibration.data.FolderModel`); by default ``model`` travels through Ray's
    object store. Grouped sums hold a group's Grams beside the total, so with more than one group
    of more than one batch a pass holds half as many layers.

    ``sink(name, entry, source)``: each pass's entries are handed on as the pass ends (``source``:
    the parameter whose tensor a layer reading the same input shares, else None) and not kept,
    so that a file written as they come holds them instead of memory (the returned statistics
    then have no entries); without it they are returned.

    ``weight_of(parameter name)``: a layer's weight where the model does not hold it (a model
    streamed from its checkpoint, :mod:`alloykit.calibration.lazy`), for the signature stored
    with each entry.
    """
    from alloykit.engine.ray_passes import check_executor, groups_of

    if store not in ("auto", "gram", "inputs"):
        raise ParameterError(f"store = {store!r} is not allowed; expected auto, gram or inputs")
    check_executor(executor, ray_address)
    batches = list(batches)
    if not batches:
        raise CheckpointError("no calibration data: give at least one batch")
    grouped = groups_of(batches, group_batches)
    targets = linear_layers(model, include, exclude)
    if not targets:
        raise CheckpointError("no linear layer matched: check include/exclude (module names)")
    device = model_device(model)
    if executor == "ray" and device.type != "cpu":
        raise ParameterError(
            f"executor='ray' runs calibration on the nodes' CPUs; the model is on {device}: drop one of them"
        )

    def mask_of(batch: Batch) -> torch.Tensor | None:
        return batch.get(mask_key) if isinstance(batch, Mapping) else None

    # a group's Grams beside the totals: twice the memory when groups of several batches follow
    factor = 2 if group_batches > 1 and len(grouped) > 1 else 1
    was_training = model.training
    model.eval()
    try:
        groups = _groups(model, targets, batches[0], mask_of)
        passes: list[list[list[Target]]] = [[]]
        held = 0
        for g in groups:
            size = factor * 8 * g[0].d_in ** 2
            if passes[-1] and max_memory is not None and held + size > max_memory:
                passes.append([])
                held = 0
            passes[-1].append(g)
            held += size
        totals: dict[str, _Partial | None] = {}
        total_steps = len(passes) * len(batches)
        done = [0]

        def step(n: int) -> None:
            done[0] += n
            if progress:
                progress("calibration", done[0], total_steps)

        def fold(name: str, part: _Partial) -> None:
            totals[name] = fold_partial(totals.get(name), part, device)

        entries: dict[str, dict[str, Any]] = {}
        shared: dict[str, str] = {}

        def finish(pass_groups: list[list[Target]]) -> None:
            for name, entry, source in _pass_entries(pass_groups, totals, dtype, rename, weight_of):
                if sink is not None:
                    sink(name, entry, source)
                    continue
                entries[name] = entry
                if source is not None:
                    shared[name] = source

        if executor == "thread":
            for pass_groups in passes:
                _activation_pass(model, [g[0] for g in pass_groups], grouped, store, mask_key,
                                 lambda g, name, part: fold(name, part), step)  # fmt: skip
                finish(pass_groups)
        else:
            from alloykit.engine.ray_passes import ordered_map

            context = _ActivationTask(
                task_model if task_model is not None else GivenModel(model),
                [[g[0].module for g in pass_groups] for pass_groups in passes],
                store,
                mask_key,
            )
            items = [(p, i, group) for p in range(len(passes)) for i, group in enumerate(grouped)]
            model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

            def cost(item: tuple[int, int, list[Batch]]) -> int:
                return model_bytes + sum(8 * g[0].d_in ** 2 for g in passes[item[0]])

            results = ordered_map(_activation_task, items, context, executor=executor,
                                  ray_address=ray_address, workers=workers, cost=cost)  # fmt: skip
            for (p, i, group), partials in zip(items, results, strict=True):
                with torch.no_grad():
                    for name, part in partials:
                        fold(name, part)
                step(len(group))
                if i == len(grouped) - 1:  # (items come pass by pass, in group order)
                    finish(passes[p])
    finally:
        model.train(was_training)
    stats = Statistics(entries, meta={"kind": "activations", "passes": len(passes)})
    stats.shared = shared
    return stats


def _pass_entries(
    pass_groups: list[list[Target]],
    totals: dict[str, _Partial | None],
    dtype: torch.dtype,
    rename: Callable[[str], str] | None,
    weight_of: Callable[[str], torch.Tensor] | None = None,
) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    """(name, entry, shared source or None) of every layer of a finished pass; its sums are
    taken out of ``totals``."""
    for g in pass_groups:
        leader = g[0]
        total = totals.pop(leader.module, None)
        if total is None or total.n_rows == 0:
            raise CheckpointError(f"layer {leader.module!r} saw no input rows (every row was padding?)")
        entry = total.entry(dtype)
        del total
        source = rename(leader.param) if rename else leader.param
        for t in g:
            name = rename(t.param) if rename else t.param
            weight = weight_of(t.param) if weight_of is not None else t.layer.weight
            layer = {
                "transposed": t.transposed,
                "signature": weight_signature(weight),
                "signature_dtype": str(weight.dtype).removeprefix("torch."),
            }
            del weight
            yield name, {**entry, **layer}, (None if t is leader else source)


def _activation_pass(
    model: nn.Module,
    leaders: list[Target],
    grouped: Iterable[list[Batch]] | list[tuple[int, list[Batch]]],
    store: str,
    mask_key: str,
    sink: Callable[[int, str, _Partial], None],
    step: Callable[[int], None] | None = None,
) -> None:
    """Forward each group of batches, every leader's inputs summed per group; ``sink(group, module,
    partial)`` gets a layer's partial as soon as its group's last batch has reached it (so with
    groups of one batch no partial outlives its product), in the order a forward reaches the
    layers. The forward stops after the last leader. The groups are numbered from 0, or given as
    (number, batches) pairs."""

    def mask_of(batch: Batch) -> torch.Tensor | None:
        return batch.get(mask_key) if isinstance(batch, Mapping) else None

    last = leaders[-1]
    state: dict[str, Any] = {}
    partials: dict[str, _Partial] = {}

    def hook(target: Target) -> Callable:
        def on_forward(module: nn.Module, args: tuple, output: Any) -> None:
            # a layer that runs again in the group's last forward (shared weights) after its
            # partial was handed on starts another partial, handed on at once as well
            part = partials.get(target.module) or _Partial(target.d_in, store)
            part.add(_rows(args[0], state.get("mask")))
            if state["last"]:
                sink(state["group"], target.module, part)
                partials.pop(target.module, None)
            else:
                partials[target.module] = part
            if target is last:
                raise _StopForward

        return on_forward

    handles = [t.layer.register_forward_hook(hook(t)) for t in leaders]
    try:
        with torch.inference_mode():
            for number, group in enumerate(grouped):
                if isinstance(group, tuple):
                    number, group = group
                state["group"] = number
                partials.update({t.module: _Partial(t.d_in, store) for t in leaders})
                for i, batch in enumerate(group):
                    state["mask"] = mask_of(batch)
                    state["last"] = i == len(group) - 1
                    try:
                        call_model(model, batch)
                    except _StopForward:
                        pass
                    if step:
                        step(1)
                for t in leaders:  # a layer the group's last batch did not reach
                    if t.module in partials:
                        sink(number, t.module, partials.pop(t.module))
    finally:
        for h in handles:
            h.remove()


class GivenModel:
    """A task's model: this module, sent through Ray's object store."""

    def __init__(self, model: nn.Module):
        self.model = model

    def module(self) -> nn.Module:
        return self.model


@dataclass
class _ActivationTask:
    """What an activation task needs besides its batches: the model, each pass's leaders."""

    model: Any
    passes: list[list[str]]
    store: str
    mask_key: str


def _activation_task(ctx: _ActivationTask, item: tuple[int, int, list[Batch]]) -> list[tuple[str, _Partial]]:
    """In a Ray task: one group of batches through one pass; the leaders' partials, in the order
    the driver folds them (the order this process would have folded them in)."""
    p, number, group = item
    model = ctx.model.module()
    by_name = {t.module: t for t in linear_layers(model)}
    leaders = [by_name[name] for name in ctx.passes[p]]
    out: list[tuple[str, _Partial]] = []
    was_training = model.training
    model.eval()
    try:
        _activation_pass(model, leaders, [(number, group)], ctx.store, ctx.mask_key,
                         lambda g, name, part: out.append((name, part)))  # fmt: skip
    finally:
        model.train(was_training)
    return out


LogProbs = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor | None]]


def hf_log_probs(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A Hugging Face classifier: log-softmax of ``outputs.logits``, labels from ``labels``."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return torch.log_softmax(logits.float(), dim=-1), batch.get("labels")


def collect_fisher(
    model: nn.Module,
    batches: Sequence[Batch],
    *,
    log_probs: LogProbs = hf_log_probs,
    estimator: str = "empirical",
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dtype: torch.dtype = torch.float32,
    rename: Callable[[str], str] | None = None,
    progress: Progress | None = None,
    group_batches: int = 1,
    executor: str = "thread",
    ray_address: str | None = None,
    workers: int | None = None,
    task_model: Any = None,
) -> Statistics:
    """Diagonal Fisher of every trainable parameter (names matched by include/exclude regexes).

    F = (1/n) Σ_i g_i², g_i = ∂ log p(y_i | x_i) / ∂θ per example i (``empirical``: y_i the
    label; ``expected``: F = (1/n) Σ_i Σ_y p(y|x_i) (∂ log p(y|x_i)/∂θ)², exact over the classes).
    ``log_probs(model, batch)`` returns (B × C log-probabilities, labels or None).

    The float64 sum Σ_i is taken per group of ``group_batches`` contiguous batches (from zeros,
    example by example) and the groups' sums are added in group order: the same bytes whether
    the groups run here or as Ray tasks (``executor="ray"``, ``ray_address``, ``workers``,
    ``task_model``: as :func:`collect_activation_statistics`). After the first group a group's
    sums sit beside the total: twice the float64 parameters.
    """
    from alloykit.engine.ray_passes import check_executor, groups_of, ordered_map

    if estimator not in ("empirical", "expected"):
        raise ParameterError(f"estimator = {estimator!r} is not allowed; expected empirical or expected")
    check_executor(executor, ray_address)
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]

    def wanted(n: str) -> bool:
        return (not inc or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)

    params = {n: p for n, p in model.named_parameters() if p.requires_grad and wanted(n)}
    if not params:
        raise CheckpointError("no trainable parameter matched include/exclude")
    device = next(iter(params.values())).device
    if executor == "ray" and device.type != "cpu":
        raise ParameterError(
            f"executor='ray' runs calibration on the nodes' CPUs; the model is on {device}: drop one of them"
        )
    grouped = groups_of(list(batches), group_batches)
    # in this process: this very module; in Ray tasks: a copy from the object store, or task_model
    source = task_model if executor == "ray" and task_model is not None else GivenModel(model)
    context = _FisherTask(source, list(params), log_probs, estimator)
    sums: dict[str, torch.Tensor] | None = None
    examples = 0
    done = 0
    results = ordered_map(_fisher_task, grouped, context, executor=executor, ray_address=ray_address,
                          workers=workers)  # fmt: skip
    for group, (part, n) in zip(grouped, results, strict=True):
        if sums is None:
            sums = part  # 0 + the first group's sums: those sums, bit for bit
        else:
            for name, s in sums.items():
                s.add_(part[name].to(s.device))
        examples += n
        done += len(group)
        if progress:
            progress("fisher", done, len(batches))
    if examples == 0 or sums is None:
        raise CheckpointError("no calibration examples: give at least one labelled batch")
    entries = {
        (rename(n) if rename else n): {
            "fisher": (s / examples).to("cpu", dtype),
            "examples": examples,
            "signature": weight_signature(params[n]),
            "signature_dtype": str(params[n].dtype).removeprefix("torch."),
        }
        for n, s in sums.items()
    }
    return Statistics(entries, meta={"kind": "fisher", "estimator": estimator})


@dataclass
class _FisherTask:
    model: Any
    names: list[str]
    log_probs: LogProbs
    estimator: str


def _fisher_task(ctx: _FisherTask, batches: list[Batch]) -> tuple[dict[str, torch.Tensor], int]:
    """One group of batches: Σ over its examples of (weighted) squared gradients, from zeros, in
    float64; and the number of examples."""
    model = ctx.model.module()
    named = dict(model.named_parameters())
    tensors = [named[n] for n in ctx.names]
    sums = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in zip(ctx.names, tensors, strict=True)}
    examples = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            with torch.enable_grad():
                logp, labels = ctx.log_probs(model, batch)
                if ctx.estimator == "empirical" and labels is None:
                    raise CheckpointError("the empirical Fisher needs labels: the batch has none")
                for i in range(logp.shape[0]):
                    if ctx.estimator == "empirical":
                        terms = [(logp[i, int(labels[i])], 1.0)]
                    else:
                        probs = logp[i].detach().exp()
                        terms = [(logp[i, c], float(probs[c])) for c in range(logp.shape[1])]
                    for value, weight in terms:
                        grads = torch.autograd.grad(value, tensors, retain_graph=True, allow_unused=True)
                        for n, g in zip(ctx.names, grads, strict=True):
                            if g is not None:
                                sums[n] += weight * g.detach().double().square()
                    examples += 1
    finally:
        model.train(was_training)
    return sums, examples
