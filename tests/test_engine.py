"""Engine laws: the oracle, isolation, K = 1 is E2E, leap_ema, save/load, NaN, compile."""

import torch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.models.resnet import CifarResNet

SETTINGS = settings(deadline=None, max_examples=8)
WIDTHS = (4, 8, 8)


def tiny_resnet(classes=5):
    return CifarResNet(8, num_classes=classes, widths=WIDTHS)


def batch(n=4, seed=0, classes=5, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def load_into(module: nn.Module, prefix: str, params, state):
    """Copy the library's tensors into an ordinary module (the oracle's own copy)."""
    for k, v in module.named_parameters():
        v.data.copy_(params[f"{prefix}.{k}"])
    for k, v in module.named_buffers():
        v.data.copy_(state[f"{prefix}.{k}"])


def dgl_reference(at, params, state, xy):
    """DGL written as plain nn.Module code: one backward() of the summed local losses."""
    x, y = xy
    model = tiny_resnet().train()
    blocks = dict(model.named_blocks())
    for name, blk in blocks.items():
        load_into(blk, name, params, state)
    names = list(blocks)
    ends = [names.index(a) for a in at] + [len(names) - 1]
    heads, total, h, start = {}, 0.0, x, 0
    for i, end in enumerate(ends):
        h = h.detach()
        for name in names[start:end + 1]:
            h = blocks[name](h)
        start = end + 1
        if i < len(ends) - 1:
            head = mf.heads.dgl(h.shape[1], 5, tuple(h.shape[2:])).train()
            load_into(head, f"head{i}", params, state)
            heads[f"head{i}"] = head
            total = total + F.cross_entropy(head(h), y)
        else:
            total = total + F.cross_entropy(h, y)
    total.backward()
    grads, new_state = {}, {}
    for prefix, mod in list(blocks.items()) + list(heads.items()):
        grads.update({f"{prefix}.{k}": v.grad for k, v in mod.named_parameters()})
        new_state.update({f"{prefix}.{k}": v for k, v in mod.named_buffers()})
    return grads, new_state


def dgl_scheme(at):
    return mf.schemes.dgl(mf.from_module(tiny_resnet()), at, input_shape=(3, 8, 8))


@SETTINGS
@given(data=st.data(), seed=mt.seeds)
def test_oracle_dgl_gradients_and_state_equal_plain_backward(data, seed):
    net = mf.from_module(tiny_resnet())
    at = data.draw(mt.cut_points(net.block_names))
    scheme = dgl_scheme(at)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=seed)
    mt.check_oracle(scheme, ts, batch(seed=seed % 100),
                    lambda p, s, b: dgl_reference(at, p, s, b))


@SETTINGS
@given(data=st.data())
def test_isolation_each_loss_reaches_only_its_own_parameters(data):
    net = mf.from_module(tiny_resnet())
    at = data.draw(mt.cut_points(net.block_names, min_modules=2))
    scheme = dgl_scheme(at)
    mt.check_isolation(scheme, mf.init(scheme, mf.optim.sgd(0.1)), batch())


def test_k1_dgl_is_e2e():
    net = mf.from_module(tiny_resnet())
    opt = mf.optim.sgd(0.1, momentum=0.9)
    one, e2e = mf.schemes.dgl(net, [], input_shape=(3, 8, 8)), mf.schemes.e2e(net)
    a, b = mf.init(one, opt, seed=2), mf.init(e2e, opt, seed=2)
    for i in range(3):
        a, _ = mf.step(one, opt)(a, batch(seed=i))
        b, _ = mf.step(e2e, opt)(b, batch(seed=i))
    mt.assert_identical(a.params, b.params)
    mt.assert_identical(a.state, b.state)


def test_step_is_pure_and_counts():
    scheme = dgl_scheme(["1.0", "2.0"])
    opt = mf.optim.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ts = mf.init(scheme, opt)
    new, metrics = mt.check_purity(mf.step(scheme, opt), ts, batch())
    assert int(new.step) == 1 and set(metrics) == {"m0", "m1", "final"}
    assert not torch.equal(new.params["1.0.conv1.weight"], ts.params["1.0.conv1.weight"])


def test_engine_sgd_equals_torch_sgd_on_e2e():
    module = tiny_resnet()
    scheme = mf.schemes.e2e(mf.from_module(module))
    opt = mf.optim.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ts = mf.init(scheme, opt, seed=4)
    for name, blk in module.named_blocks():
        load_into(blk, name, ts.params, ts.state)
    torch_opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
    run = mf.step(scheme, opt)
    for i in range(3):
        x, y = batch(seed=i)
        ts, _ = run(ts, (x, y))
        torch_opt.zero_grad()
        F.cross_entropy(module.train()(x), y).backward()
        torch_opt.step()
    for name, blk in module.named_blocks():
        for k, v in blk.named_parameters():
            mt.assert_close(ts.params[f"{name}.{k}"], v.detach(), 1e-4, k)


@settings(deadline=None, max_examples=20)
@given(decay=st.floats(0, 1), seed=mt.seeds)
def test_leap_ema_moves_the_twin_toward_the_source(decay, seed):
    src = mf.from_module(nn.Linear(3, 3), name="b")
    leap = mf.leap_ema(mf.copy(src, "trunk"), src, decay)
    params, state = mf.init_params(src, leap, seed=seed)
    params = {k: torch.randn_like(v) for k, v in params.items()}
    (ema,) = leap.after_steps
    new = mt.check_purity(ema.fn, params, state)
    old_t, s = state["twin.b.weight"], params["b.weight"]
    t = new["twin.b.weight"]
    if decay == 1:
        assert torch.equal(t, old_t)
    elif decay == 0:
        assert torch.equal(t, s)
    else:
        mt.assert_close(t, decay * old_t + (1 - decay) * s)
        lo, hi = torch.minimum(old_t, s), torch.maximum(old_t, s)
        assert bool(((t >= lo - 1e-6) & (t <= hi + 1e-6)).all())


def test_leap_ema_forward_is_copy_plus_twin_and_twin_gets_no_gradient():
    src = mf.from_module(nn.Linear(3, 3), name="b")
    leap = mf.leap_ema(mf.copy(src, "trunk"), src, 0.9)
    params, state = mf.init_params(src, leap)
    x = torch.randn(2, 3)
    y, _ = leap(params, state, x)
    mt.assert_close(y, 2 * F.linear(x, params["b.weight"], params["b.bias"]))
    assert set(leap.param_names) == {"trunk.b.weight", "trunk.b.bias"}
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        mf.leap_ema(mf.copy(src, "t"), src, 1.5)
    with pytest.raises(ValueError, match="copy of its source"):
        mf.leap_ema(mf.from_module(nn.Linear(3, 3), name="other"), src)


def test_save_load_round_trip(tmp_path):
    scheme = dgl_scheme(["1.0"])
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts, _ = mf.step(scheme, opt)(mf.init(scheme, opt), batch())
    mf.save(tmp_path / "ck.pt", ts, extra={"epoch": 3})
    back, extra = mf.load(tmp_path / "ck.pt", with_extra=True)
    mt.assert_identical(tuple(back), tuple(ts))
    assert extra == {"epoch": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a checkpoint"):
        mf.load(tmp_path / "bad.pt")


def test_non_finite_loss_raises_and_updates_nothing():
    scheme = dgl_scheme(["1.0"])
    opt = mf.optim.sgd(0.1)
    ts = mf.init(scheme, opt)
    x, y = batch()
    x[0, 0, 0, 0] = float("nan")
    before = mt._clone_tree(ts)
    with pytest.raises(mf.NonFiniteLossError, match="m0"):
        mf.step(scheme, opt)(ts, (x, y))
    mt.assert_identical(tuple(ts), tuple(before))


def test_state_with_missing_or_extra_keys_is_refused():
    scheme = dgl_scheme(["1.0"])
    opt = mf.optim.sgd(0.1)
    ts = mf.init(scheme, opt)
    bad = ts._replace(state={**ts.state, "ghost": torch.zeros(1)})
    with pytest.raises(KeyError, match="unexpected \\['ghost'\\]"):
        mf.step(scheme, opt)(bad, batch())
    state = dict(ts.state)
    del state["stem.bn.running_mean"]
    with pytest.raises(KeyError, match="missing \\['stem.bn.running_mean'\\]"):
        mf.step(scheme, opt)(ts._replace(state=state), batch())


def test_objectives_out_of_order_are_refused():
    scheme = dgl_scheme(["1.0"])
    with pytest.raises(ValueError, match="no earlier objective"):
        mf.init(scheme[::-1], mf.optim.sgd(0.1))


def test_batch_with_mismatched_labels_is_refused():
    scheme = dgl_scheme(["1.0"])
    opt = mf.optim.sgd(0.1)
    x, y = batch()
    with pytest.raises(ValueError, match="labels"):
        mf.step(scheme, opt)(mf.init(scheme, opt), (x, y[:2]))


def test_evaluate_reports_every_head():
    scheme = dgl_scheme(["1.0", "2.0"])
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    acc = mf.evaluate(scheme, ts, [batch(seed=1), batch(seed=2)])
    assert set(acc) == {"m0", "m1", "final"} and all(0 <= v <= 1 for v in acc.values())


def test_compiled_equals_eager_with_one_compile_per_objective():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    scheme = dgl_scheme(["1.0", "2.0"])
    opt = mf.optim.sgd(mf.optim.warmup_cosine(0.1, 2, 10), momentum=0.9)
    eager, compiled = mf.step(scheme, opt), mf.step(scheme, opt, compile=True, backend=counter, share=False)
    a = b = mf.init(scheme, opt, seed=5)
    for i in range(4):
        a, _ = eager(a, batch(seed=i))
        b, _ = compiled(b, batch(seed=i))
    mt.assert_close(b.params, a.params, 1e-4)
    mt.assert_close(b.state, a.state, 1e-4)
    assert counter.frame_count == len(scheme)


def test_inductor_smoke():
    torch._dynamo.reset()
    net = mf.from_module(nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 3)))
    scheme = [mf.local_loss(net, None, mf.losses.cross_entropy, name="final")]
    opt = mf.optim.sgd(0.1)
    x, y = torch.randn(8, 3, 2, 2), torch.randint(0, 3, (8,))
    a = b = mf.init(scheme, opt)
    a, _ = mf.step(scheme, opt)(a, (x, y))
    b, _ = mf.step(scheme, opt, compile=True, backend="inductor")(b, (x, y))
    mt.assert_close(b.params, a.params, 1e-4)


def test_more_objectives_than_the_recompile_limit_compile_once_each():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    layers = [nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(11)] + [nn.Linear(6, 3)]
    modules = mf.split(mf.from_module(nn.Sequential(*layers)), [str(i) for i in range(11)])
    scheme = [mf.local_loss(m, mf.from_module(nn.Linear(6, 3), name=f"head{i}"), mf.losses.cross_entropy,
                            name=f"m{i}") for i, m in enumerate(modules[:-1])]
    scheme.append(mf.local_loss(modules[-1], None, mf.losses.cross_entropy, name="final"))
    assert len(scheme) > torch._dynamo.config.recompile_limit
    opt = mf.optim.sgd(0.1)
    eager, compiled = mf.step(scheme, opt), mf.step(scheme, opt, compile=True, backend=counter, share=False)
    a = b = mf.init(scheme, opt, seed=1)
    for i in range(2):
        xy = (torch.randn(8, 6, generator=torch.Generator().manual_seed(i)), torch.arange(8) % 3)
        a, _ = eager(a, xy)
        b, _ = compiled(b, xy)
    mt.assert_close(b.params, a.params, 1e-4)
    assert counter.frame_count == len(scheme)


def test_evaluate_runs_each_block_once_and_matches_the_objectives_one_by_one(monkeypatch):
    module = mf.models.CifarResNet(14, num_classes=10, in_channels=3, widths=(4, 8, 16))
    net = mf.from_module(module)
    at = mf.published.split_for(None, net.block_names, 4)
    scheme = mf.schemes.dgl_mlaan(net, at, input_shape=(3, 8, 8))
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=0)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    calls, apply = {}, mf.core.Block.apply

    def counted(block, *args, **kwargs):
        calls[block.name] = calls.get(block.name, 0) + 1
        return apply(block, *args, **kwargs)

    monkeypatch.setattr(mf.core.Block, "apply", counted)
    got = mf.evaluate(scheme, ts, [(x, y)])
    monkeypatch.undo()
    assert set(net.block_names) <= set(calls) and set(calls.values()) == {1}, calls
    acts, want = {"input": x}, {}
    for o in scheme:  # each objective's whole net from its input, as a training step runs it
        _, _, outputs, m = o.forward(ts.params, ts.state, acts[o.input_name], mf.Batch(x, y), train=False,
                                     taps=net.block_names)
        acts.update({k: v for k, v in outputs.items() if v is not None})
        want[o.name] = float(m["accuracy"])
    assert got == pytest.approx(want)
