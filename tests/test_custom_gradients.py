"""Custom gradients are a supported hook (docs/design.md §7, "Custom gradients"): the
executor runs an objective's own ``grad_fn`` on its input, and the checkers see its reach."""

from __future__ import annotations

import attrs
import pytest
import torch
from torch import nn

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.train.execute import objective_gradient_fn


def scheme_with(grad_fn):
    a, b = mf.split(mf.from_module(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))), ["1"])
    head = mf.from_module(nn.Linear(4, 3), name="head")
    first = attrs.evolve(mf.local_loss(a, head, mf.losses.cross_entropy, name="m0"), grad_fn=grad_fn)
    return [first, mf.local_loss(b, None, mf.losses.cross_entropy, name="final")]


BATCH = (torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]))


def zeros(objective, taps):
    inner = objective_gradient_fn(attrs.evolve(objective, grad_fn=None), taps)

    def fn(params, state, x, batch, step=None):
        grads, aux = inner(params, state, x, batch, step)
        return {k: torch.zeros_like(v) for k, v in grads.items()}, aux

    return fn


def leaks(objective, taps):
    inner = objective_gradient_fn(attrs.evolve(objective, grad_fn=None), taps)

    def fn(params, state, x, batch, step=None):
        grads, aux = inner(params, state, x, batch, step)
        return {**grads, "2.weight": torch.ones(3, 4)}, aux

    return fn


def test_the_docstring_signature_is_the_one_the_engine_calls():
    scheme = scheme_with(lambda objective, taps: objective_gradient_fn(attrs.evolve(objective, grad_fn=None), taps))
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    plain = [attrs.evolve(o, grad_fn=None) for o in scheme]
    got, want = mf.gradients(scheme)(ts, BATCH), mf.gradients(plain)(ts, BATCH)
    assert all(torch.equal(got.grads[k], want.grads[k]) for k in want.grads)
    mt.check_isolation(scheme, ts, BATCH)


def test_a_grad_fn_returning_zeros_fails_isolation():
    scheme = scheme_with(zeros)
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    with pytest.raises(AssertionError, match="'m0''s grad_fn gives no gradient to block '0'"):
        mt.check_isolation(scheme, ts, BATCH)


def test_a_grad_fn_that_leaks_fails_isolation():
    scheme = scheme_with(leaks)
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    with pytest.raises(AssertionError, match="'m0' leaks gradient into '2.weight'"):
        mt.check_isolation(scheme, ts, BATCH)


def test_share_true_refuses_a_grad_fn_by_name():
    scheme = scheme_with(zeros)
    with pytest.raises(ValueError, match=r"objectives \['m0'\] bring their own grad_fn"):
        mf.gradients(scheme, share=True)


def test_a_switched_off_objective_is_neither_computed_nor_updated():
    calls = []

    def counted(out, batch):
        calls.append(1)
        return mf.losses.cross_entropy(out, batch)

    a, b = mf.split(mf.from_module(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))), ["1"])
    head = mf.from_module(nn.Linear(4, 3), name="head")
    scheme = [mf.local_loss(a, head, counted, name="m0", active=lambda step: step % 2 == 0),
              mf.local_loss(b, None, mf.losses.cross_entropy, name="final")]
    opt = mf.optim.sgd(0.1, momentum=0.9, weight_decay=1e-2)
    train_step, ts = mf.step(scheme, opt), mf.init(scheme, opt)
    ts, metrics = train_step(ts, BATCH)                # step 0: both
    assert sorted(metrics) == ["final", "m0"] and len(calls) == 1
    before = ts
    ts, metrics = train_step(ts, BATCH)                # step 1: m0 off
    assert sorted(metrics) == ["final"] and len(calls) == 1
    for k in ("head.weight", "0.weight"):               # what only m0 trains does not move, momentum included
        assert torch.equal(ts.params[k], before.params[k])
        assert torch.equal(ts.opt_state[1].momentum_buffer[k], before.opt_state[1].momentum_buffer[k])
    assert not torch.equal(ts.params["2.weight"], before.params["2.weight"])
    ts, metrics = train_step(ts, BATCH)                # step 2: both again
    assert sorted(metrics) == ["final", "m0"] and len(calls) == 2
