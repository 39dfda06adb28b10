"""Rematerialised objectives: same gradients and state as the plain step, less memory."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.models.resnet import CifarResNet

SHAPE = (3, 8, 8)
BLOCKS = ("stem", "1.0", "1.1", "2.0", "2.1", "3.0", "3.1", "classifier")


def small_resnet():
    return CifarResNet(14, num_classes=5, widths=(4, 8, 8))


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(n) % 5


def remat_all(scheme, every):
    return [mf.remat(o, every) for o in scheme]


@settings(deadline=None, max_examples=8)
@given(method=st.sampled_from(["e2e", "dgl", "infopro", "mlaan", "dgl_mlaan", "infopro_mlaan"]),
       at=mt.cut_points(BLOCKS, max_modules=5), every=st.integers(1, 3), seed=mt.seeds)
def test_remat_gives_the_same_gradients_and_identical_state(method, at, every, seed):
    scheme = mf.schemes.build(method, mf.from_module(small_resnet()), at, input_shape=SHAPE)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=seed)
    xy = batch(seed=seed % 50)
    plain = mf.gradients(scheme)(ts, xy)
    got = mf.gradients(remat_all(scheme, every))(ts, xy)
    mt.assert_close(got.grads, plain.grads, 1e-5, "gradient")
    mt.assert_identical(got.state, plain.state, "state")
    mt.assert_close(got.losses, plain.losses, 1e-6, "loss")


def test_remat_replays_dropout():
    net = mf.from_module(nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 16),
                                       nn.Dropout(0.5), nn.Linear(16, 3)))
    scheme = [mf.local_loss(net, None, mf.losses.cross_entropy, name="final")]
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    xy = (torch.randn(8, 6), torch.arange(8) % 3)
    torch.manual_seed(3)
    plain = mf.gradients(scheme)(ts, xy)
    after_plain = torch.rand(1)
    torch.manual_seed(3)
    got = mf.gradients(remat_all(scheme, 1))(ts, xy)
    mt.assert_close(got.grads, plain.grads, 1e-6)
    assert torch.equal(torch.rand(1), after_plain), "remat must leave the generator where the plain step does"


def test_remat_granularity_must_be_positive():
    scheme = mf.schemes.e2e(mf.from_module(small_resnet()))
    with pytest.raises(ValueError, match="positive"):
        mf.remat(scheme[0], 0)


def test_remat_lowers_the_measured_peak():
    from mlaan_func.memory import track_memory

    scheme = mf.schemes.build("mlaan", mf.from_module(small_resnet()), ["1.0", "1.1", "2.0"], input_shape=SHAPE)
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    xy = batch(n=32)
    peaks = []
    for s in (scheme, remat_all(scheme, 1)):
        with track_memory() as meter:
            mf.gradients(s)(ts, xy)
        peaks.append(meter.peak_bytes)
    assert peaks[1] < peaks[0]
