"""The output's chat template (mergekit's ``chat_template``): auto takes the plurality of the
inputs' templates, names give the common formats, a Jinja string is taken as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import alloykit  # noqa: E402
from alloykit.errors import RecipeError  # noqa: E402
from alloykit.recipe.schema import recipe_from_dict  # noqa: E402
from tests.conftest import save_folder  # noqa: E402

MINE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
THEIRS = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _tokenizer(folder: Path, template: str | None) -> None:
    words = ["<unk>", "<s>", "</s>", "hi", "hello"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(folder)


@pytest.fixture
def family(tmp_path: Path) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 4, generator=g)}
    out = {"base": save_folder(base, tmp_path / "base")}
    for i, template in enumerate([MINE, THEIRS, MINE]):
        out[f"ft{i}"] = save_folder(
            {"w": base["w"] + 0.01 * torch.randn(4, 4, generator=g)}, tmp_path / f"ft{i}"
        )
        _tokenizer(out[f"ft{i}"], template)
    _tokenizer(out["base"], THEIRS)
    return out


def _merge(family: dict[str, Path], out: Path, chat_template: str) -> transformers.PreTrainedTokenizerBase:
    data = {
        "merge_method": "task_arithmetic",
        "base_model": str(family["base"]),
        "models": [{"model": str(family[f"ft{i}"]), "parameters": {"weight": 0.5}} for i in range(3)],
        "chat_template": chat_template,
    }
    alloykit.merge(**recipe_from_dict(data).merge_kwargs(), output=out)
    return transformers.AutoTokenizer.from_pretrained(out)


def test_auto_takes_the_template_most_inputs_carry(family: dict[str, Path], tmp_path: Path) -> None:
    # ft0 and ft2 carry MINE; the base and ft1 THEIRS: a tie, the first in input order (the base) wins
    tok = _merge(family, tmp_path / "tie", "auto")
    assert tok.chat_template.strip() == THEIRS
    (family["base"] / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((family["base"] / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (family["base"] / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = _merge(family, tmp_path / "plurality", "auto")
    assert tok.chat_template.strip() == MINE  # two of three fine-tunes
    assert tok.apply_chat_template(CHAT, tokenize=False) == "<user>hi<assistant>hello"


def test_named_and_literal_templates(family: dict[str, Path], tmp_path: Path) -> None:
    tok = _merge(family, tmp_path / "chatml", "chatml")
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    tok = _merge(family, tmp_path / "literal", THEIRS)
    assert tok.apply_chat_template(CHAT, tokenize=False) == "[user] hi[assistant] hello"
    with pytest.raises(RecipeError, match=r"chat_template 'chatgpt': expected auto, one of chatml"):
        _merge(family, tmp_path / "bad", "chatgpt")
    assert not (tmp_path / "bad").exists()
