"""What the step takes (issue 14): loss hyper-parameters as state or schedules, the step in
losses, any pytree batch, any metric; and the batch checks of issue 11 (labels, lengths,
device, structure), each failing with an error that names the fix."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import mlaan_func as mf
from mlaan_func import testing as mt

FAST = settings(deadline=None, max_examples=12)


def two_module_scheme(weight=0.5, decay=0.9):
    """A module, an auxiliary objective with a leap trunk, and the final classifier."""
    torch.manual_seed(0)
    net = mf.from_module(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)))
    first, last = mf.split(net, at=["1"])
    source = mf.Net(net.blocks[2:3])
    trunk = mf.leap_ema(mf.copy(source, "trunk"), source=source, decay=decay)
    head = mf.from_module(nn.Linear(6, 3), name="head")
    return [mf.local_loss(first, mf.cascade(trunk, head), mf.losses.cross_entropy, weight=weight, name="aux"),
            mf.local_loss(last, None, mf.losses.cross_entropy, name="final")]


def data(i, n=6):
    g = torch.Generator().manual_seed(i)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


# --------------------------------------------------------------------------- hyper-parameters


def test_held_weight_changed_mid_run_equals_a_rebuilt_run_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    held = two_module_scheme(weight=mf.hyper.held(0.5), decay=mf.hyper.held(0.9))
    opt = mf.optim.sgd(0.1, momentum=0.9)
    compiled = mf.step(held, opt, compile=True, backend=counter, share=False)  # one graph per objective, values inside it
    ts = mf.init(held, opt, seed=3)
    for i in range(4):
        if i == 2:
            ts = mf.hyper.set_held(ts, {"weight:aux": 0.1, "decay:twin.2": 0.5})
        ts, _ = compiled(ts, data(i))
    assert counter.frame_count == len(held)

    ref = mf.init(two_module_scheme(), opt, seed=3)
    for i in range(4):
        fixed = two_module_scheme(*((0.5, 0.9) if i < 2 else (0.1, 0.5)))
        ref, _ = mf.step(fixed, opt)(ref, data(i))
    mt.assert_close(ts.params, ref.params, 1e-5)
    mt.assert_close({k: v for k, v in ts.state.items() if ":" not in k}, ref.state, 1e-5)


def test_scheduled_weight_and_decay_follow_the_step_and_losses_see_it():
    seen = []

    def loss(out, batch, *, step):
        seen.append(int(step))
        return mf.losses.cross_entropy(out, batch)

    weight = lambda step: 1.0 / (step + 1).float()  # noqa: E731
    decay = lambda step: torch.where(step < 1, 0.0, 1.0)  # noqa: E731
    scheme = two_module_scheme(weight=weight, decay=decay)
    scheme[1] = mf.local_loss(scheme[1].net, None, loss, name="final")
    opt = mf.optim.sgd(0.1)
    ts = mf.init(scheme, opt)
    for i in range(3):
        g = mf.gradients(scheme)(ts, data(i))
        plain = two_module_scheme(weight=1.0 / (i + 1))
        want = mf.gradients(plain)(ts, data(i))
        mt.assert_close(g.grads, want.grads, 1e-6)
        new, _ = mf.step(scheme, opt)(ts, data(i))
        twin = new.state["twin.2.weight"]
        # decay 0 at step 0: the twin copies its source; decay 1 afterwards: frozen
        assert torch.equal(twin, new.params["2.weight"]) if i == 0 else torch.equal(twin, ts.state["twin.2.weight"])
        ts = new
    assert seen == [0, 0, 1, 1, 2, 2]


def test_held_values_refuse_non_finite_and_unknown_keys():
    scheme = two_module_scheme(weight=mf.hyper.held(0.5), decay=mf.hyper.held(0.9))
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    with pytest.raises(ValueError, match="weight:aux was set to inf; set it to a finite number"):
        mf.hyper.set_held(ts, {"weight:aux": float("inf")})
    with pytest.raises(ValueError, match=r"EMA decay must be in \[0, 1\]"):
        mf.hyper.set_held(ts, {"decay:twin.2": 1.5})
    with pytest.raises(KeyError, match="not a held hyper-parameter.*held\\(w\\)"):
        mf.hyper.set_held(ts, {"weight:final": 1.0})
    with pytest.raises(ValueError, match="finite number"):
        mf.hyper.held(float("nan"))


# --------------------------------------------------------------------------- any batch


def masked_cross_entropy(out, batch):
    x, y, mask = batch
    loss = (F.cross_entropy(out, y, reduction="none") * mask).sum() / mask.sum()
    return loss, {"loss": loss.detach()}


def test_a_triple_batch_reaches_every_loss_whole():
    net = mf.from_module(nn.Sequential(nn.Linear(5, 3)))
    scheme = [mf.local_loss(net, None, masked_cross_entropy, name="final")]
    x, y = data(0)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    got = mf.gradients(scheme)(ts, (x, y, mask)).grads
    keep = mask.bool()
    plain = [mf.local_loss(net, None, mf.losses.cross_entropy, name="final")]
    want = mf.gradients(plain)(ts, (x[keep], y[keep])).grads
    mt.assert_close(got, want, 1e-6)


leaf = st.sampled_from(["mask", "w", "meta"])


@FAST
@given(kind=st.sampled_from(["dict", "tuple", "nested"]), extras=st.lists(leaf, unique=True, max_size=3),
       seed=st.integers(0, 1000))
def test_any_pytree_batch_gives_the_gradients_of_its_input_and_labels(kind, extras, seed):
    scheme = two_module_scheme()
    x, y = data(seed)
    more = {e: torch.randn(6) for e in extras}
    if kind == "dict":
        batch = {"x": x, "y": y, **more}
    elif kind == "tuple":
        batch = (x, y, *more.values())
    else:
        batch = {"x": x, "y": y, "extra": {"pair": (torch.ones(2), more)}}
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=seed)
    got = mf.gradients(scheme)(ts, batch)
    want = mf.gradients(scheme)(ts, (x, y))
    mt.assert_close(got.grads, want.grads, 0.0)
    mt.assert_close(got.state, want.state, 0.0)


def test_a_batch_whose_structure_changes_between_steps_is_refused():
    scheme = two_module_scheme()
    opt = mf.optim.sgd(0.1)
    train_step = mf.step(scheme, opt)
    ts = mf.init(scheme, opt)
    x, y = data(0)
    ts, _ = train_step(ts, {"x": x, "y": y})
    ts, _ = train_step(ts, {"x": x[:4], "y": y[:4]})  # a smaller batch is the same structure
    with pytest.raises(ValueError, match="structure changed between steps.*same kind of batch"):
        train_step(ts, {"x": x, "y": y, "mask": torch.ones(6)})


# --------------------------------------------------------------------------- batch checks (issue 11)


def ce_scheme(classes=3):
    return [mf.local_loss(mf.from_module(nn.Linear(5, classes), name="fc"), None, mf.losses.cross_entropy,
                          name="final")]


def test_float_or_one_hot_labels_say_how_to_fix_them():
    scheme = ce_scheme()
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    x, y = data(0)
    with pytest.raises(ValueError, match="integer class indices.*y.argmax"):
        mf.gradients(scheme)(ts, (x, y.float()))
    with pytest.raises(ValueError, match=r"shape \(N,\).*argmax"):
        mf.gradients(scheme)(ts, {"x": x, "y": F.one_hot(y, 3)})


def test_labels_beyond_the_logits_name_the_number_of_classes():
    scheme = ce_scheme(classes=3)
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    x, _ = data(0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*from 4 to 9.*num_classes=10"):
        mf.gradients(scheme)(ts, (x, torch.arange(6) + 4))
    with pytest.raises(ValueError, match=r"from -1"):
        mf.gradients(scheme)(ts, (x, torch.arange(6) - 1))


def test_int32_labels_are_accepted_as_class_indices():
    scheme = ce_scheme()
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    x, y = data(0)
    mt.assert_close(mf.gradients(scheme)(ts, (x, y.int())).grads, mf.gradients(scheme)(ts, (x, y)).grads, 0.0)


def test_mismatched_lengths_and_devices_are_named():
    scheme = ce_scheme()
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    x, y = data(0)
    with pytest.raises(ValueError, match="6 inputs but 5 labels; pass one label per input"):
        mf.gradients(scheme)(ts, (x, y[:5]))
    with pytest.raises(ValueError, match="batch is on meta but the parameters are on cpu.*\\.to\\('cpu'\\)"):
        mf.gradients(scheme)(ts, (x.to("meta"), y.to("meta")))


# --------------------------------------------------------------------------- any metric


def top2(out, batch):
    loss, metrics = mf.losses.cross_entropy(out, batch)
    hit = (out.topk(2, dim=1).indices == batch.y[:, None]).any(dim=1).float().mean()
    return loss, {**metrics, "top2": hit}


def test_evaluate_averages_every_reported_metric_and_user_metrics_over_samples():
    net = mf.from_module(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)))
    first, last = mf.split(net, at=["1"])
    scheme = [mf.local_loss(first, mf.from_module(nn.Linear(6, 3), name="head"), top2, name="aux"),
              mf.local_loss(last, None, mf.losses.cross_entropy, name="final")]
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    probe = mf.from_module(nn.Linear(6, 3), name="probe")
    probe_params, probe_state = mf.init_params(probe, seed=4)

    def linear_probe(outputs, batch):
        logits, _ = probe(probe_params, probe_state, outputs["1"], train=False)
        return {"accuracy": (logits.argmax(1) == batch.y).float().mean()}

    batches = [data(0, n=6), data(1, n=2)]
    every = mf.evaluate(scheme, ts, batches, metrics={"probe": linear_probe}, select=None)
    assert sorted(every) == ["aux", "final", "probe"]
    assert sorted(every["aux"]) == ["accuracy", "loss", "top2"]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    h, _ = first(ts.params, ts.state, x, train=False)
    logits, _ = probe(probe_params, probe_state, h, train=False)
    assert every["probe"]["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    out = mf.from_module(nn.Linear(6, 3), name="head")(ts.params, ts.state, h, train=False)[0]
    assert every["aux"]["loss"] == pytest.approx(float(F.cross_entropy(out, y)), rel=1e-5)
    assert mf.evaluate(scheme, ts, batches) == {k: every[k]["accuracy"] for k in ("aux", "final")}


# ---------------------------------------------------------------- library API errors (#25 item 16)
def _tiny():
    net = mf.from_module(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)))
    scheme = [mf.local_loss(net, None, mf.losses.cross_entropy, name="final")]
    opt = mf.optim.sgd(0.1)
    return scheme, opt, mf.init(scheme, opt)


def test_an_empty_batch_says_so():
    scheme, opt, ts = _tiny()
    with pytest.raises(mf.errors.BatchError, match="the batch is empty"):
        mf.step(scheme, opt)(ts, (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)))


def test_a_uint8_batch_says_to_convert_it():
    scheme, opt, ts = _tiny()
    with pytest.raises(mf.errors.BatchError, match="uint8"):
        mf.step(scheme, opt)(ts, (torch.zeros(2, 3, dtype=torch.uint8), torch.tensor([0, 1])))


def test_labels_on_another_device_say_so():
    scheme, opt, ts = _tiny()
    with pytest.raises(mf.errors.DeviceMismatchError, match="labels are on meta"):
        mf.step(scheme, opt)(ts, (torch.zeros(2, 3), torch.zeros(2, dtype=torch.long, device="meta")))


def test_split_with_none_says_what_cut_points_are():
    net = mf.from_module(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)))
    with pytest.raises(TypeError, match="list of block names"):
        mf.split(net, None)


@pytest.mark.parametrize("bad, message", [
    (lambda out, batch: (torch.nn.functional.cross_entropy(out, batch.y, reduction="none"), {}), "shape \\(4,\\)"),
    (lambda out, batch: (1.5, {}), "a float"),
    (lambda out, batch: (torch.tensor(1), {}), "torch.int64"),
    (lambda out, batch: torch.nn.functional.cross_entropy(out, batch.y), "returns \\(loss, metrics\\)"),
])
def test_a_loss_of_the_wrong_kind_is_named(bad, message):
    net = mf.from_module(torch.nn.Linear(3, 2), name="fc")
    scheme = [mf.local_loss(net, None, bad, name="final")]
    opt = mf.optim.sgd(0.1)
    with pytest.raises(ValueError, match="objective 'final''s loss.*" + message):
        mf.step(scheme, opt)(mf.init(scheme, opt), (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])))


def test_no_optimizer_state_says_how_to_build_one():
    scheme, opt, ts = _tiny()
    with pytest.raises(ValueError, match="opt_state=None"):
        mf.step(scheme, opt)(ts._replace(opt_state=None), (torch.zeros(2, 3), torch.tensor([0, 1])))


def test_a_parameter_of_the_wrong_shape_is_named():
    scheme, opt, ts = _tiny()
    params = {**ts.params, "2.weight": torch.zeros(3, 4)}
    with pytest.raises(mf.ShapeError, match="parameter '2.weight' has shape \\(3, 4\\) but its block holds \\(2, 4\\)"):
        mf.step(scheme, opt)(ts._replace(params=params), (torch.zeros(2, 3), torch.tensor([0, 1])))
