"""Remat inside blocks (mf.remat(o, inside=), docs/design.md §6 "Remat inside blocks"): the
blocks keep only the values that cross their cuts and recompute each segment in the
backward; gradients, state and losses are the plain step's bit for bit, over drawn schemes,
cut points and cut rules, for the backbone's blocks, the heads and the leap trunks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.core.segments import SegmentedBlock, segmented
from mlaan_func.errors import SchemeError, TraceError
from mlaan_func.memory import track_memory
from mlaan_func.models.resnet import CifarResNet

SHAPE = (3, 8, 8)
BLOCKS = ("stem", "1.0", "1.1", "2.0", "2.1", "3.0", "3.1", "classifier")
METHODS = ["e2e", "dgl", "infopro", "mlaan", "dgl_mlaan", "infopro_mlaan"]
RULES = ["block_input", "conv_inputs", "nested", lambda name, module: isinstance(module, (nn.BatchNorm2d, nn.Conv2d))]


def setup(method, at, seed, n=6):
    scheme = mf.schemes.build(method, mf.from_module(CifarResNet(14, num_classes=5, widths=(4, 8, 8))), at,
                              input_shape=SHAPE)
    g = torch.Generator().manual_seed(seed % 1000)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=seed)
    return scheme, ts, (torch.randn(n, *SHAPE, generator=g), torch.arange(n) % 5)


def assert_same(got, want):
    mt.assert_identical(got.grads, want.grads, "grads")
    mt.assert_identical(got.state, want.state, "state")
    assert list(got.losses) == list(want.losses)
    assert all(torch.equal(got.losses[k], want.losses[k]) for k in want.losses)


@settings(deadline=None, max_examples=12)
@given(method=st.sampled_from(METHODS), at=mt.cut_points(BLOCKS, max_modules=4), rule=st.sampled_from(RULES),
       share=st.sampled_from([None, False]), every_objective=st.booleans(), seed=mt.seeds)
def test_remat_inside_blocks_gives_the_plain_gradients_bit_for_bit(method, at, rule, share, every_objective, seed):
    scheme, ts, batch = setup(method, at, seed)
    want = mf.gradients(scheme, share=share)(ts, batch)
    marked = [mf.remat(o, inside=rule) if every_objective or i % 2 == 0 else o for i, o in enumerate(scheme)]
    assert_same(mf.gradients(marked, share=share)(ts, batch), want)


def test_every_kind_of_block_is_cut_heads_and_leap_trunks_included():
    scheme, ts, batch = setup("dgl_mlaan", ["1.0", "1.1", "2.0", "2.1"], 0)
    step = mf.execute.executor([mf.remat(o, inside="conv_inputs") for o in scheme])
    kinds = set()

    def walk(b):
        if isinstance(b, SegmentedBlock):
            kinds.add(type(b.block.module).__name__)
            assert len(b.segments) >= 1
            return
        assert not isinstance(b, mf.core.net.Block), f"block {b.name} was not cut"
        for c in b.children():
            walk(c)

    for net in step.nets:
        for b in net.blocks:
            walk(b)
    assert {"BasicBlock", "DGLHead"} <= kinds, kinds
    assert any(type(b).__name__ == "LeapBlock" for net in step.nets for b in net.blocks)


def test_a_block_keeps_only_what_crosses_its_cuts():
    # six conv-BN-ReLU-conv-BN-ReLU blocks: plain keeps four maps per block (both convs' and BNs'
    # inputs), conv_inputs two (the convs' inputs), block_input one (its input)
    def unit():
        return nn.Sequential(*[m for _ in range(2) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                                                             nn.ReLU())])
    net = mf.from_module(nn.Sequential(*[unit() for _ in range(6)], nn.Flatten(), nn.Linear(8 * 8 * 8, 5)))
    obj = mf.local_loss(net, None, mf.losses.cross_entropy, name="fit")
    ts = mf.init([obj], mf.optim.sgd(0.1))
    batch = (torch.randn(16, 8, 8, 8), torch.arange(16) % 5)
    peaks = {}
    for inside in (None, "conv_inputs", "block_input"):
        scheme = [obj if inside is None else mf.remat(obj, inside=inside)]
        with track_memory() as meter:
            got = mf.gradients(scheme)(ts, batch)
        peaks[inside] = meter.peak_bytes
        assert_same(got, mf.gradients([obj])(ts, batch))
    assert peaks["block_input"] < peaks["conv_inputs"] < peaks[None], peaks


def test_batchnorm_statistics_are_written_once():
    net = mf.from_module(nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                                                     nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))))
    params, state = mf.init_params(net)
    x = torch.randn(4, 3, 9, 9)
    leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
    cut = segmented(net, "conv_inputs")
    y, new = cut.run(leaves, state, x, train=True)
    y.sum().backward()  # recomputes both segments
    _, plain = net.run(params, state, x, train=True)
    mt.assert_identical(new, plain, "state")
    assert int(new["0.1.num_batches_tracked"]) == 1


def test_bad_rules_and_untraceable_blocks_are_refused_with_the_fix():
    obj = mf.local_loss(mf.from_module(nn.Linear(4, 2)), None, mf.losses.cross_entropy, name="o")
    with pytest.raises(SchemeError, match="block_input"):
        mf.remat(obj, inside="everything")
    with pytest.raises(SchemeError, match="every="):
        mf.remat(obj, every=2, inside="conv_inputs")

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    net = mf.core.net.Net((mf.core.net.Block.of("branchy", Branchy()), mf.core.net.Block.of("fc", nn.Linear(4, 2))))
    bad = mf.local_loss(net, None, mf.losses.cross_entropy, name="o")
    scheme = [mf.remat(bad, inside="conv_inputs")]
    with pytest.raises(TraceError, match="without inside="):
        mf.gradients(scheme)(mf.init(scheme, mf.optim.sgd(0.1)), (torch.randn(3, 4), torch.tensor([0, 1, 0])))


def test_remat_inside_does_not_compile():
    obj = mf.remat(mf.local_loss(mf.from_module(nn.Linear(4, 2)), None, mf.losses.cross_entropy, name="o"),
                   inside="block_input")
    with pytest.raises(SchemeError, match="compile=False"):
        mf.execute.executor([obj], compile=True)
