"""The contract of the one executor (docs/design.md §4, §5): every published scheme, run
through every option of the step, agrees — bit for bit where the design says exact.

Options: ``share`` None / True (merged, one VJP per arriving cotangent), ``"sum"`` (summed
cotangents: float32 rounding), ``False`` (nothing merged); remat (every block, or every two);
a mix of rematerialised and plain objectives (the remat ones opaque); an own ``grad_fn``
(opaque); compiled kernels (``aot_eager``); a module-parallel rank started from given
boundaries; and evaluation (the plan run forward).
"""

from __future__ import annotations

import attrs
import pytest
import torch
from torch import nn

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.execute import executor, gradient_fns
from mlaan_func.plan import plan_routes

METHODS = mf.schemes.SCHEMES
SHAPE = (3, 8, 8)


def published(method: str, dropout: bool = True):
    net = mf.from_module(mf.models.CifarResNet(14, num_classes=5, widths=(4, 8, 8)))
    if dropout:  # randomness inside the blocks: a shared forward must draw what each objective would
        drop = mf.from_module(nn.Dropout(0.25), name="drop").blocks[0]
        net = mf.core.Net((net.blocks[0], drop, *net.blocks[1:]))
    return mf.schemes.build(method, net, ["1.0", "1.1", "2.1"], input_shape=SHAPE)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, *SHAPE, generator=g), torch.randint(0, 5, (6,), generator=g)


def equal(a, b, what):
    assert set(a) == set(b), f"{what}: keys differ"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what} differ bitwise at {bad[:4]}"


def grads(scheme, ts, **options):
    return mf.gradients(scheme, **options)(ts, batch())


@pytest.mark.parametrize("method", METHODS)
def test_every_form_of_sharing_agrees_with_each_objective_alone(method):
    scheme = published(method)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    alone = grads(scheme, ts, share=False)
    for share in (None, True):
        g = grads(scheme, ts, share=share)
        equal(g.grads, alone.grads, f"share={share} gradients")
        equal(g.state, alone.state, f"share={share} state")
        equal(g.losses, alone.losses, f"share={share} losses")
    summed = grads(scheme, ts, share="sum")
    mt.assert_close(summed.grads, alone.grads)
    mt.assert_close(summed.state, alone.state)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("every", [1, 2])
def test_remat_is_bitwise_the_plain_step_merged_or_not(method, every):
    scheme = published(method)
    remat = [mf.remat(o, every=every) for o in scheme]
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    plain = grads(scheme, ts, share=False)
    for share in (None, False):
        g = grads(remat, ts, share=share)
        equal(g.grads, plain.grads, f"remat every={every} share={share}")
        equal(g.state, plain.state, f"remat every={every} share={share} state")


@pytest.mark.parametrize("method", ["dgl", "mlaan", "infopro_mlaan"])
def test_opaque_objectives_mixed_with_plain_ones_agree(method):
    scheme = published(method)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    plain = grads(scheme, ts, share=False)
    mixed = [mf.remat(o) if i % 2 else o for i, o in enumerate(scheme)]
    equal(grads(mixed, ts).grads, plain.grads, "half rematerialised")

    def own(objective, taps):  # the default gradient function, brought as the objective's own
        return gradient_fns([attrs.evolve(objective, grad_fn=None)], [plan_routes([objective], given=[
            objective.input_name] if objective.input_name != "input" else ())[0]._replace(taps=taps)])[0]

    custom = [attrs.evolve(o, grad_fn=own) if i % 2 == 0 else o for i, o in enumerate(scheme)]
    g = grads(custom, ts)
    equal(g.grads, plain.grads, "own grad_fn")
    equal(g.state, plain.state, "own grad_fn state")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dgl", "mlaan"])
def test_compiled_kernels_agree_with_eager(method):
    scheme = published(method, dropout=False)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    eager = grads(scheme, ts)
    for share in (None, False):
        g = grads(scheme, ts, compile=True, backend="aot_eager", share=share)
        mt.assert_close(g.grads, eager.grads, 1e-4)
        mt.assert_close(g.state, eager.state, 1e-4)


@pytest.mark.parametrize("method", ["dgl", "mlaan", "dgl_mlaan"])
@pytest.mark.parametrize("share", [None, False])
def test_a_rank_from_given_boundaries_computes_its_part_of_the_whole_step(method, share):
    scheme = published(method, dropout=False)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    whole, kept = executor(scheme, share=share, keep=["1.1"])(ts, batch(), {})
    later = [o for o in scheme if o.input_name not in ("input", "stem", "drop", "1.0")]
    g, sent = executor(later, share=share, given=["1.1"], keep=["2.1"])(ts, batch(), {"1.1": kept["1.1"]})
    assert list(sent) == ["2.1"]
    for o in later:
        assert torch.equal(g.losses[o.name], whole.losses[o.name]), o.name
    own = {k for o in later for k in o.param_names} - {k for o in scheme if o not in later for k in o.param_names}
    equal({k: g.grads[k] for k in own}, {k: whole.grads[k] for k in own}, "the rank's own parameters")


@pytest.mark.parametrize("method", METHODS)
def test_evaluation_runs_each_block_application_once_and_scores_as_each_objective_alone(method):
    scheme = published(method)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    calls = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: calls.append(m) if isinstance(m, nn.Conv2d) else None)
    try:
        got = mf.evaluate(scheme, ts, [batch()], select=None)
    finally:
        hook.remove()
    plan = mf.plan.plan_scheme(scheme)
    convs = sum(isinstance(m, nn.Conv2d) for p in plan.pieces for b in p.net.blocks
                for leaf in mf.identity.module_blocks(b) for m in leaf.eval_template.modules())
    assert len(calls) == convs   # every piece of the plan, once
    x, y = batch()
    acts = {"input": x}
    routes = plan_routes(scheme)
    with torch.no_grad():   # each objective alone, from the boundary it reads, in eval mode
        for o, r in zip(scheme, routes):
            loss, _, outputs, m = o.forward(ts.params, ts.state, acts[o.input_name], (x, y), train=False,
                                            taps=r.taps, step=ts.step)
            for name, v in outputs.items():
                acts.setdefault(name, v)
            for k, v in m.items():
                assert got[o.name][k] == float(v.double()), (o.name, k)
