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
from alloykit.errors import AlloykitError


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
) -> ActivationStatistics:
    """One pass over ``batches`` with every model (``states`` loaded into copies of ``model``):
    per group, the sums behind the cross-model correlation of its units. Units are observed with
    forward hooks at module inputs/outputs (any batch shape); sources that are not at a module
    boundary are read from the traced graph ``gm`` (whose shapes are those of the example).
    ``device``: where the models run and the sums accumulate (returned on the host)."""
    from alloykit.engine.devices import to_device

    device = torch.device(device)
    groups = list(groups or table.groups)
    missing = [g.name for g in groups if not g.activation]
    if missing:
        raise AlignmentDataError(f"groups without an activation source: {missing}")
    hooked = all(src.module is not None for g in groups for src in g.activation)
    if not hooked and gm is None:
        raise AlignmentDataError("some groups are observed inside the graph: give the traced graph")
    replicas = []
    for state in states:
        m = copy.deepcopy(gm if not hooked else model)
        m.load_state_dict(state)
        replicas.append(m.eval().to(device))
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
    for b, batch in enumerate(batches):
        batch = to_device(batch, device)
        mask = batch.get(mask_key) if isinstance(batch, Mapping) else None
        captured = [(_hooked_values if hooked else _graph_values)(m, groups, batch, b) for m in replicas]
        for g in groups:
            per_model = []
            for values in captured:
                feats = [unit_features(values[_key(s, hooked)], s, g.size, mask) for s in g.activation]
                per_model.append(torch.cat(feats, dim=0))
            x = torch.nan_to_num(torch.cat(per_model, dim=1), nan=0.0, posinf=0.0, neginf=0.0)
            stats.sums[g.name].add(x)
        stats.batches += 1
        if progress:
            progress("activations", b + 1, len(batches))
    for sums in stats.sums.values():
        sums.total, sums.outer = sums.total.cpu(), sums.outer.cpu()
    stats.check_alive()
    return stats


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
