"""Llama-shaped synthetic checkpoints for the benchmarks: model sizes, the Hugging Face config and
state-dict shapes, and the seeded generator that writes base + 2 fine-tunes to disk (sharded, with
``model.safetensors.index.json``), once, under the benchmarks' work folder.

Imports nothing heavy at module level: the benchmark drivers import this module and must stay
small (a child's ``ru_maxrss`` starts at its parent's RSS); ``torch`` and ``safetensors`` are
imported inside :func:`generate`, which runs in a child process.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- model shapes

SIZES: dict[str, dict[str, Any]] = {
    # Llama-2-7B: 6,738,415,616 parameters, 13.5 GB per model in bf16 (40 GB for the three).
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "shard_size": "2GB",
    },
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
    # ~19 M parameters; small shards so that the sharded code paths still run.
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
BYTES_PER_PARAM = 2  # bf16


def natural_key(name: str) -> list[Any]:
    """Sort key putting ``layers.10`` after ``layers.9``."""
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


def shards_of(shapes: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[int]]:
    """Indices of ``shapes`` per shard: tensors in order, a new shard when the next one does not fit."""
    shards: list[list[int]] = [[]]
    used = 0
    for k, (_, shape) in enumerate(shapes):
        nbytes = BYTES_PER_PARAM * n_params([("", shape)])
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += nbytes
    return shards


def parse_size(text: str) -> int:
    """``"2GB"`` → bytes: the rules of ``alloykit.io.parse_size`` (decimal units, ``GiB`` binary),
    repeated here because importing ``alloykit.io`` imports torch, which the drivers avoid."""
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    units.update({"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1})
    for unit, factor in units.items():  # noqa: B007 (used after the loop)
        if s.endswith(unit):
            number = s[: -len(unit)]
            break
    else:
        number, factor = s, 1
    value = float(number)
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return int(value * factor)


def plan(size: str, shard_size: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """What :func:`generate` would write for ``size``, without writing (or importing torch):
    parameter count, bytes per model, shards, the disk it needs and, given ``root``, whether the
    data is already there and how much space is free."""
    shard_size = shard_size or SIZES[size]["shard_size"]
    cfg = llama_config(size)
    shapes = llama_tensors(cfg)
    params = n_params(shapes)
    shard_bytes = parse_size(shard_size)
    shards = shards_of(shapes, shard_bytes)
    largest = max(BYTES_PER_PARAM * n_params([("", s)]) for _, s in shapes)
    out: dict[str, Any] = {
        "size": size,
        "parameters": params,
        "tensors": len(shapes),
        "bytes_per_model": BYTES_PER_PARAM * params,
        "shard_size": shard_size,
        "shards_per_model": len(shards),
        "disk_bytes": BYTES_PER_PARAM * params * len(MODELS),
        # generation holds one shard (bf16) plus the float32 draft of its largest tensor
        "generate_peak_bytes": min(shard_bytes, BYTES_PER_PARAM * params) + 2 * largest,
    }
    if root is not None:
        stamp = _stamp(cfg, shard_bytes)
        done = [m for m in MODELS if _complete(root / m, stamp)]
        out["root"] = str(root)
        out["generated"] = done
        out["disk_bytes_missing"] = BYTES_PER_PARAM * params * (len(MODELS) - len(done))
        probe = root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        out["disk_free"] = shutil.disk_usage(probe).free
    return out


def describe_plan(p: dict[str, Any]) -> str:
    lines = [
        f"size {p['size']}: {p['parameters']:,} parameters ({p['parameters'] / 1e9:.3f} B), "
        f"{p['tensors']} tensors",
        f"  {p['bytes_per_model'] / 1e9:.2f} GB per model (bf16), {p['shards_per_model']} shards of "
        f"≤ {p['shard_size']}; {len(MODELS)} models = {p['disk_bytes'] / 1e9:.1f} GB on disk",
        f"  generation holds ≈ {p['generate_peak_bytes'] / 1e9:.1f} GB at a time (one shard); a merge "
        f"writes another {p['bytes_per_model'] / 1e9:.1f} GB: bench_merge needs "
        f"{(p['disk_bytes'] + p['bytes_per_model']) / 1e9:.1f} GB in all, bench_vs_mergekit (two "
        f"outputs kept to compare them) {(p['disk_bytes'] + 2 * p['bytes_per_model']) / 1e9:.1f} GB",
    ]
    if "root" in p:
        lines.append(
            f"  {p['root']}: generated {', '.join(p['generated']) or 'nothing yet'}; still to write "
            f"{p['disk_bytes_missing'] / 1e9:.1f} GB, {p['disk_free'] / 1e9:.1f} GB free"
            + (" (NOT ENOUGH)" if p["disk_bytes_missing"] > p["disk_free"] else "")
        )
    return "\n".join(lines)


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


def _stamp(cfg: dict[str, Any], shard_bytes: int) -> dict[str, Any]:
    """Written beside a complete model; a model whose stamp differs is generated again."""
    return {
        "version": GEN_VERSION,
        "config": cfg,
        "shard_bytes": shard_bytes,
        "init_std": INIT_STD,
        "noise_std": NOISE_STD,
    }


def _complete(folder: Path, stamp: dict[str, Any]) -> bool:
    marker = folder / ".bench-complete.json"
    return marker.is_file() and json.loads(marker.read_text()) == stamp


def generate(root: Path, size: str, shard_size: str, log: Callable[[str], None]) -> None:
    """Write (or reuse) base, ft1, ft2 under ``root`` (runs in a child process, so that the
    driver stays small: a child's ru_maxrss starts at its parent's RSS)."""
    from safetensors.torch import save_file

    from alloykit.io import parse_size as alloykit_parse_size

    shard_bytes = alloykit_parse_size(shard_size)

    cfg = llama_config(size)
    shapes = llama_tensors(cfg)
    stamp = _stamp(cfg, shard_bytes)
    for model in MODELS:
        folder = root / model
        if _complete(folder, stamp):
            log(f"reusing {folder}")
            continue
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        shards = shards_of(shapes, shard_bytes)
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
        (folder / ".bench-complete.json").write_text(json.dumps(stamp))
        log(
            f"generated {folder}: {len(shards)} shards, {total / 1e9:.2f} GB in "
            f"{time.perf_counter() - t0:.1f} s"
        )


def generate_in_child(root: Path, size: str, shard_size: str, log: Callable[[str], None]) -> None:
    """Make sure base, ft1 and ft2 of ``size`` are under ``root``: generate them in a child
    process (torch is imported there, never in the driver). Refuses, before writing anything,
    when the free disk space is short of what is still to write."""
    import subprocess
    import sys

    p = plan(size, shard_size, root)
    if p["disk_bytes_missing"] > p["disk_free"]:
        raise SystemExit(
            f"not enough disk for --size {size} under {root}: {p['disk_bytes_missing'] / 1e9:.1f} GB "
            f"to write, {p['disk_free'] / 1e9:.1f} GB free (--workdir elsewhere?)"
        )
    if p["disk_bytes_missing"]:
        log(f"generating {p['disk_bytes_missing'] / 1e9:.1f} GB under {root}")
    cmd = [sys.executable, str(Path(__file__).resolve()), "generate", str(root), size, shard_size]
    subprocess.run(cmd, check=True)


def _main(argv: list[str]) -> int:
    """``python _models.py [plan] [SIZE ...]``: the plans, nothing written;
    ``python _models.py generate ROOT SIZE SHARD_SIZE``: generate (what the drivers run)."""
    if argv[:1] == ["generate"]:
        root, size, shard_size = argv[1:4]
        generate(Path(root), size, shard_size, _log)
        return 0
    if argv[:1] == ["plan"]:
        argv = argv[1:]
    for name in argv or sorted(SIZES):
        print(describe_plan(plan(name, root=Path("/tmp/alloykit-bench") / name)))
    return 0


def _log(msg: str) -> None:
    import sys

    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    import sys

    sys.exit(_main(sys.argv[1:]))
