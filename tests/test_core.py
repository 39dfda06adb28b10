"""Functional core and combinators: split/cascade identity, purity, init, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.models.resnet import CifarResNet

SETTINGS = settings(deadline=None, max_examples=15)


def tiny_resnet(classes=5, channels=3):
    return CifarResNet(8, num_classes=classes, in_channels=channels, widths=(4, 8, 8))


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 7),
                         nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


@SETTINGS
@given(data=st.data(), seed=mt.seeds, train=st.booleans())
def test_split_then_cascade_is_the_net_mlp(data, seed, train):
    net = mf.from_module(mlp())
    at = data.draw(mt.cut_points(net.block_names))
    params, state = mf.init_params(net, seed=seed)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed))
    mt.check_split_identity(net, at, params, state, x, train=train)


@SETTINGS
@given(data=st.data(), batch=mt.image_batches(channels=3, size=8, num_classes=5))
def test_split_then_cascade_is_the_net_resnet(data, batch):
    net = mf.from_module(tiny_resnet())
    at = data.draw(mt.cut_points(net.block_names))
    params, state = mf.init_params(net, seed=1)
    mt.check_split_identity(net, at, params, state, batch[0])


def test_split_gives_k_modules_reading_the_previous_output():
    net = mf.from_module(mf.models.resnet32())
    mods = mf.split(net, mf.published_split("resnet32", 16))
    assert len(mods) == 16
    assert mods[0].block_names == ("stem",) and mods[0].input_name == "input"
    assert mods[1].input_name == "stem" and mods[-1].block_names == ("3.4", "classifier")
    assert len(mf.split(net, mf.published_split("resnet32", 15))[0].blocks) == 2


@SETTINGS
@given(seed=mt.seeds, train=st.booleans())
def test_net_call_is_pure(seed, train):
    net = mf.from_module(tiny_resnet())
    params, state = mf.init_params(net, seed=seed)
    x = torch.randn(3, 3, 8, 8)
    mt.check_purity(lambda p, s, x: net(p, s, x, train=train), params, state, x)


def test_train_updates_batchnorm_state_eval_does_not():
    net = mf.from_module(tiny_resnet())
    params, state = mf.init_params(net)
    x = torch.randn(3, 3, 8, 8)
    _, s_train = net(params, state, x, train=True)
    _, s_eval = net(params, state, x, train=False)
    assert int(s_train["stem.bn.num_batches_tracked"]) == 1
    assert s_eval is state


def test_net_matches_the_module_it_came_from():
    module = tiny_resnet()
    net = mf.from_module(module)
    params, state = mf.init_params(net, seed=3)
    block_module = dict(module.named_blocks())
    for name, blk in block_module.items():
        for k, v in blk.named_parameters():
            v.data.copy_(params[f"{name}.{k}"])
        for k, v in blk.named_buffers():
            v.data.copy_(state[f"{name}.{k}"])
    x = torch.randn(4, 3, 8, 8)
    module.eval()
    y, _ = net(params, state, x, train=False)
    mt.assert_close(y, module(x))


def test_init_is_deterministic_and_copies_equal_their_source():
    net = mf.from_module(tiny_resnet())
    p1, s1 = mf.init_params(net, seed=7)
    p2, _ = mf.init_params(net, seed=7)
    p3, _ = mf.init_params(net, seed=8)
    mt.assert_identical(p1, p2)
    assert not torch.equal(p1["1.0.conv1.weight"], p3["1.0.conv1.weight"])
    trunk = mf.copy(mf.split(net, ["1.0"])[1], "trunk")
    pc, sc = mf.init_params(trunk, seed=7)
    assert torch.equal(pc["trunk.2.0.conv1.weight"], p1["2.0.conv1.weight"])
    assert torch.equal(sc["trunk.2.0.bn1.running_var"], s1["2.0.bn1.running_var"])


def test_resnet_init_follows_the_design():
    params, state = mf.init_params(mf.from_module(mf.models.resnet32()), seed=0)
    w = params["2.0.conv1.weight"]
    assert abs(float(w.std()) - (2 / (9 * 32)) ** 0.5) < 0.01
    assert torch.equal(params["2.0.bn1.weight"], torch.ones(32))
    assert 460_000 < sum(v.numel() for v in params.values()) < 470_000


@pytest.mark.parametrize("at, message", [
    (["9.9"], "unknown cut point"),
    (["2.0", "1.0"], "follow the block order"),
    (["1.0", "1.0"], "appears twice"),
    (["classifier"], "empty last module"),
    ("1.0", "list of block names"),
])
def test_bad_cut_points_say_what_is_wrong(at, message):
    net = mf.from_module(tiny_resnet())
    with pytest.raises((ValueError, TypeError), match=message):
        mf.split(net, at)


def test_more_modules_than_blocks_is_refused():
    net = mf.from_module(tiny_resnet())
    with pytest.raises(ValueError):
        mf.split(net, list(net.block_names))


def test_missing_parameter_names_the_key_and_the_fix():
    net = mf.from_module(tiny_resnet())
    params, state = mf.init_params(net)
    del params["1.0.conv1.weight"]
    with pytest.raises(KeyError, match="1.0.conv1.weight.*init"):
        net(params, state, torch.randn(2, 3, 8, 8))


def test_head_of_the_wrong_width_is_a_shape_error():
    net = mf.from_module(tiny_resnet())
    first = mf.split(net, ["1.0"])[0]
    head = mf.from_module(nn.Sequential(nn.Conv2d(99, 2, 1)), name="head")
    params, state = mf.init_params(first, head)
    with pytest.raises(mf.ShapeError, match="head"):
        mf.cascade(first, head)(params, state, torch.randn(2, 3, 8, 8))
    with pytest.raises(mf.ShapeError, match="head"):
        mf.output_shape(mf.cascade(first, head), (2, 3, 8, 8))


def test_output_shape_runs_on_meta():
    net = mf.from_module(mf.models.resnet110())
    assert mf.output_shape(net, (2, 3, 32, 32)) == (2, 10)
