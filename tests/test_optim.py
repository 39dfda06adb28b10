"""The pure optimizers match torch.optim step for step, never mutate inputs, and reject bad
hyper-parameters."""

import io
import math

import pytest
import torch
from oracles import run_pure
from hypothesis import given, settings
from hypothesis import strategies as st

from mlaan_func import optim

FAST = settings(deadline=None, max_examples=20)

shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=3)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative to ``b``, and absolute below a norm of 1: the parameters start at unit scale
    (``randn``), and one that the updates bring near zero keeps the rounding of the unit-scale
    values it was computed from (seed 3 of the schedule test: 1.3e-5 of a scalar near 0)."""
    return float((a - b).norm() / max(float(b.norm()), 1.0))


def make(shape_list, seed, dtype=torch.float32, steps=3, grad_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    params = {f"p{i}.w": torch.randn(s, generator=g, dtype=dtype) for i, s in enumerate(shape_list)}
    grads = [{k: grad_scale * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in params.items()}
             for _ in range(steps)]
    return params, grads


def run_torch(make_opt, params, grads, before_step=None):
    leaves = [p.clone().requires_grad_(True) for p in params.values()]
    opt = make_opt(leaves)
    for i, g in enumerate(grads):
        for leaf, v in zip(leaves, g.values()):
            leaf.grad = v.clone()
        if before_step is not None:
            before_step(i, opt, leaves)
        opt.step()
    return {k: leaf.detach() for k, leaf in zip(params, leaves)}


def assert_matches(ours, ref, tol=1e-5):
    assert list(ours) == list(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype
        assert rel_err(ours[k], ref[k]) <= tol, (k, rel_err(ours[k], ref[k]))


@FAST
@given(shape_list=shapes, seed=st.integers(0, 2**16), steps=st.integers(1, 5),
       lr=st.floats(1e-3, 1.0), momentum=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       nesterov=st.booleans(), weight_decay=st.sampled_from([0.0, 1e-4, 0.1]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_sgd_equals_torch(shape_list, seed, steps, lr, momentum, nesterov, weight_decay, dtype):
    nesterov = nesterov and momentum > 0
    params, grads = make(shape_list, seed, dtype, steps)
    ours, _ = run_pure(optim.sgd(lr, momentum, nesterov, weight_decay), params, grads)
    ref = run_torch(lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, nesterov=nesterov,
                                               weight_decay=weight_decay), params, grads)
    assert_matches(ours, ref)


@FAST
@given(shape_list=shapes, seed=st.integers(0, 2**16), steps=st.integers(1, 5),
       lr=st.floats(1e-4, 0.1), b1=st.sampled_from([0.0, 0.8, 0.9]), b2=st.sampled_from([0.9, 0.999]),
       eps=st.sampled_from([1e-8, 1e-3]), weight_decay=st.sampled_from([0.0, 1e-2, 0.1]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_adamw_equals_torch(shape_list, seed, steps, lr, b1, b2, eps, weight_decay, dtype):
    params, grads = make(shape_list, seed, dtype, steps)
    ours, state = run_pure(optim.adamw(lr, b1, b2, eps, weight_decay), params, grads)
    ref = run_torch(lambda ps: torch.optim.AdamW(ps, lr=lr, betas=(b1, b2), eps=eps,
                                                 weight_decay=weight_decay), params, grads)
    assert_matches(ours, ref)
    assert int(state[0].count) == steps


@FAST
@given(shape_list=shapes, seed=st.integers(0, 2**16), warmup=st.integers(0, 4), extra=st.integers(0, 4),
       momentum=st.sampled_from([0.0, 0.9]))
def test_schedule_equals_torch_with_lr_set_each_step(shape_list, seed, warmup, extra, momentum):
    total = max(warmup + extra, 1)
    schedule = optim.warmup_cosine(0.5, warmup, total)
    params, grads = make(shape_list, seed, steps=total + 2)
    ours, _ = run_pure(optim.sgd(schedule, momentum=momentum), params, grads)

    def set_lr(i, opt, leaves):
        opt.param_groups[0]["lr"] = float(schedule(torch.tensor(i)))

    ref = run_torch(lambda ps: torch.optim.SGD(ps, lr=0.0, momentum=momentum), params, grads, set_lr)
    assert_matches(ours, ref)


@FAST
@given(shape_list=shapes, seed=st.integers(0, 2**16), steps=st.integers(1, 4),
       max_norm=st.floats(0.1, 10.0), grad_scale=st.sampled_from([0.01, 1.0, 10.0]),
       momentum=st.sampled_from([0.0, 0.9]))
def test_clip_then_sgd_equals_clip_grad_norm(shape_list, seed, steps, max_norm, grad_scale, momentum):
    params, grads = make(shape_list, seed, steps=steps, grad_scale=grad_scale)
    opt = optim.chain(optim.clip_by_global_norm(max_norm), optim.sgd(0.1, momentum=momentum))
    ours, _ = run_pure(opt, params, grads)

    def clip(i, opt, leaves):
        torch.nn.utils.clip_grad_norm_(leaves, max_norm)

    ref = run_torch(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=momentum), params, grads, clip)
    assert_matches(ours, ref)


def test_warmup_cosine_key_points():
    lr = optim.warmup_cosine(0.8, warmup_steps=100, total_steps=1100)
    at = lambda s: float(lr(torch.tensor(s, dtype=torch.int64)))  # noqa: E731
    assert at(0) == pytest.approx(0.008)
    assert at(50) == pytest.approx(0.8 * (0.01 + 0.99 * 0.5))
    assert at(100) == pytest.approx(0.8)
    assert at(600) == pytest.approx(0.4, abs=1e-6)
    assert at(350) == pytest.approx(0.4 * (1 + math.cos(math.pi / 4)), rel=1e-5)
    assert at(1100) == 0.0 and at(5000) == 0.0
    out = lr(torch.tensor(3))
    assert out.dim() == 0 and out.dtype == torch.float32
    # no warm-up: peak at step 0; warm-up only: 0 from total_steps on
    assert float(optim.warmup_cosine(1.0, 0, 10)(torch.tensor(0))) == pytest.approx(1.0)
    only = optim.warmup_cosine(1.0, 4, 4)
    assert float(only(torch.tensor(3))) == pytest.approx(0.01 + 0.99 * 0.75)
    assert float(only(torch.tensor(4))) == 0.0
    assert float(optim.constant(0.3)(torch.tensor(9))) == pytest.approx(0.3)


@FAST
@given(warmup=st.integers(0, 50), extra=st.integers(0, 50), peak=st.floats(0.0, 10.0))
def test_warmup_cosine_is_bounded_rises_then_falls(warmup, extra, peak):
    total = max(warmup + extra, 1)
    lr = optim.warmup_cosine(peak, warmup, total)
    values = [float(lr(torch.tensor(s))) for s in range(total + 3)]
    assert all(0.0 <= v <= peak * (1 + 1e-6) for v in values)
    assert values[:warmup] == sorted(values[:warmup])
    assert all(b <= a + 1e-6 * peak for a, b in zip(values[warmup:], values[warmup + 1:]))


def snapshot(tree):
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: snapshot(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return type(tree)(*map(snapshot, tree)) if hasattr(tree, "_fields") else tuple(map(snapshot, tree))
    raise TypeError(f"unexpected {type(tree).__name__} in an optimizer state")


def tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in tensors(v)]
    return [t for v in tree for t in tensors(v)]


def named_tuples(tree):
    if isinstance(tree, tuple):
        own = [tree] if hasattr(tree, "_fields") else []
        return own + [n for v in tree for n in named_tuples(v)]
    return []


def identical(a, b):
    ta, tb = tensors(a), tensors(b)
    return len(ta) == len(tb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))


OPTIMIZERS = {
    "sgd": lambda: optim.sgd(0.1),
    "sgd_nesterov_wd": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
    "sgd_schedule": lambda: optim.sgd(optim.warmup_cosine(0.1, 2, 10), momentum=0.9),
    "adamw": lambda: optim.adamw(1e-3),
    "adamw_schedule": lambda: optim.adamw(optim.warmup_cosine(1e-3, 2, 10)),
    "clip_sgd": lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(0.1, momentum=0.9)),
    "empty_chain": lambda: optim.chain(),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_update_is_pure_and_state_is_plain(name):
    opt = OPTIMIZERS[name]()
    params, grads = make([(3, 2), (4,), ()], seed=1, steps=3)
    state = opt.init(params)
    for g in grads:
        before = snapshot((g, state, params))
        updates, new_state = opt.update(g, state, params)
        assert identical((g, state, params), before)
        inputs = {t.data_ptr() for t in tensors((g, state, params)) if t.numel()}
        assert not any(t.data_ptr() in inputs for t in tensors((updates, new_state)) if t.numel())
        assert list(updates) == list(g)
        new_params = optim.apply_updates(params, updates)
        assert identical(params, before[2])
        assert not {t.data_ptr() for t in new_params.values()} & {t.data_ptr() for t in params.values()}
        params, state = new_params, new_state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert identical(loaded, state)
    counts = [s.count for s in named_tuples(state) if "count" in s._fields]
    assert len(counts) == ("schedule" in name) + ("adamw" in name)
    assert all(c.dtype == torch.int64 and c.dim() == 0 and int(c) == 3 for c in counts)


def test_apply_updates_passes_other_keys_through_and_keeps_order():
    params = {"a": torch.ones(2), "b": torch.zeros(1), "c": torch.ones(1, dtype=torch.float64)}
    out = optim.apply_updates(params, {"c": torch.ones(1, dtype=torch.float64), "a": torch.ones(2)})
    assert list(out) == ["a", "b", "c"]
    assert out["b"] is params["b"]
    assert torch.equal(out["a"], torch.full((2,), 2.0)) and out["c"].dtype == torch.float64
    with pytest.raises(KeyError, match="unknown"):
        optim.apply_updates(params, {"z": torch.ones(1)})


def test_subset_of_gradients_updates_only_those_keys():
    params, grads = make([(2,), (3,)], seed=0, steps=1)
    opt = optim.sgd(0.1, momentum=0.9)
    state = opt.init(params)
    updates, new_state = opt.update({"p1.w": grads[0]["p1.w"]}, state, params)
    assert list(updates) == ["p1.w"]
    bufs = new_state[0].momentum_buffer
    assert list(bufs) == ["p0.w", "p1.w"] and bufs["p0.w"] is state[0].momentum_buffer["p0.w"]
    with pytest.raises(KeyError, match="momentum state"):
        opt.update({"nope": torch.ones(1)}, state, params)


def test_schedule_runs_compiled_without_recompiles():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    opt = optim.sgd(optim.warmup_cosine(0.1, 2, 6), momentum=0.9, nesterov=True, weight_decay=1e-4)
    update = torch.compile(opt.update, backend=counter, fullgraph=True)
    params, grads = make([(3, 2), (4,)], seed=2, steps=8)
    eager_state = compiled_state = opt.init(params)
    eager_params = compiled_params = params
    for g in grads:
        u, eager_state = opt.update(g, eager_state, eager_params)
        eager_params = optim.apply_updates(eager_params, u)
        u, compiled_state = update(g, compiled_state, compiled_params)
        compiled_params = optim.apply_updates(compiled_params, u)
    assert_matches(compiled_params, eager_params, 1e-6)
    assert counter.frame_count == 1


BAD = [
    (lambda: optim.sgd(-0.1), "learning_rate must be >= 0"),
    (lambda: optim.sgd(float("nan")), "learning_rate must be a finite"),
    (lambda: optim.sgd(0.1, momentum=1.0), r"momentum must be in \[0, 1\)"),
    (lambda: optim.sgd(0.1, momentum=-0.1), r"momentum must be in \[0, 1\)"),
    (lambda: optim.sgd(0.1, nesterov=True), "nesterov=True needs momentum"),
    (lambda: optim.sgd(0.1, weight_decay=-1e-4), "weight_decay must be >= 0"),
    (lambda: optim.trace(0.0, nesterov=True), "nesterov=True needs momentum"),
    (lambda: optim.adamw(-1.0), "learning_rate must be >= 0"),
    (lambda: optim.adamw(1e-3, b1=1.0), r"b1 must be in \[0, 1\)"),
    (lambda: optim.adamw(1e-3, b2=1.5), r"b2 must be in \[0, 1\)"),
    (lambda: optim.adamw(1e-3, eps=-1.0), "eps must be >= 0"),
    (lambda: optim.adamw(1e-3, weight_decay=-0.1), "weight_decay must be >= 0"),
    (lambda: optim.clip_by_global_norm(0.0), "max_norm must be > 0"),
    (lambda: optim.clip_by_global_norm(float("inf")), "max_norm must be a finite"),
    (lambda: optim.warmup_cosine(0.1, 10, 5), "total_steps must be >= warmup_steps"),
    (lambda: optim.warmup_cosine(0.1, -1, 5), "warmup_steps must be an int >= 0"),
    (lambda: optim.warmup_cosine(0.1, 0, 0), "total_steps must be an int >= 1"),
    (lambda: optim.warmup_cosine(0.1, 1.5, 5), "warmup_steps must be an int"),
    (lambda: optim.warmup_cosine(-0.1, 1, 5), "peak_lr must be >= 0"),
    (lambda: optim.warmup_cosine(0.1, 1, 5, start_factor=2.0), r"start_factor must be in \[0, 1\]"),
    (lambda: optim.constant(-1.0), "lr must be >= 0"),
    (lambda: optim.scale_by_schedule(0.1), "schedule must be a function"),
    (lambda: optim.chain(optim.scale(1.0), "sgd"), "chain takes Optimizers"),
]


@pytest.mark.parametrize("make_bad,message", BAD)
def test_bad_hyper_parameters_raise(make_bad, message):
    with pytest.raises(ValueError, match=message):
        make_bad()


def test_misuse_at_update_time_raises():
    params = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="needs the params"):
        opt = optim.add_decayed_weights(0.1)
        opt.update({"w": torch.ones(2)}, opt.init(params), None)
    opt = optim.sgd(lambda step: torch.ones(2))
    with pytest.raises(ValueError, match="0-d tensor"):
        opt.update({"w": torch.ones(2)}, opt.init(params), params)
    with pytest.raises(ValueError, match="state of 1 parts"):
        optim.sgd(0.1, momentum=0.9).update({"w": torch.ones(2)}, (optim.EmptyState(),), params)
