"""Readers and the atomic writer: formats, round trips, and bad files."""

from __future__ import annotations

import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloykit.errors import CheckpointError, OutputExistsError
from alloykit.io import StreamingWriter, TensorMeta, open_checkpoint, parse_size
from tests.conftest import make_base


def _metas(sd):
    return [TensorMeta(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


def test_safetensors_reader_is_lazy_and_exact(tmp_path):
    sd = make_base() | {
        "ids": torch.arange(5),
        "half": torch.randn(3, 2).half(),
        "bf": torch.randn(4).bfloat16(),
        "empty": torch.zeros(0, 3),
    }
    save_file(sd, tmp_path / "m.safetensors")
    r = open_checkpoint(tmp_path / "m.safetensors")
    assert set(r.keys()) == set(sd)
    assert r.meta("half") == TensorMeta("half", (3, 2), torch.float16)
    for k, v in sd.items():
        assert torch.equal(r.read(k), v) and r.read(k).dtype == v.dtype


def test_sharded_writer_round_trip_with_index(tmp_path):
    sd = make_base()
    out = tmp_path / "out"
    with StreamingWriter(out, _metas(sd), max_shard_bytes=200) as w:
        for k, v in reversed(list(sd.items())):  # any completion order gives the same files
            w.write(k, v)
        w.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in sd.values())
    loaded = {}
    for s in shards:
        loaded |= load_file(out / s)  # the safetensors library reads our files
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    r = open_checkpoint(out)
    assert all(torch.equal(r.read(k), sd[k]) for k in sd)


def test_single_shard_has_no_index(tmp_path):
    sd = make_base()
    with StreamingWriter(tmp_path / "o", _metas(sd)) as w:
        for k, v in sd.items():
            w.write(k, v)
        w.commit()
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["model.safetensors"]


def test_writer_refuses_existing_output_unless_forced(tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="exists"):
        StreamingWriter(tmp_path / "o", [])
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"
    with StreamingWriter(tmp_path / "o", [], force=True) as w:
        w.commit()
    assert not (tmp_path / "o" / "keep.txt").exists()


def test_interrupted_write_leaves_nothing(tmp_path):
    sd = make_base()
    with pytest.raises(KeyboardInterrupt):
        with StreamingWriter(tmp_path / "o", _metas(sd)) as w:
            w.write("embed.weight", sd["embed.weight"])
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_commit_refuses_missing_tensors(tmp_path):
    sd = make_base()
    with pytest.raises(RuntimeError, match="not written"):
        with StreamingWriter(tmp_path / "o", _metas(sd)) as w:
            w.commit()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_wrong_shape(tmp_path):
    with StreamingWriter(tmp_path / "o", [TensorMeta("a", (2,), torch.float32)]) as w:
        with pytest.raises(RuntimeError, match=r"'a': got torch.float32\[3\], planned"):
            w.write("a", torch.zeros(3))


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    save_file(make_base(), tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated file: tensor"):
        open_checkpoint(tmp_path / "m.safetensors")


@pytest.mark.parametrize(
    "payload,match",
    [
        (b"\x01\x02", "not a safetensors file"),
        (struct.pack("<Q", 10**12) + b"{}", "corrupt safetensors header"),
        (struct.pack("<Q", 4) + b"{{{{", "corrupt safetensors header"),
        (
            struct.pack("<Q", 60)
            + json.dumps({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}).encode().ljust(60),
            "unknown dtype",
        ),
    ],
)
def test_corrupt_safetensors_is_a_clear_error(tmp_path, payload, match):
    (tmp_path / "m.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(tmp_path / "m.safetensors")


def test_pytorch_bin_and_sharded_bin_index(tmp_path):
    sd = make_base()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    r = open_checkpoint(tmp_path)
    assert all(torch.equal(r.read(k), sd[k]) for k in sd)
    folder = tmp_path / "sharded"
    folder.mkdir()
    names = sorted(sd)
    torch.save({k: sd[k] for k in names[:3]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({k: sd[k] for k in names[3:]}, folder / "pytorch_model-00002-of-00002.bin")
    wm = {k: f"pytorch_model-0000{1 if i < 3 else 2}-of-00002.bin" for i, k in enumerate(names)}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    r = open_checkpoint(folder)
    assert set(r.keys()) == set(sd) and all(torch.equal(r.read(k), sd[k]) for k in sd)


class Evil:
    def __reduce__(self):
        return (print, ("this ran code",))


def test_pickle_that_needs_code_is_refused(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    torch.save({"w": torch.zeros(2), "obj": Evil()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(CheckpointError, match="needs code execution"):
            open_checkpoint(tmp_path / name)


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        open_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="expected a path, a state dict or an nn.Module"):
        open_checkpoint(42)


def test_module_and_state_dict_sources():
    m = torch.nn.Linear(3, 2)
    r = open_checkpoint(m)
    assert set(r.keys()) == {"weight", "bias"} and torch.equal(r.read("weight"), m.weight)


@pytest.mark.parametrize(
    "text,value",
    [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 5 * 10**8), ("1.5 kb", 1500), (123, 123)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("lots")
