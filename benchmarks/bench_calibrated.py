#!/usr/bin/env python3
"""The data-aware merges end to end on the generated Llama checkpoints, as a user runs them:
``alloykit calibrate`` on each fine-tune, then ``alloykit merge`` of a recipe that names the
statistics files, each step a whole process.

What it does
------------
1. Reuses (or generates, in a child) the bf16 base + 2 fine-tunes of ``bench_merge.py --size``
   under ``--workdir``, and gives each folder a word-level tokenizer of the model's vocabulary
   (``w4`` … ``w{V-1}``, written with ``tokenizers``/``transformers``: the generated models have
   none) and each fine-tune a seeded text file of ``--samples`` lines of random words.
2. Runs ``alloykit calibrate FT --data … --samples N --max-length L -o FT.stats.safetensors``
   for each fine-tune (the model runs in float32; its input Grams go to the file pass by pass).
3. Runs ``alloykit merge`` for ``linear`` (the baseline of the same run: reads the same
   checkpoints, no statistics) and for each of ``--methods`` (default ``esm,regmean``) with the
   statistics.
4. Prints one row per step: wall time from spawn to exit, CPU time, the peak RSS of the process
   tree (psutil, every 20 ms) and the kernel's ``ru_maxrss``; merges also as a ratio of time to the
   linear merge of the same run. ``--json`` writes the rows.

Examples::

    python benchmarks/bench_calibrated.py --size tiny
    python benchmarks/bench_calibrated.py --size 1.1b --methods esm --timeout 10800
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the helper modules beside this file

from _measure import GiB, exclusive, log, machine, measure_process
from _models import SIZES, generate_in_child

DEFAULT_WORKDIR = Path("/tmp/alloykit-bench")
WORDS_PER_SAMPLE = 160  # more words than --max-length tokens: every sample is cut to L


def write_tokenizers(folders: list[Path], vocab_size: int) -> None:
    """A word-level tokenizer over ``[UNK] [BOS] [EOS] [PAD] w4 … w{V-1}`` in each folder (run in
    a child: it imports transformers)."""
    code = (
        "import sys\n"
        "from tokenizers import Tokenizer, models, pre_tokenizers\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "v = int(sys.argv[1])\n"
        "vocab = {'[UNK]': 0, '[BOS]': 1, '[EOS]': 2, '[PAD]': 3, **{f'w{i}': i for i in range(4, v)}}\n"
        "tok = Tokenizer(models.WordLevel(vocab, unk_token='[UNK]'))\n"
        "tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()\n"
        "fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='[UNK]', pad_token='[PAD]',\n"
        "                               bos_token='[BOS]', eos_token='[EOS]')\n"
        "for folder in sys.argv[2:]:\n"
        "    fast.save_pretrained(folder)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(vocab_size), *map(str, folders)], check=True)


def write_data(path: Path, lines: int, vocab_size: int, seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(lines):
            f.write(" ".join(f"w{rng.randrange(4, vocab_size)}" for _ in range(WORDS_PER_SAMPLE)) + "\n")


def recipe(root: Path, method: str, statistics: list[Path] | None) -> str:
    lines = [f"method: {method}", f"base_model: {root / 'base'}", "models:"]
    for i, ft in enumerate(("ft1", "ft2")):
        stats = f", statistics: {statistics[i]}" if statistics else ""
        lines.append(f"  - {{model: {root / ft}{stats}}}")
    return "\n".join(lines) + "\n"


def alloykit_cli() -> list[str]:
    return [sys.executable, "-m", "alloykit.cli.main"]


def step(name: str, cmd: list[str], work: Path, timeout: float | None) -> dict[str, Any]:
    log(f"{name}: {' '.join(cmd[3:])}")
    m = measure_process(cmd, timeout=timeout, log_path=work / f"{name}.log")
    if m["returncode"] != 0:
        tail = (work / f"{name}.log").read_text(errors="replace")[-2000:]
        raise SystemExit(f"{name} failed (exit {m['returncode']}):\n{tail}")
    log(f"{name}: {m['seconds']:.1f} s, peak {m['peak_rss'] / GiB:.2f} GiB")
    return {"step": name, **m}


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two statistics files hold the same names and tensors (read one at a time)."""
    from safetensors import safe_open

    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--methods", default="esm,regmean")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--timeout", type=float, default=None, help="seconds per step")
    ap.add_argument("--json", type=Path, default=None)
    loading = ("comma list of how calibration gets the weights: stream (read per module, the default) "
               "and/or whole (the float32 model loaded); the first mode's statistics feed the merges, "
               "and with both the files are checked to hold the same tensors")  # fmt: skip
    ap.add_argument("--loading", default="stream", help=loading)
    args = ap.parse_args(argv)
    modes = [m for m in args.loading.split(",") if m]
    if not modes or set(modes) - {"stream", "whole"}:
        ap.error(f"--loading {args.loading!r}: expected stream and/or whole")

    root = args.workdir / args.size
    work = root / "calibrated"
    vocab = SIZES[args.size]["vocab_size"]
    with exclusive(args.workdir):
        generate_in_child(root, args.size, SIZES[args.size]["shard_size"], log)
        work.mkdir(parents=True, exist_ok=True)
        write_tokenizers([root / m for m in ("base", "ft1", "ft2")], vocab)
        rows = []
        stats = []
        pairs = []  # (checked after every measured step: reading the files grows this process,
        # and a child forked from it would count those pages in its ru_maxrss)
        for i, ft in enumerate(("ft1", "ft2")):
            data = work / f"{ft}.txt"
            write_data(data, args.samples, vocab, seed=i)
            files = []
            for mode in modes:
                out = work / f"{ft}.{mode}.stats.safetensors"
                out.unlink(missing_ok=True)  # (measured, not reused)
                flag = "--stream-weights" if mode == "stream" else "--load-whole-model"
                cmd = alloykit_cli() + ["calibrate", str(root / ft), "--data", str(data), "-o", str(out),
                                        "--samples", str(args.samples), "--max-length", str(args.max_length),
                                        "--no-progress", flag]  # fmt: skip
                rows.append(step(f"calibrate {ft} ({mode})", cmd, work, args.timeout))
                files.append(out)
            if len(files) > 1:
                pairs.append((ft, files))
            stats.append(files[0])
        baseline = None
        for method in ["linear", *[m for m in args.methods.split(",") if m]]:
            path = work / f"{method}.yml"
            path.write_text(recipe(root, method, None if method == "linear" else stats))
            output = work / f"out-{method}"
            cmd = alloykit_cli() + ["merge", str(path), "-o", str(output), "--force", "--no-progress"]
            row = step(f"merge {method}", cmd, work, args.timeout)
            shutil.rmtree(output, ignore_errors=True)
            baseline = baseline or row["seconds"]
            row["vs_linear"] = row["seconds"] / baseline
            rows.append(row)
        for ft, files in pairs:
            log(f"{ft}: the {' and '.join(modes)} files hold the same tensors: {same_tensors(*files)}")
    info = machine()
    load = ", ".join(f"{x:.1f}" for x in info["load"])
    print(f"\n{args.size}: 2 fine-tunes, {args.samples} samples × {args.max_length} tokens; "
          f"{info.get('cpus')} CPUs ({info.get('cpu', '?')}), load {load}")  # fmt: skip
    print("| step | wall s | × linear | CPU s | peak RSS GiB | ru_maxrss GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ratio = f"{r['vs_linear']:.1f}" if "vs_linear" in r else ""
        cpu = r["user_seconds"] + r["sys_seconds"]
        print(f"| {r['step']} | {r['seconds']:.1f} | {ratio} | {cpu:.0f} | {r['peak_rss'] / GiB:.2f} | "
              f"{r['ru_maxrss'] / GiB:.2f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "machine": info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
