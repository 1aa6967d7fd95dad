#!/usr/bin/env python3
"""alloykit against mergekit 0.1.5, side by side: the same checkpoints, the same mergekit YAML,
each tool run as a whole process (interpreter start-up included), one after the other.

What it does
------------
1. Reuses (or generates, in a child process) the Llama-shaped bf16 base + 2 fine-tunes of
   ``bench_merge.py --size`` under ``--workdir``.
2. Writes one mergekit YAML per recipe (linear, task_arithmetic, ties, dare_ties,
   breadcrumbs_ties, della, slerp; density 0.2 where a method trims).
3. For each recipe, warms the inputs in the page cache, then runs
   ``mergekit-yaml RECIPE OUT --lazy-unpickle --out-shard-size N ...`` (CPU, no tokenizer copy,
   quiet) and ``alloykit merge RECIPE -o OUT --shard-size S --no-progress``, each as a child of
   this (small, torch-free) driver, measuring the wall time from spawn to exit, the peak RSS of
   the child's process tree (psutil, every 20 ms) and the kernel's ``ru_maxrss`` of the child
   (``wait4``: the per-child form of ``getrusage(RUSAGE_CHILDREN).ru_maxrss``).
4. Compares the two outputs in a third child, one tensor at a time and in row blocks
   (``safe_open``/``get_slice``: the comparison holds a few MB): tensor names, dtypes, shapes,
   bit-identical bytes, and the max abs diff where they differ.
5. Prints one row per recipe: both times, the speed-up (mergekit ÷ alloykit), both peaks and
   their ratio (alloykit ÷ mergekit), identical bytes, and the targets of issue 14 (whole
   process: ≥ 10× for the TIES family, ≥ 4× for linear and task_arithmetic, alloykit's peak RSS
   ≤ 1.5 GiB), with the machine (CPUs, load average).

``--mergekit CMD`` runs a mergekit-yaml of another environment (e.g.
``--mergekit /opt/mk/bin/mergekit-yaml``); by default the one beside this interpreter, then the
one on PATH. Without mergekit the script says so and exits 0.

dare_ties and della draw random masks: mergekit from torch's global generator in execution order,
alloykit from a generator per (tensor, model), so their bytes cannot match (the parity tests
compare them with a shared deterministic mask); the table says "random" and gives the max diff.

Examples::

    python benchmarks/bench_vs_mergekit.py --size tiny
    python benchmarks/bench_vs_mergekit.py --size 1.1b --recipes linear,task_arithmetic --json vs.json
    python benchmarks/bench_vs_mergekit.py --size 7b --recipes ties --timeout 7200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helper modules beside this file

from _measure import (
    alloykit_version,
    describe_version,
    exclusive,
    log,
    machine,
    measure_process,
    print_result,
    read_result,
    shard_files,
    warm,
)
from _models import MODELS, SIZES, describe_plan, generate_in_child, parse_size
from _models import plan as plan_size
from _table import RSS_TARGET, gib, print_rows

DENSITY = 0.2
WEIGHT = 0.5

# recipe name -> merge_method, whether the base is given, parameters per fine-tune (None: slerp's base +
# ft1), global parameters
RECIPES: dict[str, dict[str, Any]] = {
    "linear": {"method": "linear", "base": False, "per_model": {}, "global": {}},
    "task_arithmetic": {"method": "task_arithmetic", "base": True, "per_model": {}, "global": {}},
    "ties": {"method": "ties", "base": True, "per_model": {"density": DENSITY}, "global": {}},
    "dare_ties": {"method": "dare_ties", "base": True, "per_model": {"density": DENSITY}, "global": {}},
    "breadcrumbs_ties": {
        "method": "breadcrumbs_ties",
        "base": True,
        "per_model": {"density": DENSITY, "gamma": 0.01},
        "global": {},
    },
    # mergekit's della: keep probability density ± epsilon, which must lie in (0, 1)
    "della": {
        "method": "della",
        "base": True,
        "per_model": {"density": DENSITY, "epsilon": 0.1},
        "global": {},
    },
    # slerp: the base and one fine-tune
    "slerp": {"method": "slerp", "base": True, "per_model": None, "global": {"t": 0.5}},
}
RANDOM = {"dare_ties", "della"}  # random masks: bytes cannot match mergekit's
# issue 14, item 4: whole process, mergekit ÷ alloykit
SPEEDUP_TARGETS = {
    "linear": 4.0,
    "task_arithmetic": 4.0,
    "ties": 10.0,
    "dare_ties": 10.0,
    "breadcrumbs_ties": 10.0,
    "della": 10.0,
}


def recipe_yaml(name: str, folders: dict[str, Path]) -> str:
    """The mergekit YAML of recipe ``name`` (written by hand: the driver does not import yaml)."""
    r = RECIPES[name]
    lines = [f"merge_method: {r['method']}"]
    if r["base"]:
        lines.append(f"base_model: {folders['base']}")
    lines.append("models:")
    if r["per_model"] is None:  # slerp: the base and ft1
        lines += [f"  - model: {folders['base']}", f"  - model: {folders['ft1']}"]
    else:
        for m in MODELS[1:]:
            lines.append(f"  - model: {folders[m]}")
            params = {"weight": WEIGHT, **r["per_model"]}
            lines.append("    parameters: {" + ", ".join(f"{k}: {v}" for k, v in params.items()) + "}")
    if r["global"]:
        lines.append("parameters: {" + ", ".join(f"{k}: {v}" for k, v in r["global"].items()) + "}")
    lines.append("dtype: bfloat16")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- finding the tools


def _beside_python(name: str) -> str | None:
    path = Path(sys.executable).parent / name
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def find_mergekit(option: str | None) -> list[str] | None:
    if option:
        cmd = shlex.split(option)
        return cmd if shutil.which(cmd[0]) or Path(cmd[0]).is_file() else None
    found = _beside_python("mergekit-yaml") or shutil.which("mergekit-yaml")
    return [found] if found else None


def find_alloykit(option: str | None) -> list[str]:
    if option:
        return shlex.split(option)
    found = _beside_python("alloykit")
    return [found] if found else [sys.executable, "-m", "alloykit.cli.main"]


def mergekit_version(cmd: list[str]) -> str:
    """mergekit's version in the environment of ``cmd`` (the interpreter in its #! line)."""
    python = sys.executable
    try:
        first = Path(shutil.which(cmd[0]) or cmd[0]).read_bytes()[:200].split(b"\n")[0]
        if first.startswith(b"#!"):
            python = first[2:].decode().strip().split()[0]
    except OSError:
        pass
    probe = "import importlib.metadata as m; print(m.version('mergekit'))"
    try:
        proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return proc.stdout.strip() or "?"


def mergekit_has(cmd: list[str], option: str) -> bool:
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=300)
    return option in proc.stdout


# --------------------------------------------------------------------------- comparing outputs
# Runs in a child: ``bench_vs_mergekit.py --compare A B``; prints one BENCH-RESULT line.


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / f for name, f in weight_map.items()}
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            out.update(dict.fromkeys(f.keys(), shard))
    return out


def compare(a: Path, b: Path, block_elements: int = 1 << 22) -> dict[str, Any]:
    """Compare the tensors of two model folders one tensor (and one block of rows) at a time."""
    import torch
    from safetensors import safe_open

    fa, fb = _tensor_files(a), _tensor_files(b)
    only_a, only_b = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    dtype_mismatch: list[str] = []
    shape_mismatch: list[str] = []
    differing: list[str] = []
    diff_elements = 0
    total_elements = 0
    max_diff = 0.0
    dtypes: set[str] = set()
    handles: dict[Path, Any] = {}

    def handle(path: Path):
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path]

    for name in sorted(set(fa) & set(fb)):
        sa, sb = handle(fa[name]).get_slice(name), handle(fb[name]).get_slice(name)
        shape_a, shape_b = list(sa.get_shape()), list(sb.get_shape())
        if shape_a != shape_b:
            shape_mismatch.append(f"{name}: {shape_a} != {shape_b}")
            continue
        dtypes.add(sa.get_dtype())
        if sa.get_dtype() != sb.get_dtype():
            dtype_mismatch.append(f"{name}: {sa.get_dtype()} != {sb.get_dtype()}")
        rows = shape_a[0] if shape_a else 1
        per_row = max(1, math.prod(shape_a[1:]))
        step = max(1, block_elements // per_row)
        tensor_differs = False
        for start in range(0, rows, step):
            if shape_a:
                x, y = sa[start : start + step], sb[start : start + step]
            else:
                x, y = handle(fa[name]).get_tensor(name), handle(fb[name]).get_tensor(name)
            total_elements += x.numel()
            if x.dtype == y.dtype and x.element_size() in ints:
                it = ints[x.element_size()]
                neq = x.contiguous().view(it) != y.contiguous().view(it)
            else:
                neq = x.double() != y.double()
            n = int(neq.sum())
            if n:
                tensor_differs = True
                diff_elements += n
                d = (x.double() - y.double()).abs()
                max_diff = max(max_diff, float(torch.nan_to_num(d, nan=float("inf")).max()))
        if tensor_differs:
            differing.append(name)
    identical = not (only_a or only_b or dtype_mismatch or shape_mismatch or differing)
    return {
        "identical": identical,
        "tensors": len(set(fa) & set(fb)),
        "only_mergekit": only_a[:10],
        "only_alloykit": only_b[:10],
        "dtype_mismatch": dtype_mismatch[:10],
        "shape_mismatch": shape_mismatch[:10],
        "differing_tensors": len(differing),
        "differing_examples": differing[:5],
        "differing_elements": diff_elements,
        "elements": total_elements,
        "max_abs_diff": max_diff,
        "dtypes": sorted(dtypes),
    }


# --------------------------------------------------------------------------- driver


def _fmt_s(m: dict[str, Any] | None) -> str:
    if m is None:
        return "-"
    if m.get("timed_out"):
        return f">{m['seconds']:.0f} (timeout)"
    if m["returncode"] != 0:
        return f"failed ({m['returncode']})"
    return f"{m['seconds']:.2f}"


def _cpu(m: dict[str, Any] | None) -> str:
    return f"{m['user_seconds'] + m['sys_seconds']:.1f}" if _ok(m) else "-"


def _ok(m: dict[str, Any] | None) -> bool:
    return m is not None and m["returncode"] == 0 and not m.get("timed_out")


def _row(r: dict[str, Any]) -> list[str]:
    mk, ak, cmp_ = r.get("mergekit"), r.get("alloykit"), r.get("compare")
    speed = None
    if _ok(ak) and (_ok(mk) or (mk and mk.get("timed_out"))):
        speed = mk["seconds"] / ak["seconds"]
    lower_bound = bool(mk and mk.get("timed_out"))
    mem = ak["peak_rss"] / mk["peak_rss"] if _ok(ak) and _ok(mk) and mk["peak_rss"] else None
    if cmp_ is None:
        same = "-"
    elif "error" in cmp_:
        same = "compare failed"
    elif cmp_["identical"]:
        same = "yes"
    else:
        why = []
        if cmp_["only_mergekit"] or cmp_["only_alloykit"]:
            why.append("names differ")
        if cmp_["dtype_mismatch"]:
            why.append("dtypes differ")
        if cmp_["shape_mismatch"]:
            why.append("shapes differ")
        if cmp_["differing_elements"]:
            why.append(
                f"max diff {cmp_['max_abs_diff']:.2g}, "
                f"{cmp_['differing_elements'] / max(cmp_['elements'], 1):.1%} of entries"
            )
        same = ("no, random: " if r["recipe"] in RANDOM else "no: ") + "; ".join(why)
    target = SPEEDUP_TARGETS.get(r["recipe"])
    verdict = "-"
    if target is not None:
        verdict = f"≥{target:g}× "
        if speed is None or (lower_bound and speed < target and ak["peak_rss"] <= RSS_TARGET):
            verdict += "?"  # no time, or mergekit timed out before the speed-up reached the target
        else:
            rss_ok = ak["peak_rss"] <= RSS_TARGET
            verdict += "PASS" if speed >= target and rss_ok else "MISS"
            if not rss_ok:
                verdict += " (RSS)"
    elif _ok(ak):
        verdict = "RSS ok" if ak["peak_rss"] <= RSS_TARGET else "RSS MISS"
    return [
        r["recipe"],
        _fmt_s(mk),
        _fmt_s(ak),
        "-" if speed is None else ("≥" if lower_bound else "") + f"{speed:.2f}",
        gib(mk["peak_rss"]) if _ok(mk) else "-",
        gib(ak["peak_rss"]) if _ok(ak) else "-",
        "-" if mem is None else f"{mem:.2f}",
        (gib(mk["ru_maxrss"]) if _ok(mk) else "-") + " / " + (gib(ak["ru_maxrss"]) if _ok(ak) else "-"),
        _cpu(mk) + " / " + _cpu(ak),
        same,
        verdict,
        f"{r['load_before']:.1f}–{r['load_after']:.1f}",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child run (each tool)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--mergekit",
        default=None,
        help="mergekit-yaml command, e.g. the one of another environment (default: the one beside "
        "this Python, then PATH)",
    )
    ap.add_argument(
        "--alloykit",
        default=None,
        help="alloykit command (default: the one beside this Python, else python -m alloykit.cli.main)",
    )
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/alloykit-bench"))
    ap.add_argument(
        "--shard-size", default=None, help="input and output shard size (default: bench_merge's for --size)"
    )
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and recipe; the fastest is reported")
    ap.add_argument("--keep-outputs", action="store_true", help="keep both outputs of every recipe")
    ap.add_argument("--no-compare", action="store_true", help="skip the output comparison")
    ap.add_argument(
        "--plan", action="store_true", help="print what --size needs on disk (and has); run nothing"
    )
    ap.add_argument("--show-recipes", action="store_true", help="print the YAML of each recipe and exit")
    ap.add_argument("--compare", nargs=2, type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.compare is not None:  # child
        print_result(compare(*args.compare))
        return 0

    recipes = [s.strip() for s in args.recipes.split(",") if s.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    shard_size = args.shard_size or SIZES[args.size]["shard_size"]
    root = args.workdir / args.size
    folders = {m: root / m for m in MODELS}
    if args.plan:
        print(describe_plan(plan_size(args.size, shard_size, root)))
        return 0
    if args.show_recipes:
        for name in recipes:
            print(f"# {name}\n{recipe_yaml(name, folders)}")
        return 0

    mergekit = find_mergekit(args.mergekit)
    if mergekit is None:
        where = (
            f"{args.mergekit!r} not found"
            if args.mergekit
            else "no mergekit-yaml beside this Python or on PATH"
        )
        print(
            f"mergekit not installed: {where}; install mergekit 0.1.5 (here or in another environment) "
            "and pass --mergekit /path/to/mergekit-yaml"
        )
        return 0
    alloykit_cmd = find_alloykit(args.alloykit)
    mk_version = mergekit_version(mergekit)
    version = alloykit_version()
    log(f"mergekit {mk_version}: {shlex.join(mergekit)}")
    if mk_version != "0.1.5":
        log(f"warning: the targets and alloykit's mergekit presets are for mergekit 0.1.5, not {mk_version}")
    log(f"alloykit: {shlex.join(alloykit_cmd)}; {describe_version(version)}")

    lock = exclusive(args.workdir, log)  # noqa: F841  (released at exit)
    plan = plan_size(args.size, shard_size, root)
    log(describe_plan(plan).replace("\n", "\n    "))
    generate_in_child(root, args.size, shard_size, log)
    free = shutil.disk_usage(root).free
    if free < 2.05 * plan["bytes_per_model"]:
        raise SystemExit(
            f"not enough disk under {root} for the two outputs of a recipe: "
            f"{2 * plan['bytes_per_model'] / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free"
        )

    work = root / "vs-mergekit"
    if work.exists():  # leftovers of an interrupted run
        shutil.rmtree(work)
    (work / "recipes").mkdir(parents=True)
    (work / "logs").mkdir()
    files_all = shard_files([folders[m] for m in MODELS])

    mk_opts = ["--no-cuda", "--no-copy-tokenizer", "--quiet", "--random-seed", "0"]
    if mergekit_has(mergekit, "--lazy-unpickle"):
        mk_opts.append("--lazy-unpickle")
    # mergekit counts a shard in parameters, alloykit in bytes; the inputs are bf16 (2 bytes)
    mk_opts += ["--out-shard-size", str(parse_size(shard_size) // 2)]
    ak_opts = ["--shard-size", shard_size, "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    # For scale: a bare interpreter importing torch (what either tool pays before any work).
    torch_import = measure_process([sys.executable, "-c", "import torch"], env=env)
    log(f"python -c 'import torch': {torch_import['seconds']:.2f} s, {gib(torch_import['peak_rss'])} GiB")

    results: list[dict[str, Any]] = []
    for name in recipes:
        recipe = work / "recipes" / f"{name}.yml"
        recipe.write_text(recipe_yaml(name, folders))
        row: dict[str, Any] = {"recipe": name, "load_before": os.getloadavg()[0]}
        outs = {"mergekit": work / f"out-{name}-mergekit", "alloykit": work / f"out-{name}-alloykit"}
        cmds = {
            "mergekit": [*mergekit, str(recipe), str(outs["mergekit"]), *mk_opts],
            "alloykit": [*alloykit_cmd, "merge", str(recipe), "-o", str(outs["alloykit"]), *ak_opts],
        }
        for tool in ("mergekit", "alloykit"):
            runs = []
            for rep in range(args.repeat):
                shutil.rmtree(outs[tool], ignore_errors=True)
                warm(files_all)
                log(f"{name}: {tool} #{rep + 1} ({shlex.join(cmds[tool])})")
                log_path = work / "logs" / f"{name}-{tool}.log"
                m = measure_process(cmds[tool], timeout=args.timeout, env=env, log_path=log_path)
                m["command"] = cmds[tool]
                runs.append(m)
                status = "timed out" if m["timed_out"] else f"exit {m['returncode']}"
                log(
                    f"  {status}, {m['seconds']:.2f} s, cpu {m['user_seconds'] + m['sys_seconds']:.1f} s, "
                    f"peak RSS {gib(m['peak_rss'])} GiB (ru_maxrss {gib(m['ru_maxrss'])} GiB, "
                    f"{m['samples']} samples)"
                )
                if not _ok(m):
                    if not m["timed_out"]:
                        tail = log_path.read_text(errors="replace")[-2000:]
                        log(f"  {tool} failed; end of its log:\n{tail}")
                    break
            ok = [m for m in runs if _ok(m)]
            best = min(ok, key=lambda m: m["seconds"]) if len(ok) == len(runs) else runs[-1]
            best["runs_seconds"] = [m["seconds"] for m in runs]
            row[tool] = best
        if not args.no_compare and _ok(row["mergekit"]) and _ok(row["alloykit"]):
            cmd = [sys.executable, os.path.abspath(__file__), "--compare", str(outs["mergekit"])]
            proc = subprocess.run([*cmd, str(outs["alloykit"])], capture_output=True, text=True)
            if proc.returncode == 0:
                row["compare"] = read_result(proc.stdout)
            else:
                row["compare"] = {"error": proc.stderr[-2000:]}
                log(f"  comparison failed:\n{proc.stderr[-2000:]}")
            c = row["compare"]
            if "error" not in c:
                log(
                    f"  identical: {c['identical']} ({c['tensors']} tensors, {c['differing_tensors']} "
                    f"differ, max abs diff {c['max_abs_diff']:.3g})"
                )
        row["load_after"] = os.getloadavg()[0]
        if not args.keep_outputs:
            for out in outs.values():
                shutil.rmtree(out, ignore_errors=True)
        results.append(row)

    mach = machine()
    headers = [
        "recipe",
        "mergekit s",
        "alloykit s",
        "speed-up",
        "mergekit peak GiB",
        "alloykit peak GiB",
        "memory ratio",
        "ru_maxrss GiB mk / ak",
        "cpu s mk / ak",
        "identical bytes",
        "target",
        "load",
    ]
    notes = [
        f"{args.size}: {plan['parameters'] / 1e9:.3f} B params, bf16, {plan['bytes_per_model'] / 1e9:.2f} GB "
        f"per model, shards {shard_size}; recipes: mergekit YAML, weight {WEIGHT} each, density "
        f"{DENSITY} where a method trims, dtype bfloat16 (--show-recipes prints them).",
        "s: whole process, spawn to exit, interpreter and torch start-up included "
        f"(python -c 'import torch' alone: {torch_import['seconds']:.2f} s, "
        f"{gib(torch_import['peak_rss'])} GiB); best of {args.repeat}. speed-up = mergekit s ÷ alloykit s. "
        "cpu s: the child's user + sys time (wait4), which CPU contention inflates less than s.",
        "peak GiB: the largest sum of RSS over the child and its descendants (psutil, every 20 ms); "
        "memory ratio = alloykit ÷ mergekit. ru_maxrss: the kernel's high-water mark of the child "
        "(wait4; the driver imports no torch, so it does not inflate it).",
        "identical bytes: same tensor names, dtypes, shapes and bytes; otherwise the max abs diff. "
        "dare_ties and della draw random masks (mergekit: torch's global generator in execution "
        "order), so their bytes cannot match.",
        "target (issue 14): whole-process speed-up ≥ 10× for the TIES family, ≥ 4× for linear and "
        f"task_arithmetic, and alloykit's peak RSS ≤ {RSS_TARGET / 2**30:g} GiB.",
        f"mergekit {mk_version} ({shlex.join(mergekit)} {shlex.join(mk_opts)}); alloykit: "
        f"{shlex.join(alloykit_cmd)} merge … {shlex.join(ak_opts)}; {describe_version(version)}.",
        f"machine: {mach['cpus']} CPUs ({mach.get('cpu', '?')}), "
        f"{mach.get('memory_bytes', 0) / 2**30:.0f} GiB RAM; 1-min load average per row in 'load' (a load "
        f"above {mach['cpus']} means other processes shared the CPUs: times are inflated, the "
        "ratios within one row less so). Inputs warmed in the page cache before each run.",
    ]
    print_rows(
        headers,
        [_row(r) for r in results],
        notes,
        f"alloykit vs mergekit {mk_version} ({args.size})",
        left=("recipe", "identical bytes", "target"),
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "size": args.size,
                    "shard_size": shard_size,
                    "plan": plan,
                    "mergekit": {"command": mergekit, "options": mk_opts, "version": mk_version},
                    "alloykit": {"command": alloykit_cmd, "options": ak_opts, **version},
                    "machine": mach,
                    "torch_import": torch_import,
                    "results": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
