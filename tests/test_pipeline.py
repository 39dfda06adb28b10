"""The streamed pipeline (mfd.pipeline_step) on 2-3 gloo processes on 127.0.0.1 equals one
process bitwise for schemes whose gradient reach stays on one rank, and refuses the others.

Ranks meet through a file store in the test's directory and write stderr to files; the
timeout only turns a hang into a failure (no wall-clock assertion)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils._pytree import tree_flatten

import mlaan_func as mf
from mlaan_func import distributed as mfd

sys.path.insert(0, os.path.dirname(__file__))
import pipeline_worker as w  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "pipeline_worker.py")
HANG = 900
CUTS = ["1.0", "1.1", "2.0", "2.1", "3.0", "3.1"]


def launch(tmp, world, config, name, worker=WORKER):
    out, store = tmp / f"{name}.pt", tmp / f"{name}.store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [tmp / f"{name}.stderr{r}" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as log:
            procs.append(subprocess.Popen([sys.executable, worker, str(r), str(world), str(store), str(out),
                                           json.dumps(config)], env=env, stderr=log))
    try:
        for p in procs:
            p.wait(timeout=HANG)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), [log.read_text()[-2000:] for log in logs]
    reports = [json.loads((tmp / f"{name}.pt.rank{r}.json").read_text()) for r in range(world)]
    return mf.load(out), reports


def one_process(config, steps=None):
    """The same run in one process: its state and each step's losses."""
    _, objectives = w.scheme(config["method"], config["at"])
    opt = w.optimizer()
    ts = mf.init(objectives, opt, seed=0)
    step = mf.step(objectives, opt)
    losses = []
    for b in w.batches(config["steps"], config.get("ragged", False))[:steps]:
        ts, metrics = step(ts, b)
        losses.append({o: float(m["loss"]) for o, m in metrics.items() if o != "optimizer"})
    return ts, losses


def assert_bitwise(got, want):
    assert got.params.keys() == want.params.keys()
    for k in want.params:
        assert torch.equal(got.params[k], want.params[k]), k
    for k in want.state:
        assert torch.equal(got.state[k], want.state[k]), k
    got_opt, want_opt = tree_flatten(got.opt_state)[0], tree_flatten(want.opt_state)[0]
    assert len(got_opt) == len(want_opt)
    assert all(torch.equal(a, b) for a, b in zip(got_opt, want_opt))
    assert int(got.step) == int(want.step)


@st.composite
def configs(draw):
    world = draw(st.sampled_from([2, 3]))
    k = draw(st.integers(world, 4))
    at = sorted(draw(st.lists(st.sampled_from(CUTS), min_size=k - 1, max_size=k - 1, unique=True)),
                key=CUTS.index)
    # contiguous owners, every rank at least one module
    starts = sorted(draw(st.lists(st.integers(1, k - 1), min_size=world - 1, max_size=world - 1, unique=True)))
    owner = [sum(i >= s for s in starts) for i in range(k)]
    steps = 3
    cut = draw(st.integers(0, steps))  # the batches split into two run calls (0 or 3: one call)
    return world, {"method": draw(st.sampled_from(["dgl", "infopro"])), "at": at, "owner": owner,
                   "steps": steps, "ragged": draw(st.booleans()), "chunks": [cut, steps - cut]}


@pytest.mark.slow
@settings(max_examples=3, deadline=None)
@given(configs())
def test_pipeline_equals_one_process_bitwise(tmp_path_factory, drawn):
    world, config = drawn
    got, reports = launch(tmp_path_factory.mktemp("pipe"), world, config, "run")
    want, losses = one_process(config)
    assert_bitwise(got, want)  # parameters, state, the whole optimizer state, wherever the run was cut
    assert all(r["losses"] == losses for r in reports)  # every objective's losses on every rank


@pytest.mark.slow
def test_a_data_by_pipeline_mesh_equals_data_parallel_over_its_replicas_bitwise(tmp_path):
    """2 replicas x 2 stages (4 processes): each replica streams its half of every batch and
    a stage averages its gradients over the replicas; equal to data_parallel_step on 2."""
    config = {"method": "dgl", "at": ["1.0", "2.0", "3.0"], "owner": [0, 0, 1, 1], "steps": 3,
              "chunks": [2, 1], "replicas": 2}
    got, _ = launch(tmp_path, 4, config, "mesh")
    want, _ = launch(tmp_path, 2, {**config, "data_parallel": True}, "data")
    assert_bitwise(got, want)


@pytest.mark.slow
def test_a_rank_that_dies_mid_stream_is_reported_on_the_others(tmp_path):
    config = {"method": "dgl", "at": ["1.0", "2.0", "3.0"], "owner": [0, 0, 1, 2], "steps": 6, "die_at": 2}
    out, store = tmp_path / "die.pt", tmp_path / "die.store"
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), "3", str(store), str(out), json.dumps(config)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.DEVNULL) for r in range(3)]
    try:
        codes = [p.wait(timeout=HANG) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes[2] == 3 and codes[:2] == [0, 0], codes
    for r in range(2):
        raised = json.loads((tmp_path / f"die.pt.rank{r}.json").read_text())["raised"]
        assert raised and "A rank died" in raised, raised


@pytest.mark.slow
def test_a_non_finite_loss_stops_every_rank_at_the_last_good_step(tmp_path):
    config = {"method": "dgl", "at": ["1.0", "2.0", "3.0"], "owner": [0, 0, 1, 1], "steps": 4, "nan_at": 2,
              "chunks": [4]}
    got, reports = launch(tmp_path, 2, config, "nan")
    assert all(r["raised"] and "at step 2" in r["raised"] and "past step 1" in r["raised"] for r in reports), reports
    want, _ = one_process(config, steps=2)
    assert_bitwise(got, want)


def test_pipeline_refuses_a_scheme_whose_reach_crosses_ranks():
    at = ["1.0", "2.0", "3.0"]
    for method in ["mlaan", "e2e"]:
        net, objectives = w.scheme(method, at)
        ends = [m.output_name for m in mf.split(net, at)]
        plan = mfd.plan_modules(objectives, ends, [0, 0, 1, 1], 2)
        problems = mfd.crossing_objectives(objectives, ends, [0, 0, 1, 1], plan.rank_of_objective)
        assert any("ranks [0]" in p and "objective '" in p for p in problems), (method, problems)
    for method in ["dgl", "infopro"]:
        _, objectives = w.scheme(method, at)
        plan = mfd.plan_modules(objectives, ends, [0, 0, 1, 1], 2)
        assert mfd.crossing_objectives(objectives, ends, [0, 0, 1, 1], plan.rank_of_objective) == [], method
