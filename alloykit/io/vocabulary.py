"""One vocabulary for models whose tokenizers differ (mergekit's ``tokenizer_source``).

The output tokenizer is the base's (``base``), one model's (a path) or the union of all
(``union``: the base's tokens with their ids, then every other model's tokens it lacks, in the
order of the models and of each model's own ids, then the added/special tokens). Every model's
token-indexed tensors (embeddings, LM head) are then read in the output's token order: the row of
output token *t* is the model's own row for *t* when it has the token; otherwise

* a token of a ``tokens:`` entry takes what the entry says (a model's row for that token or for
  another token, or zeros; ``force`` applies it to every model, also those that have the token);
* a token only one model has takes that model's row (in every model: its task vector is zero);
* a token the base has takes the base's row;
* any other token takes the mean of the rows of the models that have it;
* a token no model has gets zeros (with a warning).

This is mergekit 0.1.5's rule set (``tokenizer/build.py``, ``tokenizer/embed.py``). Deviations,
both where mergekit's result depends on hash order and changes from run to run: union tokens are
added in model order and each model's id order (mergekit iterates a ``get_vocab()`` dict, a hash
map), and without a base model the first model's tokenizer is the base (mergekit takes the first
of a ``set``). Rows of mergekit's output match ours token for token.

A :class:`VocabularyReader` presents one model's checkpoint this way, reading only the rows a job
needs (runs of consecutive rows), so the engine merges, slices and writes as for any tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alloykit.errors import CheckpointError, ParameterError
from alloykit.io.readers import CheckpointReader, TensorMeta

LOG = logging.getLogger(__name__)

# Token-indexed tensors: these names, when their first axis is the model's vocabulary size.
_TOKEN_INDEXED = re.compile(
    r"(embed_tokens|tok_embeddings|word_embeddings|wte|embed_in|embed_out|lm_head|shared)\.(weight|bias)$"
    r"|(^|\.)output\.weight$"
)

# A default row: taken from one model (reader index, its row), the mean of the models that have
# the token, or zeros.
FROM_MODEL, MEAN, ZERO = 0, 1, 2


@dataclass
class TokenRule:
    """A ``tokens:`` entry: where token ``token``'s row comes from."""

    kind: str  # "model" (that model's row for the token), "model_token" (another token), "zero"
    model: int | None = None  # reader index
    token: str | None = None
    token_id: int | None = None
    force: bool = False


@dataclass
class TokenizerSpec:
    """What the user asked: ``source`` is ``base``, ``union`` or a model folder; ``tokens`` maps a
    token to ``{"source": path | {"kind": "zero"} | {"kind": "model_token", "model": path,
    "token": str | "token_id": int}, "force": bool}``; ``base``: the folder whose tokenizer is the
    base (mergekit's base_model when it is one more input, e.g. for ``linear``)."""

    source: str = "union"
    tokens: dict[str, Any] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    base: str | None = None


def config_vocab_size(folder: Path | None) -> int | None:
    """``vocab_size`` from a model's config.json (a VLM's ``text_config``), or None."""
    path = folder / "config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    cfg = json.loads(path.read_text())
    for c in (cfg, cfg.get("text_config") or {}):
        if isinstance(c.get("vocab_size"), int):
            return c["vocab_size"]
    return None


def _has_tokenizer(folder: Path | None) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")
    return folder is not None and any((folder / n).is_file() for n in names)


def load_tokenizer(folder: Path | None, label: str) -> Any:
    from transformers import AutoTokenizer

    if not _has_tokenizer(folder):
        raise CheckpointError(
            f"{label}: no tokenizer files in {folder} (tokenizer.json, tokenizer.model, ...)"
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except Exception as e:  # transformers raises many kinds; the message is what matters
        raise CheckpointError(f"{label}: cannot load the tokenizer in {folder}: {e}") from None


def strip_unused(tokenizer: Any, vocab_size: int, label: str) -> Any:
    """The tokenizer without tokens whose id is ≥ ``vocab_size`` (rows the model does not have)."""
    unused = {t for t, i in tokenizer.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tokenizer
    data = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else None
    if data is None or data["model"]["type"] != "BPE":
        kind = data["model"]["type"] if data else "a slow tokenizer"
        raise CheckpointError(
            f"{label}: its tokenizer has {len(unused)} tokens beyond the model's {vocab_size} rows, and "
            f"removing them is supported for BPE tokenizers only ({kind})"
        )
    from tokenizers import Tokenizer

    data["added_tokens"] = [a for a in data["added_tokens"] if a["id"] < vocab_size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def kept(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if kept(m)]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tokenizer


def _copy(tokenizer: Any) -> Any:
    """An independent copy (saved and loaded again, as adding tokens changes it in place)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True, use_fast=True)


def union_tokenizer(base: Any, tokenizers: list[tuple[Any, int]]) -> Any:
    """The base tokenizer plus every token of ``tokenizers`` (``(tokenizer, rows)``, base first)
    it lacks: plain tokens first (in model order, then id order), then added/special tokens (the
    first model's settings win when they differ)."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, rows in tokenizers:
        specials = tok.added_tokens_decoder
        contents = {a.content for a in specials.values()}
        for token, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < rows and token not in contents:
                plain.setdefault(token)
        for idx, info in sorted(specials.items()):
            if idx >= rows:
                continue
            if info.content in added and added[info.content] != info:
                LOG.warning("token %r is added with different settings; the first is kept", info.content)
            added.setdefault(info.content, info)
    out = _copy(base)
    have = set(base.get_vocab())
    new = [t for t in plain if t not in have and t not in added]
    if new:
        out.add_tokens(new)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclass
class VocabularyMap:
    """The output vocabulary and, per reader (models, then the base), where each output token's row
    comes from. ``rows`` = output rows (the vocabulary, padded to ``pad_to_multiple_of``)."""

    tokenizer: Any
    tokens: list[str]
    rows: int
    # per reader: int64 [len(tokens)], the reader's own row of each output token, -1 without
    own: list[torch.Tensor]
    # per output token: FROM_MODEL / MEAN / ZERO / -1 (every model has it: no default)
    default_kind: torch.Tensor
    default_model: torch.Tensor  # reader index for FROM_MODEL
    default_row: torch.Tensor  # that reader's row
    forced: torch.Tensor  # bool: every model takes the default
    vocab_sizes: list[int]
    source: str = "union"
    mapped: list[str] = field(default_factory=list)  # the token-indexed tensors

    def summary(self) -> dict[str, Any]:
        kinds = self.default_kind
        return {
            "source": self.source,
            "tokens": len(self.tokens),
            "rows": self.rows,
            "tensors": list(self.mapped),
            "from_one_model": int((kinds == FROM_MODEL).sum()),
            "mean_of_models": int((kinds == MEAN).sum()),
            "zeros": int((kinds == ZERO).sum()),
        }

    def digest(self) -> str:
        h = hashlib.sha256("\n".join(self.tokens).encode())
        for p in self.own:
            h.update(p.numpy().tobytes())
        return h.hexdigest()[:16]


def _token_rules(spec: TokenizerSpec, folders: list[Path | None], labels: list[str]) -> dict[str, TokenRule]:
    def index_of(ref: Any, where: str) -> int:
        for i, f in enumerate(folders):
            if f is not None and Path(str(ref)).resolve() == f.resolve():
                return i
        raise ParameterError(
            f"tokenizer tokens {where}: {ref!r} is not one of the models ({', '.join(labels)})"
        )

    rules = {}
    for token, entry in (spec.tokens or {}).items():
        entry = entry or {}
        src, force = entry.get("source"), bool(entry.get("force", False))
        if src is None:
            raise ParameterError(f"tokenizer tokens {token!r}: give a source (a model, zero or model_token)")
        if isinstance(src, dict) and src.get("kind") == "zero":
            rules[token] = TokenRule("zero", force=force)
        elif isinstance(src, dict) and src.get("kind") == "model_token":
            if (src.get("token") is None) == (src.get("token_id") is None):
                raise ParameterError(f"tokenizer tokens {token!r}: give exactly one of token or token_id")
            rules[token] = TokenRule(
                "model_token",
                index_of(src.get("model"), repr(token)),
                src.get("token"),
                src.get("token_id"),
                force,
            )
        elif isinstance(src, str | Path):
            rules[token] = TokenRule("model", index_of(src, repr(token)), force=force)
        else:
            raise ParameterError(f"tokenizer tokens {token!r}: source {src!r} is not understood")
    return rules


def build_vocabulary(spec: TokenizerSpec, readers: list[CheckpointReader], base: int | None) -> VocabularyMap:
    """The output tokenizer and each reader's rows for it. ``readers``: models then the base;
    ``base``: the index of the base among them (None: the first reader's tokenizer is the base)."""
    if spec.pad_to_multiple_of is not None and spec.pad_to_multiple_of < 1:
        raise ParameterError(f"pad_to_multiple_of = {spec.pad_to_multiple_of}: expected a positive integer")
    folders = [r.folder for r in readers]
    labels = [r.label for r in readers]
    if spec.base is not None:
        matches = [
            i for i, f in enumerate(folders) if f is not None and f.resolve() == Path(spec.base).resolve()
        ]
        base = matches[0] if matches else base
    anchor = base if base is not None else 0
    sizes = []
    for r in readers:
        # a LoRA adapter's folder has no config: the vocabulary is its base model's
        on = getattr(r, "base", None)
        size = config_vocab_size(r.folder) or config_vocab_size(getattr(on, "folder", None))
        sizes.append(size)
    loaded: dict[int, Any] = {}
    for i, r in enumerate(readers):
        if i == anchor:
            continue
        if not _has_tokenizer(r.folder):
            LOG.warning("%s has no tokenizer; its vocabulary is taken to be the base's", r.label)
            continue
        loaded[i] = load_tokenizer(r.folder, r.label)
    base_tok = load_tokenizer(folders[anchor], labels[anchor])
    if sizes[anchor] is None:
        sizes[anchor] = len(base_tok.get_vocab())
    base_tok = strip_unused(base_tok, sizes[anchor], labels[anchor])
    loaded[anchor] = base_tok
    for i in range(len(readers)):
        if sizes[i] is None:
            sizes[i] = len((loaded.get(i) or base_tok).get_vocab())

    source = str(spec.source)
    if source == "base":
        out = base_tok
    elif source == "union":
        order = [anchor] + [i for i in range(len(readers)) if i != anchor and i in loaded]
        out = union_tokenizer(base_tok, [(loaded[i], sizes[i]) for i in order])
    else:
        path = Path(source)
        if not path.is_dir():
            raise ParameterError(f"tokenizer source {source!r}: expected base, union or a local model folder")
        out = load_tokenizer(path, f"tokenizer source {source}")
    rules = _token_rules(spec, folders, labels)
    existing = set(out.get_vocab())
    for token in rules:
        if token not in existing:
            out.add_tokens(token)
            existing.add(token)

    vocab = out.get_vocab()
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise CheckpointError(
            f"the output tokenizer's ids are not 0 … {len(vocab) - 1} without gaps, so its tokens cannot "
            "index the rows of an embedding; give another tokenizer source"
        )
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    n = len(tokens)
    own = []
    for i in range(len(readers)):
        theirs = (loaded.get(i) or base_tok).get_vocab()
        p = torch.full((n,), -1, dtype=torch.int64)
        for t, j in vocab.items():
            k = theirs.get(t)
            if k is not None and k < sizes[i]:
                p[j] = k
        own.append(p)
    present = torch.stack([p >= 0 for p in own])  # [readers, tokens]
    count = present.sum(0)
    kind = torch.full((n,), -1, dtype=torch.int64)
    dmodel = torch.full((n,), -1, dtype=torch.int64)
    drow = torch.full((n,), -1, dtype=torch.int64)
    forced = torch.zeros(n, dtype=torch.bool)
    missing = count < len(readers)
    only = count == 1
    donor = present.to(torch.int8).argmax(0)
    sel = missing & only
    kind[sel], dmodel[sel] = FROM_MODEL, donor[sel]
    none = count == 0
    kind[none] = ZERO
    if none.any():
        LOG.warning("%d tokens are in no model; their rows are zeros", int(none.sum()))
    if base is not None:
        sel = missing & (count > 1) & present[base]
        kind[sel], dmodel[sel] = FROM_MODEL, base
    kind[missing & (count > 1) & (kind < 0)] = MEAN
    for token, rule in rules.items():
        j = vocab[token]
        if not rule.force and not missing[j]:
            kind[j] = -1
            continue
        forced[j] = rule.force
        if rule.kind == "zero":
            kind[j] = ZERO
        elif rule.kind == "model":
            if own[rule.model][j] < 0:
                raise ParameterError(
                    f"tokenizer tokens {token!r}: {labels[rule.model]} does not have this token"
                )
            kind[j], dmodel[j], drow[j] = FROM_MODEL, rule.model, own[rule.model][j]
        else:
            row = rule.token_id
            if row is None:
                theirs = (loaded.get(rule.model) or base_tok).get_vocab()
                if rule.token not in theirs:
                    raise ParameterError(
                        f"tokenizer tokens {token!r}: token {rule.token!r} is not in {labels[rule.model]}"
                    )
                row = theirs[rule.token]
            if not 0 <= row < sizes[rule.model]:
                raise ParameterError(
                    f"tokenizer tokens {token!r}: token id {row} is out of range for {labels[rule.model]} "
                    f"({sizes[rule.model]} rows)"
                )
            kind[j], dmodel[j], drow[j] = FROM_MODEL, rule.model, row
    sel = (kind == FROM_MODEL) & (drow < 0)
    for m in range(len(readers)):
        pick = sel & (dmodel == m)
        drow[pick] = own[m][pick]
    rows = n
    pad = spec.pad_to_multiple_of
    if pad and rows % pad:
        rows = (rows // pad + 1) * pad
    return VocabularyMap(out, tokens, rows, own, kind, dmodel, drow, forced, sizes, source)


def token_indexed(name: str, meta: TensorMeta, vocab_size: int) -> bool:
    return bool(_TOKEN_INDEXED.search(name)) and len(meta.shape) >= 1 and meta.shape[0] == vocab_size


def _runs(rows: torch.Tensor) -> list[tuple[int, int, int]]:
    """(position, first row, count) of each run of consecutive values in ``rows``."""
    if rows.numel() == 0:
        return []
    breaks = torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), rows.numel()]
    first = rows.tolist()
    return [(s, first[s], e - s) for s, e in zip(starts, ends, strict=True)]


class VocabularyReader:
    """Reader ``index`` of a :class:`VocabularyMap`, its token-indexed tensors in the output's
    token order (in ``dtypes[name]``); every other tensor as it is."""

    def __init__(
        self,
        readers: list[CheckpointReader],
        index: int,
        vmap: VocabularyMap,
        names: set[str],
        dtypes: dict[str, torch.dtype],
    ):
        self._readers = readers
        self._index = index
        self._inner = readers[index]
        self.label = self._inner.label
        self.folder = self._inner.folder
        self._vmap = vmap
        self._names = names
        self._dtypes = dtypes

    def __getattr__(self, attr: str) -> Any:  # config_updates of a layer stack, etc.
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._inner, attr)

    def keys(self) -> list[str]:
        return self._inner.keys()

    def meta(self, name: str) -> TensorMeta:
        m = self._inner.meta(name)
        if name not in self._names:
            return m
        return TensorMeta(name, (self._vmap.rows, *m.shape[1:]), self._dtypes[name])

    def read(self, name: str) -> torch.Tensor:
        if name not in self._names:
            return self._inner.read(name)
        m = self.meta(name)
        return self._rows(name, 0, m.shape[0])

    def read_range(self, name: str, start: int, length: int) -> torch.Tensor:
        if name not in self._names:
            return self._inner.read_range(name, start, length)
        m = self.meta(name)
        width = max(m.numel // m.shape[0], 1) if m.shape[0] else 1
        first, last = start // width, -(-(start + length) // width)
        block = self._rows(name, first, last).reshape(-1)
        offset = start - first * width
        return block[offset : offset + length]

    def fingerprint(self) -> dict:
        return {**self._inner.fingerprint(), "vocabulary": self._vmap.digest()}

    # -- rows ---------------------------------------------------------------------------------
    def _gather(self, reader: int, name: str, rows: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Rows ``rows`` of reader ``reader``'s (original) tensor, read as runs, in the dtype."""
        r = self._readers[reader]
        width = 1
        for d in shape:
            width *= d
        out = torch.empty((rows.numel(), *shape), dtype=self._dtypes[name])
        for pos, row, count in _runs(rows):
            part = r.read_range(name, row * width, count * width).view(count, *shape)
            out[pos : pos + count] = part.to(self._dtypes[name])
        return out

    def _rows(self, name: str, first: int, last: int) -> torch.Tensor:
        vm = self._vmap
        shape = tuple(self._inner.meta(name).shape[1:])
        dtype = self._dtypes[name]
        n = len(vm.tokens)
        out = torch.zeros((last - first, *shape), dtype=dtype)
        ids = torch.arange(min(first, n), min(last, n))
        if ids.numel():
            own = vm.own[self._index][ids]
            mine = (own >= 0) & ~vm.forced[ids]
            at = torch.nonzero(mine).flatten()
            if at.numel():
                out[at] = self._gather(self._index, name, own[at], shape)
            kind = torch.where(mine, torch.full_like(ids, -1), vm.default_kind[ids])
            for m in range(len(self._readers)):
                at = torch.nonzero((kind == FROM_MODEL) & (vm.default_model[ids] == m)).flatten()
                if at.numel():
                    out[at] = self._gather(m, name, vm.default_row[ids][at], shape)
            at = torch.nonzero(kind == MEAN).flatten()
            if at.numel():
                out[at] = self._mean(name, ids[at], shape)
        if last > n:
            # padding rows: the mean of this model's token rows (mergekit's rule)
            whole = out if first == 0 and last >= n else self._rows(name, 0, n)
            out[max(n - first, 0) :] = torch.mean(whole[:n], dim=0)
        return out

    def _mean(self, name: str, ids: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """Per token, the mean of the rows of the models that have it (summed in model order from
        zero, then divided by the count, as mergekit does)."""
        vm = self._vmap
        acc = torch.zeros((ids.numel(), *shape), dtype=self._dtypes[name])
        count = torch.zeros(ids.numel(), dtype=torch.int64)
        # readers in order: mergekit gathers the listed models in order and the base last when it
        # is not listed; a mean is over models that lack the base's token, so the base's place
        # never changes a sum
        for m in range(len(self._readers)):
            rows = vm.own[m][ids]
            at = torch.nonzero(rows >= 0).flatten()
            if at.numel():
                acc[at] = acc[at] + self._gather(m, name, rows[at], shape)
                count[at] += 1
        for c in torch.unique(count).tolist():
            at = torch.nonzero(count == c).flatten()
            acc[at] = acc[at] / c
        return acc


def align_vocabularies(
    spec: TokenizerSpec,
    models: list[CheckpointReader],
    base: CheckpointReader | None,
    compute_dtype: torch.dtype | None,
) -> tuple[list[VocabularyReader], VocabularyReader | None, VocabularyMap]:
    """Wrap ``models`` and ``base`` so that their token-indexed tensors follow one vocabulary.
    Returns the wrapped models, the wrapped base and the map (``mapped``: the tensors mapped)."""
    readers = list(models) + ([base] if base is not None else [])
    vmap = build_vocabulary(spec, readers, len(models) if base is not None else None)
    names: set[str] = set()
    dtypes: dict[str, torch.dtype] = {}
    key_sets = [set(r.keys()) for r in readers]
    for name in sorted(n for n in set().union(*key_sets) if _TOKEN_INDEXED.search(n)):
        holders = [i for i, keys in enumerate(key_sets) if name in keys]
        metas = {i: readers[i].meta(name) for i in holders}
        hits = {i for i in holders if token_indexed(name, metas[i], vmap.vocab_sizes[i])}
        if not hits:
            continue
        if hits != set(holders):
            lacking = ", ".join(
                f"{readers[i].label} ({list(metas[i].shape)}, vocabulary {vmap.vocab_sizes[i]})"
                for i in holders
                if i not in hits
            )
            raise CheckpointError(
                f"tensor {name!r} is indexed by token in some models but its first axis is not the "
                f"vocabulary size in {lacking}"
            )
        if len({m.shape[1:] for m in metas.values()}) > 1:
            raise CheckpointError(
                f"tensor {name!r}: the models' rows have different shapes "
                f"({', '.join(f'{readers[i].label}: {list(m.shape)}' for i, m in metas.items())})"
            )
        names.add(name)
        if compute_dtype is not None:
            dtypes[name] = compute_dtype
        else:
            d = metas[holders[0]].dtype
            for m in metas.values():
                d = torch.promote_types(d, m.dtype)
            dtypes[name] = d
    wrapped = [VocabularyReader(readers, i, vmap, names, dtypes) for i in range(len(readers))]
    out_models = wrapped[: len(models)]
    out_base = wrapped[-1] if base is not None else None
    if not names:
        raise CheckpointError(
            "tokenizer: no tensor is indexed by token (an embedding or LM head whose first axis is the "
            f"model's vocabulary size, {vmap.vocab_sizes[0]} for {readers[0].label}); nothing to map"
        )
    vmap.mapped = sorted(names)
    return out_models, out_base, vmap


def save_vocabulary(vmap: VocabularyMap, writer: Any, has_config: bool) -> None:
    """Write the output tokenizer into the writer's staging folder and set the config's vocabulary
    size to the output's rows (``text_config.vocab_size`` when the model keeps it there)."""
    from alloykit.errors import OutputError
    from alloykit.io.paths import describe_os_error

    try:
        vmap.tokenizer.save_pretrained(str(writer.tmp_dir))
        path = writer.tmp_dir / "config.json"
        if has_config and path.is_file():
            cfg = json.loads(path.read_text())
            nested = cfg.get("text_config")
            if "vocab_size" not in cfg and isinstance(nested, dict) and "vocab_size" in nested:
                nested["vocab_size"] = vmap.rows
            else:
                cfg["vocab_size"] = vmap.rows
            path.write_text(json.dumps(cfg, indent=2) + "\n")
    except OSError as e:
        raise OutputError(describe_os_error(e, e.filename or writer.tmp_dir)) from None
