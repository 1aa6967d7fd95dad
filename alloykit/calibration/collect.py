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
from collections.abc import Callable, Mapping, Sequence
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


class _Accumulator:
    """XᵀX over rows added batch by batch (float64), or the rows themselves while fewer than
    the input width (``store='auto'``)."""

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
        if self.store == "inputs" or (self.store == "auto" and self.gram is None and
                                      self.n_rows + x.shape[0] <= self.d_in):  # fmt: skip
            # rows keep float32 or float64 (half precision widened), as the forward made them
            keep = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
            self.rows.append(x.to(keep).cpu().clone())
            self.n_rows += x.shape[0]
            return
        if self.gram is None:  # on the device the model runs on: the product is the cost
            self.gram = torch.zeros(self.d_in, self.d_in, dtype=torch.float64, device=x.device)
            for r in self.rows:
                rd = r.double().to(x.device)
                self.gram += rd.T @ rd
            self.rows = []
        xd = x.double()
        self.gram += xd.T @ xd
        self.n_rows += x.shape[0]

    def entry(self, dtype: torch.dtype) -> dict[str, Any]:
        if self.gram is not None:
            return {"gram": self.gram.to("cpu", dtype), "tokens": self.n_rows}
        rows = torch.cat(self.rows) if self.rows else torch.zeros(0, self.d_in)
        return {"inputs": rows, "tokens": self.n_rows}

    @property
    def nbytes(self) -> int:
        return 8 * self.d_in * self.d_in


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
    """
    if store not in ("auto", "gram", "inputs"):
        raise ParameterError(f"store = {store!r} is not allowed; expected auto, gram or inputs")
    batches = list(batches)
    if not batches:
        raise CheckpointError("no calibration data: give at least one batch")
    targets = linear_layers(model, include, exclude)
    if not targets:
        raise CheckpointError("no linear layer matched: check include/exclude (module names)")

    def mask_of(batch: Batch) -> torch.Tensor | None:
        return batch.get(mask_key) if isinstance(batch, Mapping) else None

    was_training = model.training
    model.eval()
    try:
        groups = _groups(model, targets, batches[0], mask_of)
        passes: list[list[list[Target]]] = [[]]
        held = 0
        for g in groups:
            size = 8 * g[0].d_in ** 2
            if passes[-1] and max_memory is not None and held + size > max_memory:
                passes.append([])
                held = 0
            passes[-1].append(g)
            held += size
        entries: dict[str, dict[str, Any]] = {}
        shared: dict[str, str] = {}
        total_steps = len(passes) * len(batches)
        step = 0
        for pass_groups in passes:
            accs = {id(g[0]): _Accumulator(g[0].d_in, store) for g in pass_groups}
            last = pass_groups[-1][0]
            current: dict[str, Any] = {}
            handles = []

            def hook(acc: _Accumulator, stop: bool, batch_state: dict[str, Any]) -> Callable:
                def on_forward(module: nn.Module, args: tuple, output: Any) -> None:
                    acc.add(_rows(args[0], batch_state.get("mask")))
                    if stop:
                        raise _StopForward

                return on_forward

            for g in pass_groups:
                leader = g[0]
                handles.append(
                    leader.layer.register_forward_hook(hook(accs[id(leader)], leader is last, current))
                )
            try:
                with torch.inference_mode():
                    for batch in batches:
                        current["mask"] = mask_of(batch)
                        try:
                            call_model(model, batch)
                        except _StopForward:
                            pass
                        step += 1
                        if progress:
                            progress("calibration", step, total_steps)
            finally:
                for h in handles:
                    h.remove()
            for g in pass_groups:
                leader = g[0]
                entry = accs[id(leader)].entry(dtype)
                for t in g:
                    name = rename(t.param) if rename else t.param
                    entries[name] = {
                        **entry,
                        "transposed": t.transposed,
                        "signature": weight_signature(t.layer.weight),
                        "signature_dtype": str(t.layer.weight.dtype).removeprefix("torch."),
                    }
                    if t is not leader:
                        shared[name] = rename(leader.param) if rename else leader.param
                    else:
                        if entry["tokens"] == 0:
                            raise CheckpointError(
                                f"layer {t.module!r} saw no input rows (every row was padding?)"
                            )
    finally:
        model.train(was_training)
    stats = Statistics(entries, meta={"kind": "activations", "passes": len(passes)})
    stats.shared = shared
    return stats


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
) -> Statistics:
    """Diagonal Fisher of every trainable parameter (names matched by include/exclude regexes).

    F = (1/n) Σ_i g_i², g_i = ∂ log p(y_i | x_i) / ∂θ per example i (``empirical``: y_i the
    label; ``expected``: F = (1/n) Σ_i Σ_y p(y|x_i) (∂ log p(y|x_i)/∂θ)², exact over the classes).
    ``log_probs(model, batch)`` returns (B × C log-probabilities, labels or None).
    """
    if estimator not in ("empirical", "expected"):
        raise ParameterError(f"estimator = {estimator!r} is not allowed; expected empirical or expected")
    inc = [re.compile(p) for p in include or []]
    exc = [re.compile(p) for p in exclude or []]

    def wanted(n: str) -> bool:
        return (not inc or any(r.search(n) for r in inc)) and not any(r.search(n) for r in exc)

    params = {n: p for n, p in model.named_parameters() if p.requires_grad and wanted(n)}
    if not params:
        raise CheckpointError("no trainable parameter matched include/exclude")
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    examples = 0
    was_training = model.training
    model.eval()
    names = list(params)
    tensors = [params[n] for n in names]
    try:
        batches = list(batches)
        for b, batch in enumerate(batches):
            with torch.enable_grad():
                logp, labels = log_probs(model, batch)
                if estimator == "empirical" and labels is None:
                    raise CheckpointError("the empirical Fisher needs labels: the batch has none")
                for i in range(logp.shape[0]):
                    if estimator == "empirical":
                        terms = [(logp[i, int(labels[i])], 1.0)]
                    else:
                        probs = logp[i].detach().exp()
                        terms = [(logp[i, c], float(probs[c])) for c in range(logp.shape[1])]
                    for value, weight in terms:
                        grads = torch.autograd.grad(value, tensors, retain_graph=True, allow_unused=True)
                        for n, g in zip(names, grads, strict=True):
                            if g is not None:
                                sums[n] += weight * g.detach().double().square()
                    examples += 1
            if progress:
                progress("fisher", b + 1, len(batches))
    finally:
        model.train(was_training)
    if examples == 0:
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
