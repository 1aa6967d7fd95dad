"""The chat template of a merged model (mergekit's ``chat_template`` option).

``auto`` takes the template most of the input models carry (the first such when they tie, in the
order the models are given); a name takes one of the common formats below; anything else must be
a Jinja template. The template is written beside the copied tokenizer files, as
``chat_template.jinja`` (what ``transformers`` reads) and in ``tokenizer_config.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from alloykit.errors import RecipeError

# Common chat formats, by the names mergekit uses for them.
NAMED = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
    ),
}


def model_template(folder: Path | None) -> str | None:
    """The chat template a model folder carries (``chat_template.jinja``, else the one in
    ``tokenizer_config.json``; of several named ones, ``default``), stripped; None without."""
    if folder is None:
        return None
    jinja = Path(folder) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text().strip() or None
    config = Path(folder) / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text()).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(template, list):  # [{"name": ..., "template": ...}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def resolve_chat_template(choice: str, folders: list[Path | None]) -> str | None:
    """The template for ``choice`` (``auto``, a name of :data:`NAMED` or a Jinja template);
    None for ``auto`` when no input model has one."""
    if choice == "auto":
        found = [t for t in (model_template(f) for f in folders) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if choice in NAMED:
        return NAMED[choice]
    if "{" not in choice or len(choice) < 20:
        raise RecipeError(
            f"chat_template {choice!r}: expected auto, one of {', '.join(NAMED)}, or a Jinja template"
        )
    return choice


def write_chat_template(folder: Path, template: str) -> None:
    """Put ``template`` in ``folder`` (an output being written) as ``transformers`` reads it."""
    (folder / "chat_template.jinja").write_text(template)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        data["chat_template"] = template
        config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
