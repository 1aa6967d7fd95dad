"""After an alignment merge: averaging partly correlated units shrinks the merged network's
activation variance ("variance collapse", Jordan et al., REPAIR, ICLR 2023). Two repairs:

* :func:`bn_reset` — recompute every BatchNorm's running statistics on data (cumulative average,
  ``momentum=None``, one pass in train mode), as ZipIt and MuDSC do after merging;
* :func:`repair` — for networks without BatchNorm: rescale every aligned producer (Linear/Conv
  whose output units belong to a group) so that each output channel's mean and standard deviation
  on data equal the average of the endpoint models' (μ* = mean_m μ_m, σ* = mean_m σ_m, in the
  merged basis), folded into the weight and bias: W ← W·σ*/σ, b ← (b − μ)·σ*/σ + μ*.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from alloykit.alignment.align import Alignment
from alloykit.alignment.statistics import _call


def bn_reset(model: nn.Module, batches: Sequence[Any]) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``batches``; returns how many
    norms were reset. One pass in train mode (each norm normalises with its batch statistics, so
    later norms see what they see in ZipIt's and MuDSC's reset), with each norm's input sums
    accumulated in float64 over all rows: exact for batches of any size (PyTorch's
    ``momentum=None`` averages batch means instead). Running variance: unbiased, as PyTorch's."""
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    sums: dict[str, list] = {}

    def hook(name: str):
        def fn(m, args):
            x = args[0].detach().double()
            y = x.movedim(1, -1).reshape(-1, x.shape[1])
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + y.sum(0)
            s[1] = s[1] + y.square().sum(0)
            s[2] += y.shape[0]

        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in norms]
    was = model.training
    model.train()
    try:
        with torch.no_grad():
            for b in batches:
                _call(model, b)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    with torch.no_grad():
        for name, m in norms:
            if name not in sums or m.running_mean is None:
                continue
            total, squares, n = sums[name]
            mean = total / n
            var = (squares - n * mean.square()) / max(n - 1, 1)
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.clamp(min=0).to(m.running_var.dtype))
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(len(batches))
    return len(norms)


def _channel_stats(model: nn.Module, layers: Sequence[str], batches: Sequence[Any]) -> dict[str, tuple]:
    """Per layer: per output channel mean and std of its outputs (channel axis 1 for convs, last
    for linears), exact over all rows."""
    sums: dict[str, list] = {}
    modules = dict(model.named_modules())
    handles = []

    def hook(name: str, channel_axis: int):
        def fn(m, a, out):
            y = out.detach().double().movedim(channel_axis, -1).reshape(-1, out.shape[channel_axis])
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + y.sum(0)
            s[1] = s[1] + y.square().sum(0)
            s[2] += y.shape[0]

        return fn

    for name in layers:
        mod = modules[name]
        handles.append(
            mod.register_forward_hook(hook(name, 1 if isinstance(mod, nn.modules.conv._ConvNd) else -1))
        )
    try:
        with torch.no_grad():
            model.eval()
            for b in batches:
                _call(model, b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, (s, sq, n) in sums.items():
        mean = s / n
        var = (sq / n - mean.square()).clamp(min=0)
        out[name] = (mean, var.sqrt())
    return out


def repairable_layers(model: nn.Module, alignment: Alignment) -> list[tuple[str, str]]:
    """(module name, group) for every Linear/Conv whose weight rows are a whole group."""
    found = []
    rows = {(p.param, p.axis): g for g in alignment.table.groups for p in g.pieces if p.role == "out"}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | nn.modules.conv._ConvNd):
            g = rows.get((f"{name}.weight", 0))
            if g is not None and all(p.offset == 0 and p.outer == 1 and p.inner == 1 for p in g.pieces
                                     if p.param == f"{name}.weight"):  # fmt: skip
                found.append((name, g.name))
    return found


def repair(
    merged: nn.Module,
    endpoints: Sequence[nn.Module],
    alignment: Alignment,
    batches: Sequence[Any],
    eps: float = 1e-5,
) -> int:
    """REPAIR (module docstring); returns how many layers were rescaled. Layers are corrected in
    order, each with statistics measured after the earlier corrections."""
    layers = repairable_layers(merged, alignment)
    if not layers:
        return 0
    names = [n for n, _ in layers]
    ends = [_channel_stats(m, names, batches) for m in endpoints]
    modules = dict(merged.named_modules())
    for name, group in layers:
        tr = alignment.transforms[group]
        n = len(endpoints)
        here = ends[0][name][0].device  # where the models run
        mu_t = sum((tr.merge[m].to(here) * n).T @ ends[m][name][0] for m in range(n)) / n
        sd_t = sum((tr.merge[m].to(here) * n).T @ ends[m][name][1] for m in range(n)) / n
        mean, std = _channel_stats(merged, [name], batches)[name]
        mod = modules[name]
        scale = (sd_t / std.clamp(min=eps)).to(mod.weight.dtype)
        with torch.no_grad():
            shape = (-1,) + (1,) * (mod.weight.dim() - 1)
            mod.weight.mul_(scale.reshape(shape))
            if mod.bias is not None:  # without a bias only the spread is restored
                new_bias = (mod.bias.double() - mean) * scale.double() + mu_t
                mod.bias.copy_(new_bias.to(mod.bias.dtype))
    return len(layers)
