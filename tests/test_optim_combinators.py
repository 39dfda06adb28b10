"""Optimizer combinators (issue 14): each equals its torch.optim / big-batch counterpart step
for step, nests, and rejects bad input with an error that names the fix."""

import math

import pytest
import torch
from oracles import run_pure
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mlaan_func as mf
from mlaan_func import optim
from mlaan_func import testing as mt

FAST = settings(deadline=None, max_examples=15)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a tensor: equal bits, not just equal values (NaN, -0.0)."""
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t.contiguous().view(torch.int64)


def assert_bitwise(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_bitwise(a[k], b[k])
    elif isinstance(a, tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_bitwise(x, y)
    else:
        assert a == b


def params_and_grads(names, seed, steps):
    g = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(3, 2, generator=g) for n in names}
    grads = [{n: torch.randn(3, 2, generator=g) for n in names} for _ in range(steps)]
    return params, grads


# --------------------------------------------------------------------------- partition


@FAST
@given(assignment=st.lists(st.sampled_from(["heads", "backbone"]), min_size=1, max_size=6),
       seed=st.integers(0, 2**16), steps=st.integers(1, 4))
def test_partition_of_sgd_and_adamw_equals_two_torch_param_groups(assignment, seed, steps):
    names = [f"p{i}" for i in range(len(assignment))]
    labels = dict(zip(names, assignment))
    params, grads = params_and_grads(names, seed, steps)
    opt = optim.partition({"heads": optim.adamw(1e-2, weight_decay=0.1),
                           "backbone": optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)},
                          lambda p: {k: labels[k] for k in p})
    ours, _ = run_pure(opt, params, grads)

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    heads = [leaves[k] for k in names if labels[k] == "heads"]
    body = [leaves[k] for k in names if labels[k] == "backbone"]
    opts = ([torch.optim.AdamW(heads, lr=1e-2, weight_decay=0.1)] if heads else []) + \
        ([torch.optim.SGD(body, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)] if body else [])
    for g in grads:
        for k, leaf in leaves.items():
            leaf.grad = g[k].clone()
        for o in opts:
            o.step()
    for k in names:
        torch.testing.assert_close(ours[k], leaves[k].detach(), rtol=1e-5, atol=1e-6)


def test_partition_nests_and_labels_by_objective():
    net = mf.from_module(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)))
    first, last = mf.split(net, at=["1"])
    head = mf.from_module(nn.Linear(4, 3), name="head")
    scheme = [mf.local_loss(first, head, mf.losses.cross_entropy, name="m0"),
              mf.local_loss(last, None, mf.losses.cross_entropy, name="final")]
    backbone = optim.partition({"frozen": optim.set_to_zero(), "rest": optim.sgd(0.1)},
                               mf.labels.by_name({"frozen": "0.*"}, default="rest"))
    opt = optim.partition({"backbone": backbone, "heads": optim.adamw(1e-2)},
                          mf.labels.by_objective(scheme))
    ts = mf.init(scheme, opt)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    new, _ = mf.step(scheme, opt)(ts, (x, y))
    for k in ("0.weight", "0.bias"):
        assert_bitwise(new.params[k], ts.params[k])
    for k in ("2.weight", "head.weight"):
        assert not torch.equal(new.params[k], ts.params[k])


def test_labels_by_objective_on_mlaan_names_every_role():
    net = mf.from_module(mf.models.resnet32(num_classes=10))
    scheme = mf.schemes.mlaan(net, mf.published_split("resnet32", 4))
    params, _ = mf.init_params(*scheme)
    labels = mf.labels.by_objective(scheme)(params)
    assert {labels[k] for k in params if k.startswith("trunk")} == {"trunks"}
    assert all(labels[k] == "backbone" for k in params if k.split(".")[0] in {"stem", "1", "2", "3", "classifier"})
    assert "heads" in labels.values()


# --------------------------------------------------------------------------- masked, set_to_zero


def test_masked_weight_decay_equals_torch_groups_without_decay_on_biases():
    params, grads = params_and_grads(["a.weight", "a.bias", "b.weight"], seed=3, steps=3)
    mask = lambda p: {k: k.endswith("weight") for k in p}  # noqa: E731
    opt = optim.chain(optim.masked(optim.add_decayed_weights(0.1), mask), optim.trace(0.9),
                      optim.scale_by_learning_rate(0.05))
    ours, _ = run_pure(opt, params, grads)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    ref = torch.optim.SGD([{"params": [leaves["a.weight"], leaves["b.weight"]], "weight_decay": 0.1},
                           {"params": [leaves["a.bias"]], "weight_decay": 0.0}], lr=0.05, momentum=0.9)
    for g in grads:
        for k, leaf in leaves.items():
            leaf.grad = g[k].clone()
        ref.step()
    for k in params:
        torch.testing.assert_close(ours[k], leaves[k].detach(), rtol=1e-5, atol=1e-6)


def test_set_to_zero_leaves_parameters_bitwise_including_negative_zero():
    params = {"w": torch.tensor([-0.0, 0.0, 1.5, -2.0])}
    out, _ = run_pure(optim.set_to_zero(), params, [{"w": torch.randn(4)} for _ in range(3)])
    assert_bitwise(out, params)


# --------------------------------------------------------------------------- multi_steps


def linear_scheme():
    net = mf.from_module(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)))
    return [mf.local_loss(net, None, mf.losses.cross_entropy, name="final")]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_multi_steps_equals_one_step_on_the_k_times_larger_batch(k):
    scheme = linear_scheme()
    g = torch.Generator().manual_seed(k)
    xs, ys = torch.randn(2, 4 * k, 5, generator=g), torch.randint(0, 3, (2, 4 * k), generator=g)
    big_opt = optim.sgd(0.3, momentum=0.9, weight_decay=1e-3)
    acc_opt = optim.multi_steps(big_opt, every_k=k)
    big = acc = mf.init(scheme, big_opt, seed=1)
    acc = mf.init(scheme, acc_opt, seed=1)
    big_step, acc_step = mf.step(scheme, big_opt), mf.step(scheme, acc_opt)
    for s in range(2):
        big, _ = big_step(big, (xs[s], ys[s]))
        for m in range(k):
            before = acc.params
            acc, metrics = acc_step(acc, (xs[s][m * 4:(m + 1) * 4], ys[s][m * 4:(m + 1) * 4]))
            if m < k - 1:
                assert_bitwise(acc.params, before)
        mt.assert_close(acc.params, big.params, 1e-5)
    assert int(metrics["optimizer"]["mini_step"]) == 0


# --------------------------------------------------------------------------- apply_if_finite


def test_apply_if_finite_leaves_params_and_state_bitwise_unchanged_on_nan():
    scheme = linear_scheme()
    opt = optim.apply_if_finite(optim.adamw(1e-2), max_consecutive_errors=2)
    train_step = mf.step(scheme, opt, check_finite=False)
    ts = mf.init(scheme, opt, seed=0)
    x, y = torch.randn(8, 5), torch.arange(8) % 3
    ts, metrics = train_step(ts, (x, y))
    assert int(metrics["optimizer"]["skipped"]) == 0
    bad = x.clone()
    bad[0, 0] = float("nan")
    new, metrics = train_step(ts, (bad, y))
    assert_bitwise(new.params, ts.params)
    assert_bitwise(new.opt_state.inner_state, ts.opt_state.inner_state)
    assert int(metrics["optimizer"]["skipped"]) == 1 and int(metrics["optimizer"]["total_notfinite"]) == 1
    after, metrics = train_step(new, (x, y))
    assert int(metrics["optimizer"]["notfinite_count"]) == 0
    assert not torch.equal(after.params["0.weight"], new.params["0.weight"])
    ts = new
    ts, _ = train_step(ts, (bad, y))
    with pytest.raises(FloatingPointError, match="in a row.*lower the learning rate"):
        train_step(ts, (bad, y))


# --------------------------------------------------------------------------- inject_hyperparams


def test_injected_lr_changed_mid_run_equals_a_rebuilt_run_without_recompiling():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    scheme = linear_scheme()
    opt = optim.inject_hyperparams(optim.sgd)(learning_rate=0.2, momentum=0.9)
    compiled = mf.step(scheme, opt, compile=True, backend=counter, share=False)  # one graph per objective, values inside it
    data = [(torch.randn(6, 5, generator=torch.Generator().manual_seed(i)), torch.arange(6) % 3)
            for i in range(4)]
    ts = mf.init(scheme, opt, seed=2)
    for i, xy in enumerate(data):
        if i == 2:
            ts = ts._replace(opt_state=optim.set_hyperparams(ts.opt_state, learning_rate=0.05))
        ts, _ = compiled(ts, xy)
    assert counter.frame_count == len(scheme)

    rebuilt = [optim.sgd(0.2, momentum=0.9), optim.sgd(0.05, momentum=0.9)]
    ref = mf.init(scheme, rebuilt[0], seed=2)
    for i, xy in enumerate(data):
        ref, _ = mf.step(scheme, rebuilt[i >= 2])(ref, xy)
    mt.assert_close(ts.params, ref.params, 1e-6)
    mt.assert_close(ts.opt_state.inner_state[0].momentum_buffer, ref.opt_state[0].momentum_buffer, 1e-6)


def test_set_hyperparams_refuses_non_finite_and_unknown_names():
    opt = optim.inject_hyperparams(optim.adamw, static_args=("b1",))(learning_rate=0.1, b1=0.9)
    state = opt.init({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="learning_rate was set to nan; set it to a finite number"):
        optim.set_hyperparams(state, learning_rate=math.nan)
    with pytest.raises(ValueError, match="finite number"):
        optim.set_hyperparams(state, learning_rate=float("inf"))
    with pytest.raises(KeyError, match="no injected hyper-parameter.*inject_hyperparams"):
        optim.set_hyperparams(state, momentum=0.5)
    with pytest.raises(ValueError, match="static_args"):
        optim.inject_hyperparams(optim.adamw)(learning_rate=0.1, b1=0.9).init({"w": torch.ones(2)})


# --------------------------------------------------------------------------- bad input


def test_partition_labels_missing_a_parameter_or_naming_an_unknown_group():
    params = {"a": torch.ones(1), "b": torch.ones(1)}
    missing = optim.partition({"x": optim.sgd(0.1)}, lambda p: {"a": "x"})
    with pytest.raises(ValueError, match=r"gives nothing for parameters \['b'\].*give every parameter one of"):
        missing.init(params)
    unknown = optim.partition({"x": optim.sgd(0.1)}, {"a": "x", "b": "y"})
    with pytest.raises(ValueError, match=r"groups \['y'\] that have no transform.*add a transform"):
        unknown.init(params)


def test_mask_with_unknown_keys_and_every_k_below_one():
    params = {"a": torch.ones(1)}
    with pytest.raises(ValueError, match=r"unknown parameters \['c'\].*check the spelling"):
        optim.masked(optim.sgd(0.1), {"a": True, "c": False}).init(params)
    with pytest.raises(ValueError, match="every_k must be an int >= 1"):
        optim.multi_steps(optim.sgd(0.1), every_k=0)


def test_label_helpers_refuse_unknown_parameters_and_unmatched_names():
    scheme = linear_scheme()
    with pytest.raises(ValueError, match="belong to no objective"):
        mf.labels.by_objective(scheme)({"nope": torch.ones(1)})
    with pytest.raises(ValueError, match="match none of the patterns.*default="):
        mf.labels.by_name({"a": "x.*"})({"y.w": torch.ones(1)})


def test_labels_by_objective_tells_copies_from_trunks_and_refuses_conflicts():
    net = mf.from_module(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)))
    first, last = mf.split(net, at=["1"])
    copied_head = mf.copy(last, "aug")  # an AugLocal-style head: a copy of a later block
    scheme = [mf.local_loss(first, copied_head, mf.losses.cross_entropy, name="m0"),
              mf.local_loss(last, None, mf.losses.cross_entropy, name="final")]
    params, _ = mf.init_params(*scheme)
    labels = mf.labels.by_objective(scheme)(params)
    assert labels == {"0.weight": "backbone", "0.bias": "backbone", "aug.2.weight": "copies",
                      "aug.2.bias": "copies", "2.weight": "backbone", "2.bias": "backbone"}
    head_on_backbone = [mf.local_loss(first, last, mf.losses.cross_entropy, name="m0"),
                        mf.local_loss(last, None, mf.losses.cross_entropy, name="final")]
    with pytest.raises(ValueError, match="'2.weight' is both 'heads' and 'backbone'.*by_name"):
        mf.labels.by_objective(head_on_backbone)
