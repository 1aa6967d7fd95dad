"""Data sources, models, training and evaluation of the alignment benchmark (ZipIt!/MuDSC setting).

Every test is small: the sources are read once per module, the models see a handful of images,
and training runs a few dozen steps of an MLP.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from alloykit.bench import align_data as ad
from alloykit.bench import align_models as am
from alloykit.bench.sources import DataMissingError
from alloykit.errors import ParameterError


def _load(source, *args, **kwargs) -> ad.Images:
    try:
        return source(*args, **kwargs)
    except DataMissingError as e:
        pytest.skip(str(e))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and lose a lot when another job holds the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits() -> ad.Images:
    return _load(ad.digits, seed=0)


@pytest.fixture(scope="module")
def glyphs() -> ad.Images:
    return _load(ad.glyphs, seed=0, variants=2)


def _check_images(im: ad.Images, n_classes: int) -> None:
    for x, y in ((im.x_train, im.y_train), (im.x_test, im.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 28, 28) and len(x) == len(y) > 0
        assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
        assert set(y.tolist()) == set(range(n_classes))
    assert len(im.classes) == n_classes


# ------------------------------------------------------------------------------------------ sources


def test_fashion_mnist_is_the_full_set_in_unit_range():
    im = _load(ad.fashion_mnist)
    _check_images(im, 10)
    assert len(im.y_train) == 60_000 and len(im.y_test) == 10_000
    assert im.y_train.bincount().tolist() == [6000] * 10


def test_fashion_mnist_missing_names_the_debian_package(tmp_path):
    with pytest.raises(DataMissingError, match="apt-get install dataset-fashion-mnist"):
        ad.fashion_mnist(tmp_path)


def test_digits_upsampled_padded_and_stratified(digits):
    _check_images(digits, 10)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert len(digits.y_test) == pytest.approx(0.3 * 1797, abs=1)
    # the 20x20 digit sits inside a 4-pixel zero border
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert digits.x_train[:, 0][:, border].abs().max() == 0
    share = digits.y_test.bincount().float() / (digits.y_train.bincount() + digits.y_test.bincount())
    assert share.min() > 0.25 and share.max() < 0.35


def test_digits_same_seed_same_split(digits):
    again, other = ad.digits(seed=0), ad.digits(seed=1)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    assert not torch.equal(other.y_test, digits.y_test)


def test_glyphs_shapes_and_labels(glyphs):
    _check_images(glyphs, 10)
    assert glyphs.classes == list("ABCDEFGHIJ")
    fonts = len(glyphs.info["train_fonts"]) + len(glyphs.info["test_fonts"])
    assert len(glyphs.y_train) + len(glyphs.y_test) == fonts * 10 * 2


def test_glyph_test_fonts_are_unseen(glyphs):
    train, test = set(glyphs.info["train_fonts"]), set(glyphs.info["test_fonts"])
    assert train and test and not train & test
    # held out by family: no style of a test typeface is in training
    family = {str(p): f for p, f, _ in ad.usable_fonts("ABCDEFGHIJ")}
    assert not {family[p] for p in train} & {family[p] for p in test}


def test_glyphs_same_seed_same_data(glyphs):
    again = ad.glyphs(seed=0, variants=2)
    assert torch.equal(again.x_train, glyphs.x_train) and torch.equal(again.y_train, glyphs.y_train)
    assert again.info == glyphs.info
    assert ad.glyphs(seed=1, variants=1, hold_out="font").info["test_fonts"] != glyphs.info["test_fonts"]


def test_usable_fonts_drop_symbol_and_empty_fonts():
    fonts = ad.usable_fonts("ABCDEFGHIJ")
    if not fonts:
        pytest.skip("no fonts installed: apt-get install fonts-dejavu-core")
    names = {f for _, f, _ in fonts}
    assert not any(ad.SYMBOL_FONTS.search(n) for n in names)
    assert "Last Resort High-Efficiency" not in names  # one box for every char
    assert len({p.name for p, _, _ in fonts}) == len(fonts)  # matplotlib's copies of DejaVu are dropped


def test_task_split_keeps_global_labels(digits):
    tasks = ad.task_split(digits, [[0, 1, 2, 3, 4], [9, 5, 6, 7, 8]])
    assert [t.name for t in tasks] == ["digits.A", "digits.B"]
    assert tasks[1].classes == [5, 6, 7, 8, 9]
    assert set(tasks[1].y_train.tolist()) == {5, 6, 7, 8, 9} == set(tasks[1].y_test.tolist())
    assert len(tasks[0].y_train) + len(tasks[1].y_train) == len(digits.y_train)
    assert torch.equal(tasks[0].x_test, digits.x_test[digits.y_test < 5])


@pytest.mark.parametrize("groups", [[[0, 1], [1, 2]], [[0], []], [[0, 10]]])
def test_task_split_refuses_bad_groups(digits, groups):
    with pytest.raises(ParameterError, match="groups"):
        ad.task_split(digits, groups)


def test_subsample_per_class(digits):
    small = ad.subsample(digits, train_per_class=7, test_per_class=3, seed=0)
    assert small.y_train.bincount().tolist() == [7] * 10 and small.y_test.bincount().tolist() == [3] * 10
    assert torch.equal(small.x_train, ad.subsample(digits, 7, 3, seed=0).x_train)


# ------------------------------------------------------------------------------------------- models

X = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(am.ARCHITECTURES))
def test_architecture_maps_images_to_embeddings(name):
    model = am.ARCHITECTURES[name](seed=0).eval()
    assert model(X).shape == (3, 32)
    assert am.ARCHITECTURES[name](seed=0, dim=8).eval()(X).shape == (3, 8)


@pytest.mark.parametrize("name", sorted(am.ARCHITECTURES))
def test_architecture_traces_with_fx(name):
    model = am.ARCHITECTURES[name](seed=0).eval()
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(X), model(X), rtol=0, atol=0)
    torch.testing.assert_close(traced(X[:1]), model(X[:1]), rtol=0, atol=0)  # batch size is not baked in


@pytest.mark.parametrize("name", sorted(am.ARCHITECTURES))
def test_seed_alone_decides_the_init(name):
    state = torch.random.get_rng_state()
    a, b, c = (am.ARCHITECTURES[name](seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert any(
        not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items() if v.dtype.is_floating_point
    )


def test_vit_fused_and_split_qkv():
    fused, split = am.TinyViT(fused_qkv=True), am.TinyViT(fused_qkv=False)
    names = {n for n, _ in split.named_modules()}
    assert {"blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v", "blocks.0.attn.proj"} <= names
    assert "blocks.0.attn.qkv" not in names and "blocks.0.attn.qkv" in dict(fused.named_modules())
    assert not any(isinstance(m, nn.MultiheadAttention) for m in fused.modules())


@pytest.mark.parametrize("fused", [True, False])
def test_attention_matches_torch_reference(fused):
    attn = am.init_weights(_meta(lambda: am.Attention(8, 2, fused_qkv=fused)), seed=3)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    if fused:
        q, k, v = attn.qkv(x).split(8, dim=-1)
    else:
        q, k, v = attn.q(x), attn.k(x), attn.v(x)
    heads = [t.reshape(2, 5, 2, 4).transpose(1, 2) for t in (q, k, v)]
    ref = attn.proj(F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(attn(x), ref)


def _meta(build):
    with torch.device("meta"):
        return build()


def test_resnet_has_projection_shortcut_where_shape_changes():
    model = am.ResNet(width=4, blocks=(1, 2), seed=0)
    assert isinstance(model.stages[0][0].shortcut, nn.Identity)
    assert isinstance(model.stages[1][0].shortcut, nn.Sequential)  # stride 2 and 4 -> 8 channels
    assert isinstance(model.stages[1][1].shortcut, nn.Identity)
    assert model.stages[1][0].shortcut[0].kernel_size == (1, 1)


def test_group_norm_cnn_refuses_groups_that_do_not_divide():
    with pytest.raises(ParameterError, match="groups"):
        am.GroupNormCNN(width=6, groups=4)
    assert sum(isinstance(m, nn.GroupNorm) for m in am.GroupNormCNN(depth=4).modules()) == 4


# ---------------------------------------------------------------------------------- head, training


def test_class_embeddings_unit_norm_and_seeded():
    e = am.class_embeddings(7, 16, seed=2)
    assert e.shape == (7, 16)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(7))
    assert torch.equal(e, am.class_embeddings(7, 16, seed=2))
    assert not torch.equal(e, am.class_embeddings(7, 16, seed=3))


def test_logits_are_scaled_cosines():
    class_emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    out = am.logits(torch.tensor([[3.0, 4.0]]), class_emb, scale=10.0)
    torch.testing.assert_close(out, torch.tensor([[6.0, 8.0, -6.0]]))


def test_train_reduces_loss_and_is_deterministic(digits):
    x, y = digits.x_train[:96], digits.y_train[:96]
    ce = am.class_embeddings(10, 32, seed=0)
    runs = []
    for _ in range(2):
        model = am.MLP(hidden=(32,), seed=0)
        lines: list[str] = []
        out = am.train(model, x, y, ce, epochs=8, lr=3e-3, batch_size=32, seed=0, log=lines.append)
        runs.append((model, out))
    (m1, r1), (m2, r2) = runs
    assert r1["steps"] == 24 == len(r1["loss"]) and len(r1["epoch_loss"]) == 8 and len(lines) == 8
    assert r1["epoch_loss"][-1] < 0.5 * r1["epoch_loss"][0]
    assert r1["loss"] == r2["loss"] and isinstance(r1["seconds"], float) and not m1.training
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])


# --------------------------------------------------------------------------------------- evaluation


class _Fixed(nn.Module):
    """An "embedding model" that returns its input flattened: images (N, 1, 1, d) -> (N, d)."""

    def forward(self, x):
        return x.flatten(1)


def _tasks(groups):
    return [ad.Task(n, g, *([torch.empty(0)] * 4)) for n, g in zip("AB", groups, strict=True)]


def test_evaluate_joint_and_per_task_by_hand():
    # 5 classes, tasks A = {0, 1}, B = {2, 3}; class 4 is in no task, so its example is left out.
    s = torch.tensor(
        [
            [2.0, 1.0, 3.0, 0.0, 9.0],  # y=0: joint 2 (wrong), within A 0 (right)
            [0.0, 1.0, 0.0, 0.0, 0.0],  # y=1: joint 1 (right), within A 1 (right)
            [0.0, 5.0, 1.0, 2.0, 0.0],  # y=2: joint 1 (wrong), within B 3 (wrong)
            [0.0, 0.0, 1.0, 2.0, 0.0],  # y=3: joint 3 (right), within B 3 (right)
            [0.0, 0.0, 0.0, 0.0, 0.0],  # y=4: in no task
        ]
    )
    y = torch.tensor([0, 1, 2, 3, 4])
    out = am.evaluate(
        lambda x: s[x.flatten().long()], torch.arange(5.0), y, torch.eye(5), _tasks([[0, 1], [2, 3]])
    )
    assert out == {"joint": 0.5, "per_task": {"A": 1.0, "B": 0.5}, "per_task_mean": 0.75}


def test_evaluate_module_equals_its_logits(digits):
    tasks = ad.task_split(digits, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    ce = am.class_embeddings(10, 32, seed=0)
    model = am.MLP(hidden=(16,), seed=0)
    x, y = digits.x_test[:200], digits.y_test[:200]
    by_module = am.evaluate(model, x, y, ce, tasks, batch_size=64)
    by_fn = am.evaluate(lambda b: am.logits(model(b), ce), x, y, ce, tasks)
    assert by_module == by_fn


def test_ensemble_picks_the_most_confident_model_by_hand():
    # class vectors = the 4 unit axes, so logits = 10 · (embedding / |embedding|).
    x = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0.6, 0.8], [0.8, 0, 0, 0.6]]).reshape(3, 1, 1, 4)
    tasks = _tasks([[0, 1], [2, 3]])
    out = am.ensemble_logits([_Fixed(), _Fixed()], torch.eye(4), tasks, x)

    def log_sigmoid(z):  # log softmax of the larger of two logits z apart
        return -math.log1p(math.exp(-z))

    expected = torch.tensor(
        [
            [log_sigmoid(10), log_sigmoid(-10), log_sigmoid(0), log_sigmoid(0)],
            [log_sigmoid(0), log_sigmoid(0), log_sigmoid(-2), log_sigmoid(2)],
            [log_sigmoid(8), log_sigmoid(-8), log_sigmoid(-6), log_sigmoid(6)],
        ]
    )
    torch.testing.assert_close(out, expected)
    # row 3: model A is surer (sigmoid(8) > sigmoid(6)), so the joint prediction is class 0
    assert out.argmax(1).tolist() == [0, 3, 0]
    wider = am.ensemble_logits([_Fixed(), _Fixed()], torch.eye(5)[:, :4], tasks, x)
    assert torch.isinf(wider[:, 4]).all()  # a class in no task is never predicted


def test_ensemble_per_task_equals_individual_models(digits):
    tasks = ad.task_split(digits, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    ce = am.class_embeddings(10, 32, seed=0)
    models = [am.MLP(hidden=(16,), seed=s) for s in (0, 1)]
    x, y = digits.x_test, digits.y_test
    ens = am.evaluate(lambda b: am.ensemble_logits(models, ce, tasks, b), x, y, ce, tasks)
    for m, t in zip(models, tasks, strict=True):
        assert ens["per_task"][t.name] == am.evaluate(m, x, y, ce, tasks)["per_task"][t.name]
