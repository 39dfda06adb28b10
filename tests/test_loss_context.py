"""The loss context (issue #23): a loss reads its objective's input and the detached values
earlier objectives of the same step published. Every form of the executor gives a
context-reading objective the same bits; the plan refuses a reader placed before its source,
naming both; no gradient crosses objectives through a published value (the reach laws)."""

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.errors import SchemeError
from test_shared import BLOCKS, CLASSES, SHAPE, backbone, batch  # the small ResNet-14 case


def publisher(output, batch, *, context):
    """Cross-entropy; publishes the squared norm of its gradient w.r.t. the net's output and
    the mean of its logits."""
    loss, metrics = mf.losses.cross_entropy(output, batch)
    if context.differentiable:
        grad, = torch.autograd.grad(loss, context.net_output, retain_graph=True)
        context.publish("energy", grad.pow(2).sum())
    context.publish("mean", output.mean())
    return loss, metrics


def reader_of(source):
    """Cross-entropy plus a second-order term that matches the squared norm of its own input
    gradient to what ``source`` published, and a first-order one on its logits' mean."""
    def reader(output, batch, *, context):
        loss, metrics = mf.losses.cross_entropy(output, batch)
        mean = context.read(source, "mean")
        assert not mean.requires_grad
        term = (output.mean() - mean) ** 2
        if context.differentiable:
            grad, = torch.autograd.grad(loss, context.input, create_graph=True)
            term = term + 1e3 * (grad.pow(2).sum() - context.read(source, "energy")) ** 2
        return loss + term, {**metrics, "term": term.detach()}
    return reader


def with_context(scheme, source, reader, *, both=False):
    """``scheme`` with objective ``source`` publishing and ``reader`` reading it (and, with
    ``both``, the reader publishing too)."""
    out = list(scheme)
    name = out[source].name
    out[source] = attrs.evolve(out[source], loss=publisher)
    loss = reader_of(name)
    if both:
        inner = loss

        def loss(output, batch, *, context):
            context.publish("mean", output.mean())
            return inner(output, batch, context=context)
    out[reader] = attrs.evolve(out[reader], loss=loss, context_from=[name])
    return out


@st.composite
def context_cases(draw):
    at = draw(mt.cut_points(BLOCKS, min_modules=2, max_modules=5))
    k = len(at) + 1
    options = {"width": draw(st.integers(1, min(k - 1, 3))), "trunks": draw(st.sampled_from([None, "rule"]))}
    scheme = mf.schemes.mlaan(backbone(), at, input_shape=SHAPE, **options)
    assert len(scheme) >= 2
    source = draw(st.integers(0, len(scheme) - 2))
    reader = draw(st.integers(source + 1, len(scheme) - 1))
    return with_context(scheme, source, reader, both=draw(st.booleans()))


def exclusive_to_context(scheme):
    """The parameters only context-taking objectives train."""
    mine = {k for o in scheme if o.loss_takes_context for k in o.param_names}
    others = {k for o in scheme if not o.loss_takes_context for k in o.param_names}
    return mine - others


@settings(deadline=None, max_examples=8)
@given(scheme=context_cases(), seed=mt.seeds, data=mt.image_batches(size=8, num_classes=CLASSES))
def test_a_context_reader_gets_the_same_bits_in_every_share_mode_and_with_remat(scheme, seed, data):
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=seed % 1000)
    want = mf.gradients(scheme, share=False)(ts, data)
    readers = [o.name for o in scheme if o.context_from]
    assert all("term" in want.metrics[n] for n in readers)
    alone = exclusive_to_context(scheme)
    assert alone   # the context objectives' heads
    forms = [(scheme, share) for share in (None, True)]
    forms += [([mf.remat(o, every) for o in scheme], share) for every in (1, 2) for share in (None, True, False)]
    for form, share in forms:
        got = mf.gradients(form, share=share)(ts, data)
        for part in ("grads", "state", "losses", "metrics"):
            mt.assert_identical(getattr(got, part), getattr(want, part), f"{part} (share={share})")
    for form in (scheme, [mf.remat(o, 1) for o in scheme]):
        summed = mf.gradients(form, share="sum")(ts, data)
        # a context objective runs alone in every form: its loss, metrics and the parameters only
        # it trains are the same bits; the rest is float32 rounding of the summed cotangents
        for name in (o.name for o in scheme if o.loss_takes_context):
            mt.assert_identical(summed.losses[name], want.losses[name], name)
            mt.assert_identical(summed.metrics[name], want.metrics[name], name)
        mt.assert_identical({k: summed.grads[k] for k in alone}, {k: want.grads[k] for k in alone}, "grads")
        mt.assert_identical(summed.state, want.state, "state")
        mt.assert_close(summed.grads, want.grads, 1e-4, "gradient")


@settings(deadline=None, max_examples=4)
@given(scheme=context_cases(), data=mt.image_batches(size=8, num_classes=CLASSES))
def test_context_schemes_keep_the_reach_laws_and_the_oracle(scheme, data):
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=2)
    mt.check_isolation(scheme, ts, data)
    mt.check_oracle(scheme, ts, data, rtol=1e-4)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    mt.check_purity(mf.step(scheme, opt), mf.init(scheme, opt), data)


def test_compiled_steps_on_aot_eager_equal_eager_with_a_context_reader():
    scheme = with_context(mf.schemes.mlaan(backbone(), ["1.0", "2.0"], input_shape=SHAPE), 0, 2)
    assert [o.loss_takes_context for o in scheme] == [True, False, True]   # m1.independent is compiled
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    xy = batch(seed=1)
    want = mf.gradients(scheme, share=False)(ts, xy)
    for share in (None, False):
        got = mf.gradients(scheme, share=share, compile=True, backend="aot_eager")(ts, xy)
        mt.assert_close(got.grads, want.grads, 1e-5, f"gradient (compiled, share={share})")
        for name in ("m1.cascaded", "final"):
            mt.assert_identical(got.metrics[name], want.metrics[name], name)


def test_a_reader_before_its_source_is_refused_naming_both():
    scheme = mf.schemes.dgl(backbone(), ["1.0", "2.0"], input_shape=SHAPE)
    wrong = with_context(scheme, 2, 0)   # m0 reads what final publishes: final runs after it
    assert [o.name for o in wrong] == ["m0", "m1", "final"]
    opt = mf.optim.sgd(0.1)
    for build in (lambda: mf.init(wrong, opt), lambda: mf.gradients(wrong), lambda: mf.step(wrong, opt),
                  lambda: mf.plan.plan_scheme(wrong)):
        with pytest.raises(SchemeError, match=r"'m0' reads loss-context values of 'final', which comes after it.*"
                                              r"put 'final' before 'm0'"):
            build()
    mf.init(with_context(scheme, 0, 2), opt)   # the right order is accepted


def test_context_sources_are_checked_when_the_scheme_is_built():
    net = mf.from_module(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3)))
    a, b = mf.split(net, ["0"])
    ce = mf.losses.cross_entropy
    opt = mf.optim.sgd(0.1)
    with pytest.raises(SchemeError, match="takes no context keyword"):
        mf.local_loss(b, None, ce, context_from=["m0"])
    with pytest.raises(TypeError, match="not a string"):
        mf.local_loss(b, None, reader_of("m0"), context_from="m0")
    with pytest.raises(SchemeError, match="names itself"):
        mf.local_loss(b, None, reader_of("final"), name="final", context_from=["final"])
    missing = [mf.local_loss(a, None, ce, name="m0"),
               mf.local_loss(b, None, reader_of("m9"), name="final", context_from=["m9"])]
    with pytest.raises(SchemeError, match="'final' reads loss-context values of 'm9', which is not an objective"):
        mf.init(missing, opt)
    silent = [mf.local_loss(a, None, ce, name="m0"),
              mf.local_loss(b, None, reader_of("m0"), name="final", context_from=["m0"])]
    with pytest.raises(SchemeError, match="'final' reads loss-context values of 'm0', whose loss takes no context"):
        mf.gradients(silent)
    undeclared = [mf.local_loss(a, None, publisher, name="m0"),
                  mf.local_loss(b, None, lambda out, batch, *, context: reader_of("m0")(out, batch, context=context),
                                name="final")]
    ts = mf.init(undeclared, opt)
    with pytest.raises(SchemeError, match="does not name as a source.*context_from=\\['m0'\\]"):
        mf.gradients(undeclared)(ts, (torch.randn(3, 4), torch.tensor([0, 1, 2])))


def test_a_published_value_carries_no_gradient_into_its_source():
    """A reader whose term depends on the source's output: were the value not detached, the
    reader's loss would reach the source's parameters and the checker would see a leak."""
    net = mf.from_module(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)))
    a, b = mf.split(net, ["1"])
    head = mf.from_module(nn.Linear(4, 3), name="head0")

    def leaky_if_attached(output, batch, *, context):
        context.publish("out", output)   # the library detaches it
        return mf.losses.cross_entropy(output, batch)

    def reads(output, batch, *, context):
        loss, metrics = mf.losses.cross_entropy(output, batch)
        return loss + (output * context.read("m0", "out")).mean(), metrics

    scheme = [mf.local_loss(a, head, leaky_if_attached, name="m0"),
              mf.local_loss(b, None, reads, name="final", context_from=["m0"])]
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    xy = (torch.randn(5, 4), torch.arange(5) % 3)
    mt.check_isolation(scheme, ts, xy)
    assert mt.expected_reach(scheme)[1] == frozenset(b.param_names)


def test_evaluation_gives_the_context_too():
    """In eval the loss gets its input and net output (no gradient) and what earlier
    objectives published in eval; a loss that reads only in training need not publish there."""
    seen = []

    def eval_reader(output, batch, *, context):
        seen.append((context.train, context.differentiable, tuple(context.input.shape),
                     tuple(context.net_output.shape), float(context.read("m0", "mean"))))
        return mf.losses.cross_entropy(output, batch)

    net = mf.from_module(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)))
    a, b = mf.split(net, ["1"])
    scheme = [mf.local_loss(a, mf.from_module(nn.Linear(6, 3), name="head0"), publisher, name="m0"),
              mf.local_loss(b, None, eval_reader, name="final", context_from=["m0"])]
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    xy = (torch.randn(5, 4), torch.arange(5) % 3)
    accuracy = mf.evaluate(scheme, ts, [xy])
    assert sorted(accuracy) == ["final", "m0"]
    train, differentiable, shape_in, shape_out, _ = seen[-1]
    assert (train, differentiable, shape_in, shape_out) == (False, False, (5, 6), (5, 3))
    mf.gradients(scheme)(ts, xy)
    assert seen[-1][:2] == (True, True)


def test_a_switched_off_source_is_refused_while_its_reader_runs():
    scheme = mf.schemes.dgl(backbone(), ["1.0", "2.0"], input_shape=SHAPE)
    scheme = with_context(scheme, 0, 1)
    scheme[0] = mf.local_loss(scheme[0].net, scheme[0].head, publisher, name="m0", active=lambda step: step % 2 == 0)
    opt = mf.optim.sgd(0.1)
    train_step, ts = mf.step(scheme, opt), mf.init(scheme, opt)
    ts, metrics = train_step(ts, batch())
    assert "term" in metrics["m1"]
    with pytest.raises(SchemeError, match="'m1' reads loss-context values of 'm0'.*switched.off"):
        train_step(ts, batch())


def test_a_loss_context_on_token_inputs_publishes_from_the_first_module():
    """The first module of an LM reads token ids (no gradient w.r.t. them); it still publishes
    its output gradient, and the next module reconciles with it (SGR on an LM). A second-order
    term needs ops with a double backward: torch's fused CPU attention kernel has none, the
    math kernel has."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    net = mf.from_module(mf.models.lm_micro(vocab_size=16, context=8))
    modules = mf.split(net, ["blocks.0"])
    seq = mf.losses.sequence_cross_entropy
    readout = net.block("readout")
    scheme = [mf.local_loss(modules[0], mf.copy(readout, "readout0"), mf.losses.gradient_reconciliation(seq),
                            name="m0"),
              mf.local_loss(modules[1], None, mf.losses.gradient_reconciliation(seq, 1.0, "m0", publish=False),
                            name="final", context_from=["m0"])]
    ts = mf.init(scheme, mf.optim.adamw(1e-3))
    tokens = torch.randint(0, 16, (3, 9))
    with sdpa_kernel(SDPBackend.MATH):
        g = mf.gradients(scheme)(ts, (tokens[:, :-1], tokens[:, 1:]))
        mt.check_isolation(scheme, ts, (tokens[:, :-1], tokens[:, 1:]))
    assert float(g.metrics["final"]["reconciliation"]) > 0


def test_a_rank_started_from_a_boundary_keeps_its_context_and_refuses_a_source_elsewhere():
    scheme = with_context(mf.schemes.dgl(backbone(), ["1.0", "2.0", "3.0"], input_shape=SHAPE), 1, 2)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=5)
    xy = batch(seed=4)
    whole = mf.gradients(scheme)(ts, xy)
    h, _ = scheme[0].net(ts.params, ts.state, xy[0], train=True)
    rank, _ = mf.execute.executor(scheme[1:], given=[scheme[1].input_name])(ts, xy, {scheme[1].input_name: h})
    for name in ("m1", "m2", "final"):
        mt.assert_identical(rank.metrics[name], whole.metrics[name], name)
    mt.assert_identical(rank.grads, {k: whole.grads[k] for k in rank.grads}, "grads")
    with pytest.raises(SchemeError, match="'m2' reads loss-context values of 'm1', which is not an objective"):
        mf.execute.executor(scheme[2:], given=[scheme[2].input_name])
