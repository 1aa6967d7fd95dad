"""The output folder's ``README.md``: a Hugging Face model card (YAML front matter, then prose)
that says how the model was made: the method and its source, the inputs, the recipe."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


def _hub_name(folder: Path | None) -> str | None:
    """The model's own name where its config records one (``_name_or_path``), else None."""
    if folder is None:
        return None
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = cfg.get("_name_or_path")
    return name if isinstance(name, str) and name and not name.startswith(("/", ".")) else None


def model_card(
    *,
    method: str,
    method_doc: str,
    models: list[str],
    base: str | None,
    base_folder: Path | None,
    recipe: Mapping[str, Any],
    has_config: bool,
) -> str:
    """The card's text. ``method_doc``: the method's docstring (its first paragraph is quoted)."""
    front: dict[str, Any] = {}
    base_name = _hub_name(base_folder) or base
    if base_name:
        front["base_model"] = base_name
    if has_config:
        front["library_name"] = "transformers"
    front["tags"] = ["merge", "alloykit", method]
    summary = " ".join(method_doc.strip().split("\n\n")[0].split())
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [
        "# Merged model",
        "",
        f"Made with [alloykit](https://github.com/alloykit/alloykit) by merging {len(models)} "
        f"model(s) with **{method}**, without further training.",
        "",
        f"> {summary}",
        "",
        "## Inputs",
        "",
    ]
    if base:
        lines.append(f"- base: `{base}`")
    lines += [f"- model: `{m}`" for m in models]
    lines += [
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(dict(recipe), sort_keys=False).strip(),
        "```",
        "",
        "`alloykit_provenance.json` beside this card records every parameter each tensor got and a "
        "digest of every input's tensors.",
        "",
    ]
    return "\n".join(lines)
