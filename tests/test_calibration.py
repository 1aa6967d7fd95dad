"""Calibration statistics: exact accumulation, padding, shared inputs, passes under a memory bound,
files and reuse, the Fisher by hand, Hugging Face folders, the CLI, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from alloykit import merge
from alloykit.calibration import (
    Statistics,
    StatisticsFile,
    calibrate,
    collect_activation_statistics,
    collect_fisher,
    gram_of,
)
from alloykit.cli.main import app
from alloykit.errors import CheckpointError, MismatchError, NonFiniteError, OutputExistsError, ParameterError

runner = CliRunner()


class Masked(nn.Module):
    """q/k/v read the same input; out reads another; a mask marks padding positions."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x, attention_mask):
        h = self.q(x) + self.k(x) * self.v(x)
        return self.out(torch.tanh(h))


def _padded_batches(seed: int = 0):
    """Batches of 3, 5 and 2 sequences, lengths up to 4, padding filled with huge values."""
    g = torch.Generator().manual_seed(seed)
    batches, valid = [], []
    for b in (3, 5, 2):
        x = torch.randn(b, 4, 6, generator=g)
        lengths = torch.randint(1, 5, (b,), generator=g)
        mask = (torch.arange(4)[None, :] < lengths[:, None]).long()
        x[mask == 0] = 1e6  # would dominate any Gram that counted padding
        batches.append({"x": x, "attention_mask": mask})
        valid.append(x[mask.bool()])
    return batches, torch.cat(valid)


def test_gram_over_uneven_padded_batches_equals_one_batch_of_the_valid_rows():
    model = Masked()
    batches, rows = _padded_batches()
    stats = collect_activation_statistics(model, batches, store="gram")
    one = collect_activation_statistics(
        model, [{"x": rows[None], "attention_mask": torch.ones(1, len(rows))}], store="gram"
    )
    expected = rows.double().T @ rows.double()
    entry = stats.get("q.weight")
    assert entry["tokens"] == len(rows)
    torch.testing.assert_close(entry["gram"], expected, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(entry["gram"], one.get("q.weight")["gram"], rtol=1e-12, atol=1e-9)
    # out reads tanh(h): its Gram is over the same valid rows, computed through the model
    h = torch.tanh(model.q(rows) + model.k(rows) * model.v(rows)).double()
    torch.testing.assert_close(stats.get("out.weight")["gram"], h.T @ h, rtol=1e-6, atol=1e-6)


def test_layers_reading_one_input_share_one_gram_in_the_file(tmp_path):
    stats = collect_activation_statistics(Masked(), _padded_batches()[0], store="gram")
    assert stats.shared == {"k.weight": "q.weight", "v.weight": "q.weight"}
    path = stats.save(tmp_path / "s.safetensors")
    raw = load_file(path)
    assert sorted(raw) == ["out.weight.gram", "q.weight.gram"]  # one Gram for q, k and v
    loaded = StatisticsFile(path)
    for name in ("q.weight", "k.weight", "v.weight", "out.weight"):
        torch.testing.assert_close(loaded.get(name)["gram"], stats.get(name)["gram"])
        assert loaded.get(name)["tokens"] == stats.get(name)["tokens"]


def test_rows_are_kept_while_fewer_than_the_input_width():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    few = collect_activation_statistics(model, [torch.randn(5, 8), torch.randn(3, 8)])
    assert set(few.get("0.weight")) >= {"inputs", "tokens"} and few.get("0.weight")["tokens"] == 8
    many = collect_activation_statistics(model, [torch.randn(10, 8)])
    assert "gram" in many.get("0.weight") and "inputs" in many.get("2.weight")  # 10 rows < 16
    x = torch.randn(12, 8)
    a = collect_activation_statistics(model, [x[:5], x[5:]])  # rows, then a switch to the Gram
    torch.testing.assert_close(gram_of(a.get("0.weight")), x.double().T @ x.double(), rtol=1e-6, atol=1e-6)


def test_a_small_memory_bound_makes_passes_with_the_same_result():
    model = nn.Sequential(*[nn.Linear(10, 10) for _ in range(4)])
    batches = [torch.randn(20, 10) for _ in range(3)]
    one = collect_activation_statistics(model, batches, store="gram")
    many = collect_activation_statistics(model, batches, store="gram", max_memory=8 * 10 * 10 + 1)
    assert one.meta["passes"] == 1 and many.meta["passes"] == 4
    for name in one.names():
        torch.testing.assert_close(one.get(name)["gram"], many.get(name)["gram"])


def test_each_pass_goes_to_the_file_before_the_next_pass_runs(tmp_path):
    """A calibration's entries are handed on as their pass ends, not all held to the end: with
    one layer a pass, the forwards and hand-overs alternate (3 batches, then that layer's
    entry), nothing is returned, and the file written that way holds the same bytes as the
    statistics collected in memory."""
    model = nn.Sequential(*[nn.Linear(10, 10) for _ in range(4)])
    batches = [torch.randn(20, 10) for _ in range(3)]
    one_layer = 8 * 10 * 10 + 1
    events: list[str] = []
    model.register_forward_pre_hook(lambda module, args: events.append("F"))
    def sink(name, entry, source):
        events.append(name)

    held = collect_activation_statistics(model, batches, store="gram", max_memory=one_layer, sink=sink)
    assert held.names() == []
    # (the first forward is the probe that finds layers reading one input)
    assert events == ["F"] + [e for i in range(4) for e in ("F", "F", "F", f"{i}.weight")]
    in_memory = collect_activation_statistics(model, batches, store="gram", max_memory=one_layer)
    path = tmp_path / "s.safetensors"
    written = calibrate(model, batches, output=path, store="gram", max_memory=one_layer)
    assert written.meta["tokens"] == 60 and sorted(written.names()) == sorted(in_memory.names())
    for name in in_memory.names():
        assert torch.equal(written.get(name)["gram"], in_memory.get(name)["gram"])
    # the header's room is padded with spaces, as the format allows: safetensors reads it
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("2.weight.gram"), in_memory.get("2.weight")["gram"])
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_a_header_past_its_reserved_room_is_written_before_the_copied_data(tmp_path, monkeypatch):
    from alloykit.calibration import StatisticsWriter

    stats = collect_activation_statistics(Masked(), _padded_batches()[0], store="gram")
    stats.meta["note"] = "x" * 200_000  # more metadata than the room reserved for the header
    monkeypatch.setattr(StatisticsWriter, "_COPY_BLOCK", 100)  # several blocks of data
    path = stats.save(tmp_path / "s.safetensors")
    loaded = StatisticsFile(path)
    assert loaded.meta["note"] == stats.meta["note"]
    for name in stats.names():
        assert torch.equal(loaded.get(name)["gram"], stats.get(name)["gram"])
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_statistics_the_format_cannot_hold_leave_no_file(tmp_path):
    x = torch.randn(4, 3, dtype=torch.complex64)
    stats = Statistics({"w": {"inputs": x, "tokens": 4}})
    with pytest.raises(CheckpointError, match="'w' are complex64, which a safetensors file cannot hold"):
        stats.save(tmp_path / "s.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_calibration_that_fails_midway_leaves_no_file(tmp_path):
    """The second pass fails after the first pass's entries were written: neither the output
    nor the temporary file remains."""
    model = nn.Sequential(*[nn.Linear(10, 10) for _ in range(4)])
    calls = [0]

    def fail_in_the_second_pass(module, args):
        calls[0] += 1
        if calls[0] == 6:  # (the probe, the first pass's 3 batches, one of the second's)
            raise RuntimeError("the forward broke")

    model.register_forward_pre_hook(fail_in_the_second_pass)
    with pytest.raises(RuntimeError, match="the forward broke"):
        calibrate(model, [torch.randn(20, 10) for _ in range(3)], output=tmp_path / "s.safetensors",
                  store="gram", max_memory=8 * 10 * 10 + 1)  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_fisher_equals_per_example_squared_gradients_by_hand():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 2, 1, 1, 0, 2])

    def log_probs(m, batch):
        return torch.log_softmax(m(batch[0]), dim=-1), batch[1]

    stats = collect_fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])], log_probs=log_probs)
    with torch.no_grad():
        p = torch.softmax(model(x), -1).double()
    err = torch.nn.functional.one_hot(y, 3).double() - p  # ∂ log p_y / ∂ logits
    grads_w = err[:, :, None] * x.double()[:, None, :]  # per example (3, 4)
    torch.testing.assert_close(
        stats.get("weight")["fisher"].double(), grads_w.square().mean(0), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        stats.get("bias")["fisher"].double(), err.square().mean(0), rtol=1e-5, atol=1e-7
    )
    assert stats.get("weight")["examples"] == 6
    # expected Fisher: Σ_y p_y (e_y − p) (e_y − p)ᵀ diagonal, over the model's own distribution
    exp = collect_fisher(model, [(x, y)], log_probs=log_probs, estimator="expected")
    eye = torch.eye(3, dtype=torch.float64)
    per = ((eye[None, :, :] - p[:, None, :]).square() * p[:, :, None]).sum(1)  # (6, 3)
    torch.testing.assert_close(exp.get("bias")["fisher"].double(), per.mean(0), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- files and reuse


def test_calibrate_writes_once_and_reuses_for_the_same_model_and_data(tmp_path, monkeypatch):
    import alloykit.calibration as cal

    model = Masked()
    batches = _padded_batches()[0]
    out = tmp_path / "stats.safetensors"
    first = calibrate(model, batches, output=out)
    assert isinstance(first, StatisticsFile) and first.meta["model"]["fingerprint"]
    monkeypatch.setattr(cal, "collect_activation_statistics", lambda *a, **k: pytest.fail("recomputed"))
    logs = []
    again = calibrate(model, batches, output=out, log=logs.append)
    assert any("reused" in line for line in logs) and again.names() == first.names()
    with pytest.raises(OutputExistsError, match="another model, data or settings"):
        calibrate(model, _padded_batches(seed=1)[0], output=out)
    with torch.no_grad():
        model.q.weight.add_(1.0)
    with pytest.raises(OutputExistsError):
        calibrate(model, batches, output=out)


def test_bad_statistics_files_are_named(tmp_path):
    stats = collect_activation_statistics(Masked(), _padded_batches()[0], store="gram")
    path = stats.save(tmp_path / "s.safetensors")
    data = load_file(path)
    meta = json.loads(StatisticsFile(path)._file.metadata["alloykit_statistics"])
    # tokens = 0
    meta["params"]["q.weight"]["tokens"] = 0
    save_file(data, str(tmp_path / "zero.safetensors"), metadata={"alloykit_statistics": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=r"zero.safetensors.*'q.weight' count tokens = 0"):
        StatisticsFile(tmp_path / "zero.safetensors")
    # no metadata: not a statistics file
    save_file(data, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not an alloykit statistics file"):
        StatisticsFile(tmp_path / "plain.safetensors")
    # a corrupt file
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        StatisticsFile(tmp_path / "broken.safetensors")


# ----------------------------------------------------------------------------- merges with statistics


def _family(n: int = 2):
    torch.manual_seed(1)
    base = Masked()
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    fts = []
    for _ in range(n):
        m = Masked()
        m.load_state_dict(base_sd)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        fts.append(m)
    stats = [collect_activation_statistics(m, _padded_batches(i)[0]) for i, m in enumerate(fts)]
    return base_sd, fts, stats


def test_statistics_of_another_model_are_refused(tmp_path):
    base, fts, stats = _family()
    sds = [m.state_dict() for m in fts]
    with pytest.raises(
        MismatchError, match=r"statistics of model_0: were computed on another weight for '\w+\.weight'"
    ):
        merge(sds, base, "esm", statistics=[stats[1], stats[0]])  # swapped
    other = collect_activation_statistics(nn.Sequential(nn.Linear(6, 6)), [torch.randn(8, 6)])
    with pytest.raises(MismatchError, match="tensor '0.weight', which model_0 does not hold"):
        merge(sds, base, "esm", statistics=[other, stats[1]])
    wide = Statistics({"q.weight": {"gram": torch.eye(7, dtype=torch.float64), "tokens": 3}})
    with pytest.raises(MismatchError, match="7 wide"):
        merge(sds, base, "esm", statistics=[wide, stats[1]])


def test_missing_or_unwanted_statistics_are_refused():
    base, fts, stats = _family()
    sds = [m.state_dict() for m in fts]
    with pytest.raises(ParameterError, match=r"esm needs calibration statistics \(activations\).*got 0"):
        merge(sds, base, "esm")
    with pytest.raises(ParameterError, match="got 1"):
        merge(sds, base, "esm", statistics=[stats[0], None])
    with pytest.raises(ParameterError, match="does not use calibration statistics"):
        merge(sds, base, "ties", statistics=stats)
    partial = Statistics({k: v for k, v in stats[1].entries.items() if k != "out.weight"})
    with pytest.raises(MismatchError, match="'out.weight' has statistics for some models but not for"):
        merge(sds, base, "esm", statistics=[stats[0], partial])
    fisher = Statistics({"q.weight": {"fisher": torch.ones(6, 6), "examples": 2}}, meta={"kind": "fisher"})
    with pytest.raises(MismatchError, match="hold fisher statistics; esm needs activations"):
        merge(sds, base, "esm", statistics=[fisher, stats[1]])


def test_nan_statistics_are_refused_and_nothing_is_written(tmp_path):
    base, fts, stats = _family()
    bad = Statistics({k: dict(v) for k, v in stats[0].entries.items()})
    g = gram_of(bad.entries["out.weight"]).clone()
    g[0, 0] = float("nan")
    bad.entries["out.weight"] = {**bad.entries["out.weight"], "gram": g}
    bad.entries["out.weight"].pop("inputs", None)
    with pytest.raises(NonFiniteError, match="'out.weight'.*NaN"):
        merge([m.state_dict() for m in fts], base, "esm", tmp_path / "out", statistics=[bad, stats[1]])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- Hugging Face folders

transformers = pytest.importorskip("transformers")
WORDS = ["red", "blue", "green", "cat", "dog", "runs", "sleeps", "the", "a", "big", "small", "fast"]


def _tiny_bert(folder: Path, seed: int, base_state=None) -> Path:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=2,
    )
    model = BertForSequenceClassification(cfg)
    if base_state is not None:
        model.load_state_dict(base_state)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(folder)
    BertTokenizer(str(vocab)).save_pretrained(folder)
    return folder


@pytest.fixture
def berts(tmp_path):
    from transformers import BertForSequenceClassification

    base = _tiny_bert(tmp_path / "base", 0)
    state = BertForSequenceClassification.from_pretrained(base).state_dict()
    fts = [_tiny_bert(tmp_path / f"ft{i}", i + 1, state) for i in range(2)]
    data = tmp_path / "data.txt"
    data.write_text("\n".join(["the red cat runs", "a big dog sleeps fast", "small blue cat", "the dog"] * 3))
    labelled = tmp_path / "data.jsonl"
    labelled.write_text(
        "\n".join(
            json.dumps({"text": t, "label": i % 2})
            for i, t in enumerate(["the red cat runs", "a big dog", "small blue cat", "dog sleeps"])
        )
    )
    return {"base": base, "fts": fts, "data": data, "labelled": labelled, "tmp": tmp_path}


def test_hf_folder_statistics_use_checkpoint_names_and_exclude_padding(berts):
    stats = calibrate(berts["fts"][0], berts["data"], samples=5, batch_size=2)
    from alloykit.io import open_checkpoint

    keys = set(open_checkpoint(berts["fts"][0]).keys())
    assert set(stats.names()) <= keys
    q = "bert.encoder.layer.0.attention.self.query.weight"
    assert q in stats.names() and stats.shared["bert.encoder.layer.0.attention.self.key.weight"] == q
    from transformers import AutoTokenizer

    from alloykit.calibration.data import pick, read_samples

    texts = [s["text"] for s in pick(read_samples(berts["data"]), 5, 0)]
    tok = AutoTokenizer.from_pretrained(berts["fts"][0])
    n_tokens = sum(len(tok(t)["input_ids"]) for t in texts)
    assert stats.get(q)["tokens"] == n_tokens  # padding rows dropped
    assert stats.meta["model"]["tokenizer"] and stats.meta["samples"] == 5


def test_cli_calibrate_then_merge_esm_regmean_fisher_from_a_recipe(berts):
    tmp = berts["tmp"]
    files = {}
    for kind, data in (("activations", berts["data"]), ("fisher", berts["labelled"])):
        for i, ft in enumerate(berts["fts"]):
            out = tmp / f"ft{i}.{kind}.safetensors"
            res = runner.invoke(
                app,
                [
                    "calibrate",
                    str(ft),
                    "--data",
                    str(data),
                    "-o",
                    str(out),
                    "--kind",
                    kind,
                    "--samples",
                    "4",
                    "--no-progress",
                ],
            )
            assert res.exit_code == 0, res.output
            files[kind, i] = out
        again = runner.invoke(
            app,
            [
                "calibrate",
                str(berts["fts"][0]),
                "--data",
                str(data),
                "-o",
                str(files[kind, 0]),
                "--kind",
                kind,
                "--samples",
                "4",
                "--no-progress",
            ],
        )
        assert again.exit_code == 0 and "reused" in again.output
    for method, kind in (("esm", "activations"), ("regmean", "activations"), ("fisher", "fisher")):
        recipe = tmp / f"{method}.yml"
        recipe.write_text(
            json.dumps(
                {
                    "method": method,
                    "base_model": str(berts["base"]),
                    "models": [
                        {"model": str(ft), "statistics": str(files[kind, i])}
                        for i, ft in enumerate(berts["fts"])
                    ],
                }
            )
        )
        res = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp / f"out-{method}"), "--no-progress"])
        assert res.exit_code == 0, res.output
        from transformers import BertForSequenceClassification

        merged = BertForSequenceClassification.from_pretrained(tmp / f"out-{method}")
        assert all(bool(torch.isfinite(p).all()) for p in merged.parameters())


def test_statistics_with_another_tokenizer_are_refused(berts):
    stats = berts["tmp"] / "s.safetensors"
    calibrate(berts["fts"][0], berts["data"], samples=3, output=stats)
    other = berts["fts"][1] / "vocab.txt"
    other.write_text(other.read_text().replace("fast", "slow"))
    s1 = calibrate(berts["fts"][1], berts["data"], samples=3)
    with pytest.raises(MismatchError, match="another tokenizer"):
        merge([berts["fts"][1], berts["fts"][0]], berts["base"], "esm", statistics=[stats, s1])


def test_bad_data_files_are_named(berts):
    empty = berts["tmp"] / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(CheckpointError, match="empty.txt: holds no samples"):
        calibrate(berts["fts"][0], empty)
    with pytest.raises(CheckpointError, match="is a folder"):
        calibrate(berts["fts"][0], berts["tmp"])
    bad = berts["tmp"] / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(CheckpointError, match=r"bad.jsonl:2: not a JSON value"):
        calibrate(berts["fts"][0], bad)
    res = runner.invoke(
        app,
        [
            "calibrate",
            str(berts["fts"][0]),
            "--data",
            str(berts["tmp"] / "none.txt"),
            "-o",
            str(berts["tmp"] / "x.safetensors"),
        ],
    )
    assert res.exit_code == 2 and "none.txt" in res.output and "Traceback" not in res.output
