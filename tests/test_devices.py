"""Devices: selection and its errors, every method on a (fake) accelerator giving the host's
bytes, out-of-memory handling; on a real GPU (when present) GPU vs CPU to float32 rounding."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import alloykit
from alloykit.engine import devices as dev
from alloykit.engine import run as engine_run
from alloykit.errors import DeviceMemoryError, ParameterError
from alloykit.methods import REGISTRY, get_method
from tests.fake_device import FAKE, DeviceMixError, FakeDeviceMode, OnFake
from tests.test_reliability import _medium, _models_for, synthetic_statistics

# ------------------------------------------------------------------------------------ selection


def test_cpu_and_defaults():
    assert dev.resolve_devices(None) == [torch.device("cpu")]
    assert dev.resolve_devices("cpu") == [torch.device("cpu")]
    assert dev.resolve_devices(torch.device("cpu")) == [torch.device("cpu")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_unavailable_devices_are_named():
    assert dev.resolve_devices("auto") == [torch.device("cpu")]
    with pytest.raises(ParameterError, match="device cuda is not available on this machine"):
        dev.resolve_devices("cuda")
    with pytest.raises(ParameterError, match="use --device cpu"):
        dev.resolve_devices("cuda:1")


def test_device_indices_are_checked_against_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert dev.resolve_devices("cuda:1") == [torch.device("cuda", 1)]
    assert dev.resolve_devices("cuda") == [torch.device("cuda", 0)]
    assert dev.resolve_devices("cuda:0,cuda:1") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert dev.resolve_devices("auto") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with pytest.raises(
        ParameterError, match=r"device cuda:3 does not exist: this machine has 2 cuda device\(s\)"
    ):
        dev.resolve_devices("cuda:3")
    with pytest.raises(ParameterError, match="names a device twice"):
        dev.resolve_devices(["cuda:1", "cuda:1"])


@pytest.mark.parametrize(
    "bad, words",
    [("banana", "is not a device"), ("meta", "holds no data"), ([], "an empty list")],
)
def test_malformed_devices_are_refused(bad, words):
    with pytest.raises(ParameterError, match=words):
        dev.resolve_devices(bad)


def test_cli_and_recipe_refuse_a_missing_gpu_before_reading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from typer.testing import CliRunner

    from alloykit.cli.main import app

    base, fts = _medium(tmp_path, 2)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"method: linear\nmodels:\n  - model: {fts[0]}\n  - model: {fts[1]}\ndevice: cuda\n")
    result = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "device cuda is not available" in result.output
    result = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors").exists()


# ------------------------------------------------------------------------- on a fake accelerator


@pytest.fixture
def fake_accelerator(monkeypatch):
    """Merges run their jobs on the fake device (:mod:`tests.fake_device`)."""
    monkeypatch.setattr(dev, "resolve_devices", lambda d: [FAKE] if d == "fake" else [torch.device("cpu")])

    @contextlib.contextmanager
    def on_fake(device):
        with FakeDeviceMode():
            yield device

    monkeypatch.setattr(engine_run, "on_device", on_fake)


def test_the_fake_device_catches_host_tensors_mixed_in():
    with FakeDeviceMode():
        x = torch.ones(3).to(FAKE)
        assert isinstance(x * 2, OnFake) and x.device == FAKE
        with pytest.raises(DeviceMixError, match="host tensors of shapes"):
            x + torch.ones(3)
        assert isinstance(torch.zeros(3, device=x.device) + x, OnFake)
        assert not isinstance(x.cpu(), OnFake)


def _merge_all(tmp_path, device):
    base, fts = _medium(tmp_path, 3)
    out = {}
    for name in sorted(REGISTRY):
        if name.endswith("_for_test") or REGISTRY[name].alignment is not None:
            continue
        models = _models_for(name, fts)
        kind = get_method(name).statistics
        stats = synthetic_statistics(models, kind) if kind else None
        res = alloykit.merge(models, base, name, workers=2, seed=3, statistics=stats, device=device)
        out[name] = (res.state_dict, res.report)
    return out


def test_every_method_on_the_fake_accelerator_gives_the_host_bytes(tmp_path, fake_accelerator):
    """Each job's inputs, statistics and whole-model state go to the device, the method computes
    there (creating nothing on the host that it mixes in), the result comes back: the same CPU
    kernels run, so the bytes equal a host merge's."""
    host = _merge_all(tmp_path / "host", None)
    fake = _merge_all(tmp_path / "fake", "fake")
    assert host.keys() == fake.keys() and len(host) >= 20
    for name in host:
        sd_h, sd_f = host[name][0], fake[name][0]
        assert sd_h.keys() == sd_f.keys(), name
        for k in sd_h:
            assert type(sd_f[k]) is torch.Tensor, (name, k)  # back on the host
            assert torch.equal(sd_h[k], sd_f[k]), (name, k)
        assert fake[name][1].devices == ["meta"] and host[name][1].devices == ["cpu"]


def test_alignment_merges_run_on_the_fake_accelerator(fake_accelerator):
    from tests.test_alignment import MLP

    torch.manual_seed(0)
    states = [MLP().state_dict(), MLP().state_dict()]
    data = [torch.randn(32, 8, generator=torch.Generator().manual_seed(1))]
    for method in ("activation_matching", "zipit", "mudsc_zip"):
        host = alloykit.merge(states, method=method, model=MLP, data=data)
        al = host.plan.spec.alignment
        fake = alloykit.merge(states, method=method, model=MLP, data=data, alignment=al, device="fake")
        assert host.state_dict.keys() == fake.state_dict.keys()
        for k in host.state_dict:
            assert torch.equal(host.state_dict[k], fake.state_dict[k]), (method, k)


def test_running_out_of_device_memory_names_the_tensor_or_falls_back(tmp_path, fake_accelerator, monkeypatch):
    base, fts = _medium(tmp_path, 2)
    method = get_method("task_arithmetic")
    real = method.fn

    def hungry(tensors, base, ctx, **params):
        if isinstance(tensors[0], OnFake) and ctx.name == "embed.weight":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real(tensors, base, ctx, **params)

    monkeypatch.setitem(REGISTRY, "task_arithmetic", dataclasses.replace(method, fn=hungry))
    out = tmp_path / "out"
    with pytest.raises(DeviceMemoryError, match="meta ran out of memory merging 'embed.weight'"):
        alloykit.merge(fts, base, "task_arithmetic", output=out, device="fake")
    assert not out.exists()
    res = alloykit.merge(fts, base, "task_arithmetic", device="fake", device_fallback=True)
    assert any("1 job(s) ran out of device memory" in w for w in res.report.warnings)
    monkeypatch.setitem(REGISTRY, "task_arithmetic", method)
    plain = alloykit.merge(fts, base, "task_arithmetic")
    for k in plain.state_dict:
        assert torch.equal(plain.state_dict[k], res.state_dict[k])


# ------------------------------------------------------------------------------- a real GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
def test_gpu_merges_equal_cpu_merges_to_float32_rounding(tmp_path):
    host = _merge_all(tmp_path / "host", None)
    gpu = _merge_all(tmp_path / "gpu", "cuda")
    for name in host:
        for k, v in host[name][0].items():
            torch.testing.assert_close(gpu[name][0][k], v, rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
