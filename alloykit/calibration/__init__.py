"""Calibration: running unlabeled (or labelled) data through a model and keeping the statistics
that data-aware merges need (ESM, RegMean: input Grams; Fisher merging: diagonal Fisher).

``calibrate(model, data, ...)`` takes a Hugging Face folder with a text/JSONL file, or an
``nn.Module`` with a list of batches, and returns statistics (written to ``output`` and reused
when the same model, data and settings come again). A method never opens these files: the
engine reads the entry of each tensor and hands it to the method in its context.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from alloykit.calibration.collect import (
    Target,
    collect_activation_statistics,
    collect_fisher,
    hf_log_probs,
    linear_layers,
)
from alloykit.calibration.statistics import (
    Statistics,
    StatisticsFile,
    StatisticsSource,
    StatisticsWriter,
    gram_of,
    open_statistics,
)
from alloykit.errors import CheckpointError, OutputExistsError, ParameterError

__all__ = [
    "Statistics",
    "StatisticsFile",
    "StatisticsSource",
    "StatisticsWriter",
    "Target",
    "calibrate",
    "collect_activation_statistics",
    "collect_fisher",
    "gram_of",
    "linear_layers",
    "open_statistics",
]

KINDS = ("activations", "fisher")


def calibrate(
    model: str | os.PathLike | torch.nn.Module,
    data: str | os.PathLike | Sequence[Any],
    *,
    kind: str = "activations",
    samples: int | None = 32,
    batch_size: int = 8,
    max_length: int = 128,
    seed: int = 0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    store: str = "auto",
    dtype: str = "float64",
    max_memory: int | None = 2 << 30,
    estimator: str = "empirical",
    log_probs: Callable | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    device: str | torch.device | None = None,
    group_batches: int = 1,
    executor: str = "thread",
    ray_address: str | None = None,
    workers: int | None = None,
    stream_weights: bool | None = None,
) -> StatisticsSource:
    """Statistics of ``model`` over ``data``.

    * ``model``: a Hugging Face folder (its class from ``config.json``, its tokenizer) or an
      ``nn.Module``. ``data``: with a folder, a text file (one sample a line) or JSON Lines
      (``{"text": ..., "label": ...}``), of which ``samples`` are drawn with ``seed``; with a
      module, a list of batches (mappings are passed as keyword arguments; an
      ``attention_mask`` entry marks padding).
    * ``kind``: ``activations`` (input Grams of linear layers) or ``fisher`` (needs labels).
    * ``device``: where the forward passes and the Gram products run (``cuda``, ``cuda:N``;
      default the module's own device); the statistics are stored on the host.
    * ``output``: a safetensors file; if it exists and was made from the same model, data and
      settings it is reused as is, if it was made from others it is refused unless ``force``.
    * ``executor``: ``thread`` (default: this process) or ``ray``: the batches are cut into
      contiguous groups of ``group_batches``, each group (of each pass) summed in a Ray task (a
      model folder is loaded by path in the task: every node must see it; a module travels
      through Ray's object store), on a local Ray or the cluster at ``ray_address``, at most
      ``workers`` tasks at once. The groups' float64 sums are added on the driver in group order,
      and this process sums the same groups in the same order: the statistics are the same bytes
      with either executor and any number of workers. ``group_batches`` (default 1: the plain
      batch-by-batch sum) trades parallelism against the partial sums sent back.
    * ``stream_weights``: a model folder's weights stay in the checkpoint and each module reads
      them (widened to float32) only for its forward (:mod:`alloykit.calibration.lazy`): the
      host holds one module's weights instead of the float32 model (4.4 GB at 1.1 B, 28 GB at
      7 B), and the statistics are the same bytes. The default (None) streams activation
      statistics of a folder on the ``thread`` executor, and loads the whole model where the
      checkpoint lacks a parameter the model has (a head that loading would initialise);
      ``False`` loads the whole model (faster for small models: each forward reads the
      checkpoint again). Fisher statistics
      need gradients of every weight and Ray tasks load the folder themselves: ``True`` is
      refused with them.
    """
    from alloykit.engine.ray_passes import check_executor

    if kind not in KINDS:
        raise ParameterError(f"kind = {kind!r} is not allowed; expected one of {', '.join(KINDS)}")
    check_executor(executor, ray_address)
    if executor == "ray" and device is not None and torch.device(device).type != "cpu":
        raise ParameterError(
            f"device = {device!r} with executor='ray': Ray tasks calibrate on the nodes' CPUs; "
            "drop one of them"
        )
    from alloykit.calibration.data import (
        data_hash,
        load_hf_model,
        model_fingerprint,
        pick,
        read_samples,
        tokenize,
        tokenizer_fingerprint,
    )
    from alloykit.calibration.lazy import LazyState, NotStreamable
    from alloykit.dtypes import parse_dtype

    store_dtype = parse_dtype(dtype, "dtype") or torch.float64
    is_folder = isinstance(model, str | os.PathLike)
    can_stream = is_folder and kind == "activations" and executor == "thread"
    if stream_weights and not can_stream:
        raise ParameterError(
            "stream_weights=True needs a model folder, kind='activations' and executor='thread' "
            f"(got {'a folder' if is_folder else type(model).__name__}, kind={kind!r}, executor={executor!r})"
        )
    stream = can_stream if stream_weights is None else stream_weights
    streamed = None
    rename = None
    tokenizer_hash = None
    folder = None
    if isinstance(model, str | os.PathLike):
        folder = Path(model)
        if isinstance(data, str | os.PathLike):
            items = pick(read_samples(data), samples, seed)
        else:
            raise ParameterError("with a model folder, give data as a text or JSON Lines file path")
        try:
            module, tokenizer, rename, streamed = load_hf_model(folder, stream=stream)
        except NotStreamable as e:
            if stream_weights:  # (asked for: say why not; by default, load it whole instead)
                raise
            if log:
                log(f"{folder}: {e}")
            module, tokenizer, rename, streamed = load_hf_model(folder, stream=False)
        batches = tokenize(tokenizer, items, batch_size, max_length)
        tokenizer_hash = tokenizer_fingerprint(folder)
        data_id = data_hash([items, max_length])
        model_label = str(folder)
    else:
        module = model
        if isinstance(data, str | os.PathLike):
            raise ParameterError("with an nn.Module, give data as a list of batches (tensors or dicts)")
        batches = list(data)  # a module's batches are used as given (``samples`` is for files)
        data_id = data_hash(batches)
        model_label = type(module).__name__
    settings = {
        "kind": kind,
        "include": list(include or []),
        "exclude": list(exclude or []),
        "store": store,
        "dtype": str(store_dtype).removeprefix("torch."),
        "estimator": estimator if kind == "fisher" else None,
        "samples": samples,
        "seed": seed,
        "batch_size": batch_size,
    }
    if group_batches != 1:  # sums grouped otherwise differ in their last bits (never the executor)
        settings["group_batches"] = group_batches
    # (a streamed model's state is read a tensor at a time: the same names and float32 values)
    fingerprint = model_fingerprint(LazyState(streamed) if streamed is not None else module.state_dict())
    meta = {
        "kind": kind,
        "model": {"label": model_label, "fingerprint": fingerprint, "tokenizer": tokenizer_hash},
        "data": data_id,
        "settings": settings,
    }
    if output is not None and Path(output).exists():
        existing = StatisticsFile(output)
        same = (
            existing.meta.get("model", {}).get("fingerprint") == fingerprint
            and existing.meta.get("data") == data_id
            and existing.meta.get("settings") == settings
        )
        if same:
            if log:
                log(f"{output}: statistics of this model, data and settings exist; reused")
            return existing
        if not force:
            raise OutputExistsError(
                f"{output} holds statistics of another model, data or settings; choose another file or "
                "pass force=True (--force) to replace it"
            )
    if device is not None:
        from alloykit.engine.devices import resolve_devices, to_device

        target = resolve_devices(device)[0]
        home = next((p.device for p in module.parameters()), target)
        if streamed is not None:  # (its weights are read onto the device as each module runs)
            streamed.to(target)
            batches = to_device(batches, target)
            home = target
        elif target != home:  # moved back afterwards: a caller's module is left where it was
            module.to(target)
            batches = to_device(batches, target)
    else:
        home = target = None
    task_model = None
    if executor == "ray" and folder is not None:
        from alloykit.calibration.data import FolderModel

        task_model = FolderModel(folder, fingerprint)
    # activation statistics go to the file pass by pass as they are made (not all held until the
    # end: a 1.1 B model's are 4.3 GB beside the model); Fisher's are summed over every parameter
    # at once and written at the end
    writer = StatisticsWriter(output, len(module.state_dict())) if output is not None else None
    try:
        stats = _collect(
            module,
            batches,
            kind,
            sink=writer.add if writer is not None and kind == "activations" else None,
            group_batches=group_batches,
            executor=executor,
            ray_address=ray_address,
            workers=workers,
            task_model=task_model,
            include=include,
            exclude=exclude,
            store=store,
            dtype=store_dtype,
            max_memory=max_memory,
            rename=rename,
            progress=progress,
            log_probs=log_probs,
            estimator=estimator,
            weight_of=streamed.read if streamed is not None else None,
        )
        if writer is not None:
            for name, entry in stats.entries.items():  # (Fisher's; activations went as they came)
                writer.add(name, entry, stats.shared.get(name))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if target != home:
            module.to(home)
    if kind == "activations":
        tokens = {e["tokens"] for e in stats.entries.values()}
        meta["tokens"] = max(tokens, default=writer.tokens if writer is not None else 0)
    meta["samples"] = sum(_batch_size(b) for b in batches)
    stats.meta.update(meta)
    stats.label = model_label
    if writer is not None:
        writer.commit(stats.meta)
        if log:
            log(f"{output}: statistics of {len(writer.params)} tensors written")
        return StatisticsFile(output)
    return stats


def _collect(module: torch.nn.Module, batches: list[Any], kind: str, **options: Any) -> Statistics:
    keys = ("include", "exclude", "dtype", "rename", "progress", "group_batches", "executor", "ray_address",
            "workers", "task_model")  # fmt: skip
    common = {k: options[k] for k in keys}
    if kind == "activations":
        return collect_activation_statistics(
            module, batches, store=options["store"], max_memory=options["max_memory"], sink=options["sink"],
            weight_of=options["weight_of"], **common,
        )  # fmt: skip
    return collect_fisher(
        module,
        batches,
        log_probs=options["log_probs"] or hf_log_probs,
        estimator=options["estimator"],
        **common,
    )


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        first = next((v for v in batch.values() if isinstance(v, torch.Tensor)), None)
        return int(first.shape[0]) if first is not None and first.dim() else 1
    if isinstance(batch, tuple | list):
        return _batch_size(batch[0]) if batch else 0
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    raise CheckpointError(f"cannot read a batch of type {type(batch).__name__}")
