"""Activation statistics for alignment: one pass over unlabeled batches, each model run through
the traced graph, the units of every group observed where the group table says, and float64 sums
of x and x xᵀ over the N models' concatenated units, so that the cross-model correlation is exact
whatever the batch sizes (not a mean of batch means)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from alloykit.alignment.groups import ActivationSource, GroupTable, PermGroup
from alloykit.errors import AlloykitError, ParameterError


class AlignmentDataError(AlloykitError):
    """The alignment data does not fit the model, or reaches no unit of a group."""


def _call(module: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return module(**batch)
    if isinstance(batch, tuple | list):
        return module(*batch)
    return module(batch)


class _Capture(torch.fx.Interpreter):
    """Runs a traced graph and keeps the values of chosen nodes."""

    def __init__(self, gm: torch.fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out.detach()
        return out


def unit_features(
    value: torch.Tensor, source: ActivationSource, n: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """(samples, n): the group's n units along ``source.axis`` of a node's value; every other
    position (batch, tokens, space, the outer/inner parts of a piece) is a sample; rows where the
    batch's mask is 0 are dropped."""
    v = value.detach()
    seg = v.narrow(source.axis, source.offset, source.outer * n * source.inner)
    moved = seg.movedim(source.axis, -1)
    lead = moved.shape[:-1]
    if mask is not None and len(lead) >= mask.dim() and tuple(lead[: mask.dim()]) == tuple(mask.shape):
        moved = moved[mask.bool()]
        lead = moved.shape[:-1]
    x = moved.reshape(*lead, source.outer, n, source.inner)
    return x.movedim(-2, -1).reshape(-1, n)


@dataclass
class CorrelationSums:
    """Σ x and Σ x xᵀ over the concatenated units (O = N·n) of one group, and the count."""

    total: torch.Tensor
    outer: torch.Tensor
    count: int = 0

    def add(self, x: torch.Tensor) -> None:
        xd = x.double()
        self.total += xd.sum(0)
        self.outer += xd.T @ xd
        self.count += xd.shape[0]

    def correlation(self, eps: float = 1e-7) -> torch.Tensor:
        """Pearson correlation C = Σ ⊘ max(σσᵀ, eps), Σ = E[xxᵀ] − μμᵀ (MuDSC's ``CovarianceMetric``)."""
        if self.count == 0:
            raise AlignmentDataError("no activation rows reached this group")
        mean = self.total / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        var = torch.diagonal(cov).clamp(min=0)
        std = var.sqrt()
        return cov / torch.clamp(torch.outer(std, std), min=eps)

    def cross_moment(self) -> torch.Tensor:
        """E[x xᵀ], Git Re-Basin's activation-matching objective."""
        return self.outer / max(self.count, 1)


@dataclass
class ActivationStatistics:
    sums: dict[str, CorrelationSums] = field(default_factory=dict)
    batches: int = 0
    sizes: dict[str, int] = field(default_factory=dict)

    def correlation(self, group: str) -> torch.Tensor:
        return self.sums[group].correlation()

    def check_alive(self) -> None:
        """A group whose units are all constant on the data in some model cannot be matched."""
        for name, s in self.sums.items():
            n = self.sizes[name]
            mean = s.total / max(s.count, 1)
            var = torch.diagonal(s.outer) / max(s.count, 1) - mean.square()
            for m in range(len(mean) // n):
                if bool((var[m * n : (m + 1) * n] <= 1e-12).all()):
                    raise AlignmentDataError(
                        f"group {name!r}: every unit of model {m} is constant (dead) on the data; give "
                        "data that activates it, or exclude the group (exclude_groups)"
                    )


def collect_activation_statistics(
    model: torch.nn.Module,
    gm: torch.fx.GraphModule | None,
    states: Sequence[dict[str, torch.Tensor]],
    table: GroupTable,
    batches: Iterable[Any],
    *,
    groups: Sequence[PermGroup] | None = None,
    mask_key: str = "attention_mask",
    progress: Callable[[str, int, int], None] | None = None,
    device: torch.device | str = "cpu",
    group_batches: int = 1,
    executor: str = "thread",
    ray_address: str | None = None,
    workers: int | None = None,
    example: tuple[tuple, dict] | None = None,
) -> ActivationStatistics:
    """One pass over ``batches`` with every model (``states`` loaded into copies of ``model``):
    per group, the sums behind the cross-model correlation of its units. Units are observed with
    forward hooks at module inputs/outputs (any batch shape); sources that are not at a module
    boundary are read from the traced graph ``gm`` (whose shapes are those of the example).
    ``device``: where the models run and the sums accumulate (returned on the host).

    The batches are cut into contiguous groups of ``group_batches`` (default 1: batch by batch);
    each group's sums start from zero and are added to the totals in group order.
    ``executor="ray"`` runs each group as a Ray task (``ray_address``: a running cluster;
    ``workers``: tasks in flight) and adds the groups' sums on the driver in the same order: the
    same bytes as this process, for any number of workers. A traced graph does not travel: tasks
    export it again from ``model`` and ``example`` (``(args, kwargs)``, the tracing inputs)."""
    from alloykit.engine.ray_passes import check_executor, groups_of, ordered_map

    check_executor(executor, ray_address)
    device = torch.device(device)
    if executor == "ray" and device.type != "cpu":
        raise ParameterError(
            f"executor='ray' collects alignment statistics on the nodes' CPUs, not on {device}: "
            "drop one of them"
        )
    groups = list(groups or table.groups)
    missing = [g.name for g in groups if not g.activation]
    if missing:
        raise AlignmentDataError(f"groups without an activation source: {missing}")
    hooked = all(src.module is not None for g in groups for src in g.activation)
    if not hooked and gm is None:
        raise AlignmentDataError("some groups are observed inside the graph: give the traced graph")
    if executor == "ray" and not hooked and example is None:
        raise AlignmentDataError(
            "some groups are observed inside the traced graph, which Ray tasks trace again: give the "
            "example inputs (example=(args, kwargs))"
        )
    n_models = len(states)
    stats = ActivationStatistics(
        {
            g.name: CorrelationSums(
                torch.zeros(n_models * g.size, dtype=torch.float64, device=device),
                torch.zeros(n_models * g.size, n_models * g.size, dtype=torch.float64, device=device),
            )
            for g in groups
        },
        sizes={g.name: g.size for g in groups},
    )
    batches = list(batches)
    if not batches:
        raise AlignmentDataError("no alignment data: give at least one batch")
    grouped = groups_of(batches, group_batches)
    items = []
    start = 0
    for group in grouped:
        items.append((start, group))
        start += len(group)
    context = _AlignmentTask(model, gm, example, list(states), groups, hooked, mask_key, device)
    results = ordered_map(_alignment_task, items, context, executor=executor, ray_address=ray_address,
                          workers=workers)  # fmt: skip
    for (first, group), part in zip(items, results, strict=True):
        for name, p in part.items():  # 0 + the first group's sums are those sums, bit for bit
            s = stats.sums[name]
            s.total += p.total.to(device)
            s.outer += p.outer.to(device)
            s.count += p.count
        stats.batches += len(group)
        if progress:
            progress("activations", first + len(group), len(batches))
    for sums in stats.sums.values():
        sums.total, sums.outer = sums.total.cpu(), sums.outer.cpu()
    stats.check_alive()
    return stats


class _AlignmentTask:
    """What a group of batches needs: the model copies (made once per process), the groups."""

    def __init__(
        self,
        model: torch.nn.Module,
        gm: torch.fx.GraphModule | None,
        example: tuple[tuple, dict] | None,
        states: list[dict[str, torch.Tensor]],
        groups: list[PermGroup],
        hooked: bool,
        mask_key: str,
        device: torch.device,
    ):
        self.model, self.gm, self.example = model, gm, example
        self.states, self.groups, self.hooked = states, groups, hooked
        self.mask_key, self.device = mask_key, device
        self._replicas: list[torch.nn.Module] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # a traced graph does not pickle (torch.export): a task exports the model again
        return {**self.__dict__, "gm": None, "_replicas": None}

    def replicas(self) -> list[torch.nn.Module]:
        if self._replicas is None:
            source = self.model if self.hooked else self.gm
            if source is None:
                from alloykit.alignment.trace import export_model

                args, kwargs = self.example
                source = self.gm = export_model(copy.deepcopy(self.model), tuple(args), dict(kwargs))
            replicas = []
            for state in self.states:
                m = copy.deepcopy(source)
                m.load_state_dict(state)
                replicas.append(m.eval().to(self.device))
            self._replicas = replicas
        return self._replicas


def _alignment_task(ctx: _AlignmentTask, item: tuple[int, list[Any]]) -> dict[str, CorrelationSums]:
    """One group of batches (the first numbered ``item[0]``): each group's sums, from zero."""
    from alloykit.engine.devices import to_device

    first, batches = item
    replicas = ctx.replicas()
    n_models = len(replicas)
    device = ctx.device
    out = {
        g.name: CorrelationSums(
            torch.zeros(n_models * g.size, dtype=torch.float64, device=device),
            torch.zeros(n_models * g.size, n_models * g.size, dtype=torch.float64, device=device),
        )
        for g in ctx.groups
    }
    for b, batch in enumerate(batches, first):
        batch = to_device(batch, device)
        mask = batch.get(ctx.mask_key) if isinstance(batch, Mapping) else None
        read = _hooked_values if ctx.hooked else _graph_values
        captured = [read(m, ctx.groups, batch, b) for m in replicas]
        for g in ctx.groups:
            per_model = []
            for values in captured:
                feats = [unit_features(values[_key(s, ctx.hooked)], s, g.size, mask) for s in g.activation]
                per_model.append(torch.cat(feats, dim=0))
            x = torch.nan_to_num(torch.cat(per_model, dim=1), nan=0.0, posinf=0.0, neginf=0.0)
            out[g.name].add(x)
    return out


def _key(src: ActivationSource, hooked: bool) -> Any:
    return (src.module, src.hook) if hooked else src.node


def _hooked_values(model: torch.nn.Module, groups: Sequence[PermGroup], batch: Any, index: int) -> dict:
    values: dict[Any, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    wanted = {(s.module, s.hook) for g in groups for s in g.activation}
    for path, hook in wanted:
        mod = modules.get(path)
        if mod is None:
            raise AlignmentDataError(f"no module {path!r} in the model (the trace names it)")
        if hook == "input":
            handles.append(
                mod.register_forward_pre_hook(
                    lambda m, a, k=(path, hook): values.__setitem__(k, a[0].detach())
                )
            )
        else:
            handles.append(
                mod.register_forward_hook(lambda m, a, o, k=(path, hook): values.__setitem__(k, o.detach()))
            )
    try:
        with torch.no_grad():
            _call(model, batch)
    except Exception as e:
        raise AlignmentDataError(
            f"batch {index} does not fit the model ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    finally:
        for h in handles:
            h.remove()
    return values


def _graph_values(gm: torch.fx.GraphModule, groups: Sequence[PermGroup], batch: Any, index: int) -> dict:
    cap = _Capture(gm, {s.node for g in groups for s in g.activation})
    args: tuple = ()
    kwargs: dict = {}
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
    elif isinstance(batch, tuple | list):
        args = tuple(batch)
    else:
        args = (batch,)
    try:
        with torch.no_grad():
            cap.run(*_flat_inputs(gm, args, kwargs))
    except AlignmentDataError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise AlignmentDataError(
            f"batch {index} does not fit the traced graph ({type(e).__name__}: {first}); groups observed "
            "inside the graph need batches shaped like the example inputs"
        ) from None
    return cap.values


def _flat_inputs(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The exported module's placeholders in order, from positional and keyword inputs."""
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args)
    for name in names[len(values) :]:
        key = str(name)
        if key not in kwargs:
            raise AlignmentDataError(f"the batch gives no input {key!r} (the traced model takes {names})")
        values.append(kwargs[key])
    return values
