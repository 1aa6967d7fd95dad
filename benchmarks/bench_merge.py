#!/usr/bin/env python3
"""Benchmark alloykit's streaming merges of real-sized, sharded safetensors checkpoints.

What it does
------------
1. Generates (once, cached under ``--workdir``) a Llama-shaped base model and two fine-tunes
   (base + small seeded noise), bf16, in Hugging Face layout: ``config.json``,
   ``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``. Shards are written
   one at a time, so generation holds one shard in memory.
2. Measures a FLOOR: read every input tensor with alloykit's reader and write an output of the same
   dtype and sharding with alloykit's ``StreamingWriter``, doing no arithmetic. There are two
   floors: reading 3 checkpoints (base + 2 fine-tunes: what the task-vector methods read) and
   reading 2 (the fine-tunes: what ``linear`` reads). Each method is compared with the floor
   that reads the same inputs.
3. Times ``alloykit.merge(...)`` for each method into an output folder, each in a fresh
   subprocess, and reports wall time, ratio to the floor, the merge report's sampled peak RSS and
   the child's kernel high-water mark (``ru_maxrss``).

Examples::

    python benchmarks/bench_merge.py --size tiny              # smoke run, ~20 M parameters
    python benchmarks/bench_merge.py                          # 1.1 B (TinyLlama shape)
    python benchmarks/bench_merge.py --methods linear,ties --workers 1,2,4
    python benchmarks/bench_merge.py --size tiny --profile --methods ties_paper
    python benchmarks/bench_merge.py --size 7b --plan           # what the 7B shape needs; no data

Inputs are warmed into the page cache before measuring (``--cold`` evicts them before every run
instead, with ``posix_fadvise(DONTNEED)``); the fraction of input pages resident at the start of
each run is measured with ``mincore`` and printed.

``--plan`` prints what a size needs (parameters, shards, disk) and generates nothing, e.g.
``--size 7b --plan`` before committing 40 GB of disk to the Llama-2-7B shape.

Modules: ``_models.py`` (sizes, shapes, the seeded generator), ``_measure.py`` (page cache, child
processes, RSS), ``_table.py`` (the table); ``bench_vs_mergekit.py`` runs mergekit 0.1.5 and
alloykit side by side on the same checkpoints and recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helper modules beside this file

from _measure import (
    alloykit_version,
    cached_fraction,
    evict,
    exclusive,
    measure_here,
    run_child,
    shard_files,
    warm,
)
from _models import (
    MODELS,
    SIZES,
    describe_plan,
    generate,
    generate_in_child,
    llama_config,
    llama_tensors,
    n_params,
    natural_key,
)
from _models import plan as plan_size
from _table import RSS_TARGET, gib, print_merge_table

__all__ = ["MODELS", "RSS_TARGET", "SIZES", "TARGETS", "VARIANTS", "main"]

# --------------------------------------------------------------------------- methods

# name -> merge() arguments. "base": whether the base model is passed (linear does not use one).
VARIANTS: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear", "base": False},
    # The same without the provenance's content digest (sha256 of every byte read).
    "linear_nodigest": {"method": "linear", "base": False, "options": {"digest": False}},
    "task_arithmetic": {"method": "task_arithmetic", "base": True},
    # Paper preset: whole-model top-k (2 radix-select passes); the model-wide sign majority is
    # summed in the merge pass. _approx: the 1-pass bucket-edge threshold.
    "ties_paper": {"method": "ties", "base": True, "preset": "paper"},
    "ties_approx": {
        "method": "ties",
        "base": True,
        "preset": "paper",
        "parameters": {"threshold": "approximate"},
    },
    # mergekit preset: per-tensor exact top-k (argsort). Its default density is 1.0 (no trim at
    # all), so density 0.2 is given to make it trim, like the paper preset's default.
    "ties_mergekit": {"method": "ties", "base": True, "preset": "mergekit", "parameters": {"density": 0.2}},
    # mergekit preset with its own default density 1.0: no top-k, election only.
    "ties_mergekit_d1": {"method": "ties", "base": True, "preset": "mergekit"},
    "dare": {"method": "dare", "base": True, "parameters": {"density": 0.5}},
    "neuromerging": {"method": "neuromerging", "base": True},
    # svd=auto (default): float64 Gram eigendecompositions where well conditioned; _exact: the
    # reference code's torch.linalg.svd everywhere.
    "tsv_m": {"method": "tsv_m", "base": True},
    "tsv_m_exact": {"method": "tsv_m", "base": True, "parameters": {"svd": "exact"}},
    "iso_c": {"method": "iso_c", "base": True},
    "iso_c_exact": {"method": "iso_c", "base": True, "parameters": {"svd": "exact"}},
    "iso_cts": {"method": "iso_cts", "base": True},
    "iso_cts_exact": {"method": "iso_cts", "base": True, "parameters": {"svd": "exact"}},
    "consensus": {"method": "consensus", "base": True},
    "pcb": {"method": "pcb", "base": True},
    "magmax": {"method": "magmax", "base": True},
    "breadcrumbs": {"method": "breadcrumbs", "base": True},
    "della": {"method": "della", "base": True},
    "model_stock": {"method": "model_stock", "base": True},
    # SLERP interpolates the base and one fine-tune.
    "slerp": {"method": "slerp", "base": True, "models": 1},
}
ALIASES = {"ties": ["ties_paper", "ties_mergekit"]}
TARGETS = {"linear": 2.0, "ties": 3.0}  # ratio to the floor


# --------------------------------------------------------------------------- one measurement
# Runs in a fresh interpreter: ``bench_merge.py --child JSON``; prints one JSON line.


def _floor(job: dict[str, Any]) -> dict[str, Any]:
    from alloykit.engine.executor import make_executor
    from alloykit.engine.memory import PeakRSS
    from alloykit.io import StreamingWriter, open_checkpoint, parse_size

    readers = [open_checkpoint(p) for p in job["inputs"]]
    keep = readers[0]  # the tensor written: the base's (3-input floor) or the first fine-tune's
    names = sorted(keep.keys(), key=natural_key)
    metas = [keep.meta(n) for n in names]
    max_bytes = parse_size(job["max_memory"]) if job.get("max_memory") else None
    executor = make_executor(job["workers"], max_bytes)
    read_bytes = 0

    # The floor streams the way the engine does (1M-element slices, reused buffers), so that a
    # method's ratio measures its arithmetic, not a slower way of reading.
    from alloykit.engine.executor import intra_op_threads
    from alloykit.engine.memory import tune_allocator

    tune_allocator()
    step = 1 << 20
    slices = [(m, s, min(step, m.numel - s)) for m in metas for s in range(0, max(m.numel, 1), step)]

    def one(item) -> int:
        meta, start, length = item
        tensors = [r.read_range(meta.name, start, length) for r in readers]
        writer.write(meta.name, tensors[0], start)
        return sum(t.nbytes for t in tensors)

    with (
        PeakRSS() as rss,
        intra_op_threads(),
        StreamingWriter(job["output"], metas, parse_size(job["shard_size"]), force=True) as writer,
    ):
        costs = ((s, s[2] * s[0].dtype.itemsize * (len(readers) + 1)) for s in slices)
        for _, n in executor.run(one, costs):
            read_bytes += n
        writer.copy_companions(keep.folder)
        writer.commit()
    return {
        "peak_rss": rss.peak,
        "baseline_rss": rss.baseline,
        "bytes_read": read_bytes,
        "bytes_written": sum(m.nbytes for m in metas),
        "workers": getattr(executor, "workers", 1),
    }


def _merge(job: dict[str, Any]) -> dict[str, Any]:
    import alloykit

    v = VARIANTS[job["variant"]]
    base = job["inputs"][0] if v["base"] else None
    models = job["inputs"][1:][: v.get("models")]
    result = alloykit.merge(
        models,
        base,
        v["method"],
        job["output"],
        preset=v.get("preset"),
        parameters=v.get("parameters"),
        out_dtype="bfloat16",
        workers=job["workers"],
        max_memory=job.get("max_memory"),
        shard_size=job["shard_size"],
        force=True,
        **v.get("options", {}),
    )
    rep = result.report
    assert rep is not None
    return {
        "peak_rss": rep.peak_rss,
        "baseline_rss": rep.baseline_rss,
        "bytes_read": rep.bytes_read,
        "bytes_written": rep.bytes_written,
        "reduction_passes": rep.reduction_passes,
        "workers": rep.workers,
        "engine_seconds": rep.seconds,
    }


def child(job: dict[str, Any]) -> None:
    """One measurement in this fresh interpreter: ``bench_merge.py --child JSON``; prints one
    ``BENCH-RESULT`` JSON line (the data generator prints nothing)."""
    if job["variant"] == "generate":
        generate(
            Path(job["root"]),
            job["size"],
            job["shard_size"],
            lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True),
        )
        return
    measure_here(_floor if job["variant"].startswith("floor") else _merge, job)


# --------------------------------------------------------------------------- driver


def expand_methods(text: str) -> list[str]:
    out: list[str] = []
    for name in (s.strip() for s in text.split(",") if s.strip()):
        for v in ALIASES.get(name, [name]):
            if v not in VARIANTS:
                known = ", ".join([*VARIANTS, *ALIASES])
                raise SystemExit(f"unknown method {name!r}; known: {known}")
            if v not in out:
                out.append(v)
    return out


def parse_workers(text: str) -> list[int | None]:
    out: list[int | None] = []
    for w in text.split(","):
        w = w.strip()
        out.append(None if w in ("", "auto") else int(w))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1.1b")
    ap.add_argument(
        "--methods",
        default="linear,task_arithmetic,ties,dare",
        help=f"comma list of {', '.join([*VARIANTS, *ALIASES])} (ties = ties_paper + ties_mergekit)",
    )
    ap.add_argument(
        "--workers", default="auto", help="comma list of worker counts, e.g. 1,2,4 (auto: alloykit's default)"
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch intra-op threads in each run (OMP_NUM_THREADS; default: torch's "
        "own, = cores): workers × threads > cores oversubscribes the CPUs. alloykit's engine may "
        "override it during a merge; the table shows the count in effect",
    )
    ap.add_argument("--max-memory", default=None, help="merge(max_memory=...), e.g. 1GB")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/alloykit-bench"))
    ap.add_argument(
        "--shard-size",
        default=None,
        help="input and output shard size (default: 16MB for tiny, 2GB for the others)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per measurement; the fastest is reported")
    ap.add_argument(
        "--cold", action="store_true", help="evict the inputs from the page cache before every run"
    )
    ap.add_argument("--no-floor", action="store_true", help="skip the floor measurements")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="run each method once under cProfile (workers=1, the profiler only "
        "sees the main thread) and print the hot spots",
    )
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child run")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--plan",
        action="store_true",
        help="print the size's parameter count, shards and the disk it needs (and has); generate "
        "and run nothing",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        child(json.loads(args.child))
        return 0
    if args.plan:
        print(describe_plan(plan_size(args.size, args.shard_size, args.workdir / args.size)))
        return 0

    def log(msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    lock = exclusive(args.workdir, log)  # noqa: F841  (released at exit)
    version = alloykit_version()
    log(f"alloykit: {version}")
    variants = expand_methods(args.methods)
    workers_list = parse_workers(args.workers)
    shard_size = args.shard_size or SIZES[args.size]["shard_size"]
    root = args.workdir / args.size
    cfg = llama_config(args.size)
    shapes = llama_tensors(cfg)
    log(
        f"size {args.size}: {n_params(shapes) / 1e9:.3f} B parameters, "
        f"{2 * n_params(shapes) / 1e9:.2f} GB per model (bf16), shards of {shard_size}"
    )
    # The driver never imports torch and never holds tensors: children inherit its RSS as the
    # starting value of their ru_maxrss.
    generate_in_child(root, args.size, shard_size, log)
    folders = {m: root / m for m in MODELS}
    inputs = [str(folders[m]) for m in MODELS]
    all_files = shard_files([folders[m] for m in MODELS])
    out_root = root / "outputs"
    if out_root.exists():  # leftovers of an interrupted run (temporary folders included)
        shutil.rmtree(out_root)
    out_root.mkdir()

    if args.cold:
        log("cold runs: inputs are evicted from the page cache before each run")
    else:
        t0 = time.perf_counter()
        warm(all_files)
        log(f"warmed the page cache with the inputs in {time.perf_counter() - t0:.1f} s")

    if args.profile:
        workers_list = [1]
    plan: list[tuple[str, int | None]] = []
    if not args.no_floor and not args.profile:
        for w in workers_list:
            plan += [("floor_3in", w), ("floor_2in", w)]
    for v in variants:
        for w in workers_list:
            plan.append((v, w))

    results: list[dict[str, Any]] = []
    for variant, w in plan:
        uses_base = variant == "floor_3in" or (variant in VARIANTS and VARIANTS[variant]["base"])
        # merges always get [base, ft1, ft2] (and pass the base only if the method uses one)
        job_inputs = inputs if uses_base or variant in VARIANTS else inputs[1:]
        read_files = shard_files([folders[m] for m in (MODELS if uses_base else MODELS[1:])])
        best = None
        for rep in range(args.repeat if not args.profile else 1):
            output = out_root / f"out-{variant}-w{w}"
            if output.exists():
                shutil.rmtree(output)
            if args.cold:
                evict(all_files)
            cached = cached_fraction(read_files)
            load = os.getloadavg()[0]
            job = {
                "variant": variant,
                "inputs": job_inputs,
                "output": str(output),
                "workers": w,
                "max_memory": args.max_memory,
                "shard_size": shard_size,
            }
            if args.profile:
                job["profile"] = str(root / f"profile-{variant}.prof")
            log(
                f"run {variant} workers={w or 'auto'} #{rep + 1} "
                f"(inputs {'?' if cached is None else f'{cached:.0%}'} in page cache)"
            )
            r = run_child(__file__, job, args.timeout, args.torch_threads)
            shutil.rmtree(output, ignore_errors=True)
            r.update(variant=variant, cached=cached, load_before=load, load_after=os.getloadavg()[0])
            log(
                f"  {r['seconds']:.2f} s, peak RSS {gib(r['peak_rss'])} GiB, ru_maxrss "
                f"{gib(r['ru_maxrss'])} GiB, VmHWM {gib(r.get('vm_hwm'))} GiB"
            )
            if args.profile:
                print(f"\n===== cProfile: {variant} (workers=1) =====\n{r['profile_text']}")
            if best is None or r["seconds"] < best["seconds"]:
                best = r
        assert best is not None
        v = VARIANTS.get(variant)
        label = variant
        if v is not None:
            extra = {k: val for k, val in (v.get("parameters") or {}).items()}
            if v.get("preset"):
                extra = {"preset": v["preset"], **extra}
            if extra:
                label += " (" + ", ".join(f"{k}={val}" for k, val in extra.items()) + ")"
        best.update(label=label, workers_req=w)
        best.pop("profile_text", None)
        results.append(best)

    # ratios against the floor with the same inputs and workers
    floors = {
        (r["variant"], r["workers_req"]): r["seconds"] for r in results if r["variant"].startswith("floor")
    }
    for r in results:
        if r["variant"].startswith("floor"):
            fl = r["seconds"]
        else:
            key = "floor_3in" if VARIANTS[r["variant"]]["base"] else "floor_2in"
            fl = floors.get((key, r["workers_req"]))
        r["ratio"] = r["seconds"] / fl if fl else None
        method = VARIANTS[r["variant"]]["method"] if r["variant"] in VARIANTS else None
        r["target"] = TARGETS.get(method) if method else None

    cached = [r["cached"] for r in results if r["cached"] is not None]
    notes = [
        f"{args.size}: {n_params(shapes) / 1e9:.3f} B params, bf16, "
        f"{2 * n_params(shapes) / 1e9:.2f} GB per model, shards {shard_size}; out_dtype "
        f"bfloat16, compute dtype float32 (alloykit default); best of {args.repeat}.",
        "wall s: the child's time around merge()/the floor (plan, read, compute, write, fsync "
        "and commit), not interpreter or torch start-up.",
        "× floor: against floor_3in (base + 2 fine-tunes read) for methods with a base, "
        "floor_2in (2 fine-tunes) for linear, at the same worker count.",
        "peak RSS (report): merge report's sampled peak (psutil every 20 ms); ru_maxrss and "
        "VmHWM: the child's kernel high-water marks (whole process, including the baseline of "
        "Python + torch; the driver stays small so ru_maxrss is not inflated by it). "
        "'!' = over the 1.5 GiB target.",
        "in cache: fraction of the run's input pages in the page cache at its start (mincore). "
        + (
            "Inputs were evicted before each run (--cold): reads came from disk."
            if args.cold
            else "Inputs were generated/warmed just before, so reads came from the page cache "
            "(memory bandwidth, not disk)"
            + (f": {min(cached):.0%}–{max(cached):.0%} resident." if cached else ".")
        ),
        "passes: reduction passes before the merge pass (each reads all inputs again).",
        "threads: torch intra-op threads in effect during the run (the engine may set its own, "
        "e.g. cores // workers).",
        f"alloykit {version.get('git_head', '?')}"
        + (" + uncommitted changes" if version.get("dirty") else "")
        + f", sources sha256 {version.get('sources_sha256', '?')}; {os.cpu_count()} CPUs; "
        f"1-min load average around the runs: {min(r['load_before'] for r in results):.1f}–"
        f"{max(max(r['load_before'], r['load_after']) for r in results):.1f} (a load above "
        f"{os.cpu_count()} means other processes shared the CPUs: wall times are then inflated; "
        "cpu s is the child's own user+sys time, which contention inflates less).",
    ]
    workers_txt = ",".join("auto" if w is None else str(w) for w in workers_list)
    print_merge_table(results, notes, f"alloykit merge benchmark ({args.size}, workers {workers_txt})")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": args.size,
                    "shard_size": shard_size,
                    "cold": args.cold,
                    "alloykit": version,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
