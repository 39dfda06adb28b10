"""Torch's own tools run on every published scheme's default step and count what ran
(docs/design.md, "Torch's tools"): FlopCounterMode, the profiler."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mlaan_func as mf
from mlaan_func.train.budget import FlopMeter  # the per-op formulas over every op that runs

METHODS = mf.schemes.SCHEMES


def published(method: str):
    backbone = mf.from_module(mf.models.CifarResNet(8, num_classes=5, widths=(4, 8, 8)))
    scheme = mf.schemes.build(method, backbone, ["1.0", "2.0"], input_shape=(3, 8, 8))
    opt = mf.optim.sgd(0.1, momentum=0.9)
    return scheme, opt, mf.init(scheme, opt), (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("method", METHODS)
def test_flop_counter_mode_wraps_the_default_step(method):
    scheme, opt, ts, batch = published(method)
    train_step = mf.step(scheme, opt)
    with FlopCounterMode(display=False) as counter:
        after, _ = train_step(ts, batch)
    with FlopMeter() as formulas:
        again, _ = train_step(ts, batch)
    assert counter.get_total_flops() == formulas.total > 0
    assert all(torch.equal(after.params[k], again.params[k]) for k in after.params)


@pytest.mark.parametrize("share", [None, "sum", False])
def test_flop_counter_mode_counts_every_form_of_sharing(share):
    scheme, _, ts, batch = published("mlaan")
    with FlopCounterMode(display=False) as counter:
        mf.gradients(scheme, share=share)(ts, batch)
    with FlopMeter() as formulas:
        mf.gradients(scheme, share=share)(ts, batch)
    assert counter.get_total_flops() == formulas.total > 0


def test_the_profiler_records_the_default_step():
    scheme, opt, ts, batch = published("dgl_mlaan")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        mf.step(scheme, opt)(ts, batch)
    names = {e.key for e in prof.key_averages()}
    assert "aten::convolution" in names and "aten::convolution_backward" in names
