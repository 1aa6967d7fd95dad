"""Alignment part 1: groups traced from the model, the self-check, transforms and the merge formula,
twin recovery, weight/activation matching, BatchNorm reset and REPAIR, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import alloykit
from alloykit.alignment.check import SelfCheckError, self_check
from alloykit.alignment.groups import GroupTable
from alloykit.alignment.post import _channel_stats, bn_reset
from alloykit.alignment.solvers import hungarian
from alloykit.alignment.statistics import AlignmentDataError
from alloykit.alignment.trace import trace_groups
from alloykit.alignment.transforms import Transform, transform_state
from alloykit.errors import CheckpointError, ParameterError

# ----------------------------------------------------------------------------- tiny models


class MLP(nn.Module):
    def __init__(self, d_in=8, h=16, d_out=4):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, h), nn.Linear(h, h), nn.Linear(h, d_out)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.short(x))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(1, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.l1, self.l2 = Block(8, 8, 1), Block(8, 12, 2)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(self.l2(self.l1(x)).mean((2, 3)))


class GNCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.g1 = nn.Conv2d(1, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.c2, self.g2 = nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.g1(self.c1(x)))
        x = torch.relu(self.g2(self.c2(x)))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


class ViT(nn.Module):
    def __init__(self, fused=True, d=8, heads=2):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.patch = nn.Conv2d(1, d, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, d) * 0.1)
        self.ln1, self.ln2, self.norm = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        if fused:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        b, _, c = x.shape
        x = torch.cat([self.cls.expand(b, -1, -1), x], dim=1) + self.pos
        y = self.ln1(x)
        n, h = y.shape[1], self.heads
        if self.fused:
            q, k, v = self.qkv(y).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q(y).reshape(b, n, h, c // h).transpose(1, 2)
            k = self.k(y).reshape(b, n, h, c // h).transpose(1, 2)
            v = self.v(y).reshape(b, n, h, c // h).transpose(1, 2)
        a = (q @ k.transpose(-2, -1) * (c // h) ** -0.5).softmax(-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))
        return self.head(self.norm(x)[:, 0])


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    return transformers.BertModel(cfg).eval()


def _randomize_norms(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so that a wrong permutation shows."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


IMG = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
ARCHITECTURES = {
    "mlp": (MLP, (torch.randn(5, 8),), {}),
    "cnn_bn": (CNN, (IMG,), {}),
    "resnet": (ResNet, (IMG,), {}),
    "gn_cnn": (GNCNN, (IMG,), {}),
    "vit_fused": (lambda: ViT(True), (IMG,), {}),
    "vit_split": (lambda: ViT(False), (IMG,), {}),
}


# ----------------------------------------------------------------------------- tracing


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_groups_pass_the_self_check_and_block_crossing_changes_outputs(name):
    factory, args, kwargs = ARCHITECTURES[name]
    torch.manual_seed(1)
    model = _randomize_norms(factory())
    table = trace_groups(model, args, kwargs).table
    report = self_check(model, table, args, kwargs)
    assert table.groups and report["all groups"] < 1e-4
    crossed = [v for k, v in report.items() if k.endswith("(across blocks)")]
    assert all(v > 1e-6 for v in crossed)


def test_expected_groups_per_architecture():
    def table(name):
        factory, args, kwargs = ARCHITECTURES[name]
        return trace_groups(factory(), args, kwargs).table

    mlp = table("mlp")
    assert [g.size for g in mlp.groups] == [16, 16]
    resnet = table("resnet")
    res = [
        g for g in resnet.groups if any(p.param == "l2.short.0.weight" and p.role == "out" for p in g.pieces)
    ]
    # the second stage's residual stream: the shortcut conv, both blocks' last convs' outputs
    assert len(res) == 1 and {"l2.c2.weight", "l2.short.1.running_mean", "fc.weight"} <= set(res[0].params())
    assert "l2.short.1.running_var" in res[0].unsigned
    gn = table("gn_cnn")
    assert sorted(g.blocks for g in gn.groups) == [2, 4]
    assert any(
        p.inner == 4 and p.param == "fc.weight" for g in gn.groups for p in g.pieces
    )  # flatten C × 2 × 2
    for name in ("vit_fused", "vit_split"):
        vit = table(name)
        blocked = [g for g in vit.groups if g.blocks == 2]
        assert len(blocked) == 2 and blocked[0].tie == blocked[1].tie  # q/k and v/o share the head axis
        stream = max(vit.groups, key=lambda g: len(g.pieces))
        assert {"cls", "pos", "patch.weight", "proj.weight", "fc2.weight", "head.weight"} <= set(
            stream.params()
        )
    fused = table("vit_fused")
    qk = next(g for g in fused.groups if g.blocks == 2 and not any(p.role == "in" for p in g.pieces))
    assert sorted(p.offset for p in qk.pieces if p.param == "qkv.weight") == [0, 8]  # q rows and k rows


def test_bert_style_encoder_traces_and_checks():
    bert = _bert()
    ids = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask}
    table = trace_groups(bert, (), kwargs).table
    assert sum(g.blocks == 2 for g in table.groups) == 4  # q/k and v/o per layer, 2 layers
    assert sum(g.size == 32 for g in table.groups) == 2  # the FFN of each layer
    self_check(bert, table, (), kwargs)
    # the residual stream reaches the output (last_hidden_state): left alone, and said why
    assert "touches a model output" in table.fixed["embeddings.LayerNorm.weight"]
    assert "group" not in table.describe().split("left alone")[0].lower() or table.describe()


def test_a_wrong_table_fails_the_self_check_naming_the_group():
    model = MLP()
    table = trace_groups(model, (torch.randn(4, 8),)).table
    g = table.groups[0]
    broken = GroupTable(
        [type(g)(g.name, g.size, [p for p in g.pieces if p.role == "out"], g.blocks)] + table.groups[1:]
    )
    with pytest.raises(SelfCheckError, match=f"group '{g.name}'"):
        self_check(model, broken, (torch.randn(4, 8),))


def test_a_spec_can_stand_in_for_tracing():
    model = MLP()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    spec = {
        "h1": [[0, "fc1.weight"], [0, "fc1.bias"], [1, "fc2.weight", "in"]],
        "h2": [[0, "fc2.weight"], [0, "fc2.bias"], [1, "fc3.weight", "in"]],
    }
    table = GroupTable.from_spec(spec, shapes)
    self_check(model, table, (torch.randn(4, 8),))
    traced = trace_groups(model, (torch.randn(4, 8),)).table
    assert [sorted((p.param, p.role) for p in g.pieces) for g in table.groups] == [
        sorted((p.param, p.role) for p in g.pieces) for g in traced.groups
    ]
    assert GroupTable.from_json(table.to_json()).groups[0].pieces == table.groups[0].pieces
    with pytest.raises(ParameterError, match="no tensor 'fc9.weight'"):
        GroupTable.from_spec({"x": [[0, "fc9.weight"]]}, shapes)


def test_untraceable_model_names_the_problem():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if float(x.sum()) > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(CheckpointError, match="cannot trace Branchy.*hand-written spec"):
        trace_groups(Branchy(), (torch.randn(2, 4),))


# ----------------------------------------------------------------------------- transforms


def _permuted_twin(model: nn.Module, table: GroupTable, seed: int = 5) -> dict[str, torch.Tensor]:
    from alloykit.alignment.transforms import random_transforms

    trs = random_transforms(table, torch.Generator().manual_seed(seed))
    return transform_state(model.state_dict(), table, trs)


def test_merge_formula_by_hand_for_permutations():
    torch.manual_seed(2)
    a, b = MLP(), MLP()
    x = torch.randn(4, 8)
    table = trace_groups(a, (x,)).table
    p1, p2 = torch.randperm(16), torch.randperm(16)
    transforms = {
        table.groups[0].name: Transform.from_permutations([torch.arange(16), p1]),
        table.groups[1].name: Transform.from_permutations([torch.arange(16), p2]),
    }
    from alloykit.alignment.align import Alignment
    from alloykit.alignment.transforms import aligned_mean

    al = Alignment(table, transforms, 2)
    sa, sb = a.state_dict(), b.state_dict()
    got = aligned_mean([sa["fc2.weight"], sb["fc2.weight"]], al.entries("fc2.weight"))
    torch.testing.assert_close(got, (sa["fc2.weight"] + sb["fc2.weight"][p2][:, p1]) / 2)
    got = aligned_mean([sa["fc1.bias"], sb["fc1.bias"]], al.entries("fc1.bias"))
    torch.testing.assert_close(got, (sa["fc1.bias"] + sb["fc1.bias"][p1]) / 2)


def test_identity_transforms_equal_plain_averaging():
    torch.manual_seed(3)
    a, b = CNN(), CNN()
    res = alloykit.merge(
        [a.state_dict(), b.state_dict()], None, "weight_average", model=CNN, example_inputs=IMG
    )
    plain = alloykit.merge_state_dicts([a.state_dict(), b.state_dict()], None, "linear")
    for k in plain:
        torch.testing.assert_close(res.state_dict[k], plain[k], rtol=0, atol=0)


def test_zip_transform_algebra():
    u0 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    u1 = torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 0, 1]])  # model 1's units 0 and 1 fused into merged unit 1
    tr = Transform.from_unmerge([u0, u1])
    # each merged unit is the mean of its members: columns of the merge matrices sum to 1 over models
    torch.testing.assert_close(tr.merge[0].sum(0) + tr.merge[1].sum(0), torch.ones(3, dtype=torch.float64))
    assert tr.merge[0][0, 0] == 1.0 and tr.merge[1][0, 1] == pytest.approx(1 / 3) == tr.merge[0][1, 1]
    assert tr.permutations() is None and tr.width == 3
    with pytest.raises(ValueError, match="no member"):
        Transform.from_unmerge([torch.tensor([[1.0, 0], [0, 0]])] * 2)  # merged unit 1 is empty


# ----------------------------------------------------------------------------- matching


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "resnet", "gn_cnn", "vit_fused", "vit_split"])
@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
def test_twin_recovery_returns_the_original_function(name, method):
    """A model merged with a permuted copy of itself: the Hungarian methods undo the permutation."""
    factory, args, kwargs = ARCHITECTURES[name]
    torch.manual_seed(4)
    model = _randomize_norms(factory())
    table = trace_groups(model, args, kwargs).table
    twin = _permuted_twin(model, table)
    # enough rows that no two distinct units correlate perfectly by chance (images: 64 positions
    # per channel and image)
    data = [IMG[:2], IMG[2:]] if args[0].dim() == 4 else [torch.randn(40, 8), torch.randn(24, 8)]
    res = alloykit.merge(
        [model.state_dict(), twin], None, method, model=factory, data=data, example_inputs=args
    )
    merged = copy.deepcopy(model)
    merged.load_state_dict(res.state_dict)
    with torch.no_grad():
        for batch in data:
            torch.testing.assert_close(merged(batch), model(batch), rtol=1e-5, atol=1e-6)


def test_hungarian_against_brute_force():
    import itertools

    g = torch.Generator().manual_seed(7)
    sim = torch.randn(10, 10, generator=g, dtype=torch.float64)
    tr, score = hungarian(sim, 5, 2)
    block = sim[:5, 5:]
    best = max(itertools.permutations(range(5)), key=lambda p: float(block[range(5), list(p)].sum()))
    assert tr.permutations()[1].tolist() == list(best)
    assert score == pytest.approx(float(block[range(5), list(best)].mean()))
    # with 2 blocks of 3: whole blocks map onto whole blocks
    sim = torch.randn(12, 12, generator=g, dtype=torch.float64)
    tr, _ = hungarian(sim, 6, 2, blocks=2)
    perm = tr.permutations()[1]
    assert {int(x) // 3 for x in perm[:3]} in ({0}, {1}) and {int(x) // 3 for x in perm[3:]} in ({0}, {1})


def test_weight_matching_is_deterministic_and_recorded():
    torch.manual_seed(8)
    a, b = MLP(), MLP()
    res = [
        alloykit.merge(
            [a.state_dict(), b.state_dict()],
            None,
            "weight_matching",
            model=MLP,
            example_inputs=torch.randn(4, 8),
        )
        for _ in range(2)
    ]
    for k in res[0].state_dict:
        assert torch.equal(res[0].state_dict[k], res[1].state_dict[k])


# ----------------------------------------------------------------------------- post-steps


def test_bn_reset_matches_the_empirical_statistics():
    torch.manual_seed(9)
    model = _randomize_norms(CNN())
    batches = [torch.randn(4, 1, 8, 8), torch.randn(7, 1, 8, 8)]
    assert bn_reset(model, batches) == 2
    x = torch.cat(batches)
    with torch.no_grad():
        pre = model.c1(x)
    torch.testing.assert_close(model.b1.running_mean, pre.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.b1.running_var, pre.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
    assert model.b1.momentum == 0.1 and not model.training


def test_repair_restores_the_interpolated_channel_statistics():
    torch.manual_seed(10)
    a, b = MLP(), MLP()
    data = [torch.randn(32, 8), torch.randn(32, 8)]
    res = alloykit.merge(
        [a.state_dict(), b.state_dict()], None, "activation_matching", model=MLP, data=data, post="repair"
    )
    merged = MLP()
    merged.load_state_dict(res.state_dict)
    # fc1's outputs: merged channel c = model-a channel c with model-b's matched channel
    from alloykit.alignment.pipeline import prepare_alignment

    al, _, _ = prepare_alignment("activations", {}, [a.state_dict(), b.state_dict()], model=MLP, data=data)
    tr = al.transforms[al.table.groups[0].name]
    ea = _channel_stats(a, ["fc1"], data)["fc1"]
    eb = _channel_stats(b, ["fc1"], data)["fc1"]
    target_mean = (ea[0] + (tr.merge[1] * 2).T @ eb[0]) / 2
    target_std = (ea[1] + (tr.merge[1] * 2).T @ eb[1]) / 2
    got = _channel_stats(merged, ["fc1"], data)["fc1"]
    torch.testing.assert_close(got[0], target_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1], target_std, rtol=1e-4, atol=1e-5)
    assert any("post repair: 2 layers" in w for w in res.report.warnings)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_named():
    torch.manual_seed(11)
    a = MLP()
    other = MLP(h=12)
    with pytest.raises(ParameterError, match="model 1 does not fit the model definition"):
        alloykit.merge(
            [a.state_dict(), other.state_dict()],
            None,
            "weight_matching",
            model=MLP,
            example_inputs=torch.randn(2, 8),
            keys="intersection",
        )
    with pytest.raises(ParameterError, match="give the model definition"):
        alloykit.merge([a.state_dict(), MLP().state_dict()], None, "weight_matching")
    with pytest.raises(ParameterError, match="activation matching needs data"):
        alloykit.merge(
            [a.state_dict(), MLP().state_dict()],
            None,
            "activation_matching",
            model=MLP,
            example_inputs=torch.randn(2, 8),
        )
    with pytest.raises(AlignmentDataError, match="batch 0 does not fit the model"):
        alloykit.merge(
            [a.state_dict(), MLP().state_dict()],
            None,
            "activation_matching",
            model=MLP,
            data=[torch.randn(3, 5)],
            example_inputs=torch.randn(2, 8),
        )
    with pytest.raises(ParameterError, match="'pkg.nowhere:make'"):
        alloykit.merge(
            [a.state_dict(), MLP().state_dict()],
            None,
            "weight_matching",
            model="pkg.nowhere:make",
            example_inputs=torch.randn(2, 8),
        )


def test_dead_units_are_named():
    torch.manual_seed(12)
    a, b = MLP(), MLP()
    with torch.no_grad():
        b.fc1.weight.zero_()
        b.fc1.bias.fill_(-1.0)  # every fc1 unit of model 1 is dead after the ReLU
    with pytest.raises(AlignmentDataError, match="every unit of model 1 is constant"):
        alloykit.merge(
            [a.state_dict(), b.state_dict()],
            None,
            "activation_matching",
            model=MLP,
            data=[torch.randn(16, 8)],
        )
