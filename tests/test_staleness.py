"""Declared staleness (docs/design.md §5, "Declared staleness"; mlaan_func.parallel.staleness):
the single-process simulator of the law equals mf.step bitwise at staleness 0, sees the delay
at staleness 1, does not depend on how batches are chunked into calls, and refuses what the
law does not cover; the gloo pipeline (2 and 3 ranks) equals the simulator bitwise."""

import itertools
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mlaan_func as mf
from mlaan_func.errors import SchemeError
from mlaan_func.parallel.staleness import simulate_staleness

sys.path.insert(0, os.path.dirname(__file__))
import pipeline_worker as w  # noqa: E402
from test_pipeline import CUTS, assert_bitwise, launch  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "stale_worker.py")


@st.composite
def configs(draw, worlds=(2, 3)):
    method = draw(st.sampled_from(["mlaan", "dgl_mlaan"]))
    world = 2 if method == "dgl_mlaan" else draw(st.sampled_from(worlds))  # W = 3 would span 3 ranks
    k = draw(st.integers(max(world, 3), 4))
    at = sorted(draw(st.lists(st.sampled_from(CUTS), min_size=k - 1, max_size=k - 1, unique=True)),
                key=CUTS.index)
    starts = sorted(draw(st.lists(st.integers(1, k - 1), min_size=world - 1, max_size=world - 1, unique=True)))
    owner = [sum(i >= s for s in starts) for i in range(k)]
    return world, {"method": method, "at": at, "owner": owner, "steps": 3, "ragged": draw(st.booleans()),
                   "staleness": draw(st.sampled_from([0, 1])), "chunks": draw(st.sampled_from([1, 2]))}


def simulated(config, staleness=None, chunks=1, losses=None):
    """The simulator's state and carry after the config's batches; each step's losses are
    appended to ``losses`` when given."""
    net, objectives = w.scheme(config["method"], config["at"])
    ends = [m.output_name for m in mf.split(net, config["at"])]
    opt = w.optimizer()
    run = simulate_staleness(objectives, opt, ends, config["owner"],
                             config["staleness"] if staleness is None else staleness)
    ts, carry, data = mf.init(objectives, opt, seed=0), None, w.batches(config["steps"], config.get("ragged", False))
    cut = [len(data) * c // chunks for c in range(chunks + 1)]
    for a, b in itertools.pairwise(cut):
        ts, history, carry = run(ts, data[a:b], carry)
        assert len(history) == b - a
        if losses is not None:
            losses += [{o: float(m["loss"]) for o, m in row.items() if o != "optimizer"} for row in history]
    return ts, carry


def stepped(config):
    _, objectives = w.scheme(config["method"], config["at"])
    opt = w.optimizer()
    ts, step = mf.init(objectives, opt, seed=0), mf.step(objectives, opt)
    for b in w.batches(config["steps"], config.get("ragged", False)):
        ts, _ = step(ts, b)
    return ts


@settings(max_examples=4, deadline=None)
@given(configs())
def test_staleness_0_is_the_synchronous_step_bitwise(drawn):
    _, config = drawn
    ts, carry = simulated(config, staleness=0)
    assert_bitwise(ts, stepped(config))
    assert carry.grads == () and carry.twins == ()


def test_the_law_checker_can_fail_staleness_1_is_not_0():
    config = {"method": "mlaan", "at": ["1.0", "2.0", "3.0"], "owner": [0, 0, 1, 1], "steps": 2}
    late, carry = simulated(config, staleness=1)
    now, _ = simulated(config, staleness=0)
    assert any(not torch.equal(late.params[k], now.params[k]) for k in now.params)
    assert len(carry.grads) == 1 and [name for name, _ in carry.grads[0]] == ["m2.cascaded"]
    with pytest.raises(AssertionError):
        assert_bitwise(late, now)


@pytest.mark.parametrize("method,staleness", [("mlaan", 1), ("dgl_mlaan", 2)])
def test_a_run_does_not_depend_on_how_batches_are_chunked(method, staleness):
    config = {"method": method, "at": ["1.0", "2.0", "3.0"], "owner": [0, 1, 1, 1], "steps": 4, "ragged": True}
    whole, carry = simulated(config, staleness)
    for chunks in (2, 4):
        parts, carried = simulated(config, staleness, chunks=chunks)
        assert_bitwise(parts, whole)
        for (a, ga), (b, gb) in zip((x for step in carry.grads for x in step),
                                    (x for step in carried.grads for x in step)):
            assert a == b and all(torch.equal(ga[k], gb[k]) for k in ga)


def test_what_the_law_does_not_cover_is_refused_by_name():
    at = ["1.0", "2.0", "3.0"]
    net, objectives = w.scheme("dgl_mlaan", at)
    ends = [m.output_name for m in mf.split(net, at)]
    opt = w.optimizer()
    with pytest.raises(SchemeError, match="'m2.cascaded' runs through modules of ranks \\[0, 1, 2\\]"):
        simulate_staleness(objectives, opt, ends, [0, 1, 2, 2], 1)
    with pytest.raises(ValueError, match="staleness must be an int >= 0"):
        simulate_staleness(objectives, opt, ends, [0, 0, 1, 1], -1)
    net, dgl = w.scheme("dgl", at)
    with pytest.raises(SchemeError, match="use staleness=0"):
        simulate_staleness(dgl, opt, ends, [0, 0, 1, 1], 1)
    run = simulate_staleness(objectives, opt, ends, [0, 0, 1, 1], 1)
    ts = mf.init(objectives, opt, seed=0)
    _, _, carry = run(ts, w.batches(1))
    with pytest.raises(SchemeError, match="staleness=2"):
        simulate_staleness(objectives, opt, ends, [0, 0, 1, 1], 2)(ts, w.batches(1), carry)


@pytest.mark.slow
@settings(max_examples=3, deadline=None)
@given(configs())
def test_pipeline_equals_the_simulator_bitwise(tmp_path_factory, drawn):
    world, config = drawn
    got, reports = launch(tmp_path_factory.mktemp("stale"), world, config, "run", worker=WORKER)
    losses = []
    want, _ = simulated(config, losses=losses)
    assert_bitwise(got, want)  # parameters, state and the whole optimizer state
    assert all(r["losses"] == losses for r in reports)  # every objective's losses, gathered on every rank


@pytest.mark.slow
def test_pipeline_at_staleness_1_on_3_ranks_with_chunks_equals_the_simulator(tmp_path):
    config = {"method": "mlaan", "at": ["1.0", "2.0", "3.0"], "owner": [0, 1, 2, 2], "steps": 4,
              "ragged": True, "staleness": 1, "chunks": 2}
    got, _ = launch(tmp_path, 3, config, "run", worker=WORKER)
    assert_bitwise(got, simulated(config)[0])


@pytest.mark.slow
def test_a_non_finite_loss_under_staleness_stops_every_rank_at_the_last_good_step(tmp_path):
    config = {"method": "mlaan", "at": ["1.0", "2.0", "3.0"], "owner": [0, 0, 1, 1], "steps": 4,
              "staleness": 1, "nan_at": 2}
    _, reports = launch(tmp_path, 2, config, "nan", worker=WORKER)
    assert all(r["raised"] and "at step 2" in r["raised"] for r in reports), reports
    got = mf.load(tmp_path / "nan.pt")
    assert_bitwise(got, simulated({**config, "steps": 2})[0])
