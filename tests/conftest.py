"""Small models built inside the tests, in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SHAPES = {
    "embed.weight": (12, 6),
    "layers.0.attn.weight": (6, 6),
    "layers.0.attn.bias": (6,),
    "layers.1.mlp.weight": (8, 6),
    "layers.1.norm.weight": (6,),
    "head.weight": (3, 6),
}


def make_base(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g).to(dtype) for k, s in SHAPES.items()}


def make_finetunes(
    base: dict[str, torch.Tensor], n: int = 3, scale: float = 0.05, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
        for _ in range(n)
    ]


def save_folder(sd: dict[str, torch.Tensor], folder: Path, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))
    return folder


@pytest.fixture
def toy(tmp_path: Path):
    """A base and three fine-tunes, in memory and as safetensors folders."""
    base = make_base()
    fts = make_finetunes(base)
    paths = [save_folder(sd, tmp_path / f"ft{i}") for i, sd in enumerate(fts)]
    return {
        "base": base,
        "fts": fts,
        "base_path": save_folder(base, tmp_path / "base"),
        "paths": paths,
        "tmp": tmp_path,
    }
