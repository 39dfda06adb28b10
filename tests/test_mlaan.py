"""MLAAN (MLM + LAM), InfoPro and the combined schemes: routing, the oracle, twins, export."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.models.resnet import CifarResNet
from mlaan_func.trunks import leap_trunk_rule
from oracles import ce, local_reference

SETTINGS = settings(deadline=None, max_examples=6)
WIDTHS = (4, 8, 8)
CLASSES = 5
SHAPE = (3, 8, 8)


def small_resnet():
    return CifarResNet(14, num_classes=CLASSES, widths=WIDTHS)


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(n) % CLASSES


def build(method, at, **options):
    return mf.schemes.build(method, mf.from_module(small_resnet()), at, input_shape=SHAPE, **options)


BLOCKS = mf.from_module(small_resnet()).block_names  # stem 1.0 1.1 2.0 2.1 3.0 3.1 classifier


@st.composite
def splits_and_width(draw, min_k=1):
    at = draw(mt.cut_points(BLOCKS, min_modules=min_k, max_modules=5))
    k = len(at) + 1
    return at, draw(st.integers(1, k))


# ----------------------------------------------------------------------------- routing

@SETTINGS
@given(sw=splits_and_width(min_k=2), depth=st.integers(1, 4), method=st.sampled_from(["mlaan", "dgl_mlaan"]))
def test_routing_each_loss_reaches_exactly_its_window_trunk_and_head(sw, depth, method):
    at, width = sw
    scheme = build(method, at, width=width, trunk_depth=depth)
    modules = mf.split(mf.from_module(small_resnet()), at)
    k = len(modules)
    for o in scheme:
        name = o.name
        if name == "final":
            want = {p for m in modules[k - width:] for p in m.param_names}
        else:
            i = int(name.split(".")[0][1:])
            if name.endswith("independent"):
                want = set(modules[i].param_names) | {p for p in o.param_names if p.startswith(f"head{i}.")}
            else:
                window = {p for m in modules[i - width + 1:i + 1] for p in m.param_names}
                trunk = {p for p in o.param_names if p.startswith((f"trunk{i}.", f"chead{i}."))}
                assert trunk and not any(p.startswith("twin") for p in o.param_names)
                want = window | trunk
        assert set(o.param_names) == want, name
    mt.check_isolation(scheme, mf.init(scheme, mf.optim.sgd(0.1)), batch())


def test_modules_before_the_first_window_have_no_objective_of_their_own():
    scheme = build("dgl_mlaan", ["1.0", "1.1", "2.0", "2.1"])
    names = [o.name for o in scheme]
    assert names[0] == "m2.cascaded" and "m0.independent" not in names and "m1.independent" not in names
    assert scheme[0].input_name == "input"
    assert names[-1] == "final" and scheme[-1].input_name == "1.1"


@pytest.mark.parametrize("method", ["mlaan", "dgl_mlaan", "infopro_mlaan", "dgl", "infopro"])
def test_k1_is_e2e(method):
    opt = mf.optim.sgd(0.1, momentum=0.9)
    one, e2e = build(method, []), build("e2e", [])
    a, b = mf.init(one, opt, seed=3), mf.init(e2e, opt, seed=3)
    for i in range(2):
        a, _ = mf.step(one, opt)(a, batch(seed=i))
        b, _ = mf.step(e2e, opt)(b, batch(seed=i))
    mt.assert_identical(a.params, b.params)


def test_k_equals_w_has_only_the_final_window():
    scheme = build("dgl_mlaan", ["1.0", "2.0"], width=3)
    assert [o.name for o in scheme] == ["final"]


@pytest.mark.parametrize("width", [0, 4])
def test_bad_window_width_is_refused(width):
    with pytest.raises(ValueError, match="window width"):
        build("mlaan", ["1.0", "2.0"], width=width)


def test_trunk_table_that_does_not_chain_is_refused():
    with pytest.raises(ValueError, match="does not chain"):
        build("mlaan", ["1.0", "2.0"], width=1, trunks=[["3.1", "2.0"], ["3.1"]])


def test_unknown_scheme_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="unknown scheme.*dgl_mlaan"):
        build("mlan", ["1.0"])
    with pytest.raises(ValueError, match="ema_update"):
        build("mlaan", ["1.0", "2.0"], ema_update="some")
    with pytest.raises(ValueError, match="decay"):
        build("mlaan", ["1.0", "2.0"], decay=2.0)


# ----------------------------------------------------------------------------- oracle

def reference_mlaan(scheme_objectives, at, width, ind_loss, cas_loss):
    """``ind_loss(i)`` / ``cas_loss(i)``: module ``i``'s loss ``(output, x, y) -> loss``."""
    model = small_resnet()
    names = [n for n, _ in model.named_blocks()]
    return local_reference(model, scheme_objectives, at, "mlaan", lambda i, end: leap_trunk_rule(names, end),
                           width=width, ind_loss=ind_loss, cas_loss=cas_loss)


def infopro_parts(i, k, contrastive):
    lam1, lam2 = mf.losses.infopro_lambdas(i, k, *mf.schemes.DEFAULT_LAMBDAS)
    mean = torch.tensor(mf.schemes.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(mf.schemes.CIFAR10_STD).view(1, 3, 1, 1)
    supcon = mf.losses.supervised_contrastive(0.07)

    def loss(out, x, y):
        recon, task = out
        bce = F.binary_cross_entropy(recon, (x * std + mean).clamp(0, 1))
        t = supcon(task, mf.Batch(x, y))[0] if contrastive else F.cross_entropy(task, y)
        return lam1 * bce + lam2 * t
    return loss


@pytest.mark.parametrize("method", ["mlaan", "dgl_mlaan", "infopro_mlaan"])
@pytest.mark.parametrize("at", [["1.0", "1.1", "2.1"], ["stem", "1.1", "2.0", "3.0"]])
def test_oracle_gradients_state_and_twins_equal_plain_backward(method, at):
    width = mf.schemes.DEFAULT_WIDTH[method]
    scheme = build(method, at)
    k = len(at) + 1
    if method == "infopro_mlaan":
        reference = reference_mlaan(scheme, at, width, lambda i: infopro_parts(i, k, True),
                                    lambda i: infopro_parts(i, k, False))
    else:
        reference = reference_mlaan(scheme, at, width, lambda i: ce, lambda i: ce)
    opt = mf.optim.sgd(0.5)
    ts = mf.init(scheme, opt, seed=11)
    xy = batch(seed=4)
    mt.check_oracle(scheme, ts, xy, reference, rtol=1e-4)
    # twins: m · twin + (1 − m) · updated source, after one plain-SGD update
    grads, _ = reference(ts.params, ts.state, xy)
    new, _ = mf.step(scheme, opt)(ts, xy)
    twins = [key for key in new.state if key.startswith("twin.") and key[5:] in ts.params]
    assert twins
    for key in twins:
        src = key[len("twin."):]
        want = 0.995 * ts.state[key] + 0.005 * (ts.params[src] - 0.5 * grads[src])
        mt.assert_close(new.state[key], want, 1e-4, key)


# ----------------------------------------------------------------------------- twins

def test_ema_update_all_moves_every_twin_last_only_module_k_minus_2():
    at = ["1.0", "1.1", "2.0", "2.1"]
    opt = mf.optim.sgd(0.5)
    for mode in ("all", "last"):
        scheme = build("mlaan", at, ema_update=mode)
        ts = mf.init(scheme, opt, seed=1)
        new, _ = mf.step(scheme, opt)(ts, batch())
        twin_weights = [k for k in ts.state if k.startswith("twin") and k.endswith("conv1.weight")]
        moved = {k for k in twin_weights if not torch.equal(ts.state[k], new.state[k])}
        if mode == "all":
            assert all(k.startswith("twin.") for k in twin_weights) and moved == set(twin_weights)
        else:
            k_minus_2 = len(at) - 1
            assert moved and all(k.startswith(f"twin{k_minus_2}.") for k in moved)
            assert len(twin_weights) > len(moved)


def test_twins_never_reach_the_optimizer_and_are_shared_per_source_block():
    scheme = build("mlaan", ["1.0", "1.1", "2.0", "2.1"])
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    assert not any(k.startswith("twin") for k in ts.params)
    twin_blocks = {k.split(".")[1] + "." + k.split(".")[2] for k in ts.state if k.startswith("twin.")}
    assert len(twin_blocks) == len({k for k in twin_blocks})
    assert mf.engine.after_steps(scheme) and len(mf.engine.after_steps(scheme)) == len(twin_blocks)


def test_published_trunk_table_builds_for_resnet32_15():
    net = mf.from_module(mf.models.resnet32())
    at = mf.published_split("resnet32", 15)
    scheme = mf.schemes.mlaan(net, at, trunks=mf.leap_trunk_table("resnet32", 15))
    o = next(o for o in scheme if o.name == "m2.cascaded")
    assert [b.name for b in o.head.blocks][:4] == ["trunk2.2.0", "trunk2.3.0", "trunk2.3.3", "trunk2.3.4"]


# ----------------------------------------------------------------------------- export

@pytest.mark.parametrize("method", ["dgl", "mlaan", "dgl_mlaan"])
def test_exported_backbone_equals_the_schemes_forward(method):
    backbone = mf.from_module(small_resnet())
    scheme = mf.schemes.build(method, backbone, ["1.0", "2.0"], input_shape=SHAPE)
    opt = mf.optim.sgd(0.1)
    ts = mf.init(scheme, opt)
    for i in range(2):
        ts, _ = mf.step(scheme, opt)(ts, batch(seed=i))
    module = mf.to_module(backbone, ts.params, ts.state).eval()
    assert not any(k.startswith(("head", "chead", "trunk", "twin")) for k in module.state_dict())
    x = batch(seed=9)[0]
    mt.assert_close(module(x), backbone(ts.params, ts.state, x, train=False)[0])
    acc = mf.evaluate(scheme, ts, [batch(seed=9)])
    assert abs(acc["final"] - float((module(x).argmax(1) == batch(seed=9)[1]).float().mean())) < 1e-6


# ----------------------------------------------------------------------------- done-when

@pytest.mark.slow
@pytest.mark.parametrize("method", ["e2e", "dgl", "infopro", "mlaan", "dgl_mlaan", "infopro_mlaan"])
def test_every_scheme_trains_resnet32_at_15_modules_with_falling_loss(method):
    net = mf.from_module(mf.models.resnet32())
    at = [] if method == "e2e" else mf.published_split("resnet32", 15)
    scheme = mf.schemes.build(method, net, at)
    opt = mf.optim.sgd(0.05, momentum=0.9)
    ts = mf.init(scheme, opt, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
    run = mf.step(scheme, opt)
    losses = []
    for _ in range(6):
        ts, metrics = run(ts, (x, y))
        losses.append(float(metrics["final"]["loss"]))
    assert losses[-1] < losses[0]
