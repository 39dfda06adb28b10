"""SGR (Successive Gradient Reconciliation, Yang et al., ICML 2024) as a recipe: a plain-PyTorch
implementation written here from the paper's description, and the laws through the checkers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.models.resnet import CifarResNet
from oracles import Reference

CLASSES = 5
SHAPE = (3, 8, 8)
WIDTHS = (4, 8, 8)


def small_resnet():
    return CifarResNet(14, num_classes=CLASSES, widths=WIDTHS)


BLOCKS = mf.from_module(small_resnet()).block_names


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(n) % CLASSES


def build(at, **options):
    return mf.schemes.sgr(mf.from_module(small_resnet()), at, input_shape=SHAPE, **options)


def sgr_reference(scheme, at, weight):
    """Module ``i`` of ``model.named_blocks()`` cut after ``at`` runs on ``h_{i-1}`` (detached,
    a leaf); its DGL head (the backbone's classifier for the last module) gives ``CE_i``.
    Module ``i > 0`` adds ``weight · N · ‖∂CE_i/∂h_{i-1} − sg(∂CE_{i-1}/∂h_{i-1})‖²``, the first
    gradient taken with ``create_graph=True`` so that one ``backward()`` of the sum follows
    it; the second is taken at module ``i-1``'s output, through its head only."""
    model = small_resnet()
    blocks = dict(model.named_blocks())
    names = list(blocks)
    ends = [names.index(a) for a in at] + [len(names) - 1]
    per_module = [names[(ends[j - 1] + 1 if j else 0):ends[j] + 1] for j in range(len(ends))]
    heads = {b.prefix: b.module for o in scheme if o.head is not None for b in o.head.blocks}

    def reference(params, state, xy):
        x, y = xy
        ref = Reference(params, state)
        h, previous, total = x, None, 0.0
        for i, module in enumerate(per_module):
            h_in = h.detach().requires_grad_(i > 0)
            z = h_in
            for b in module:
                z = ref.run(b, blocks[b], z)
            last = i == len(per_module) - 1
            logits = z if last else ref.run(f"head{i}", heads[f"head{i}"], z)
            ce = F.cross_entropy(logits, y)
            total = total + ce
            if previous is not None:
                grad_in, = torch.autograd.grad(ce, h_in, create_graph=True)
                total = total + weight * x.shape[0] * ((grad_in - previous) ** 2).sum()
            if not last:
                previous = torch.autograd.grad(ce, z, retain_graph=True)[0].detach()
            h = z
        total.backward()
        return ref.grads(), {**state, **ref.new_state}

    return reference


@pytest.mark.parametrize("at", [["1.0", "2.0"], ["stem", "1.1", "2.1", "3.0"], ["2.1"]])
@pytest.mark.parametrize("weight", [1.0, 10.0])
def test_sgr_one_step_equals_plain_backward(at, weight):
    scheme = build(at, weight=weight)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=4)
    xy = batch(seed=2)
    mt.check_oracle(scheme, ts, xy, sgr_reference(scheme, at, weight), rtol=1e-4)
    # the reconciliation term is not negligible at this weight: without it the gradients differ
    plain = mf.gradients(mf.schemes.dgl(mf.from_module(small_resnet()), at, input_shape=SHAPE))(ts, xy)
    got = mf.gradients(scheme)(ts, xy)
    assert max(mt.relative_error(got.grads[k], plain.grads[k]) for k in got.grads) > 1e-3
    assert all(float(got.metrics[o.name]["reconciliation"]) > 0 for o in scheme[1:])


def test_sgr_is_dgl_whose_losses_read_the_module_before():
    at = ["1.0", "2.0", "3.0"]
    scheme, base = build(at), mf.schemes.dgl(mf.from_module(small_resnet()), at, input_shape=SHAPE)
    def describe(s):
        return [(o.name, o.input_name, o.output_name, o.param_names, o.state_names) for o in s]

    assert describe(scheme) == describe(base)
    assert [o.context_from for o in scheme] == [(), ("m0",), ("m1",), ("m2",)]
    assert [o.input_name for o in scheme[1:]] == [o.output_name for o in scheme[:-1]]
    assert [o.name for o in build([])] == ["final"] and not build([])[0].loss_takes_context   # K = 1 is E2E


@settings(deadline=None, max_examples=4)
@given(at=mt.cut_points(BLOCKS, min_modules=2, max_modules=5), weight=st.sampled_from([0.5, 5.0]),
       head=st.sampled_from(["dgl", "linear"]), data=mt.image_batches(size=8, num_classes=CLASSES))
def test_sgr_laws_isolation_purity_and_every_executor_form(at, weight, head, data):
    scheme = build(at, weight=weight, head=head)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=1)
    mt.check_isolation(scheme, ts, data)
    mt.check_purity(mf.step(scheme, opt), ts, data)
    want = mf.gradients(scheme, share=False)(ts, data)
    for form in (scheme, [mf.remat(o, 1) for o in scheme]):
        for share in (None, True, "sum", False):
            got = mf.gradients(form, share=share)(ts, data)
            for part in ("grads", "state", "losses", "metrics"):
                mt.assert_identical(getattr(got, part), getattr(want, part), f"{part} (share={share})")


def test_sgr_trains_and_evaluates():
    scheme = build(["1.0", "2.0"], weight=1.0)
    opt = mf.optim.sgd(0.05, momentum=0.9)
    ts, train_step = mf.init(scheme, opt, seed=0), mf.step(scheme, opt)
    xy = batch(n=8, seed=3)
    first = None
    for _ in range(8):
        ts, metrics = train_step(ts, xy)
        first = first if first is not None else float(metrics["final"]["loss"])
    assert float(metrics["final"]["loss"]) < first
    report = mf.evaluate(scheme, ts, [xy], select=None)
    assert sorted(report) == ["final", "m0", "m1"] and "reconciliation" not in report["final"]
