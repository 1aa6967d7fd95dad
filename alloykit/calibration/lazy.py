"""A model whose weights stay in the checkpoint until a layer runs.

Calibration needs only forwards, one layer after another. Loading the whole model in float32 costs
4 bytes per parameter (4.4 GB at 1.1 B, 28 GB at 7 B) beside the statistics; here the model is
built with every parameter on the ``meta`` device (shapes only, no memory), and each module that
owns parameters reads them from the checkpoint, widened to float32, just before its forward and
drops them right after. The host then holds one module's weights at a time (an embedding or one
projection), at the price of reading the checkpoint again on each forward (from the page cache
after the first).

The forwards compute the same float32 values as with the whole model loaded: the statistics are
the same bytes (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from alloykit.errors import CheckpointError


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device as they are registered
    (their initialisation then costs nothing); buffers are built as usual, since some are
    computed rather than stored (e.g. rotary frequencies)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


class NotStreamable(CheckpointError):
    """The checkpoint lacks parameters the model has (e.g. a head that loading would initialise,
    or names a loader converts): the model cannot run from the checkpoint alone."""


class StreamedWeights:
    """Hooks that give each module of ``model`` its parameters from ``reader`` for the length of
    its forward (as ``dtype``, on ``device``).

    ``rename`` maps a module's parameter names to checkpoint names. A tied parameter (one object
    under several names, e.g. an LM head sharing the embedding) is read under whichever of its
    names the checkpoint has. Persistent buffers the checkpoint holds are read once, at once.
    """

    def __init__(
        self,
        model: nn.Module,
        reader: Any,
        rename: Callable[[str], str] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.model, self.reader, self.dtype = model, reader, dtype
        self.device = torch.device(device)
        rename = rename or (lambda n: n)
        keys = set(reader.keys())
        # every name of every parameter object, so a tied one finds whichever name is stored
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        self.source: dict[str, str] = {}  # state-dict name -> checkpoint key
        missing = []
        for group in names.values():
            stored = next((rename(n) for n in group if rename(n) in keys), None)
            if stored is None:
                missing.append(group[0])
            for n in group:
                self.source[n] = stored or n
        if missing:
            raise NotStreamable(
                f"{len(missing)} parameters of the model are not in the checkpoint, e.g. {missing[:3]}: "
                "streaming the weights needs every one stored (the whole model is loaded instead unless "
                "streaming was asked for)"
            )
        for name, buffer in model.named_buffers():
            if rename(name) in keys:
                self._set_buffer(name, reader.read(rename(name)).to(buffer.dtype))
        self._move_buffers()
        self.handles = []
        for prefix, module in model.named_modules():
            own = [n for n, p in module._parameters.items() if p is not None]
            if own:
                full = [f"{prefix}.{n}" if prefix else n for n in own]
                self.handles.append(module.register_forward_pre_hook(self._loader(own, full)))
                self.handles.append(module.register_forward_hook(self._releaser(own), always_call=True))

    def _set_buffer(self, name: str, value: torch.Tensor) -> None:
        owner, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(owner) if owner else self.model
        module._buffers[leaf] = value

    def to(self, device: torch.device | str) -> None:
        """Run on ``device``: the buffers go there now, each weight as its module runs."""
        self.device = torch.device(device)
        self._move_buffers()

    def _move_buffers(self) -> None:
        for module in self.model.modules():
            for leaf, b in module._buffers.items():
                if b is not None and b.device != self.device:
                    module._buffers[leaf] = b.to(self.device)

    def read(self, name: str) -> torch.Tensor:
        """The parameter ``name`` (a state-dict name) from the checkpoint, as the model runs it."""
        return self.reader.read(self.source[name]).to(device=self.device, dtype=self.dtype)

    def _loader(self, own: list[str], full: list[str]) -> Callable:
        def load(module: nn.Module, args: Any) -> None:
            for leaf, name in zip(own, full, strict=True):
                module._parameters[leaf] = nn.Parameter(self.read(name), requires_grad=False)

        return load

    def _releaser(self, own: list[str]) -> Callable:
        def release(module: nn.Module, args: Any, output: Any) -> None:
            for leaf in own:
                p = module._parameters[leaf]
                if p is not None and p.device.type != "meta":
                    module._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)

        return release

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class LazyState(Mapping[str, torch.Tensor]):
    """The state dict of a streamed model as a mapping that reads each tensor when asked."""

    def __init__(self, weights: StreamedWeights):
        self.weights = weights
        params = dict(weights.model.named_parameters(remove_duplicate=False))
        state = weights.model.state_dict()  # (parameters on meta: no memory)
        self.names = list(state)
        self.buffers = {n: t for n, t in state.items() if n not in params}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.buffers:
            return self.buffers[name]
        if name not in self.weights.source:
            raise KeyError(name)
        return self.weights.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
