"""Calibration with the weights streamed from the checkpoint (``alloykit.calibration.lazy``): the
same forwards and the same statistics bytes as with the whole model loaded, one module's weights
in memory at a time, and clear refusals."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from alloykit.calibration import StatisticsFile, calibrate  # noqa: E402
from alloykit.calibration.lazy import LazyState, StreamedWeights, parameters_on_meta  # noqa: E402
from alloykit.errors import CheckpointError, ParameterError  # noqa: E402
from alloykit.io import open_checkpoint  # noqa: E402
from tests.test_calibration import berts  # noqa: E402,F401 - the fixture


def _llama_folder(folder, tie: bool, dtype: torch.dtype):
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1, so a norm left unloaded would show
            p.add_(0.05 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tie", [False, True])
def test_a_streamed_llama_computes_the_loaded_models_logits_holding_one_module_at_a_time(tmp_path, tie):
    folder = _llama_folder(tmp_path / "m", tie, torch.bfloat16)
    loaded = transformers.LlamaForCausalLM.from_pretrained(folder).float().eval()
    config = transformers.AutoConfig.from_pretrained(folder)
    with parameters_on_meta():
        model = transformers.LlamaForCausalLM(config)
    model.tie_weights()
    model.eval()
    assert all(p.device.type == "meta" for p in model.parameters())
    weights = StreamedWeights(model, open_checkpoint(folder))
    held: list[int] = []

    def count(module, args):  # (registered after the loaders: runs once this module is loaded)
        held.append(sum(p.numel() for p in model.parameters() if p.device.type != "meta"))

    for m in model.modules():
        m.register_forward_pre_hook(count)
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = loaded(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in loaded.modules())
    assert max(held) <= largest  # never two modules' weights at once
    assert all(p.device.type == "meta" for p in model.parameters())  # all released after
    # the lazily read state equals the loaded model's (names, float32 values; tied names too)
    state = LazyState(weights)
    want_state = loaded.state_dict()
    assert sorted(state) == sorted(want_state)
    for name in want_state:
        assert torch.equal(state[name], want_state[name]), name


def test_streamed_statistics_are_the_bytes_of_the_loaded_model(berts, tmp_path):  # noqa: F811
    """The whole calibration both ways: equal tensors and metadata (the same model fingerprint),
    so a file written one way is reused the other way."""
    ft = berts["fts"][0]
    a = calibrate(ft, berts["data"], samples=6, batch_size=2, output=tmp_path / "a.safetensors",
                  stream_weights=False)  # fmt: skip
    b = calibrate(ft, berts["data"], samples=6, batch_size=2, output=tmp_path / "b.safetensors",
                  stream_weights=True)  # fmt: skip
    assert a.names() == b.names() and len(a.names()) > 0
    for name in a.names():
        ea, eb = a.get(name), b.get(name)
        assert ea.keys() == eb.keys()
        for k in ea:
            if isinstance(ea[k], torch.Tensor):
                assert torch.equal(ea[k], eb[k]), (name, k)
            else:
                assert ea[k] == eb[k], (name, k)
    assert a.meta == b.meta
    # an explicit device: the buffers go there and each weight is read onto it as its module runs
    c = calibrate(ft, berts["data"], samples=6, batch_size=2, stream_weights=True, device="cpu")
    for name in a.names():
        assert torch.equal(a.get(name)["gram" if "gram" in a.get(name) else "inputs"],
                           c.get(name)["gram" if "gram" in c.get(name) else "inputs"])  # fmt: skip
    # the default streams a folder's activations; its file is the one just written
    again = calibrate(ft, berts["data"], samples=6, batch_size=2, output=tmp_path / "a.safetensors")
    assert isinstance(again, StatisticsFile) and again.meta == a.meta


def test_streaming_is_refused_where_it_cannot_apply(berts):  # noqa: F811
    with pytest.raises(ParameterError, match="stream_weights=True needs a model folder, kind='activations'"):
        calibrate(berts["fts"][0], berts["labelled"], kind="fisher", samples=2, stream_weights=True)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ParameterError, match="got Sequential"):
        calibrate(module, [torch.randn(2, 4)], stream_weights=True)


def test_a_parameter_missing_from_the_checkpoint_is_named(tmp_path):
    folder = _llama_folder(tmp_path / "m", False, torch.float32)
    config = transformers.AutoConfig.from_pretrained(folder)
    with parameters_on_meta():
        model = transformers.LlamaForCausalLM(config)
    reader = open_checkpoint({k: v for k, v in _read_all(folder).items() if k != "lm_head.weight"})
    with pytest.raises(CheckpointError, match=r"not in the checkpoint, e.g. \['lm_head.weight'\]"):
        StreamedWeights(model, reader)


def _read_all(folder):
    reader = open_checkpoint(folder)
    return {k: reader.read(k) for k in reader.keys()}


def test_stored_buffers_are_read_once_and_computed_ones_kept():
    """A persistent buffer the checkpoint holds takes its stored value (as from_pretrained
    gives it); one it does not hold (computed at build time, e.g. rotary frequencies) is kept."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)
            self.register_buffer("scale", torch.ones(2))
            self.register_buffer("shift", torch.full((2,), 0.5))

        def forward(self, x):
            return self.linear(x) * self.scale + self.shift

    torch.manual_seed(0)
    real = Scaled()
    real.scale.fill_(3.0)
    stored = {k: v for k, v in real.state_dict().items() if k != "shift"}
    with parameters_on_meta():
        model = Scaled()
    StreamedWeights(model, open_checkpoint(stored))
    x = torch.randn(4, 3)
    assert torch.equal(model(x), real(x))
    assert torch.equal(model.scale, torch.full((2,), 3.0)) and torch.equal(model.shift, torch.full((2,), 0.5))


def test_a_checkpoint_missing_a_parameter_is_loaded_whole_by_default(berts, tmp_path):  # noqa: F811
    """A head the checkpoint lacks (from_pretrained initialises it): the default falls back to
    the whole model, with the statistics it gives; asking for streaming names the parameter."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "headless"
    shutil.copytree(berts["fts"][0], folder)
    state = load_file(folder / "model.safetensors")
    del state["classifier.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    said: list[str] = []
    got = calibrate(folder, berts["data"], samples=6, batch_size=2, log=said.append)
    assert any("classifier.weight" in line and "not in the checkpoint" in line for line in said)
    whole = calibrate(folder, berts["data"], samples=6, batch_size=2, stream_weights=False)
    assert got.names() == whole.names()
    for name in got.names():
        for key in ("gram", "inputs"):
            if key in got.get(name):
                assert torch.equal(got.get(name)[key], whole.get(name)[key])
    with pytest.raises(CheckpointError, match=r"e.g. \['classifier.weight'\]"):
        calibrate(folder, berts["data"], samples=6, batch_size=2, stream_weights=True)
