"""Data passes and searches as Ray tasks, on a local Ray started here (2 CPUs): calibration Grams and
Fishers, alignment statistics, and validation-search trials give the very bytes and choices of the
same work done in this process, for any grouping of the batches and any number of workers; errors
inside a task reach the caller as the task raised them."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import alloykit
from alloykit.alignment.statistics import AlignmentDataError
from alloykit.alignment.statistics import collect_activation_statistics as align_stats
from alloykit.alignment.trace import trace_groups
from alloykit.calibration import calibrate, collect_activation_statistics, collect_fisher
from alloykit.cli.main import app
from alloykit.errors import CheckpointError, MissingDependencyError, ParameterError
from alloykit.evaluation import Split, Task, select
from alloykit.evaluation.harness import Suite, run_method
from alloykit.evaluation.search import Scored
from alloykit.methods.base import Continuous, Grid

ray = pytest.importorskip("ray")
cloudpickle = pytest.importorskip("cloudpickle")
runner = CliRunner()


@pytest.fixture(scope="module")
def local_ray():
    # Models, objectives and suites defined here travel to the workers by value (they cannot
    # import tests/).
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture
def pools(monkeypatch):
    """(task function, executor) of every pool of tasks made: proof that a pass went to Ray."""
    from alloykit.engine.ray_passes import TaskPool

    made: list[tuple[str, str]] = []
    real = TaskPool.__init__

    def spy(self, fn, context=None, **kw):
        made.append((fn.__name__, kw.get("executor", "thread")))
        real(self, fn, context, **kw)

    monkeypatch.setattr(TaskPool, "__init__", spy)
    return made


# ----------------------------------------------------------------------------- calibration


class Shared(nn.Module):
    """q/k/v read one input; ``mix`` runs twice in a forward (shared weights); a mask marks padding."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, 3)

    def forward(self, x, attention_mask):
        h = torch.tanh(self.q(x) + self.k(x) * self.v(x))
        return self.out(self.mix(torch.tanh(self.mix(h))))


def _padded(n: int = 7, seed: int = 0):
    """``n`` batches of 1 to 3 sequences of up to 4 tokens (some batches fewer valid rows than
    d_in = 6, some more: 'auto' keeps rows, then turns to the Gram), padding filled with 1e6."""
    g = torch.Generator().manual_seed(seed)
    batches, valid = [], []
    for _ in range(n):
        b = int(torch.randint(1, 4, (1,), generator=g))
        x = torch.randn(b, 4, 6, generator=g)
        lengths = torch.randint(1, 5, (b,), generator=g)
        mask = (torch.arange(4)[None, :] < lengths[:, None]).long()
        x[mask == 0] = 1e6
        batches.append({"x": x, "attention_mask": mask})
        valid.append(x[mask.bool()])
    return batches, valid


def _same_statistics(a, b) -> None:
    assert a.names() == b.names() and a.shared == b.shared and a.meta == b.meta
    for name in a.names():
        ea, eb = a.get(name), b.get(name)
        assert ea.keys() == eb.keys(), name
        for k, v in ea.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == eb[k].dtype and torch.equal(v, eb[k]), (name, k)
            else:
                assert v == eb[k], (name, k)


def _fold(terms):
    """Σ in order, from the first term (what the statistics promise, bit for bit)."""
    total = None
    for t in terms:
        total = t.clone() if total is None else total + t
    return total


def test_grams_on_ray_are_the_bytes_of_this_process_for_any_grouping_and_workers(local_ray):
    torch.manual_seed(0)
    model = Shared()
    batches, valid = _padded()
    for store in ("auto", "gram"):
        for group, workers in ((1, 2), (3, 1), (3, 2)):
            here = collect_activation_statistics(model, batches, store=store, group_batches=group)
            there = collect_activation_statistics(
                model, batches, store=store, group_batches=group, executor="ray", workers=workers
            )
            _same_statistics(here, there)
    # independently: q's Gram is the per-group sums of each batch's XᵀX over its valid rows,
    # added in group order, bit for bit
    products = [r.double().T @ r.double() for r in valid]
    for group in (1, 3):
        stats = collect_activation_statistics(
            model, batches, store="gram", group_batches=group, executor="ray"
        )
        want = _fold(_fold(products[i : i + group]) for i in range(0, len(products), group))
        assert torch.equal(stats.get("q.weight")["gram"], want)
        assert stats.get("k.weight")["tokens"] == sum(len(r) for r in valid)
    # a layer that runs twice per forward counts both inputs, here and on Ray alike
    assert stats.get("mix.weight")["tokens"] == 2 * sum(len(r) for r in valid)
    # several passes (one layer's Gram at a time) on Ray: the same bytes again
    small = collect_activation_statistics(model, batches, store="gram", max_memory=8 * 6 * 6 + 1)
    many = collect_activation_statistics(
        model, batches, store="gram", max_memory=8 * 6 * 6 + 1, executor="ray"
    )
    assert many.meta["passes"] == small.meta["passes"] == 3
    _same_statistics(small, many)


def _log_probs(model, batch):
    return torch.log_softmax(model(batch[0]), dim=-1), batch[1]


def test_fisher_on_ray_is_the_bytes_of_this_process(local_ray):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, 10, 2)]
    for estimator in ("empirical", "expected"):
        for group in (1, 2):
            kw = dict(log_probs=_log_probs, estimator=estimator, group_batches=group)
            _same_statistics(
                collect_fisher(model, batches, **kw), collect_fisher(model, batches, executor="ray", **kw)
            )
    # and it is the Fisher: the last layer's bias by hand, (e_y − p)² averaged over examples
    stats = collect_fisher(model, batches, log_probs=_log_probs, executor="ray")
    with torch.no_grad():
        p = torch.softmax(model(x), -1).double()
    err = torch.nn.functional.one_hot(y, 3).double() - p
    torch.testing.assert_close(
        stats.get("2.bias")["fisher"].double(), err.square().mean(0), rtol=1e-5, atol=1e-7
    )
    assert stats.get("2.bias")["examples"] == 10


def test_cli_calibrate_a_folder_on_ray_writes_the_same_file(local_ray, tmp_path, pools):
    transformers = pytest.importorskip("transformers")
    from tests.test_calibration import _tiny_bert

    folder = _tiny_bert(tmp_path / "ft", 1)
    data = tmp_path / "data.jsonl"
    texts = ["the red cat runs", "a big dog sleeps fast", "small blue cat", "the dog", "red dog", "a cat"]
    data.write_text("\n".join(json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(texts)))
    files = {}
    for kind in ("activations", "fisher"):
        for executor in ("thread", "ray"):
            out = tmp_path / f"{kind}.{executor}.safetensors"
            res = runner.invoke(
                app,
                ["calibrate", str(folder), "-d", str(data), "-o", str(out), "--kind", kind, "--samples", "6",
                 "--batch-size", "2", "--group-batches", "2", "--executor", executor, "--no-progress"],
            )  # fmt: skip
            assert res.exit_code == 0, res.output
            files[kind, executor] = out.read_bytes()
        assert files[kind, "ray"] == files[kind, "thread"]  # tensors and metadata, byte for byte
    # (a Gram pass in this process runs its groups in the one forward loop, without a pool)
    assert pools == [("_activation_task", "ray"), ("_fisher_task", "thread"), ("_fisher_task", "ray")]
    # tasks load the folder by path and refuse other weights found there
    from alloykit.calibration.data import FolderModel, model_fingerprint

    module = FolderModel(folder, "0" * 64)
    with pytest.raises(CheckpointError, match="holds other weights than the driver read there"):
        module.module()
    good = transformers.BertForSequenceClassification.from_pretrained(folder).state_dict()
    assert FolderModel(folder, model_fingerprint(good)).module() is not None


# ----------------------------------------------------------------------------- alignment


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Functional(nn.Module):
    """The last layer is a bare F.linear: its group is observed inside the traced graph."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 12)
        self.w2 = nn.Parameter(torch.randn(3, 12) * 0.3)

    def forward(self, x):
        return F.linear(torch.relu(self.fc1(x)), self.w2)


def _sums(stats):
    return {k: (s.total, s.outer, s.count) for k, s in stats.sums.items()}


@pytest.mark.parametrize("factory", [MLP, Functional])
def test_alignment_statistics_on_ray_are_the_bytes_of_this_process(local_ray, factory):
    torch.manual_seed(2)
    states = [factory().state_dict() for _ in range(3)]
    batches = [torch.randn(10, 8) for _ in range(5)]
    template = factory().eval()
    traced = trace_groups(template, (batches[0],), {})
    hooked = all(s.module is not None for g in traced.table.groups for s in g.activation)
    assert hooked == (factory is MLP)  # the functional one exercises the graph, exported again in the tasks
    for group in (1, 2):
        kw = dict(group_batches=group, example=((batches[0],), {}))
        here = align_stats(template, traced.graph_module, states, traced.table, batches, **kw)
        there = align_stats(
            template, traced.graph_module, states, traced.table, batches, executor="ray", **kw
        )
        assert here.batches == there.batches == 5
        for name, (total, outer, count) in _sums(here).items():
            t2, o2, c2 = _sums(there)[name]
            assert torch.equal(total, t2) and torch.equal(outer, o2) and count == c2 == 50
    if hooked:  # by hand: fc1's units, seen at fc2's input, of the 3 models side by side, summed per batch
        (group,) = [g for g in traced.table.groups if g.activation[0].module == "fc2"]
        feats = []
        for state in states:
            m = factory()
            m.load_state_dict(state)
            with torch.no_grad():
                feats.append([torch.relu(m.fc1(b)).double() for b in batches])
        xs = [torch.cat([f[i] for f in feats], dim=1) for i in range(len(batches))]
        total, outer, _ = _sums(there)[group.name]  # grouped by 2
        assert torch.equal(total, _fold(_fold(x.sum(0) for x in xs[i : i + 2]) for i in range(0, 5, 2)))
        assert torch.equal(outer, _fold(_fold(x.T @ x for x in xs[i : i + 2]) for i in range(0, 5, 2)))


def test_an_activation_merge_from_the_cli_on_ray_writes_the_same_model(local_ray, tmp_path, pools):
    torch.manual_seed(3)
    paths = []
    for i in range(2):
        p = tmp_path / f"m{i}.safetensors"
        save_file(MLP().state_dict(), str(p))
        paths.append(str(p))
    data = tmp_path / "batches.safetensors"
    save_file({f"b{i}": torch.randn(16, 8) for i in range(4)}, str(data))
    outputs = {}
    for executor in ("thread", "ray"):
        out = tmp_path / executor
        res = runner.invoke(
            app,
            ["align", "merge", *paths, "-o", str(out), "--model", f"{__name__}:MLP", "--method",
             "activation_matching", "--data", str(data), "--executor", executor],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        outputs[executor] = b"".join(f.read_bytes() for f in sorted(out.glob("*.safetensors")))
    assert outputs["ray"] == outputs["thread"]
    assert pools == [("_alignment_task", "thread"), ("_alignment_task", "ray")]  # the recipe's executor
    # the API's executor reaches the statistics pass too
    states = [MLP().state_dict() for _ in range(2)]
    batches = [torch.randn(16, 8) for _ in range(3)]
    kw = dict(model=MLP, data=batches)
    a = alloykit.merge(states, None, "activation_matching", **kw).state_dict
    b = alloykit.merge(states, None, "activation_matching", executor="ray", **kw).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a) and pools[-1] == ("_alignment_task", "ray")


# ----------------------------------------------------------------------------- search


def _bumpy(params):
    """Ties on purpose: (a=1, b=0.5) and (a=3, b=0.5) score the same; the first in grid order wins."""
    return 1.0 if params["b"] == 0.5 and params["a"] != 2 else 0.25 * params["b"]


def test_a_grid_search_on_ray_makes_the_same_trials_and_choice(local_ray):
    space = {"a": Grid((1, 2, 3)), "b": Continuous(0.0, 1.0, grid=(0.5, 1.0))}
    seen = []
    here = select(space, _bumpy, fixed={"k": 7})
    there = select(space, _bumpy, fixed={"k": 7}, executor="ray", workers=2, on_trial=seen.append)
    assert here.params == there.params == {"k": 7, "a": 1, "b": 0.5}  # the first of the tied best
    assert [(t.params, t.score) for t in there.trials] == [(t.params, t.score) for t in here.trials]
    assert seen == there.trials and len(seen) == 6  # reported in grid order, not completion order
    # the trials really ran in other processes, with this process's intra-op threads
    where = select({"x": Grid((1, 2, 3))}, _where, executor="ray").trials
    assert all(t.detail[0] != os.getpid() and t.detail[1] == torch.get_num_threads() for t in where)
    golden = select({"x": Continuous(0.0, 4.0)}, _peak, budget=6)
    golden_ray = select({"x": Continuous(0.0, 4.0)}, _peak, budget=6, executor="ray")
    assert golden_ray.params == golden.params and golden_ray.score == golden.score
    assert [t.params["x"] for t in golden_ray.trials] == [t.params["x"] for t in golden.trials]


def _where(params):
    return Scored(float(params["x"]), (os.getpid(), torch.get_num_threads()))


def _peak(params):
    return -((params["x"] - 1.3) ** 2)


def _toy_suite(peek: bool = False):
    """Two tasks whose validation accuracy peaks at λ = 0.5 of the task-arithmetic sum and test
    accuracy at 1.5 (a selection that peeked at test would choose otherwise)."""
    base = {"w": torch.zeros(4)}
    fts = {"a": {"w": torch.tensor([1.0, 0.2, 0, 0])}, "b": {"w": torch.tensor([-0.1, 1.0, 0, 0])}}
    tasks = [Task(n, ["x"], Split(["t"], [0]), Split(["v"], [0]), Split(["s"], [0])) for n in ("a", "b")]
    by = {t.name: t for t in tasks}

    def evaluate(state, split, names):
        out = {}
        for n in names:
            by[n].split("test" if peek else split)  # the guard: raises while test is sealed
            i = 0 if n == "a" else 1
            target = 0.5 if split == "validation" else 1.5
            out[n] = 1.0 - 0.2 * float(abs(state["w"][i] - target)) - 0.01 * float(state["w"][2:].abs().sum())
        return out

    return Suite(tasks, base, fts, evaluate)


@pytest.mark.parametrize(
    "method,kw",
    [
        ("task_arithmetic", dict(budget=6)),  # golden-section, merged once and rescaled
        ("ties", dict(space={"lambda": Grid((0.4, 0.6)), "density": Grid((0.5, 1.0))})),  # a merge per trial
    ],
)
def test_the_harness_search_on_ray_selects_what_the_sequential_search_selects(local_ray, method, kw, pools):
    suite = _toy_suite()
    individual = {"a": 0.9, "b": 0.9}
    logged, logged_ray = [], []
    here = run_method(suite, method, individual, on_trial=lambda *a: logged.append(a), **kw)
    there = run_method(
        suite, method, individual, executor="ray", on_trial=lambda *a: logged_ray.append(a), **kw
    )
    assert here.status == there.status == "ok", (here.reason, there.reason)
    assert there.params == here.params and there.trials == here.trials and logged_ray == logged
    assert there.validation == here.validation and there.test == here.test and there.search == here.search
    assert pools == [("_evaluate", "thread"), ("_evaluate", "ray")]
    if method == "task_arithmetic":
        assert abs(there.params["lambda"] - 0.5) < 0.25 and len(there.trials) == 6
    else:
        assert len(there.trials) == 4 and there.params == max(here.trials, key=lambda t: t["score"])["params"]


# ----------------------------------------------------------------------------- errors


def test_errors_inside_ray_tasks_reach_the_caller_as_raised(local_ray):
    batches = [torch.randn(6, 8) for _ in range(4)]
    batches[3] = torch.randn(6, 5)  # the second batch of the second group of two
    states = [MLP().state_dict(), MLP().state_dict()]
    table = trace_groups(MLP().eval(), (batches[0],)).table
    with pytest.raises(AlignmentDataError, match="batch 3 does not fit the model"):
        align_stats(MLP(), None, states, table, batches, group_batches=2, executor="ray")
    row = run_method(_toy_suite(peek=True), "task_arithmetic", {"a": 0.9, "b": 0.9}, budget=3, executor="ray")
    assert row.status == "error" and "test split was read during hyperparameter selection" in row.reason
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match="empirical Fisher needs labels"):
        collect_fisher(model, [(torch.randn(2, 4), None)], log_probs=_log_probs, executor="ray")


def test_ray_options_are_checked_and_a_missing_ray_is_named(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(ParameterError, match="executor = 'dask' is not allowed"):
        collect_activation_statistics(model, [torch.randn(2, 4)], executor="dask")
    with pytest.raises(ParameterError, match="ray_address is given but the executor is 'thread'"):
        calibrate(model, [torch.randn(2, 4)], ray_address="head:6379")
    with pytest.raises(ParameterError, match="group_batches = 0"):
        collect_activation_statistics(model, [torch.randn(2, 4)], group_batches=0)
    with pytest.raises(ParameterError, match="Ray tasks calibrate on the nodes' CPUs"):
        calibrate(model, [torch.randn(2, 4)], executor="ray", device="cuda")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as without the extra
    with pytest.raises(MissingDependencyError, match=r"pip install 'alloykit\[ray\]'"):
        collect_activation_statistics(model, [torch.randn(2, 4)], executor="ray")
    with pytest.raises(MissingDependencyError, match=r"pip install 'alloykit\[ray\]'"):
        select({"x": Grid((1, 2))}, _peak, executor="ray")
