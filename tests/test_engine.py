"""The streaming engine through the public API: plans, determinism, and bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import yaml

from alloykit import merge, merge_state_dicts
from alloykit.errors import MismatchError, NonFiniteError, OutputExistsError
from alloykit.io import open_checkpoint
from tests.conftest import make_base, make_finetunes, save_folder


def digest(folder) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.suffix == ".safetensors" or p.name.endswith("index.json")
    }


def test_output_is_a_complete_model_folder(toy):
    out = toy["tmp"] / "merged"
    res = merge(
        toy["paths"],
        toy["base_path"],
        "ties",
        out,
        parameters={"density": 0.5},
        out_dtype="bfloat16",
        recipe={"method": "ties", "note": "mine"},
    )
    assert res.output == out
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "alloykit_provenance.json", "alloykit_recipe.yml"} <= names
    prov = json.loads((out / "alloykit_provenance.json").read_text())
    assert prov["recipe"] == {"method": "ties", "note": "mine"}
    assert prov["resolved_parameters"]["density"] == [0.5, 0.5, 0.5]
    assert prov["report"]["peak_rss"] >= prov["report"]["baseline_rss"] > 0
    assert set(prov["inputs"]) == {str(p) for p in toy["paths"]}
    assert yaml.safe_load((out / "alloykit_recipe.yml").read_text())["note"] == "mine"
    r = open_checkpoint(out)
    assert all(r.meta(k).dtype == torch.bfloat16 for k in r.keys())
    # the file route and the in-memory route agree
    mem = merge(toy["fts"], toy["base"], "ties", parameters={"density": 0.5}, out_dtype="bfloat16").state_dict
    assert all(torch.equal(r.read(k), mem[k]) for k in mem)


@pytest.mark.parametrize(
    "method,params", [("ties", {"density": 0.3}), ("dare", {"density": 0.5}), ("linear", {})]
)
def test_same_seed_identical_bytes_for_any_worker_count(toy, method, params):
    base = None if method == "linear" else toy["base_path"]
    runs = []
    for i, (workers, mem) in enumerate([(1, None), (3, None), (2, "16KB")]):
        out = toy["tmp"] / f"o{i}"
        merge(
            toy["paths"],
            base,
            method,
            out,
            parameters=params,
            seed=11,
            workers=workers,
            max_memory=mem,
            shard_size=300,
        )
        runs.append(digest(out))
    assert len(runs[0]) > 2  # several shards and an index
    assert runs[0] == runs[1] == runs[2]


def test_dry_run_reads_no_data_and_writes_nothing(toy, monkeypatch):
    from alloykit.io.readers import SafetensorsFile

    def boom(self, name):
        raise AssertionError("dry run read tensor data")

    monkeypatch.setattr(SafetensorsFile, "read", boom)
    res = merge(toy["paths"], toy["base_path"], "ties", toy["tmp"] / "o", dry_run=True)
    assert not (toy["tmp"] / "o").exists()
    # two threshold passes; the sign majority is summed in the merge pass itself
    assert res.plan.reduction_passes == 2
    per_model = sum(v.numel() * 4 for v in toy["base"].values())
    assert res.plan.write_bytes == per_model
    assert res.plan.read_bytes == 4 * per_model * 3  # 4 checkpoints, read in 3 passes


def test_shape_mismatch_names_tensor_shapes_and_models(toy):
    bad = dict(toy["fts"][1])
    bad["layers.0.attn.weight"] = torch.zeros(6, 7)
    p = save_folder(bad, toy["tmp"] / "bad")
    with pytest.raises(
        MismatchError,
        match=r"'layers.0.attn.weight' has different shapes .*"
        r"bad: \[6, 7\].*base: \[6, 6\]",
    ):
        merge([toy["paths"][0], p], toy["base_path"], "task_arithmetic", toy["tmp"] / "o")
    assert not (toy["tmp"] / "o").exists()


def test_missing_keys_error_by_default_and_union_or_intersection_on_request(toy):
    fewer = {k: v for k, v in toy["fts"][1].items() if k != "head.weight"}
    extra = dict(toy["fts"][2]) | {"extra.bias": torch.ones(2)}
    with pytest.raises(
        MismatchError, match=r"(?s)model_1: 1 missing \(e.g. \['head.weight'\]\).*keys='union'"
    ):
        merge([toy["fts"][0], fewer], toy["base"], "task_arithmetic")
    inter = merge([toy["fts"][0], fewer, extra], toy["base"], "task_arithmetic", keys="intersection")
    assert "head.weight" not in inter.state_dict and "extra.bias" not in inter.state_dict
    union = merge([toy["fts"][0], fewer, extra], toy["base"], "task_arithmetic", keys="union")
    sd = union.state_dict
    # head.weight: merged from the two models that have it
    expected = (
        toy["base"]["head.weight"]
        + (toy["fts"][0]["head.weight"] - toy["base"]["head.weight"])
        + (extra["head.weight"] - toy["base"]["head.weight"])
    )
    torch.testing.assert_close(sd["head.weight"], expected)
    assert "extra.bias" not in sd  # not in the base's architecture: left out, with a warning
    assert any("extra.bias" in w and "left out" in w for w in union.plan.warnings)


def test_nan_input_is_refused_and_nothing_is_written(toy):
    bad = dict(toy["fts"][0])
    bad["layers.1.mlp.weight"] = bad["layers.1.mlp.weight"].clone()
    bad["layers.1.mlp.weight"][0, 0] = float("nan")
    p = save_folder(bad, toy["tmp"] / "nan")
    with pytest.raises(NonFiniteError, match=r"nan: tensor 'layers.1.mlp.weight' holds 1 NaN/Inf"):
        merge([p, toy["paths"][1]], toy["base_path"], "ties", toy["tmp"] / "o")
    assert not (toy["tmp"] / "o").exists()
    assert [p.name for p in toy["tmp"].iterdir() if p.name.startswith(".")] == []


def test_wrong_base_is_detected_and_nothing_is_written(toy):
    other = save_folder(make_base(seed=99), toy["tmp"] / "other")
    with pytest.raises(MismatchError, match=r"differs from the base .*other by 1\d\d% .*fine-tuned from"):
        merge(toy["paths"], other, "ties", toy["tmp"] / "o")
    assert not (toy["tmp"] / "o").exists()
    res = merge(toy["paths"], other, "task_arithmetic", base_check=None)
    assert res.report.relative_delta_norm[str(toy["paths"][0])] > 1.0


def test_existing_output_is_refused_unless_forced(toy):
    out = toy["tmp"] / "o"
    out.mkdir()
    with pytest.raises(OutputExistsError):
        merge(toy["paths"], None, "linear", out)
    merge(toy["paths"], None, "linear", out, force=True)
    assert (out / "model.safetensors").exists()


def test_failure_mid_merge_leaves_no_output(toy, monkeypatch):
    from alloykit.io.readers import SafetensorsFile

    calls = {"n": 0}
    original = SafetensorsFile.read

    def flaky(self, name):
        calls["n"] += 1
        if calls["n"] == 9:  # Ctrl-C in the middle of the merge
            raise KeyboardInterrupt
        return original(self, name)

    monkeypatch.setattr(SafetensorsFile, "read", flaky)
    with pytest.raises(KeyboardInterrupt):
        merge(toy["paths"], toy["base_path"], "task_arithmetic", toy["tmp"] / "o", workers=1)
    assert not (toy["tmp"] / "o").exists()
    assert not any(p.name.startswith(".o.") for p in toy["tmp"].iterdir())


def test_exclude_copies_from_base_and_integer_buffers_are_copied(toy):
    fts = [dict(f) | {"pos_ids": torch.arange(4)} for f in toy["fts"]]
    base = dict(toy["base"]) | {"pos_ids": torch.arange(4)}
    sd = merge(fts, base, "task_arithmetic", exclude=[r"^head\."]).state_dict
    assert torch.equal(sd["head.weight"], base["head.weight"])
    assert torch.equal(sd["pos_ids"], torch.arange(4)) and sd["pos_ids"].dtype == torch.int64
    assert not torch.equal(sd["embed.weight"], base["embed.weight"])


def test_config_is_copied_with_the_output_dtype(toy):
    save_folder(toy["base"], toy["base_path"], {"model_type": "toy", "torch_dtype": "float32"})
    out = toy["tmp"] / "o"
    merge(toy["paths"], toy["base_path"], "task_arithmetic", out, out_dtype="float16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_bf16_checkpoints_merge_in_float32_by_default(tmp_path):
    base = make_base(dtype=torch.bfloat16)
    fts = make_finetunes(base, n=2)
    sd = merge(fts, base, "linear").state_dict
    for k in base:
        exp = ((fts[0][k].float() + fts[1][k].float()) / 2).to(torch.bfloat16)
        assert torch.equal(sd[k], exp)


@pytest.mark.parametrize(
    "method,params",
    [
        ("linear", {}),
        ("task_arithmetic", {"lambda": 0.7}),
        ("ties", {"density": 0.3}),  # whole-model trim: reduction passes over slices too
        ("ties", {"density": 1.0, "topk": "tensor"}),
        ("magnitude_prune", {"density": 0.4, "topk": "model"}),
    ],
)
def test_streaming_in_slices_gives_the_same_bytes(toy, method, params):
    base = None if method == "linear" else toy["base_path"]
    whole = merge(toy["paths"], base, method, toy["tmp"] / "whole", parameters=params)
    sliced = merge(toy["paths"], base, method, toy["tmp"] / "sliced", parameters=params, chunk_elements=7)
    assert len(sliced.plan.jobs) > 3 * len(whole.plan.jobs)  # it really was sliced
    assert digest(toy["tmp"] / "whole") == digest(toy["tmp"] / "sliced")
    mem = merge(toy["fts"], toy["base"] if base else None, method, parameters=params, chunk_elements=7)
    r = open_checkpoint(toy["tmp"] / "whole")
    assert all(torch.equal(r.read(k), v) for k, v in mem.state_dict.items())


def test_non_elementwise_settings_are_not_sliced(toy):
    res = merge(
        toy["fts"],
        toy["base"],
        "ties",
        preset="mergekit",
        parameters={"density": 0.5},
        chunk_elements=7,
        dry_run=True,
    )
    assert len(res.plan.jobs) == len(toy["base"])  # per-tensor top-k needs the whole tensor
    res = merge(
        toy["fts"],
        toy["base"],
        "dare",
        preset="mergekit",
        parameters={"density": 0.5},
        chunk_elements=7,
        dry_run=True,
    )
    assert len(res.plan.jobs) == len(toy["base"])  # L1 rescale needs whole-tensor norms


def test_dare_slices_draw_their_own_masks_deterministically(toy):
    kw = dict(parameters={"density": 0.5}, seed=5, chunk_elements=10)
    a = merge(toy["fts"], toy["base"], "dare", workers=1, **kw).state_dict
    b = merge(toy["fts"], toy["base"], "dare", workers=3, **kw).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the first slice of each tensor is drawn exactly as a whole-tensor call would draw it
    whole = merge(toy["fts"], toy["base"], "dare", parameters={"density": 0.5}, seed=5).state_dict
    assert torch.equal(a["layers.0.attn.bias"], whole["layers.0.attn.bias"])  # 6 < 10: one slice
    assert not torch.equal(a["embed.weight"], whole["embed.weight"])
    assert torch.equal(a["embed.weight"].reshape(-1)[:10], whole["embed.weight"].reshape(-1)[:10])


def test_outsized_jobs_do_not_run_together_without_a_memory_bound(tmp_path):
    """Two embedding-sized whole-tensor jobs under the default budget run one after the other,
    while the small jobs still share the workers."""
    import threading
    import time

    from alloykit.methods import REGISTRY
    from alloykit.methods.base import merge_method

    running: list[int] = []
    peak = {"big": 0, "all": 0}
    lock = threading.Lock()

    @merge_method("hold_for_test", params=[], needs_base=False, memory_factor=4.0)
    def hold(tensors, base, ctx):
        big = tensors[0].numel() > 10_000
        with lock:
            running.append(big)
            peak["big"] = max(peak["big"], sum(running))
            peak["all"] = max(peak["all"], len(running))
        time.sleep(0.05)
        with lock:
            running.remove(big)
        return tensors[0]

    try:
        g = torch.Generator().manual_seed(0)
        sd = {
            "embed.weight": torch.randn(400, 64, generator=g),
            "head.weight": torch.randn(400, 64, generator=g),
        }
        sd |= {f"layer{i}.weight": torch.randn(16, 16, generator=g) for i in range(12)}
        other = {k: v + 1 for k, v in sd.items()}
        res = merge_state_dicts([sd, other], None, "hold_for_test", workers=3)
        assert torch.equal(res["embed.weight"], sd["embed.weight"])
        from alloykit.api import build_spec
        from alloykit.engine.plan import plan_merge

        plan = plan_merge(build_spec([sd, other], None, "hold_for_test"))
        costs = sorted((j.cost for j in plan.jobs), reverse=True)
        assert plan.default_budget(3) == costs[0] + 2 * costs[3] < 2 * costs[0]
        assert peak["big"] == 1 and peak["all"] >= 2
    finally:
        REGISTRY.pop("hold_for_test", None)


def test_a_free_worker_takes_a_later_job_that_fits_while_an_outsized_one_waits() -> None:
    """Budget 11 bytes, two workers: while the first outsized job (10) runs, the second (10)
    cannot start beside it, but the small job behind it can (the scheduler's choice, checked
    directly); a whole run never exceeds the budget and returns every result under its own
    position."""
    import threading

    from alloykit.engine.executor import ThreadExecutor, in_plan_order
    from alloykit.engine.memory import ByteBudget

    costs = {"big1": 10, "big2": 10, "small1": 1, "small2": 1}
    queue = list(costs.items())
    budget = ByteBudget(11)
    budget.acquire(10)  # big1 runs
    started = [True, False, False, False]
    assert ThreadExecutor._next(queue, started, 1, budget, busy=True) == 2  # small1, not big2
    started[2] = True
    budget.acquire(1)
    assert ThreadExecutor._next(queue, started, 1, budget, busy=True) is None  # 11 in flight: wait
    budget.release(10)
    budget.release(1)
    assert ThreadExecutor._next(queue, started, 1, budget, busy=False) == 1  # nothing runs: the head

    lock = threading.Lock()
    in_flight, peak = [0], [0]

    def job(name: str) -> str:
        with lock:
            in_flight[0] += costs[name]
            peak[0] = max(peak[0], in_flight[0])
        with lock:
            in_flight[0] -= costs[name]
        return name.upper()

    results = list(ThreadExecutor(workers=2, max_bytes=11).run(job, queue))
    assert peak[0] <= 11
    assert sorted(results) == [(0, "BIG1"), (1, "BIG2"), (2, "SMALL1"), (3, "SMALL2")]
    assert list(in_plan_order(iter(results))) == ["BIG1", "BIG2", "SMALL1", "SMALL2"]


def test_intra_op_threads_limits_numpy_blas_too_and_restores_it():
    """The SVD methods' float64 Grams and eigendecompositions run in numpy's OpenBLAS: inside a
    merge its pool is cut to the per-job thread count like torch's (else two workers would start
    two threads each on two cores), and both are restored afterwards."""
    import numpy as np  # noqa: F401 - loads numpy's BLAS so that threadpoolctl sees it
    from threadpoolctl import threadpool_info

    from alloykit.engine.executor import intra_op_threads

    def blas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before_blas, before_torch = blas_threads(), torch.get_num_threads()
    assert before_blas  # numpy's BLAS is found, else the check below is empty
    with intra_op_threads(1):
        assert blas_threads() == {1} and torch.get_num_threads() == 1
    assert blas_threads() == before_blas and torch.get_num_threads() == before_torch
