"""The method contract: a merge method is a registered function over the tensors of one parameter.

A method is declared with :func:`merge_method`::

    @merge_method("task_arithmetic", params=[Param("weight", float, 1.0, per_model=True), ...],
                  needs_base=True)
    def task_arithmetic(tensors, base, ctx, *, weight, lambda_):
        ...

* ``tensors`` are the fine-tuned models' tensors for one parameter name, already in the compute
  dtype; ``base`` is the base model's tensor (``None`` when the method takes no base).
* ``ctx`` (:class:`TensorContext`) carries the tensor's name, a seeded RNG factory and the
  whole-model statistics of a :class:`Reduction`, if the method declared one.
* The engine hands a job's inputs over as :class:`Inputs` and keeps no other reference to them:
  a method that is done with one may drop it (:func:`release`), so that a whole-tensor job does
  not hold its stored inputs through its decompositions.
* Every declared :class:`Param` arrives as a keyword (``lambda`` as ``lambda_``); per-model
  parameters arrive as lists aligned with ``tensors``.

* ``search`` (optional) declares what users tune on validation data (``Continuous`` or ``Grid``
  per parameter); ``alloykit.evaluation`` searches it, so a new method joins the benchmarks as is.

A method never opens a file; the engine never names a method.
"""

from __future__ import annotations

import hashlib
import keyword
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from alloykit.errors import ParameterError

# float32's smallest normal and largest finite magnitudes (torch.finfo(torch.float32))
_F32_TINY = 1.1754943508222875e-38
_F32_MAX = 3.4028234663852886e38

REQUIRED: Any = object()
NO_MATCH: Any = object()


@dataclass(frozen=True)
class Continuous:
    """A coefficient a method's users tune on validation data, searched in ``[low, high]``.

    ``grid`` is used when it is searched together with other parameters (a grid search);
    ``scales_update`` declares that the merged model is ``θ_0 + value · (merge at 1 − θ_0)``, so a
    search may merge once and rescale; ``affine`` that it is ``θ(0) + value · (θ(1) − θ(0))`` (a
    scale of part of the update, e.g. ESM's α on some matrices only), so a search may merge twice
    and interpolate (both tested for every method that declares them).
    """

    low: float
    high: float
    grid: tuple[float, ...] = ()
    scales_update: bool = False
    affine: bool = False

    def __post_init__(self) -> None:
        if not self.low < self.high:
            raise ValueError(f"search interval needs low < high, got [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Grid:
    """A parameter searched over a fixed list of values."""

    values: tuple[Any, ...]

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError("a search grid needs at least one value")


SearchSpace = dict[str, Continuous | Grid]


@dataclass(frozen=True)
class Param:
    """A declared parameter: type, default, range or choices, and whether it is per model."""

    name: str
    kind: type
    default: Any = REQUIRED
    per_model: bool = False
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""
    # A value at which the parameter removes a model's contribution (a weight, scale or density
    # of 0): legal, but the planner says so in its warnings.
    noop_at: float | None = None

    @property
    def py_name(self) -> str:
        return self.name + "_" if keyword.iskeyword(self.name) else self.name

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        parts = []
        if self.ge is not None:
            parts.append(f">= {self.ge}")
        if self.gt is not None:
            parts.append(f"> {self.gt}")
        if self.le is not None:
            parts.append(f"<= {self.le}")
        if self.lt is not None:
            parts.append(f"< {self.lt}")
        kind = self.kind.__name__
        return f"a {kind}" + (" " + " and ".join(parts) if parts else "")

    def validate(self, value: Any, where: str) -> Any:
        """Coerce and check one value; the message names method, parameter, value and range."""
        bad = f"{where}: parameter {self.name!r} = {value!r} is not allowed; expected {self.allowed()}"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ParameterError(bad)
            return value
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ParameterError(bad)
            if self.kind is int and float(value) != int(value):
                raise ParameterError(bad)
            value = self.kind(value)
            if value != value or value in (math.inf, -math.inf):  # NaN, ±inf
                raise ParameterError(bad)
            if self.kind is float and value != 0 and not _F32_TINY <= abs(value) <= _F32_MAX:
                # merges compute in float32: such a value would become 0 or ±inf there (a weight
                # of 1e-308 normalised by the sum of such weights gives 0/0 = NaN)
                raise ParameterError(
                    f"{where}: parameter {self.name!r} = {value!r} is outside float32's range: merges "
                    f"compute in float32, whose normal numbers have magnitudes {_F32_TINY:.3g} to "
                    f"{_F32_MAX:.3g}; give 0 or a value in that range"
                )
            if (
                (self.ge is not None and value < self.ge)
                or (self.gt is not None and value <= self.gt)
                or (self.le is not None and value > self.le)
                or (self.lt is not None and value >= self.lt)
            ):
                raise ParameterError(bad)
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise ParameterError(bad)
            return value
        raise TypeError(f"unsupported parameter kind {self.kind}")


class Inputs(list):
    """A job's input tensors, handed over by an engine that keeps no other reference to them:
    the method may let go of one it needs no more (:func:`release`)."""


def release(tensors: Sequence[Any], t: int) -> None:
    """Let go of input ``t`` once the method has taken all it needs from it, if the caller handed
    it over (:class:`Inputs`): its memory is freed then, not when the job ends. A plain list is
    the caller's own and is left as it is. The method must not read ``tensors[t]`` afterwards."""
    if isinstance(tensors, Inputs):
        tensors[t] = None


@dataclass(frozen=True)
class Deferred:
    """A tensor's share of a whole-model quantity computed in the merge pass, and the entries of
    its result that wait for it (:meth:`TensorContext.defer`)."""

    partial: Any
    index: torch.Tensor
    alternatives: dict[Any, torch.Tensor]


@dataclass(frozen=True)
class TensorContext:
    """What a method may know about the tensor it merges, besides the tensors themselves."""

    name: str
    seed: int = 0
    stats: Any = None
    offset: int = 0  # where the tensors start in the flattened parameter, when given a slice
    # Per model (aligned with ``tensors``): its calibration statistics for this tensor (see
    # alloykit.calibration.statistics), or None where it has none. Empty for methods that
    # declare no statistics.
    statistics: tuple[dict[str, Any] | None, ...] = ()
    # Per model (aligned with ``tensors``): the (piece, n, matrix) transforms of this tensor's
    # axes from an alignment (alloykit.alignment), for methods that declare an aligner.
    transforms: tuple[Any, ...] = ()
    # Where ``warn`` collects messages for the merge report (None: they are dropped).
    notes: list[str] | None = None
    # Set by the engine when the reduction's last pass runs inside the merge pass (see
    # ``Reduction.fused``): where ``defer`` collects this tensor's share of it.
    deferred: list[Deferred] | None = None
    # For methods that widen their inputs themselves (``widens_inputs``): the dtype the engine
    # expects the result in (the compute dtype), None otherwise (the inputs' dtype).
    result_dtype: torch.dtype | None = None

    def defer(self, partial: Any, index: torch.Tensor, alternatives: dict[Any, torch.Tensor]) -> None:
        """Hand the engine this tensor's ``partial`` of a whole-model quantity that the merge pass
        itself computes, and the entries of the result that depend on it: at the flat positions
        ``index`` the returned result holds the values for one outcome, ``alternatives[k]`` the
        values for outcome ``k``. Once every tensor is merged, the engine folds the partials,
        resolves the outcome and rewrites those entries if it is one of the alternatives."""
        if self.deferred is None:
            raise RuntimeError(f"{self.name!r}: the engine did not ask for a fused pass")
        self.deferred.append(Deferred(partial, index, alternatives))

    def warn(self, message: str) -> None:
        """A remark for the merge report (e.g. a rank above what the data supports)."""
        if self.notes is not None:
            self.notes.append(message)

    def generator(self, stream: int = 0) -> torch.Generator:
        """A CPU generator seeded by (seed, tensor name, stream, slice offset): the same numbers
        whatever order or worker the tensor is merged in, so 1 and N workers give identical
        bytes."""
        digest = hashlib.sha256(f"{self.seed}\0{self.name}\0{stream}\0{self.offset}".encode()).digest()
        g = torch.Generator()
        g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        return g


class Reduction(Protocol):
    """Whole-model quantities a method needs before merging any tensor (e.g. a global top-k
    threshold per task). The engine runs ``passes(params)`` passes over every merged tensor:
    ``map`` on each (in workers), ``fold`` the partial results, then ``finish`` gives the state
    that the next pass, and finally the method (as ``ctx.stats``), sees."""

    def passes(self, params: dict[str, Any]) -> int: ...
    def map(
        self,
        index: int,
        state: Any,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        ctx: TensorContext,
        params: dict[str, Any],
    ) -> Any: ...
    def fold(self, index: int, acc: Any, partial: Any) -> Any: ...
    def finish(self, index: int, state: Any, acc: Any, params: dict[str, Any]) -> Any: ...

    # Optional: ``fused(params) -> int | None``, the index of a last pass that runs inside the merge
    # pass instead of before it (one read of every input saved). The method then reports each
    # tensor's partial through ``ctx.defer``; the engine folds them as for any pass, calls
    # ``finish`` and then ``resolve(state)`` for the outcome that picks the deferred entries.

    # Optional: ``model_wide(params) -> {parameter: hint}`` names the parameters that ``finish``
    # reads once for the whole model with these settings. The planner refuses a per-tensor
    # value (a condition or a gradient) for them, with the hint saying which option honours it.


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[Param, ...]
    needs_base: bool
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_preset: str | None = None
    reduction: Reduction | None = None
    min_models: int = 1
    max_models: int | None = None
    # Working float32 copies of one input tensor the method holds at once, per model (planning);
    # or a function of the resolved parameters (e.g. more when a whole-tensor sort runs).
    memory_factor: float | Callable[[dict[str, Any]], float] = 3.0
    # Whether, with these parameters, each output entry depends only on the same entry of the
    # inputs (so the engine may stream the tensor in slices). True, False, or a function of the
    # resolved parameters.
    elementwise: bool | Callable[[dict[str, Any]], bool] = False
    # What users tune on validation data (evaluation.search reads it); empty: nothing to tune.
    search: SearchSpace = field(default_factory=dict)
    # ``ignores(params) -> {parameter: why}``: parameters that have no effect with these resolved
    # parameters; a user who sets one gets a warning in the plan and report.
    ignores: Callable[[dict[str, Any]], dict[str, str]] | None = None
    # ``check(params, where)``: raises ParameterError for values that are valid one by one but
    # not together (weights summing to zero); the planner calls it for every merged tensor.
    check: Callable[[dict[str, Any], str], None] | None = None
    # Calibration statistics the method reads: "activations" (input Grams) or "fisher"; the
    # engine requires one statistics source per model and hands each tensor's entries to the
    # method in ``ctx.statistics``.
    statistics: str | None = None
    # For models trained separately: the aligner that computes, before the merge, a transform per
    # permutation group ("identity", "weights", "activations", …); the engine hands each tensor's
    # transforms to the method in ``ctx.transforms``.
    alignment: str | None = None
    # The method widens its inputs itself, exactly (it computes in float32/64 whatever it is
    # given): with a float32 compute dtype the engine then hands it bfloat16/float16 inputs as
    # stored, which halves what an embedding-sized job holds, and expects the result in
    # ``ctx.result_dtype``.
    widens_inputs: bool = False
    # Whether, with these parameters, each output row (index along the first axis) depends only
    # on the same rows of the inputs (per-row masks, per-row ratios): the engine may then stream a
    # tensor of 2 or more dimensions in slices of whole rows, handed to the method shaped
    # (rows, *shape[1:]). True, False, or a function of the resolved parameters.
    rowwise: bool | Callable[[dict[str, Any]], bool] = False
    # ``working_bytes(params, shape, n_models, has_statistics) -> bytes`` held while merging one
    # tensor of that shape, beyond its inputs and output (planning); replaces memory_factor for a
    # method whose memory is not proportional to the tensor's size (ESM: d_out² matrices).
    working_bytes: Callable[[dict[str, Any], tuple[int, ...], int, bool], int] | None = None

    def is_elementwise(self, params: dict[str, Any]) -> bool:
        return self.elementwise(params) if callable(self.elementwise) else bool(self.elementwise)

    def is_rowwise(self, params: dict[str, Any]) -> bool:
        return self.rowwise(params) if callable(self.rowwise) else bool(self.rowwise)

    @property
    def summary(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ParameterError(
            f"{self.name}: unknown parameter {name!r}; known: {', '.join(p.name for p in self.params)}"
        )

    def __call__(
        self,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None = None,
        ctx: TensorContext | None = None,
        preset: str | None = None,
        **params: Any,
    ) -> torch.Tensor:
        """Merge one tensor directly (notebooks, tests): defaults, preset and validation apply."""
        values = self.resolve(len(tensors), preset=preset, global_params=params)
        if self.check is not None:
            self.check(values, "")
        if self.needs_base and base is None:
            raise ParameterError(f"{self.name}: needs a base tensor")
        ctx = ctx or TensorContext(name="")
        if self.reduction is not None and ctx.stats is None:
            # This tensor is the whole model: its whole-model quantities (a top-k threshold, a
            # sign majority, norms) are its own, computed as the engine computes them
            ctx = replace(ctx, stats=self._whole_model_state(list(tensors), base, ctx, values))
        return self.fn(list(tensors), base, ctx, **values)

    def _whole_model_state(
        self,
        tensors: list[torch.Tensor],
        base: torch.Tensor | None,
        ctx: TensorContext,
        values: dict[str, Any],
    ) -> Any:
        """The reduction passes over one tensor; a pass the engine fuses into the merge pass
        (``fused``) runs on its own here, which gives the same bytes."""
        reduction = self.reduction
        passes = list(range(reduction.passes(values)))
        fused = getattr(reduction, "fused", None)
        if fused is not None and fused(values) is not None:
            passes.append(fused(values))
        state = None
        for index in passes:
            partial = reduction.map(index, state, list(tensors), base, replace(ctx, stats=state), values)
            state = reduction.finish(index, state, reduction.fold(index, None, partial), values)
        return state

    def resolve(
        self,
        n_models: int,
        preset: str | None = None,
        global_params: dict[str, Any] | None = None,
        model_params: Sequence[dict[str, Any]] | None = None,
        tensor_name: str = "",
        layer_t: float = 0.0,
    ) -> dict[str, Any]:
        """Final, validated keyword arguments of ``fn`` for one tensor.

        Precedence, lowest first: the declared default, the preset, the global value, the
        per-model value. Values may be tensor-name conditions or gradients (see
        :func:`evaluate_setting`)."""
        preset_name = preset or self.default_preset
        if preset_name is not None and preset_name not in self.presets:
            raise ParameterError(
                f"{self.name}: unknown preset {preset_name!r}; known: {', '.join(self.presets) or 'none'}"
            )
        preset_values = self.presets.get(preset_name, {}) if preset_name else {}
        global_params = dict(global_params or {})
        model_params = list(model_params or [{} for _ in range(n_models)])
        known = {p.name for p in self.params}
        for source in [global_params, *model_params]:
            for key in source:
                if key not in known:
                    self.param(key)  # raises with the list of known parameters
        out: dict[str, Any] = {}
        for p in self.params:
            where = f"{self.name}" + (f" (tensor {tensor_name!r})" if tensor_name else "")
            # Highest precedence first; a condition list that matches nothing falls through
            # to the next level (mergekit's rule).
            shared = [src[p.name] for src in (global_params, preset_values) if p.name in src]
            if p.per_model:
                values = []
                for i, mp in enumerate(model_params):
                    chain = ([mp[p.name]] if p.name in mp else []) + shared
                    values.append(self._pick(p, chain, tensor_name, layer_t, f"{where}, model {i}"))
                out[p.py_name] = values
            else:
                out[p.py_name] = self._pick(p, shared, tensor_name, layer_t, where)
        return out

    @staticmethod
    def _pick(p: Param, chain: list[Any], tensor_name: str, t: float, where: str) -> Any:
        for setting in chain:
            value = evaluate_setting(setting, tensor_name, t)
            if value is not NO_MATCH:
                return p.validate(value, where)
        if p.default is REQUIRED:
            raise ParameterError(f"{where}: parameter {p.name!r} is required")
        return p.default


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A parameter value as given in a recipe, evaluated for one tensor.

    * a scalar: itself;
    * a list of numbers: a *gradient* over layer depth ``t`` in [0, 1], linearly interpolated
      (mergekit's rule: ``t = layer / (layers − 1)``; tensors outside layers use ``t = 0``);
    * a list of ``{filter: ..., value: ...}``: the first whose filter matches wins. A filter is a
      substring of the tensor name (mergekit's rule), ``re:PATTERN`` for a regular expression
      searched in the name, or absent / ``"*"`` for "any tensor". When none matches, the
      result is ``NO_MATCH`` and the caller falls back to the next, less specific setting.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise ParameterError("an empty list is not a parameter value")
        if all(isinstance(e, int | float) and not isinstance(e, bool) for e in setting):
            if len(setting) == 1:
                return setting[0]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if all(isinstance(e, dict) for e in setting):
            for cond in setting:
                if "value" not in cond:
                    raise ParameterError(f"condition {cond!r} has no 'value'")
                flt = cond.get("filter")
                if (
                    flt is None
                    or flt == "*"
                    or (re.search(flt[3:], tensor_name) if flt.startswith("re:") else flt in tensor_name)
                ):
                    return evaluate_setting(cond["value"], tensor_name, t)
            return NO_MATCH
        raise ParameterError(f"cannot read parameter value {setting!r}")
    return setting


REGISTRY: dict[str, MergeMethod] = {}


def merge_method(
    name: str,
    *,
    params: Sequence[Param],
    needs_base: bool,
    presets: dict[str, dict[str, Any]] | None = None,
    default_preset: str | None = None,
    reduction: Reduction | None = None,
    min_models: int = 1,
    max_models: int | None = None,
    memory_factor: float | Callable[[dict[str, Any]], float] = 3.0,
    elementwise: bool | Callable[[dict[str, Any]], bool] = False,
    search: SearchSpace | None = None,
    ignores: Callable[[dict[str, Any]], dict[str, str]] | None = None,
    check: Callable[[dict[str, Any], str], None] | None = None,
    statistics: str | None = None,
    alignment: str | None = None,
    widens_inputs: bool = False,
    rowwise: bool | Callable[[dict[str, Any]], bool] = False,
    working_bytes: Callable[[dict[str, Any], tuple[int, ...], int, bool], int] | None = None,
) -> Callable[[Callable], MergeMethod]:
    """Declare and register a method (see the module docstring)."""

    def wrap(fn: Callable) -> MergeMethod:
        if name in REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        m = MergeMethod(
            name,
            fn,
            tuple(params),
            needs_base,
            dict(presets or {}),
            default_preset,
            reduction,
            min_models,
            max_models,
            memory_factor,
            elementwise,
            dict(search or {}),
            ignores,
            check,
            statistics,
            alignment,
            widens_inputs,
            rowwise,
            working_bytes,
        )
        for values in m.presets.values():
            for k in values:
                m.param(k)  # a preset may only set declared parameters
        for k in m.search:
            m.param(k)
        REGISTRY[name] = m
        return m

    return wrap


def get_method(name: str) -> MergeMethod:
    import alloykit.methods  # noqa: F401  (registers the built-in methods)

    try:
        return REGISTRY[name]
    except KeyError:
        raise ParameterError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(REGISTRY))}"
        ) from None
