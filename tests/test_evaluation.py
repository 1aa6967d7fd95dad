"""Evaluation harness: metrics, splits, sealed test data, search, selection and reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from alloykit.api import merge_state_dicts
from alloykit.evaluation import (
    SealedSplitError,
    Split,
    Task,
    accuracy,
    golden_section,
    make_splits,
    normalized,
    select,
)
from alloykit.evaluation.harness import Suite, all_methods, reference_rows, run_method
from alloykit.evaluation.report import markdown, task_vector_cosines, write_report
from alloykit.methods.base import Continuous, Grid, get_method
from tests.conftest import make_base, make_finetunes

# ---------------------------------------------------------------- metrics


def test_accuracy_by_hand():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
    assert accuracy(torch.tensor([3]), torch.tensor([3])) == 1.0
    with pytest.raises(ValueError, match="3 predictions for 2 labels"):
        accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_normalized_accuracy():
    out = normalized({"a": 0.45, "b": 0.9}, {"a": 0.9, "b": 0.9, "c": 0.5})
    assert out == {"a": 0.5, "b": 1.0}
    with pytest.raises(KeyError, match="no fine-tuned accuracy for task"):
        normalized({"z": 0.1}, {"a": 0.9})
    with pytest.raises(ValueError, match="cannot normalize"):
        normalized({"a": 0.1}, {"a": 0.0})


# ---------------------------------------------------------------- splits


def test_splits_are_disjoint_sized_and_deterministic():
    texts = [f"text {i}" for i in range(500)] + ["dup", "dup", "clash", "clash"]
    labels = [i % 3 for i in range(500)] + [1, 1, 0, 1]
    t = make_splits("t", texts, labels, ["a", "b", "c"], n_train=200, n_validation=50, n_test=100, seed=3)
    tr, va, te = set(t.train.inputs), set(t.validation.inputs), set(t.test.inputs)
    assert (len(tr), len(va), len(te)) == (200, 50, 100)
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert "clash" not in tr | va | te  # seen with two labels: dropped
    every = tr | va | te
    for s in (t.train, t.validation, t.test):  # labels travel with their inputs
        for x, y in zip(s.inputs, s.labels, strict=True):
            assert y == (int(x.split()[1]) % 3 if x != "dup" else 1)
    again = make_splits("t", texts, labels, ["a", "b", "c"], n_train=200, n_validation=50, n_test=100, seed=3)
    assert again.test.inputs == t.test.inputs and again.train.inputs == t.train.inputs
    other = make_splits("t", texts, labels, ["a", "b", "c"], n_train=200, n_validation=50, n_test=100, seed=4)
    assert other.test.inputs != t.test.inputs
    assert len(every) == 350
    small = make_splits("s", texts, labels, ["a"], n_train=10_000, n_validation=50, n_test=100)
    assert len(small.train) == 501 - 150  # the rest (500 + "dup" distinct)


def test_splits_refuse_too_little_data():
    with pytest.raises(ValueError, match="3 distinct examples, need more than 2 test \\+ 1 validation"):
        make_splits("x", ["a", "b", "c"], [0, 1, 0], ["p", "q"], n_train=5, n_validation=1, n_test=2)


def test_sealed_test_split_raises_and_unseals():
    t = Task("t", ["a"], Split(["x"], [0]), Split(["y"], [0]), Split(["z"], [0]))
    with t.sealed():
        assert t.validation.inputs == ["y"]
        with pytest.raises(SealedSplitError, match="during hyperparameter selection"):
            _ = t.test
        with pytest.raises(SealedSplitError):
            t.split("test")
    assert t.test.inputs == ["z"]


# ---------------------------------------------------------------- search


def test_golden_section_finds_the_maximum_within_its_bracket():
    calls = []

    def f(x):
        calls.append(x)
        return -((x - 1.3) ** 2)

    x, y, hist = golden_section(f, 0.0, 4.0, 10)
    assert len(calls) == 10 == len(hist)
    width = 4.0 * 0.6180339887 ** (10 - 1)
    assert abs(x - 1.3) < width  # the true maximiser stays inside the final bracket
    assert y == max(h[1] for h in hist) and y == -((x - 1.3) ** 2)
    with pytest.raises(ValueError, match="at least 2"):
        golden_section(f, 0, 1, 1)


def test_golden_section_edges_and_nan():
    x, _, _ = golden_section(lambda v: v, 0.0, 1.0, 12)  # increasing: pushes to the upper end
    assert x > 1 - 0.6180339887**11
    with pytest.raises(ValueError, match="NaN"):
        golden_section(lambda v: math.nan, 0.0, 1.0, 3)


def test_select_strategies():
    r = select({"lambda": Continuous(0.0, 2.0)}, lambda p: -abs(p["lambda"] - 0.5), budget=7, fixed={"k": 1})
    assert r.evaluations == 7 and r.strategy.startswith("golden-section")
    assert r.params["k"] == 1 and abs(r.params["lambda"] - 0.5) < 2.0 * 0.618**6
    r = select(
        {"a": Grid((1, 2, 3)), "b": Continuous(0.0, 1.0, grid=(0.25, 0.75))},
        lambda p: -((p["a"] - 2) ** 2) - (p["b"] - 0.7) ** 2,
        budget=3,
    )
    assert r.evaluations == 6 and r.params == {"a": 2, "b": 0.75} and r.strategy.startswith("grid")
    r = select({}, lambda p: 0.42, fixed={"x": 1})
    assert (r.evaluations, r.score, r.params) == (1, 0.42, {"x": 1})
    with pytest.raises(ValueError, match="both fixed and searched"):
        select({"a": Grid((1,))}, lambda p: 0.0, fixed={"a": 1})


def test_search_declarations_name_declared_parameters():
    for name in all_methods():
        m = get_method(name)
        for key, spec in m.search.items():
            p = m.param(key)
            assert p.kind is float and not p.per_model, (name, key)
            if isinstance(spec, Continuous):
                assert spec.low < p.default <= spec.high or spec.low <= p.default < spec.high, (name, key)


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in all_methods()
        if any(getattr(s, "scales_update", False) for s in get_method(n).search.values())
    ],
)
def test_declared_scale_parameters_really_scale_the_update(name):
    """θ(v) = θ_0 + v·(θ(1) − θ_0): the harness's merge-once-and-rescale shortcut is exact."""
    _check_scales_update(name, {}, get_method(name).search)


def test_benchmark_variants_really_scale_the_update():
    from alloykit.bench.text8 import VARIANTS

    for v in VARIANTS.values():
        if v.space is not None:
            _check_scales_update(v.method, v.fixed, v.space)


def _check_scales_update(name, fixed, space):
    base = make_base()
    fts = make_finetunes(base, n=3, scale=0.05)
    (key,) = space
    assert space[key].scales_update
    at_one = merge_state_dicts(fts, base, name, parameters={**fixed, key: 1.0})
    for v in (0.3, 2.5):
        got = merge_state_dicts(fts, base, name, parameters={**fixed, key: v})
        for k in base:
            want = base[k] + v * (at_one[k] - base[k])
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6, msg=f"{name} {k} at {key}={v}")


# ---------------------------------------------------------------- harness


def _toy_suite(calls: list[tuple[str, tuple[str, ...]]]):
    """Two 'tasks' whose accuracy is a known function of the backbone: val peaks at λ≈0.5 of the
    task-arithmetic sum, test at λ≈1.5, so a selection that peeked at test would pick differently."""
    base = {"w": torch.zeros(4)}
    fts = {"a": {"w": torch.tensor([1.0, 0, 0, 0])}, "b": {"w": torch.tensor([0, 1.0, 0, 0])}}
    tasks = [Task(n, ["x"], Split(["t"], [0]), Split(["v"], [0]), Split(["s"], [0])) for n in ("a", "b")]
    by = {t.name: t for t in tasks}

    def evaluate(state, split, names):
        calls.append((split, tuple(names)))
        out = {}
        for n in names:
            by[n].split(split)  # the guard: raises if test is sealed
            i = 0 if n == "a" else 1
            target = 0.5 if split == "validation" else 1.5
            out[n] = 1.0 - 0.2 * float(abs(state["w"][i] - target))
        return out

    return Suite(tasks, base, fts, evaluate)


def test_harness_selects_on_validation_and_tests_once():
    calls: list = []
    suite = _toy_suite(calls)
    base_row, ind = reference_rows(suite)
    assert base_row.test == {"a": 0.7, "b": 0.7} and ind.test == {"a": 0.9, "b": 0.9}
    assert ind.normalized == {"a": 1.0, "b": 1.0}
    assert base_row.normalized == pytest.approx({"a": 0.7 / 0.9, "b": 0.7 / 0.9})
    calls.clear()
    row = run_method(suite, "task_arithmetic", ind.test, budget=12)
    assert row.status == "ok"
    assert abs(row.params["lambda"] - 0.5) < 0.02  # validation's optimum, not test's 1.5
    assert [c[0] for c in calls].count("test") == 1 and calls[-1] == ("test", ("a", "b"))
    assert all(c[0] == "validation" for c in calls[:-1]) and len(calls) == 13
    assert len(row.trials) == 12 and row.search.endswith("12 evaluations")
    lam = row.params["lambda"]
    assert row.test["a"] == pytest.approx(1.0 - 0.2 * abs(lam - 1.5))
    assert row.normalized["a"] == pytest.approx(row.test["a"] / 0.9)
    assert row.validation["a"] == pytest.approx(
        row.trials[[t["params"]["lambda"] for t in row.trials].index(lam)]["score"]
    )


def test_harness_refuses_a_peeking_evaluator():
    suite = _toy_suite([])
    leaky = suite.evaluate
    suite.evaluate = lambda state, split, names: leaky(state, "test", names)
    row = run_method(suite, "ties", {"a": 0.9, "b": 0.9}, budget=3)
    assert row.status == "error" and "read during hyperparameter selection" in row.reason


def test_harness_reports_methods_that_do_not_apply():
    suite = _toy_suite([])
    row = run_method(suite, "slerp", {"a": 1.0, "b": 1.0})
    assert row.status == "n/a" and "at most 1 model" in row.reason and not row.test


def test_cosines_and_report(tmp_path):
    base = {"w": torch.zeros(3), "i": torch.zeros(2, dtype=torch.long)}
    fts = {
        "x": {"w": torch.tensor([1.0, 0, 0])},
        "y": {"w": torch.tensor([2.0, 0, 0])},
        "z": {"w": torch.tensor([0, 0, 3.0])},
    }
    for f in fts.values():
        f["i"] = torch.ones(2, dtype=torch.long)  # integer buffers are not task vectors
    names, mat = task_vector_cosines(base, fts)
    assert names == ["x", "y", "z"]
    assert (
        mat[0][1] == pytest.approx(1.0)
        and mat[0][2] == pytest.approx(0.0)
        and mat[2][2] == pytest.approx(1.0)
    )
    calls: list = []
    suite = _toy_suite(calls)
    b, ind = reference_rows(suite)
    rows = [
        b,
        ind,
        run_method(suite, "task_arithmetic", ind.test, budget=4),
        run_method(suite, "slerp", ind.test),
    ]
    files = write_report(tmp_path / "r", rows, suite.names, title="toy", meta={"k": 1}, cosines=(names, mat))
    data = json.loads(files["results"].read_text())
    assert [r["name"] for r in data["rows"]] == [r.name for r in rows]
    ta = data["rows"][2]
    assert ta["mean_normalized"] == pytest.approx(sum(ta["normalized"].values()) / 2)
    md = files["report"].read_text()
    assert "| task_arithmetic |" in md and "slerp | – | – | n/a" in md
    assert f"{100 * ta['mean_test']:.1f}" in md
    for png in (
        "per_task_accuracy.png",
        "normalized_ranking.png",
        "task_vector_cosine.png",
        "validation_sweeps.png",
    ):
        assert files[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert markdown(rows, suite.names, "t").count("\n| ") >= 3


def test_harness_fixed_parameters_and_space_override():
    suite = _toy_suite([])
    # a list is a layer gradient (mergekit's rule); constant here, so weight 0.5 everywhere
    row = run_method(
        suite, "task_arithmetic", {"a": 0.9, "b": 0.9}, fixed={"weight": [0.5, 0.5]},
        space={"lambda": Grid((0.5, 1.0))}, label="ta (grid)",
    )  # fmt: skip
    assert row.name == "ta (grid)" and row.status == "ok" and len(row.trials) == 2
    # w = λ·0.5·(1, 1); validation peaks at 0.5 per coordinate → λ = 1
    assert row.params == {"weight": [0.5, 0.5], "lambda": 1.0}
    assert [t["score"] for t in row.trials] == pytest.approx([0.95, 1.0])
    assert row.test == pytest.approx({"a": 0.8, "b": 0.8})


def test_a_crashing_method_becomes_an_error_row(monkeypatch):
    suite = _toy_suite([])
    import alloykit.evaluation.harness as harness

    def boom(*args, **kwargs):
        raise RuntimeError("SVD did not converge")

    monkeypatch.setattr(harness, "_merge", boom)
    row = run_method(suite, "iso_c", {"a": 0.9, "b": 0.9}, budget=3)
    assert (row.status, row.reason) == ("error", "RuntimeError: SVD did not converge")
    md = markdown([row], suite.names, "t")
    assert "| iso_c | – | – | error: RuntimeError: SVD did not converge | | |" in md
    row.reason = "a | b\nc"
    assert "error: a \\| b c |" in markdown([row], suite.names, "t")


@pytest.mark.parametrize("shortcut, merges", [("scales_update", 2), ("affine", 3), (None, 9)])
def test_search_shortcuts_merge_once_twice_or_every_trial(monkeypatch, shortcut, merges):
    """scales_update: one merge at 1 (+ the final); affine: at 0 and 1 (+ final); else every trial.
    The selected λ is the same whichever the shortcut (task arithmetic is linear in λ)."""
    import dataclasses

    import alloykit.evaluation.harness as harness

    real_merge, real_get = harness._merge, harness.get_method
    calls = []
    monkeypatch.setattr(harness, "_merge", lambda *a, **k: calls.append(a[3]) or real_merge(*a, **k))
    flags = {"scales_update": shortcut == "scales_update", "affine": shortcut == "affine"}
    space = {"lambda": Continuous(0.0, 1.5, **flags)}
    monkeypatch.setattr(harness, "get_method", lambda n: dataclasses.replace(real_get(n), search=space))
    row = run_method(_toy_suite([]), "task_arithmetic", {"a": 0.9, "b": 0.9}, budget=8)
    assert row.status == "ok" and len(calls) == merges
    assert abs(row.params["lambda"] - 0.5) < 0.05
