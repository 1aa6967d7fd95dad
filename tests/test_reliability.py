"""Nothing lost, nothing silently wrong: output safety, OS errors, signals, determinism,
degenerate recipes, validation before reading, and injected I/O faults."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import alloykit.engine.run as engine_run
import alloykit.io.readers as readers_mod
import alloykit.io.writer as writer_mod
from alloykit import merge
from alloykit.cli.main import app
from alloykit.errors import CheckpointError, OutputError, ParameterError, RecipeError
from alloykit.methods import REGISTRY, get_method
from tests.conftest import save_folder

runner = CliRunner()


def files_digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
        if p.is_file() and p.name != "alloykit_provenance.json"  # it holds a timestamp
    }


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in Path(parent).iterdir() if ".alloykit-" in p.name]


def recipe_file(tmp: Path, data: dict, name: str = "r.yml") -> Path:
    p = tmp / name
    p.write_text(json.dumps(data))
    return p


# ----------------------------------------------------------------------------- output safety


def test_output_equal_to_an_input_is_refused_even_with_force(toy):
    before = files_digest(toy["paths"][0])
    for out in (toy["paths"][0], toy["base_path"]):
        with pytest.raises(OutputError, match=r"is the (model|base model)"):
            merge(toy["paths"], toy["base_path"], "task_arithmetic", out, force=True)
    assert files_digest(toy["paths"][0]) == before
    assert leftovers(toy["tmp"]) == []


def test_output_inside_or_around_an_input_is_refused(toy):
    with pytest.raises(OutputError, match="lies inside the model folder"):
        merge(toy["paths"], toy["base_path"], "task_arithmetic", toy["paths"][1] / "merged")
    with pytest.raises(OutputError, match="contains the model"):
        merge(toy["paths"], toy["base_path"], "task_arithmetic", toy["tmp"], force=True)
    assert not (toy["paths"][1] / "merged").exists()


def test_output_through_a_symlink_to_an_input_is_refused(toy):
    link = toy["tmp"] / "link"
    link.symlink_to(toy["paths"][2], target_is_directory=True)
    before = files_digest(toy["paths"][2])
    with pytest.raises(OutputError, match="resolved"):
        merge(toy["paths"], toy["base_path"], "task_arithmetic", link, force=True)
    assert files_digest(toy["paths"][2]) == before


def test_output_containing_the_recipe_is_refused_by_the_cli(toy):
    folder = toy["tmp"] / "recipes"
    folder.mkdir()
    recipe = recipe_file(folder, {"method": "linear", "models": [{"model": str(p)} for p in toy["paths"]]})
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(folder), "--force"])
    assert res.exit_code == 2 and "contains the recipe" in res.output
    assert recipe.exists()


def test_a_file_input_leaves_its_folder_free_for_outputs(toy):
    pt = toy["tmp"] / "a.pt"
    torch.save(toy["fts"][0], pt)
    merge([pt, toy["paths"][1]], toy["base_path"], "task_arithmetic", toy["tmp"] / "beside")
    assert (toy["tmp"] / "beside" / "model.safetensors").exists()
    with pytest.raises(OutputError, match="is the model"):
        merge([pt, toy["paths"][1]], toy["base_path"], "task_arithmetic", pt, force=True)


def test_force_replaces_an_old_output_only_once_the_new_one_is_complete(toy, monkeypatch):
    out = toy["tmp"] / "out"
    merge(toy["paths"], toy["base_path"], "task_arithmetic", out, parameters={"lambda": 0.3})
    old = files_digest(out)
    calls = {"n": 0}
    real = writer_mod._pwrite_all

    def fail_late(fd, view, offset):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, view, offset)

    monkeypatch.setattr(writer_mod, "_pwrite_all", fail_late)
    with pytest.raises(OutputError, match="no space left"):
        merge(toy["paths"], toy["base_path"], "task_arithmetic", out, force=True)
    assert files_digest(out) == old
    assert leftovers(toy["tmp"]) == []


# ----------------------------------------------------------------------------- OS errors


def test_not_enough_free_space_is_refused_before_reading(toy, monkeypatch):
    import shutil as shutil_mod

    monkeypatch.setattr(writer_mod.shutil, "disk_usage", lambda p: shutil_mod._ntuple_diskusage(10, 10, 10))

    def boom(*a, **k):
        raise AssertionError("read tensor data before the space check")

    monkeypatch.setattr(readers_mod.SafetensorsFile, "read_range", boom)
    with pytest.raises(OutputError, match=r"not enough free space.*needs .* free"):
        merge(toy["paths"], toy["base_path"], "task_arithmetic", toy["tmp"] / "out")
    assert not (toy["tmp"] / "out").exists() and leftovers(toy["tmp"]) == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EIO, "input/output error")])
def test_a_write_error_mid_merge_is_a_message_and_leaves_nothing(toy, monkeypatch, code, words):
    real = os.pwrite
    calls = {"n": 0}

    def flaky(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(code, os.strerror(code))
        return real(fd, data, offset)

    monkeypatch.setattr(writer_mod.os, "pwrite", flaky)
    with pytest.raises(OutputError, match=words):
        merge(toy["paths"], toy["base_path"], "ties", toy["tmp"] / "out", workers=3)
    assert not (toy["tmp"] / "out").exists() and leftovers(toy["tmp"]) == []


def test_a_read_error_names_the_file_and_tensor(toy, monkeypatch):
    def eio(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(readers_mod.os, "preadv", eio)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: input/output error.*while reading"):
        merge(toy["paths"], toy["base_path"], "task_arithmetic", toy["tmp"] / "out")
    assert not (toy["tmp"] / "out").exists()


def test_short_reads_are_completed(toy, monkeypatch):
    expected = merge(toy["paths"], toy["base_path"], "ties").state_dict
    real = os.preadv

    def short(fd, buffers, offset):  # at most 7 bytes per call
        (view,) = buffers
        return real(fd, [view[:7]], offset)

    monkeypatch.setattr(readers_mod.os, "preadv", short)
    got = merge(toy["paths"], toy["base_path"], "ties").state_dict
    for k in expected:
        assert torch.equal(got[k], expected[k])


def test_permission_denied_on_the_output_parent_is_a_message(toy, monkeypatch):
    real = Path.mkdir

    def denied(self, *a, **k):
        if ".alloykit-tmp-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(OutputError, match="permission denied"):
        merge(toy["paths"], toy["base_path"], "task_arithmetic", toy["tmp"] / "out")


def test_missing_parents_are_made_and_removed_again_on_failure(toy, monkeypatch):
    out = toy["tmp"] / "new" / "deeper" / "out"
    monkeypatch.setattr(engine_run, "_copy", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "boom")))
    bad = toy["base"] | {"position_ids": torch.arange(3)}
    with pytest.raises(OSError):
        merge([f | {"position_ids": torch.arange(3)} for f in toy["fts"]], bad, "task_arithmetic", out)
    assert not (toy["tmp"] / "new").exists()


def test_symlink_loop_is_named(toy):
    a, b = toy["tmp"] / "loop_a", toy["tmp"] / "loop_b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(CheckpointError, match="symbolic link loop"):
        merge([a, toy["paths"][0]], toy["base_path"], "task_arithmetic")


def test_recipe_that_is_a_folder_or_binary_is_a_message(tmp_path):
    res = runner.invoke(app, ["merge", str(tmp_path), "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "is a folder" in res.output and "Traceback" not in res.output
    binary = tmp_path / "r.yml"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(RecipeError, match="not a text file"):
        from alloykit.recipe import load_recipe

        load_recipe(binary)


def test_unexpected_errors_are_reported_without_traceback_unless_debug(toy, monkeypatch):
    import alloykit.api

    def broken(*a, **k):
        raise RuntimeError("something odd")

    monkeypatch.setattr(alloykit.api, "merge", broken)
    recipe = recipe_file(
        toy["tmp"], {"method": "linear", "models": [{"model": str(p)} for p in toy["paths"]]}
    )
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(toy["tmp"] / "o")])
    assert res.exit_code == 3 and "internal error: RuntimeError: something odd" in res.output
    assert "Traceback" not in res.output and "--debug" in res.output
    res = runner.invoke(app, ["--debug", "merge", str(recipe), "-o", str(toy["tmp"] / "o")])
    assert isinstance(res.exception, RuntimeError)


def test_an_os_error_in_the_cli_is_one_line(toy, monkeypatch):
    import alloykit.api

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "/some/where")

    monkeypatch.setattr(alloykit.api, "merge", full)
    recipe = recipe_file(
        toy["tmp"], {"method": "linear", "models": [{"model": str(p)} for p in toy["paths"]]}
    )
    res = runner.invoke(app, ["merge", str(recipe), "-o", str(toy["tmp"] / "o")])
    assert res.exit_code == 2 and "/some/where: no space left" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------- signals

SLOW_MERGE = textwrap.dedent(
    """
    import sys, time
    from alloykit.methods.base import merge_method

    @merge_method("slow_for_test", params=[], needs_base=False)
    def slow(tensors, base, ctx):
        time.sleep(60)  # a job that is still running when the signal comes
        open(sys.argv[-1] + ".job-finished", "w").close()  # (never reached if the stop is prompt)
        return tensors[0]

    from alloykit.cli.main import app
    app(sys.argv[1:])
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signals_clean_up_and_exit_without_waiting_for_running_jobs(toy, sig):
    recipe = recipe_file(toy["tmp"], {"method": "slow_for_test", "models": [{"model": str(toy["paths"][0])}]})
    out = toy["tmp"] / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, "merge", str(recipe), "--no-progress", "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(1200):  # wait until the temporary folder exists: jobs are running
        if leftovers(toy["tmp"]) or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None and leftovers(toy["tmp"]), proc.communicate()
    time.sleep(0.3)
    proc.send_signal(sig)
    # Each running job sleeps 60 s: an exit before the 30 s bound means the stop did not wait for
    # them (how fast it is belongs in a benchmark), and no job got to finish.
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, err
    assert not Path(str(out) + ".job-finished").exists()
    assert f"stopped by {signal.Signals(sig).name}" in err and "Traceback" not in err
    assert not out.exists() and leftovers(toy["tmp"]) == []


# ----------------------------------------------------------------------------- determinism

# Tensors large enough that torch splits reductions across threads (grain 32768 elements).
MEDIUM = {
    "embed.weight": (300, 128),
    "layers.0.attn.weight": (256, 256),
    "layers.0.attn.bias": (256,),
    "layers.1.mlp.weight": (160, 256),
    "layers.1.norm.weight": (256,),
}


def _medium(tmp: Path, n: int) -> tuple[Path, list[Path]]:
    g = torch.Generator().manual_seed(5)
    base = {k: torch.randn(s, generator=g) for k, s in MEDIUM.items()}
    fts = [{k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return save_folder(base, tmp / "mbase"), [save_folder(f, tmp / f"mft{i}") for i, f in enumerate(fts)]


def _models_for(method: str, paths: list[Path]) -> list[Path]:
    m = get_method(method)
    return paths[: m.max_models] if m.max_models else paths


def synthetic_statistics(paths: list[Path], kind: str, seed: int = 0) -> list:
    """Seeded statistics for models on disk: random layer inputs for every 2-D tensor, or a random
    positive Fisher for every tensor (no weight signature: they belong to no real forward pass)."""
    from alloykit.calibration import Statistics

    g = torch.Generator().manual_seed(seed)
    out = []
    for p in paths:
        r = readers_mod.open_checkpoint(p)
        entries = {}
        for name in r.keys():
            shape = r.meta(name).shape
            if kind == "fisher":
                entries[name] = {"fisher": torch.rand(shape, generator=g) + 0.01, "examples": 8}
            elif len(shape) == 2:
                entries[name] = {
                    "inputs": torch.randn(3 * shape[1] // 2 + 1, shape[1], generator=g),
                    "tokens": 3 * shape[1] // 2 + 1,
                }
        out.append(Statistics(entries, meta={"kind": kind}))
    return out


class ShuffledExecutor:
    """Runs every job, then reports them in a random completion order."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.workers = 1

    def run(self, fn, items):
        done = [(i, fn(item)) for i, (item, _cost) in enumerate(items)]
        self.rng.shuffle(done)
        yield from done


def test_every_method_gives_the_same_bytes_for_any_workers_order_and_rerun(tmp_path, monkeypatch):
    base, fts = _medium(tmp_path, 3)
    real_make = engine_run.make_executor
    for name in sorted(REGISTRY):
        if name.endswith("_for_test") or REGISTRY[name].alignment is not None:
            continue  # alignment methods: tests/test_alignment.py checks their determinism
        models = _models_for(name, fts)
        kind = get_method(name).statistics
        stats = synthetic_statistics(models, kind) if kind else None
        outs = []
        for i, (workers, shuffled) in enumerate([(1, False), (3, False), (2, True), (3, False)]):
            if shuffled:
                monkeypatch.setattr(engine_run, "make_executor", lambda *a: ShuffledExecutor(7))
            out = tmp_path / f"{name}-{i}"
            merge(models, base, name, out, workers=workers, seed=3, statistics=stats)
            monkeypatch.setattr(engine_run, "make_executor", real_make)
            outs.append(files_digest(out))
        assert outs[0] == outs[1] == outs[2] == outs[3], name


# ----------------------------------------------------------------------------- degenerate recipes


def test_linear_weights_that_nearly_cancel_are_refused(toy):
    with pytest.raises(ParameterError, match=r"sum to .*about 0"):
        merge(toy["paths"][:2], None, "linear", model_parameters=[{"weight": 1.0}, {"weight": -1.0 + 1e-9}])
    with pytest.raises(ParameterError, match="tensor 'head.weight'"):
        cond = [{"filter": "head", "value": -1.0}, {"value": 1.0}]
        merge(toy["paths"][:2], None, "linear", model_parameters=[{"weight": 1.0}, {"weight": cond}])


def test_the_same_model_twice_or_the_base_as_a_model_is_refused(toy):
    with pytest.raises(ParameterError, match="listed twice"):
        merge([toy["paths"][0], toy["paths"][0]], toy["base_path"], "task_arithmetic")
    with pytest.raises(ParameterError, match="listed twice"):  # the same folder under another name
        merge([toy["paths"][0], toy["paths"][0] / ".." / "ft0"], toy["base_path"], "task_arithmetic")
    with pytest.raises(ParameterError, match="base model .* is also listed"):
        merge([toy["paths"][0], toy["base_path"]], toy["base_path"], "task_arithmetic")
    res = merge([toy["fts"][0], toy["fts"][0]], toy["base"], "task_arithmetic")  # in memory: a warning
    assert any("listed twice" in w for w in res.provenance["warnings"])


def test_identical_weights_under_two_names_are_warned_about(toy):
    copy = save_folder(toy["fts"][0], toy["tmp"] / "copy-of-ft0")
    res = merge([toy["paths"][0], copy], toy["base_path"], "task_arithmetic")
    assert any("copy-of-ft0 has the same weights as" in w for w in res.report.warnings)
    twin_base = save_folder(toy["base"], toy["tmp"] / "base-again")
    res = merge([toy["paths"][0], twin_base], toy["base_path"], "task_arithmetic")
    assert any("base-again" in w and "same weights" in w for w in res.provenance["warnings"])


@pytest.mark.parametrize(
    "method, params",
    [
        ("ties", {"density": 0.0, "topk": "tensor", "topk_rule": "exact"}),
        ("task_arithmetic", {"lambda": 0.0}),
    ],
)
def test_a_merge_that_changes_nothing_says_so(toy, method, params):
    res = merge(toy["paths"], toy["base_path"], method, parameters=params)
    assert any("changed nothing" in w for w in res.report.warnings)
    assert any(" = 0" in w and "dropped" in w for w in res.plan.warnings)
    normal = merge(toy["paths"], toy["base_path"], method)
    assert not any("changed nothing" in w for w in normal.report.warnings)


def test_a_memory_budget_below_the_largest_job_names_the_smallest_that_works(toy):
    with pytest.raises(ParameterError, match=r"tensor 'embed.weight' needs ([\d,]+) bytes.*smallest budget"):
        merge(toy["paths"], toy["base_path"], "ties", max_memory="1KB", dry_run=True)
    plan = merge(toy["paths"], toy["base_path"], "ties", dry_run=True).plan
    largest = max(j.cost for j in plan.jobs)
    merge(toy["paths"], toy["base_path"], "ties", max_memory=largest)  # exactly enough works


# ----------------------------------------------------------------------------- validated first


@pytest.mark.parametrize("companion", ["config.json", "tokenizer_config.json", "generation_config.json"])
def test_malformed_companion_files_are_reported_before_any_tensor_is_read(toy, monkeypatch, companion):
    (toy["base_path"] / companion).write_text("{not json")

    def boom(*a, **k):
        raise AssertionError("read tensor data before validating companions")

    monkeypatch.setattr(readers_mod.SafetensorsFile, "read_range", boom)
    with pytest.raises(CheckpointError, match=f"{companion}: malformed JSON"):
        merge(toy["paths"], toy["base_path"], "task_arithmetic", toy["tmp"] / "out")


def test_a_corrupt_index_is_named(toy):
    folder = toy["tmp"] / "sharded"
    folder.mkdir()
    save_file(toy["fts"][0], str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: malformed index"):
        merge([folder, toy["paths"][1]], toy["base_path"], "task_arithmetic")


# ----------------------------------------------------------------------------- fuzz and faults

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


def _value(draw, p):
    """A value for parameter ``p``: usually valid, sometimes out of range or of a wrong type."""
    bad = draw(st.integers(0, 9)) == 0
    if bad:
        return draw(st.sampled_from(["x", None, -1e9, 1e9, [1, "a"], {"filter": 3}]))
    if p.choices:
        return draw(st.sampled_from(list(p.choices)))
    if p.kind is bool:
        return draw(st.booleans())
    low = p.ge if p.ge is not None else (p.gt + 1e-3 if p.gt is not None else -2.0)
    high = p.le if p.le is not None else (p.lt - 1e-3 if p.lt is not None else 3.0)
    if p.kind is int:
        return draw(st.integers(int(max(low, 0)), int(min(high, 8))))
    return draw(st.floats(low, high, allow_nan=False))


@st.composite
def recipes(draw):
    name = draw(
        st.sampled_from(
            sorted(n for n in REGISTRY if not n.endswith("_for_test") and REGISTRY[n].alignment is None)
        )
    )
    m = get_method(name)
    n_models = 1 if m.max_models == 1 else draw(st.integers(max(2, m.min_models), 3))
    params = {}
    for p in m.params:
        if draw(st.integers(0, 2)) == 0:
            params[p.name] = _value(draw, p)
    return name, n_models, params


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(recipe=recipes(), workers=st.integers(1, 3))
def test_fuzzed_recipes_merge_or_fail_cleanly(toy, recipe, workers):
    name, n_models, params = recipe
    tmp = toy["tmp"]
    data = {
        "method": name,
        "models": [{"model": str(p)} for p in toy["paths"][:n_models]],
        "parameters": params,
    }
    if get_method(name).needs_base:
        data["base_model"] = str(toy["base_path"])
    kind = get_method(name).statistics
    if kind:
        for entry, path in zip(data["models"], toy["paths"], strict=False):
            file = tmp / f"{path.name}.{kind}.safetensors"
            if not file.exists():
                synthetic_statistics([path], kind)[0].save(file)
            entry["statistics"] = str(file)
    out = tmp / "fuzz-out"
    r = recipe_file(tmp, data, "fuzz.yml")
    res = runner.invoke(
        app, ["merge", str(r), "-o", str(out), "--force", "--no-progress", "--workers", str(workers)]
    )
    assert res.exit_code in (0, 2), (res.output, res.exception)
    assert "Traceback" not in res.output
    assert leftovers(tmp) == []
    if res.exit_code == 0:
        got = readers_mod.open_checkpoint(out)
        assert set(got.keys()) == set(toy["base"])
        for k in got.keys():
            assert torch.isfinite(got.read(k)).all(), (name, params, k)
    else:
        assert "error:" in res.output


@hypothesis.settings(max_examples=25, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(
    fail_at=st.integers(1, 30),
    code=st.sampled_from([errno.ENOSPC, errno.EIO, errno.EDQUOT]),
    where=st.sampled_from(["write", "read"]),
    method=st.sampled_from(["task_arithmetic", "ties", "tsv_m", "dare"]),
)
def test_injected_io_faults_never_leave_a_half_written_output(toy, fail_at, code, where, method):
    # A failed merge returns at once and leaves its in-flight jobs to finish in the background
    # (their results are dropped); they must not count, or fail, in this example's reads.
    for t in threading.enumerate():
        if t.name.startswith("alloykit") and t is not threading.current_thread():
            t.join(timeout=60)
    calls = {"n": 0}
    module, attr = (writer_mod.os, "pwrite") if where == "write" else (readers_mod.os, "preadv")
    real = getattr(module, attr)

    def faulty(*args):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(code, os.strerror(code))
        return real(*args)

    out = toy["tmp"] / "faulty"
    setattr(module, attr, faulty)
    try:
        try:
            merge(toy["paths"], toy["base_path"], method, out, workers=2)
            failed = False
        except (OutputError, CheckpointError) as e:
            failed = True
            assert os.strerror(code).split()[0].lower() in str(e).lower() or "quota" in str(e)
    finally:
        setattr(module, attr, real)
    if failed:
        assert not out.exists()
    else:  # the fault came after the last read/write: a complete, loadable output
        assert calls["n"] < fail_at
        assert set(readers_mod.open_checkpoint(out).keys()) == set(toy["base"])
        import shutil

        shutil.rmtree(out)
    assert leftovers(toy["tmp"]) == []


@pytest.mark.parametrize("value", [2.2250738585072014e-308, -1e-40, 1e39, float("inf"), -float("inf")])
def test_a_parameter_float32_cannot_hold_is_refused_before_anything_is_read(toy, value):
    """Found by the fuzzer: linear with weights of 2.2e-308 (0 in float32) wrote NaN (0/0). A
    non-zero value outside float32's normal range is now refused with the range; 0 and small
    normal values pass."""
    from alloykit import merge
    from alloykit.errors import ParameterError

    paths = [str(p) for p in toy["paths"][:2]]
    with pytest.raises(
        ParameterError, match=r"parameter 'weight' = .* (outside float32's range|is not allowed)"
    ):
        merge(paths, method="linear", parameters={"weight": value}, dry_run=True)
    for ok in (0.0, 1e-30, -2.5):
        weights = [ok, 1.0]
        result = merge(paths, method="linear", model_parameters=[{"weight": w} for w in weights])
        merged = result.state_dict["embed.weight"]
        assert torch.isfinite(merged).all()
