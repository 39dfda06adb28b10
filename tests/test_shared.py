"""The shared step (one forward per block application, gradients by reach) equals the
per-objective engine: gradients, new state, metrics; plus plan, fallbacks and resume."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.models.resnet import CifarResNet
from mlaan_func.plan import plan_scheme
from mlaan_func.shared_step import shared_gradients, shared_gradients_from, use_shared

SETTINGS = settings(deadline=None, max_examples=6)
WIDTHS = (4, 8, 8)
CLASSES = 5
SHAPE = (3, 8, 8)
BLOCKS = mf.from_module(CifarResNet(14, num_classes=CLASSES, widths=WIDTHS)).block_names


def backbone():
    return mf.from_module(CifarResNet(14, num_classes=CLASSES, widths=WIDTHS))


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(n) % CLASSES


def assert_same_gradients(scheme, ts, xy, rtol=mt.RTOL):
    """The shared step is bit for bit the per-objective engine; with summed cotangents it
    equals it to float32 rounding."""
    want = mf.gradients(scheme, share=False)(ts, xy)
    got = shared_gradients(scheme)(ts, xy)
    for part in ("grads", "state", "losses", "metrics"):
        mt.assert_identical(getattr(got, part), getattr(want, part), part)
    summed = shared_gradients(scheme, sum_cotangents=True)(ts, xy)
    mt.assert_close(summed.grads, want.grads, rtol, "gradient")
    mt.assert_identical(summed.state, want.state, "state")
    mt.assert_close(summed.losses, want.losses, rtol, "loss")
    mt.assert_close(summed.metrics, want.metrics, rtol, "metric")
    assert list(got.losses) == list(summed.losses) == list(want.losses) == [o.name for o in scheme]
    return summed


@st.composite
def scheme_cases(draw):
    method = draw(st.sampled_from(mf.schemes.SCHEMES))
    at = draw(mt.cut_points(BLOCKS, min_modules=1, max_modules=6))
    k = len(at) + 1
    options = {}
    if method.endswith("mlaan"):
        options["width"] = draw(st.integers(1, k))
        options["trunk_depth"] = draw(st.integers(1, 4))
    return method, at, options


@settings(deadline=None, max_examples=10)
@given(case=scheme_cases(), seed=mt.seeds, data_seed=st.integers(0, 1000))
def test_shared_equals_per_objective_for_every_scheme(case, seed, data_seed):
    method, at, options = case
    scheme = mf.schemes.build(method, backbone(), at, input_shape=SHAPE, **options)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=seed % 1000)
    assert_same_gradients(scheme, ts, batch(seed=data_seed))


@pytest.mark.parametrize("method", ["mlaan", "dgl_mlaan", "infopro_mlaan"])
def test_published_mlaan_family_shares_and_is_the_default(method):
    scheme = mf.schemes.build(method, backbone(), ["1.0", "1.1", "2.0", "2.1", "3.0"], input_shape=SHAPE)
    assert use_shared(scheme, share=None, compile=False)
    assert use_shared(scheme, share=None, compile=True)
    assert not use_shared(scheme, share=False, compile=False)
    plan = plan_scheme(scheme)
    w = mf.schemes.DEFAULT_WIDTH[method]
    for piece in plan.shared:   # an interior backbone module: W windows + its own head
        assert len(piece.users) <= w + 1
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    assert_same_gradients(scheme, ts, batch(seed=1), rtol=1e-5)


def test_reach_of_each_objective_is_its_window_trunk_and_head():
    scheme = mf.schemes.dgl_mlaan(backbone(), ["1.0", "1.1", "2.0", "2.1"], input_shape=SHAPE)
    plan = plan_scheme(scheme)
    for i, o in enumerate(scheme):
        blocks = [b.name for n in o.nets for b in n.blocks]
        assert plan.reach(scheme, i) == tuple(blocks), o.name


def growing_windows_scheme():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "custom_scheme.py"
    spec = importlib.util.spec_from_file_location("custom_scheme", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = mf.from_module(CifarResNet(14, num_classes=10, in_channels=3, widths=(4, 8, 8)))
    return module.growing_windows(net, module.AT, input_shape=(3, 8, 8))[1]


def test_user_scheme_with_overlapping_windows_of_mixed_widths():
    scheme = growing_windows_scheme()
    assert use_shared(scheme, share=None, compile=False)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=2)
    x, _ = batch(6, seed=3)
    xy = (x, torch.arange(6) % 10)
    assert_same_gradients(scheme, ts, xy)
    a = b = ts
    for i in range(3):
        a, ma = mf.step(scheme, opt, share=False)(a, xy)
        b, mb = mf.step(scheme, opt, share=True)(b, xy)
    mt.assert_close(b.params, a.params, 1e-4)
    mt.assert_close(b.state, a.state, 1e-4)


def test_objectives_that_share_a_whole_path_and_a_block_reached_twice():
    """Two heads on one module, a second loss on the same net output, a window over both."""
    blocks = [nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 6), nn.Tanh()) for _ in range(3)] + [nn.Linear(6, 3)]
    mods = mf.split(mf.from_module(nn.Sequential(*blocks)), ["0", "1", "2"])
    ce = mf.losses.cross_entropy
    scheme = [
        mf.local_loss(mods[0], mf.from_module(nn.Linear(6, 3), name="ha"), ce, name="a"),
        mf.local_loss(mods[0], mf.from_module(nn.Linear(6, 3), name="hb"), ce, 0.3, name="b"),
        mf.local_loss(mf.cascade(*mods[:2]), mf.from_module(nn.Linear(6, 3), name="hc"), ce, name="c"),
        mf.local_loss(mf.cascade(*mods[1:3]), None, lambda out, b: ((out ** 2).mean(), {}), name="d"),
        mf.local_loss(mf.cascade(*mods[1:3]), mf.from_module(nn.Linear(6, 3), name="he"), ce, name="e"),
        mf.local_loss(mf.cascade(*mods[:4]), None, ce, name="final"),
    ]
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=4)
    xy = (torch.randn(8, 6), torch.arange(8) % 3)
    assert_same_gradients(scheme, ts, xy)


def per_objective_from(scheme, only, ts, xy, boundaries):
    """The per-objective engine on the objectives ``only`` of a scheme, started from given
    boundaries (the fold module_parallel_step runs without sharing): gradients, first
    writes, losses, boundaries."""
    routes = mf.engine.plan_routes(scheme)
    fns = mf.engine.gradient_fns(scheme, routes)
    grads, updates, losses = {}, {}, {}

    def run(i, o, x):
        nonlocal grads
        g, (loss, (new, outputs, _)) = fns[i]({k: ts.params[k] for k in o.param_names}, ts.state, x, xy, ts.step)
        grads = mf.routing.accumulate(grads, g)
        for k, v in new.items():
            updates.setdefault(k, v)
        losses[o.name] = loss
        return outputs

    acts = mf.routing.fold(scheme, routes, None, run, acts={"input": xy[0], **boundaries}, only=only, free=False)
    return grads, updates, losses, acts


def check_rank_from_given_boundaries(method, at, options, ranks, rank, seed, owner=None):
    """A module-parallel rank's objectives, started from the boundaries it receives, on the
    shared step and on the per-objective engine; returns the rank's plan. ``owner``: the
    rank of each module (default: ``balanced_owner``)."""
    from mlaan_func import distributed as mfd

    net = backbone()
    scheme = mf.schemes.build(method, net, at, input_shape=SHAPE, **options)
    ends = [m.output_name for m in mf.split(net, at)]
    ranks = min(ranks, len(ends))
    owner = owner if owner is not None else mfd.balanced_owner(scheme, ends, ranks)
    plan = mfd.plan_modules(scheme, ends, owner, ranks)
    rank = rank % ranks
    mine = [i for i, r in enumerate(plan.rank_of_objective) if r == rank]
    if not mine:
        return None
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=seed)
    xy = batch(seed=seed)
    with torch.no_grad():   # what earlier ranks would send: the boundaries of the whole scheme
        acts = per_objective_from(scheme, None, ts, xy, {})[3]
    received = {n: acts[n] for n in plan.receives[rank]}
    objectives = [scheme[i] for i in mine]
    g, kept = shared_gradients_from(objectives, given=plan.receives[rank], keep=plan.sends[rank])(ts, xy, received)
    grads, updates, losses, want = per_objective_from(scheme, mine, ts, xy, received)
    assert set(g.grads) == set(grads) == {k for o in objectives for k in o.param_names}
    mt.assert_close(g.grads, grads, mt.RTOL, "gradient")
    mt.assert_identical({k: g.state[k] for k in updates}, updates, "state")
    mt.assert_close(g.losses, losses, mt.RTOL, "loss")
    assert list(kept) == plan.sends[rank]
    mt.assert_identical(kept, {n: want[n] for n in plan.sends[rank]}, "sent boundary")
    return plan_scheme(objectives, given=plan.receives[rank], keep=plan.sends[rank])


@SETTINGS
@given(case=scheme_cases(), ranks=st.integers(2, 3), rank=st.integers(0, 2), seed=st.integers(0, 1000))
def test_shared_step_from_given_boundaries_equals_per_objective(case, ranks, rank, seed):
    method, at, options = case
    check_rank_from_given_boundaries(method, at, options, ranks, rank, seed)


@pytest.mark.parametrize("method, owner, rank, shares_received", [
    ("mlaan", [0, 0, 1, 1, 2], 1, True), ("mlaan", [0, 0, 0, 1, 1], 1, True), ("dgl_mlaan", [0, 0, 0, 1, 2], 1, False)])
def test_a_later_rank_shares_blocks_above_its_received_boundaries(method, owner, rank, shares_received):
    """On ResNet-14 split in five: the pieces read received boundaries, and a boundary that
    is received and sent on (dgl_mlaan, rank 1 of 3) passes through."""
    plan = check_rank_from_given_boundaries(method, ["1.0", "1.1", "2.0", "2.1"], {}, max(owner) + 1, rank, 7, owner)
    from_received = [p for p in plan.shared if isinstance(p.parent, str) and p.parent != "input"]
    assert bool(from_received) == shares_received
    assert shares_received or plan.kept == (("1.1", "1.1"),)


def test_given_and_kept_boundaries_are_checked():
    scheme = mf.schemes.mlaan(backbone(), ["1.0", "2.0"], input_shape=SHAPE)
    later = scheme[1:]    # both read the output of block 1.0
    with pytest.raises(ValueError, match="no earlier objective produces"):
        plan_scheme(later)
    with pytest.raises(ValueError, match=r"keep names \['9.9'\]"):
        plan_scheme(later, given=["1.0"], keep=["9.9"])
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"\['1.0'\] are read but not passed"):
        shared_gradients_from(later, given=["1.0"])(ts, batch(), {})


@SETTINGS
@given(case=scheme_cases(), every=st.integers(1, 3), data_seed=st.integers(0, 1000))
def test_rematerialised_shared_step_equals_per_objective(case, every, data_seed):
    method, at, options = case
    plain = mf.schemes.build(method, backbone(), at, input_shape=SHAPE, **options)
    scheme = [mf.remat(o, every=every) for o in plain]
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=data_seed)
    xy = batch(seed=data_seed)
    got = assert_same_gradients(scheme, ts, xy)      # against per-objective remat
    want = mf.gradients(plain, share=False)(ts, xy)  # and against the plain engine
    mt.assert_close(got.grads, want.grads, mt.RTOL, "gradient")
    mt.assert_identical(got.state, want.state, "state")


def test_own_grad_fn_falls_back_to_per_objective():
    import attrs

    scheme = mf.schemes.mlaan(backbone(), ["1.0", "2.0"], input_shape=SHAPE)
    assert use_shared([mf.remat(o) for o in scheme], share=None, compile=False)
    own = [attrs.evolve(o, grad_fn=lambda objective, taps: None) for o in scheme]
    assert not use_shared(own, share=None, compile=False)
    assert not use_shared(own, share=None, compile=True)
    with pytest.raises(ValueError, match="share=False"):
        use_shared(own, share=True, compile=False)


def dropout_scheme(p=0.5):
    """Two modules with dropout and a window over both: block "0" is shared."""
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.Dropout(p)) for _ in range(2)] + [nn.Linear(6, 3)]
    mods = mf.split(mf.from_module(nn.Sequential(*blocks)), ["0", "1"])
    return [mf.local_loss(mods[0], mf.from_module(nn.Sequential(nn.Dropout(p), nn.Linear(6, 3)), name="h"),
                          mf.losses.cross_entropy, name="a"),
            mf.local_loss(mf.cascade(*mods), None, mf.losses.cross_entropy, name="final")]


@pytest.mark.parametrize("remat", [False, True])
def test_dropout_is_shared_and_draws_what_each_objective_would(remat):
    """Each block draws from its own name's stream, so the shared forward's masks are the
    ones every objective's own forward draws: the shared step equals the per-objective one
    exactly, whatever the global generator holds."""
    scheme = dropout_scheme()
    scheme = [mf.remat(o) for o in scheme] if remat else scheme
    assert use_shared(scheme, share=None, compile=False)
    assert [p.block_names for p in plan_scheme(scheme).shared] == [("0",)]
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    xy = (torch.randn(8, 6, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3)
    torch.manual_seed(0)
    got = mf.gradients(scheme)(ts, xy)
    torch.manual_seed(1)
    want = mf.gradients(scheme, share=False)(ts, xy)
    mt.assert_identical(got.grads, want.grads, "gradient")
    mt.assert_identical(got.losses, want.losses, "loss")
    other = mf.gradients(scheme)(ts._replace(step=ts.step + 1), xy)   # another step, other masks
    assert not torch.equal(other.losses["final"], got.losses["final"])


def compiled_case(k, method="mlaan", depth=32):
    net = mf.from_module(CifarResNet(depth, num_classes=CLASSES, widths=WIDTHS))
    at = mf.published.split_for(None, net.block_names, k)
    return mf.schemes.build(method, net, at, input_shape=SHAPE)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mlaan", pytest.param("infopro_mlaan", marks=pytest.mark.xfail(
    reason="found 2026-12-08, on 7726fe0 too: at K=15 the compiled step's parameters are 2.8e-4 (whole tree) "
           "from eager's after 3 steps, against 1.7e-7 at K=12 on this CPU: more than rounding, to be traced",
    strict=False))])
def test_compiled_shared_step_equals_eager_with_compiles_fixed_in_k(method):
    """Runs of blocks that compute the same function share one compiled kernel: the number
    of compiles does not grow with the number of modules (it depends on how the windows
    meet the stages, not on K), and stays fixed over steps."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from mlaan_func.kernels import kernel_table

    counts = []
    for k in (12, 15):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        scheme = compiled_case(k, method)
        assert use_shared(scheme, share=None, compile=True)
        opt = mf.optim.sgd(0.1, momentum=0.9)
        eager, compiled = mf.step(scheme, opt), mf.step(scheme, opt, compile=True, backend=counter)
        a = b = mf.init(scheme, opt, seed=5)
        for i in range(3):
            a, _ = eager(a, batch(seed=i))
            b, _ = compiled(b, batch(seed=i))
            if i == 0:
                first = counter.frame_count
        assert counter.frame_count == first   # no recompiles after the first step
        # float32 rounding of aot_eager's decompositions, grown over 3 momentum steps, over the
        # whole tree: per tensor, a BatchNorm bias near zero reads 2e-3 on some CPUs' kernels
        for tree_b, tree_a in ((b.params, a.params), (b.state, a.state)):
            assert tree_b.keys() == tree_a.keys()
            floats = [k for k in tree_a if tree_a[k].is_floating_point()]
            assert all(torch.equal(tree_b[k], tree_a[k]) for k in tree_a if k not in floats)
            flat = lambda tree: torch.cat([tree[k].double().flatten() for k in floats])  # noqa: E731
            err = mt.relative_error(flat(tree_b), flat(tree_a))
            assert err <= 1e-4, err
        counts.append(counter.frame_count)
        # a kernel per kind of block, compiled once per variant (input and weights with or without gradient)
        assert counter.frame_count <= 3 * len(kernel_table(scheme, backend="eager"))
    assert max(counts) < len(compiled_case(12, method)) < len(compiled_case(15, method))


@pytest.mark.slow
def test_compiled_shared_step_with_remat_and_dropout_equals_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    scheme = [mf.remat(o) for o in compiled_case(5, "dgl_mlaan", depth=20)]
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=2)
    got = mf.gradients(scheme, compile=True, backend=CompileCounterWithBackend("aot_eager"))(ts, batch())
    want = mf.gradients(scheme, share=False)(ts, batch())
    mt.assert_close(got.grads, want.grads, 1e-4, "gradient")
    mt.assert_close(got.state, want.state, 1e-4, "state")
    drop = dropout_scheme()
    ts = mf.init(drop, mf.optim.sgd(0.1), seed=2)
    xy = (torch.randn(8, 6), torch.arange(8) % 3)
    run = mf.gradients(drop, compile=True, backend="aot_eager")
    torch.manual_seed(0)
    a = run(ts, xy)
    torch.manual_seed(1)
    b = run(ts, xy)
    mt.assert_identical(a.grads, b.grads)   # repeatable: every draw from (key, step, block)


def test_oracle_passes_through_the_shared_step():
    """The DGL+MLAAN oracle of tests/test_mlaan.py, run on the default (shared) engine."""
    from tests.test_mlaan import reference_mlaan, ce, build

    at = ["stem", "1.1", "2.0", "3.0"]
    scheme = build("dgl_mlaan", at)
    assert use_shared(scheme, share=None, compile=False)
    reference = reference_mlaan(scheme, at, 3, lambda i: ce, lambda i: ce)
    ts = mf.init(scheme, mf.optim.sgd(0.5), seed=11)
    mt.check_oracle(scheme, ts, (torch.randn(6, *SHAPE), torch.arange(6) % CLASSES), reference, rtol=1e-4)


def test_resume_is_bitwise_exact(tmp_path):
    scheme = mf.schemes.mlaan(backbone(), ["1.0", "2.0", "3.0"], input_shape=SHAPE)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    run = mf.step(scheme, opt)
    a = mf.init(scheme, opt, seed=1)
    for i in range(2):
        a, _ = run(a, batch(seed=i))
    mf.save(tmp_path / "ck.pt", a)
    b = mf.load(tmp_path / "ck.pt")
    for i in range(2, 4):
        a, _ = run(a, batch(seed=i))
        b, _ = run(b, batch(seed=i))
    mt.assert_identical(b.params, a.params)
    mt.assert_identical(b.state, a.state)


def test_no_sharing_means_the_per_objective_engine():
    scheme = mf.schemes.dgl(backbone(), ["1.0", "2.0"], input_shape=SHAPE)
    assert not plan_scheme(scheme).shared
    assert not use_shared(scheme, share=None, compile=False)
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    xy = batch()
    got = shared_gradients(scheme)(ts, xy)
    want = mf.gradients(scheme, share=False)(ts, xy)
    mt.assert_identical(got.grads, want.grads)   # nothing shared: the same computation


def test_compiled_per_objective_engine_compiles_once_per_objective():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    scheme = mf.schemes.mlaan(backbone(), ["1.0", "2.0"], input_shape=SHAPE)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    eager, compiled = mf.step(scheme, opt), mf.step(scheme, opt, compile=True, backend=counter, share=False)
    a = b = mf.init(scheme, opt, seed=5)
    for i in range(3):
        a, _ = eager(a, batch(seed=i))   # shared, eager
        b, _ = compiled(b, batch(seed=i))
    mt.assert_close(b.params, a.params, 1e-4)
    assert counter.frame_count == len(scheme)
