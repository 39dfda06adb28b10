"""Compiled block kernels: blocks share a kernel exactly when they compute the same function."""

import pytest
import torch
from torch import nn

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.core import Block
from mlaan_func.kernels import KernelBlock, kernel_net, kernel_table, signature
from mlaan_func.models.resnet import CifarResNet


class Scale(nn.Module):
    """Multiplies by a plain attribute that ``repr`` does not show."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x) * self.factor


class Tagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.tags = bytearray(b"ab")   # opaque: nothing can be said about it from outside

    def forward(self, x):
        return self.lin(x)


def test_blocks_share_a_kernel_only_with_the_same_type_configuration_and_shapes():
    assert signature(Block.of("a", nn.Linear(3, 3))) == signature(Block.of("b", nn.Linear(3, 3)))
    assert signature(Block.of("a", nn.Linear(3, 3))) != signature(Block.of("a", nn.Linear(3, 3, bias=False)))
    assert signature(Block.of("a", nn.Conv2d(3, 3, 3))) != signature(Block.of("a", nn.Conv2d(3, 3, 3, stride=2)))
    assert signature(Block.of("a", Scale(2.0))) != signature(Block.of("a", Scale(3.0)))   # hidden from repr
    tagged = Block.of("a", Tagged())   # an opaque attribute: a kernel of its own
    assert signature(tagged) != signature(Block.of("a", Tagged())) and signature(tagged) == signature(tagged)
    hooked = nn.Linear(3, 3)
    hooked.register_forward_hook(lambda m, i, o: o * 2)   # a hook: a kernel of its own
    assert signature(Block.of("a", hooked)) != signature(Block.of("a", nn.Linear(3, 3)))


def test_a_kernel_net_computes_what_the_net_computes():
    net = mf.from_module(nn.Sequential(Scale(2.0), Scale(3.0), Tagged(), Tagged(), nn.Linear(3, 3)))
    table = kernel_table([net], backend="aot_eager")
    assert len(table) == 5   # two factors, one kernel per unhashable block, one Linear
    fast = kernel_net(net, table)
    assert all(isinstance(b, KernelBlock) for b in fast.blocks)
    assert fast.param_names == net.param_names and fast.state_names == net.state_names
    params, state = mf.init_params(net)
    x = torch.randn(4, 3)
    mt.assert_close(fast.run(params, state, x)[0], net.run(params, state, x)[0], 1e-6)
    mt.assert_identical(fast.run(params, state, x, train=False)[0], net.run(params, state, x, train=False)[0])


def test_one_kernel_per_kind_of_block_in_a_resnet_scheme():
    net = mf.from_module(CifarResNet(32, num_classes=5, widths=(4, 8, 8)))
    kinds = []
    for k in (8, 15):
        scheme = mf.schemes.mlaan(net, mf.published.split_for(None, net.block_names, k), input_shape=(3, 8, 8))
        kinds.append(len(kernel_table(scheme, backend="eager")))
    # the stem, blocks 4 and 8 wide, two down-sampling blocks, heads and classifier: not K
    assert kinds[0] == kinds[1] <= 8


def test_kernel_state_writes_and_errors_are_the_blocks():
    net = mf.from_module(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    fast = kernel_net(net, kernel_table([net], backend="aot_eager"))
    params, state = mf.init_params(net)
    x = torch.randn(6, 3)
    got, want = fast.run(params, state, x), net.run(params, state, x)
    mt.assert_close(got[1], want[1], 1e-6)
    assert state["1.running_mean"].abs().sum() == 0   # the input state is untouched
    with pytest.raises(mf.ShapeError, match="block '0'"):
        fast.run(params, state, torch.randn(6, 5))
