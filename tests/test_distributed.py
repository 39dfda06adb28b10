"""Data- and module-parallel steps on 2-3 gloo processes on 127.0.0.1 equal one process.

No test here depends on how fast a loaded machine is: ranks meet through a file store in the
test's directory (no port that another job could take between choosing and binding it), their
stderr goes to files (a full pipe would block a rank), and every timeout only bounds a hang.
"""

import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mlaan_func as mf
from mlaan_func import distributed as mfd
from mlaan_func import testing as mt

sys.path.insert(0, os.path.dirname(__file__))
import dist_worker as w  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")


HANG = 900
"""Seconds after which a distributed run counts as hung: far beyond a run on a loaded machine
(seconds to a few minutes), so it only turns a hang into a failure."""


class Rank:
    """A finished worker: its exit status and what it wrote to stderr."""

    def __init__(self, returncode, stderr_path):
        self.returncode, self.stderr_path = returncode, stderr_path

    @property
    def stderr(self):
        return self.stderr_path.read_text(errors="replace")[-2000:]


def launch(world, mode, method, out, steps=2, die=False):
    out = Path(out)
    store = out.parent / f"{out.name}.store"  # a new file per run: FileStore rendezvous
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [out.parent / f"{out.name}.stderr{r}" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as log:
            procs.append(subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(store), mode, method,
                                           str(out), str(steps), "1" if die else "0"], env=env, stderr=log))
    try:
        for p in procs:
            p.wait(timeout=HANG)
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed run hung: not finished after {HANG}s; "
                    + " | ".join(f"rank {r}: {log.read_text()[-500:]}" for r, log in enumerate(logs)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [Rank(p.returncode, log) for p, log in zip(procs, logs)]


def single_process(method):
    """The worker's scheme, optimizer and start state, with its gradient function."""
    _, objectives = w.scheme(method)
    opt = w.optimizer()
    return opt, mf.init(objectives, opt, seed=0), mf.gradients(objectives), mf.engine.after_steps(objectives)


def data_parallel_reference(method, world, steps=2):
    opt, ts, grads_of, post = single_process(method)
    for x, y in w.batches(steps):
        parts = [grads_of(ts, mfd.shard((x, y), r, world)) for r in range(world)]
        grads = {k: sum(p.grads[k] for p in parts) / world for k in ts.params}
        state = {k: (sum(p.state[k] for p in parts) / world if v.is_floating_point() else parts[0].state[k])
                 for k, v in ts.state.items()}
        ts = mf.engine.apply_gradients(ts, grads, state, opt, post)
    return ts


def micro_batch_reference(method, micro, steps=2):
    opt, ts, grads_of, post = single_process(method)
    for x, y in w.batches(steps):
        per = len(y) // micro
        state, total = ts.state, None
        for m in range(micro):
            g = grads_of(ts._replace(state=state), (x[m * per:(m + 1) * per], y[m * per:(m + 1) * per]))
            state = g.state
            total = g.grads if total is None else {k: total[k] + g.grads[k] for k in total}
        ts = mf.engine.apply_gradients(ts, {k: v / micro for k, v in total.items()}, state, opt, post)
    return ts


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dgl", "mlaan"])
def test_data_parallel_equals_one_process(tmp_path, method):
    out = tmp_path / "dp.pt"
    procs = launch(2, "data", method, out)
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    got, want = mf.load(out), data_parallel_reference(method, 2)
    mt.assert_close(got.params, want.params, 1e-4, "params")
    mt.assert_close(got.state, want.state, 1e-4, "state")


@pytest.mark.slow
@pytest.mark.parametrize("method, world", [("dgl", 2), ("mlaan", 3), ("dgl_mlaan", 2)])
def test_module_parallel_equals_micro_batches_in_sequence(tmp_path, method, world):
    out = tmp_path / "mp.pt"
    procs = launch(world, "modules", method, out)
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    got, want = mf.load(out), micro_batch_reference(method, 3)
    mt.assert_close(got.params, want.params, 1e-4, "params")
    mt.assert_close(got.state, want.state, 1e-4, "state")


@pytest.mark.slow
def test_a_dead_rank_is_reported_not_waited_for(tmp_path):
    """The survivor's collective fails when the dead rank's connections close, and it reports
    that and exits by itself (launch fails the test if it hangs); how fast depends on the
    machine's load, so no duration is asserted."""
    out = tmp_path / "dead.pt"
    procs = launch(2, "modules", "dgl", out, steps=3, die=True)
    assert procs[1].returncode == 3 and procs[0].returncode == 0, [p.stderr for p in procs]
    errors = list(tmp_path.glob("dead.pt.error*"))
    assert [e.name for e in errors] == ["dead.pt.error0"] and "rank" in errors[0].read_text()


@pytest.mark.slow
def test_a_rank_late_to_its_first_step_is_waited_for(tmp_path):
    """Rank 0 starts stepping w.LATE seconds after rank 1, as on a loaded machine: rank 1's
    collectives wait for it instead of timing out (they timed out after 10 s)."""
    out = tmp_path / "late.pt"
    procs = launch(2, "data_late", "dgl", out)
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    assert not list(tmp_path.glob("late.pt.error*")), [e.read_text() for e in tmp_path.glob("late.pt.error*")]
    mt.assert_close(mf.load(out).params, data_parallel_reference("dgl", 2).params, 1e-4, "params")


@pytest.mark.slow
def test_data_parallel_ranks_seeded_differently_end_identical(tmp_path):
    out = tmp_path / "seeded.pt"
    procs = launch(2, "data_seeded", "dgl", out, steps=3)
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    a, b = mf.load(f"{out}.rank0"), mf.load(f"{out}.rank1")
    mt.assert_identical(a.params, b.params)
    mt.assert_identical(a.state, b.state)
    want = data_parallel_reference("dgl", 2, steps=3)   # started from rank 0's seed
    mt.assert_close(a.params, want.params, 1e-4, "params")


@pytest.mark.slow
def test_diverged_replicas_are_reported_naming_the_key(tmp_path):
    out = tmp_path / "diverge.pt"
    launch(2, "data_diverge", "dgl", out, steps=3)
    errors = sorted(tmp_path.glob("diverge.pt.error*"))
    assert errors and "2.0.bn1.weight" in errors[0].read_text()


@pytest.mark.slow
def test_module_parallel_takes_a_smaller_last_batch(tmp_path):
    out = tmp_path / "ragged.pt"
    procs = launch(2, "modules_ragged", "dgl", out, steps=2)
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    assert not list(tmp_path.glob("ragged.pt.error*"))
    assert int(mf.load(out).step) == 2


@pytest.fixture
def one_process():
    """A process group of one gloo rank inside the test process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_module_parallel_runs_a_rank_through_the_shared_plan(one_process):
    """mlaan on one rank: module 1 (block 1.1) is in two windows and under its own head, so
    one objective at a time runs it 3 times per micro-batch, the shared step once."""
    forwards = []
    model = w.CifarResNet(14, num_classes=5, widths=(4, 8, 8))
    model.stages[0][1].register_forward_pre_hook(lambda module, args: forwards.append(1))
    net = mf.from_module(model)
    objectives = mf.schemes.mlaan(net, w.AT, input_shape=w.SHAPE)
    ends = [m.output_name for m in mf.split(net, w.AT)]
    opt = w.optimizer()
    ts = mf.init(objectives, opt, seed=0)
    (x, y), = w.batches(1)
    got = {}
    for share, per_micro_batch in [(None, 1), (False, 3)]:
        forwards.clear()
        step = mfd.module_parallel_step(objectives, opt, ends, micro_batches=2, share=share)
        got[share], _ = step(ts, (x, y))
        assert len(forwards) == 2 * per_micro_batch, share
    mt.assert_close(got[None].params, got[False].params, 1e-4, "params")
    mt.assert_close(got[None].state, got[False].state, 1e-4, "state")   # twins follow the params


def test_plan_assigns_contiguous_modules_and_refuses_too_many_ranks():
    assert mfd.assign_modules(5, 2) == [0, 0, 0, 1, 1]
    assert mfd.assign_modules(3, 3) == [0, 1, 2]
    assert mfd.assign_modules(4, 2, costs=[3, 1, 1, 1]) == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="at least one module per rank"):
        mfd.assign_modules(2, 3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=7), st.integers(1, 4))
def test_assigned_modules_make_the_costliest_rank_as_cheap_as_any_split(costs, ranks):
    import itertools

    if ranks > len(costs):
        return
    owner = mfd.assign_modules(len(costs), ranks, costs)
    assert owner[0] == 0 and owner[-1] == ranks - 1 and all(0 <= b - a <= 1 for a, b in zip(owner, owner[1:]))

    def worst(o):
        return max(sum(c for c, r in zip(costs, o) if r == q) for q in range(ranks))

    best = min(worst([sum(i >= s for s in starts) for i in range(len(costs))])
               for starts in itertools.combinations(range(1, len(costs)), ranks - 1))
    assert worst(owner) == best


def test_measured_seconds_balance_the_owner():
    net, objectives = w.scheme("dgl")
    ends = [m.output_name for m in mf.split(net, w.AT)]
    ts = mf.init(objectives, mf.optim.sgd(0.1), seed=0)
    seconds = mfd.objective_seconds(objectives, ts, (torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))),
                                    repeats=1)
    assert len(seconds) == len(objectives) and all(s > 0 for s in seconds)
    heavy = [1.0] + [1e-3] * (len(objectives) - 1)  # the first objective's module alone on rank 0
    assert mfd.balanced_owner(objectives, ends, 2, heavy) == [0] + [1] * (len(ends) - 1)
    with pytest.raises(ValueError, match="one per objective"):
        mfd.balanced_owner(objectives, ends, 2, [1.0])


def test_plan_routes_window_inputs_across_ranks():
    net, objectives = w.scheme("dgl_mlaan")
    ends = [m.output_name for m in mf.split(net, w.AT)]
    plan = mfd.plan_modules(objectives, ends, [0, 0, 0, 1, 1], 2)
    assert plan.rank_of_objective == [0, 0, 1, 1, 1]
    assert plan.receives == [[], ["1.0", "1.1", "2.0"]] and plan.sends[0] == plan.receives[1]


def test_default_owner_balances_the_work_of_objectives():
    net, objectives = w.scheme("dgl_mlaan")
    ends = [m.output_name for m in mf.split(net, w.AT)]
    owner = mfd.balanced_owner(objectives, ends, 2)
    assert owner[0] == 0 and owner[-1] == 1 and 0 in owner[:3]


def test_uneven_shards_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        mfd.shard((torch.zeros(5, 3), torch.zeros(5)), 0, 2)


def test_shards_of_any_batch_slice_every_per_sample_tensor():
    x, y, x2 = torch.randn(6, 3), torch.arange(6), torch.randn(6, 3)
    temperature = torch.tensor(0.5)  # not per sample: every rank gets it whole
    part = mfd.shard({"x": x, "y": y, "x2": x2, "t": temperature}, 1, 3)
    assert set(part) == {"x", "y", "x2", "t"}
    assert torch.equal(part["x"], x[2:4]) and torch.equal(part["y"], y[2:4]) and torch.equal(part["x2"], x2[2:4])
    assert part["t"] is temperature
    a, b, mask = mfd.shard((x, y, torch.ones(6, dtype=torch.bool)), 0, 2)
    assert torch.equal(a, x[:3]) and torch.equal(b, y[:3]) and mask.shape == (3,)
