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

Inputs are warmed into the page cache before measuring (``--cold`` evicts them before every run
instead, with ``posix_fadvise(DONTNEED)``); the fraction of input pages resident at the start of
each run is measured with ``mincore`` and printed.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- model shapes

SIZES: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B: 1,100,048,384 parameters.
    "1.1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "shard_size": "2GB",
    },
    # ~19 M parameters; small shards so that the sharded code paths still run.
    # MiniLM-sized (all-MiniLM-L6-v2: 6 layers × 384, FFN 1536, vocab 30522; ~22 M parameters),
    # in the Llama layout the generator writes.
    "minilm": {
        "hidden_size": 384,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "vocab_size": 30522,
        "shard_size": "2GB",
    },
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 32000,
        "shard_size": "16MB",
    },
}
MODELS = ("base", "ft1", "ft2")
INIT_STD = 0.02  # base weights ~ N(0, 0.02²), norms = 1
NOISE_STD = 0.001  # fine-tune = base + N(0, 0.001²): ‖τ‖/‖θ₀‖ ≈ 5 %
GEN_VERSION = 1  # bump when the generated data changes

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
    "ties_approx": {"method": "ties", "base": True, "preset": "paper", "parameters": {"threshold": "approximate"}},
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
    "slerp": {"method": "slerp", "base": True},
}
ALIASES = {"ties": ["ties_paper", "ties_mergekit"]}
TARGETS = {"linear": 2.0, "ties": 3.0}  # ratio to the floor
RSS_TARGET = 1.5 * 2**30

GiB = 2**30


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def llama_config(size: str) -> dict[str, Any]:
    s = SIZES[size]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s["hidden_size"],
        "intermediate_size": s["intermediate_size"],
        "num_hidden_layers": s["num_hidden_layers"],
        "num_attention_heads": s["num_attention_heads"],
        "num_key_value_heads": s["num_key_value_heads"],
        "vocab_size": s["vocab_size"],
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": INIT_STD,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": "bfloat16",
    }


def llama_tensors(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Hugging Face LlamaForCausalLM state dict, in its order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def n_params(shapes: list[tuple[str, tuple[int, ...]]]) -> int:
    total = 0
    for _, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


# --------------------------------------------------------------------------- generation


def _seed(*parts: object) -> int:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _tensor(name: str, shape: tuple[int, ...], model: str):
    import torch

    g = torch.Generator().manual_seed(_seed("base", name))
    if len(shape) == 1:  # RMSNorm weights
        base = torch.ones(shape)
    else:
        base = torch.randn(shape, generator=g).mul_(INIT_STD)
    if model != "base":
        g.manual_seed(_seed(model, name))
        base.add_(torch.randn(shape, generator=g), alpha=NOISE_STD)
    return base.to(torch.bfloat16)


def _shards(shapes: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    used = 0
    for k, (_, shape) in enumerate(shapes):
        nbytes = 2 * n_params([("", shape)])
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += nbytes
    return shards


def generate(root: Path, size: str, shard_size: str, log) -> None:
    """Write (or reuse) base, ft1, ft2 under ``root`` (runs in a child process, so that the
    driver stays small: a child's ru_maxrss starts at its parent's RSS)."""
    from safetensors.torch import save_file

    from alloykit.io import parse_size

    shard_bytes = parse_size(shard_size)

    cfg = llama_config(size)
    shapes = llama_tensors(cfg)
    stamp = {
        "version": GEN_VERSION,
        "config": cfg,
        "shard_bytes": shard_bytes,
        "init_std": INIT_STD,
        "noise_std": NOISE_STD,
    }
    for model in MODELS:
        folder = root / model
        marker = folder / ".bench-complete.json"
        if marker.is_file() and json.loads(marker.read_text()) == stamp:
            log(f"reusing {folder}")
            continue
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        shards = _shards(shapes, shard_bytes)
        weight_map: dict[str, str] = {}
        total = 0
        for s, members in enumerate(shards):
            fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for k in members:
                name, shape = shapes[k]
                tensors[name] = _tensor(name, shape, model)
                weight_map[name] = fname
                total += tensors[name].nbytes
            save_file(tensors, str(folder / fname), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        marker.write_text(json.dumps(stamp))
        log(
            f"generated {folder}: {len(shards)} shards, {total / 1e9:.2f} GB in "
            f"{time.perf_counter() - t0:.1f} s"
        )


# --------------------------------------------------------------------------- page cache


def _shard_files(folders: list[Path]) -> list[Path]:
    return [p for f in folders for p in sorted(f.glob("*.safetensors"))]


def cached_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' pages resident in the page cache (``mincore``); None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        page = os.sysconf("SC_PAGE_SIZE")
        resident = total = 0
        for path in files:
            size = path.stat().st_size
            if size == 0:
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
                if addr is None or addr == ctypes.c_void_p(-1).value:
                    return None
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                rc = libc.mincore(addr, size, vec)
                libc.munmap(addr, size)
                if rc != 0:
                    return None
                raw = bytes(vec)
                resident += pages - raw.count(0)  # low bit set = resident; other bits reserved
                total += pages
            finally:
                os.close(fd)
        return resident / total if total else None
    except (OSError, AttributeError):
        return None


def evict(files: list[Path]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# --------------------------------------------------------------------------- one measurement
# Runs in a fresh interpreter: ``bench_merge.py --child JSON``; prints one JSON line.


def _floor(job: dict[str, Any]) -> dict[str, Any]:
    from alloykit.engine.executor import make_executor
    from alloykit.engine.memory import PeakRSS
    from alloykit.io import StreamingWriter, open_checkpoint, parse_size

    readers = [open_checkpoint(p) for p in job["inputs"]]
    keep = readers[0]  # the tensor written: the base's (3-input floor) or the first fine-tune's
    names = sorted(keep.keys(), key=_natural_key)
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
    models = job["inputs"][1:]
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


def _vm_hwm() -> int | None:
    """This process's own RSS high-water mark (VmHWM, per address space: unlike ru_maxrss it
    does not start at the parent's RSS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(job: dict[str, Any]) -> None:
    if job["variant"] == "generate":
        generate(
            Path(job["root"]),
            job["size"],
            job["shard_size"],
            lambda msg: print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True),
        )
        return
    import cProfile
    import io
    import pstats

    import torch  # imported before timing: not part of the measurement

    import alloykit  # noqa: F401

    # The engine may set its own intra-op thread count for the run (cores // workers); record the
    # count in effect during the run, not only the one the process started with.
    job["torch_threads"] = torch.get_num_threads()
    set_threads = torch.set_num_threads

    def spy(n: int) -> None:
        if "threads_set" not in job:
            job["threads_set"] = n
        set_threads(n)

    torch.set_num_threads = spy

    fn = _floor if job["variant"].startswith("floor") else _merge
    prof = cProfile.Profile() if job.get("profile") else None
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    out = fn(job)
    if prof:
        prof.disable()
    out["seconds"] = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    out["user_seconds"] = ru1.ru_utime - ru0.ru_utime
    out["sys_seconds"] = ru1.ru_stime - ru0.ru_stime
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["vm_hwm"] = _vm_hwm()
    out["torch_threads"] = job.get("threads_set", job["torch_threads"])
    if prof:
        prof.dump_stats(job["profile"])
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(30)
        out["profile_text"] = text.getvalue()
    print("BENCH-RESULT " + json.dumps(out), flush=True)


# --------------------------------------------------------------------------- driver


def alloykit_version() -> dict[str, Any]:
    """Which alloykit was measured: git HEAD, whether alloykit/ has uncommitted changes, and a
    digest of its sources (the working tree is what runs, committed or not)."""
    import importlib.util

    spec = importlib.util.find_spec("alloykit")
    if spec is None or not spec.submodule_search_locations:
        return {}
    pkg = Path(next(iter(spec.submodule_search_locations)))
    h = hashlib.sha256()
    for f in sorted(pkg.rglob("*.py")):
        h.update(str(f.relative_to(pkg)).encode() + b"\0" + f.read_bytes())
    out: dict[str, Any] = {"path": str(pkg), "sources_sha256": h.hexdigest()[:12]}

    def git(*a: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(pkg.parent), *a], capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode == 0:
        out["git_head"] = head.stdout.strip()
        out["dirty"] = git("diff", "--quiet", "HEAD", "--", str(pkg)).returncode != 0
    return out


def exclusive(workdir: Path, log):
    """Hold a lock on the work folder: two benchmark runs at once share 2 cores and make each
    other's timings meaningless, so a second run waits for the first."""
    workdir.mkdir(parents=True, exist_ok=True)
    f = open(workdir / ".bench.lock", "w")  # held for the process lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another benchmark holds {workdir}/.bench.lock; waiting for it to finish")
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


def run_child(job: dict[str, Any], timeout: float | None, torch_threads: int | None = None) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(job)]
    env = dict(os.environ)
    if torch_threads:
        # Every thread's OpenMP team size (worker threads do not inherit set_num_threads).
        env.update(OMP_NUM_THREADS=str(torch_threads), MKL_NUM_THREADS=str(torch_threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{job['variant']} failed (exit {proc.returncode}):\n{proc.stderr}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH-RESULT "))
    out = json.loads(line.removeprefix("BENCH-RESULT "))
    out["process_seconds"] = wall
    return out


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


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def print_table(rows: list[dict[str, Any]], footnotes: list[str], title: str) -> None:
    headers = [
        "method",
        "workers",
        "threads",
        "wall s",
        "× floor",
        "target",
        "cpu s (usr+sys)",
        "peak RSS GiB (report)",
        "ru_maxrss GiB",
        "VmHWM GiB",
        "baseline GiB",
        "read GB/s",
        "passes",
        "in cache",
    ]
    body = []
    for r in rows:
        target = r.get("target")
        ratio = r.get("ratio")
        verdict = "-"
        if target is not None and ratio is not None:
            verdict = f"≤{target:g}× " + ("ok" if ratio <= target else "MISS")
        body.append(
            [
                r["label"],
                str(r["workers"]),
                str(r.get("torch_threads", "-")),
                f"{r['seconds']:.2f}",
                f"{ratio:.2f}" if ratio is not None else "-",
                verdict,
                f"{r['user_seconds']:.1f}+{r['sys_seconds']:.1f}" if "user_seconds" in r else "-",
                _gib(r["peak_rss"]) + ("" if r["peak_rss"] <= RSS_TARGET else " !"),
                _gib(r["ru_maxrss"]) + ("" if r["ru_maxrss"] <= RSS_TARGET else " !"),
                _gib(r.get("vm_hwm")) + ("" if (r.get("vm_hwm") or 0) <= RSS_TARGET else " !"),
                _gib(r["baseline_rss"]),
                f"{r['bytes_read'] / r['seconds'] / 1e9:.2f}",
                str(r.get("reduction_passes", 0)),
                "-" if r["cached"] is None else f"{r['cached']:.0%}",
            ]
        )
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)))
        for f in footnotes:
            print(f)
        return
    table = Table(title=title, caption="\n".join(footnotes), caption_justify="left")
    for h in headers:
        table.add_column(h, justify="left" if h in ("method", "target") else "right")
    for b in body:
        table.add_row(*b)
    Console(width=200).print(table)


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
        help="input and output shard size (default: 2GB for 1.1b, 16MB for tiny)",
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
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        child(json.loads(args.child))
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
    gen = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        json.dumps({"variant": "generate", "root": str(root), "size": args.size, "shard_size": shard_size}),
    ]
    subprocess.run(gen, check=True)
    folders = {m: root / m for m in MODELS}
    inputs = [str(folders[m]) for m in MODELS]
    all_files = _shard_files([folders[m] for m in MODELS])
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
        read_files = _shard_files([folders[m] for m in (MODELS if uses_base else MODELS[1:])])
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
            r = run_child(job, args.timeout, args.torch_threads)
            shutil.rmtree(output, ignore_errors=True)
            r.update(variant=variant, cached=cached, load_before=load, load_after=os.getloadavg()[0])
            log(
                f"  {r['seconds']:.2f} s, peak RSS {_gib(r['peak_rss'])} GiB, ru_maxrss "
                f"{_gib(r['ru_maxrss'])} GiB, VmHWM {_gib(r.get('vm_hwm'))} GiB"
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
    print_table(results, notes, f"alloykit merge benchmark ({args.size}, workers {workers_txt})")
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
