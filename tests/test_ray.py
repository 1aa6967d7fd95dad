"""The Ray executor on a local Ray started here (2 CPUs, loopback only): the same bytes as the
thread executor, retries of failed tasks, clear errors and no output when a task keeps failing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import alloykit
from alloykit.methods import REGISTRY, get_method
from alloykit.methods.base import merge_method
from tests.test_reliability import _medium

ray = pytest.importorskip("ray")
cloudpickle = pytest.importorskip("cloudpickle")


@pytest.fixture(scope="module")
def local_ray():
    # Test-only methods defined here travel to the workers by value (they cannot import tests/).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _medium(tmp_path_factory.mktemp("ray"), 2)


def _model_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))


@pytest.mark.parametrize(
    "method,params",
    [("task_arithmetic", {"lambda": 0.7}), ("ties", {"density": 0.3}), ("tsv_m", {})],
)
def test_ray_writes_the_bytes_the_thread_executor_writes(local_ray, models, tmp_path, method, params):
    base, fts = models
    kw = dict(parameters=params, seed=2, chunk_elements=4096)
    alloykit.merge(fts, base, method, tmp_path / "threads", workers=2, **kw)
    res = alloykit.merge(fts, base, method, tmp_path / "ray", executor="ray", workers=2, **kw)
    assert _model_bytes(tmp_path / "ray") == _model_bytes(tmp_path / "threads")
    plan = res.plan
    assert sum(res.report.nodes.values()) == len(plan.jobs) + plan.reduction_passes * len(
        [j for j in plan.jobs if j.merge]
    )
    assert all(v > 0 for v in res.report.worker_peak_rss.values())
    # in memory: the tasks hand their tensors back
    mem = alloykit.merge(fts, base, method, executor="ray", **kw).state_dict
    ref = alloykit.merge(fts, base, method, **kw).state_dict
    assert all(torch.equal(mem[k], ref[k]) for k in ref)


def _register(name: str, fail, marker_dir: Path):
    real = get_method("task_arithmetic")

    @merge_method(name, params=list(real.params), needs_base=True)
    def flaky(tensors, base, ctx, **params):
        fail(marker_dir, ctx.name)
        return real.fn(tensors, base, ctx, **params)

    return flaky


def _fail_once(marker_dir: Path, name: str) -> None:
    marker = marker_dir / f"failed-{name}"
    if name.endswith("attn.weight") and not marker.exists():
        marker.write_text("1")
        raise OSError(5, "Input/output error (injected once)")


def _fail_always(marker_dir: Path, name: str) -> None:
    if name.endswith("attn.weight"):
        raise OSError(5, "Input/output error (injected every time)")


def test_a_task_that_fails_once_is_retried_and_the_output_is_identical(local_ray, models, tmp_path):
    base, fts = models
    _register("fails_once_for_test", _fail_once, tmp_path)
    try:
        alloykit.merge(fts, base, "task_arithmetic", tmp_path / "ref")
        alloykit.merge(fts, base, "fails_once_for_test", tmp_path / "ray", executor="ray")
        assert (tmp_path / "failed-layers.0.attn.weight").exists()  # it did fail, once
        assert _model_bytes(tmp_path / "ray") == _model_bytes(tmp_path / "ref")
    finally:
        REGISTRY.pop("fails_once_for_test", None)


def test_a_task_that_always_fails_is_a_clear_error_and_leaves_no_output(local_ray, models, tmp_path):
    base, fts = models
    _register("fails_always_for_test", _fail_always, tmp_path)
    out = tmp_path / "out"
    try:
        with pytest.raises(OSError, match="injected every time"):
            alloykit.merge(fts, base, "fails_always_for_test", out, executor="ray")
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    finally:
        REGISTRY.pop("fails_always_for_test", None)


def test_the_cli_and_recipe_take_the_executor(local_ray, models, tmp_path):
    from typer.testing import CliRunner

    from alloykit.cli.main import app

    base, fts = models
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        f"method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {fts[0]}\n  - model: {fts[1]}\n"
        "executor: ray\n"
    )
    res = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "ray node" in res.output
    alloykit.merge(fts, base, "task_arithmetic", tmp_path / "ref")
    assert _model_bytes(tmp_path / "out") == _model_bytes(tmp_path / "ref")
    bad = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "o2"), "--executor", "dask"])
    assert bad.exit_code == 2 and "executor = 'dask' is not allowed" in bad.output
