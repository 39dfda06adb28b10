"""Issue 11: a core users can trust. One regression test (or law) per item of the issue;
each failed on the main branch it was written against."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.core import ShapeError
from mlaan_func.models.resnet import CifarResNet

SETTINGS = settings(deadline=None, max_examples=6)
SHAPE = (3, 8, 8)


def small_resnet():
    return CifarResNet(14, num_classes=5, widths=(4, 8, 8))


def image_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(n) % 5


def vector_batch(n=6, d=4, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.arange(n) % classes


# ------------------------------------------------------------------ 1. init from the seed

MODULE_KINDS = {
    "transformer": lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
    "attention": lambda: nn.MultiheadAttention(8, 2, batch_first=True),
    "conv_bn": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),
    "lstm": lambda: nn.LSTM(4, 6),
    "resnet_block": lambda: small_resnet().stages[1][0],
}


@settings(deadline=None, max_examples=10)
@given(seed=mt.seeds, global_a=st.integers(0, 2**31 - 1), global_b=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(sorted(MODULE_KINDS)))
def test_init_depends_only_on_the_seed_not_on_the_global_generator(seed, global_a, global_b, kind):
    torch.manual_seed(global_a)
    a = mf.init_params(mf.from_module(MODULE_KINDS[kind](), name="b"), seed=seed)
    torch.manual_seed(global_b)
    b = mf.init_params(mf.from_module(MODULE_KINDS[kind](), name="b"), seed=seed)
    mt.assert_identical(a, b)


class TokenNet(nn.Module):
    def __init__(self, with_reset):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 4))
        self.fc = nn.Linear(4, 4)
        self.with_reset = with_reset

    def reset_parameters(self):
        if not self.with_reset:
            raise AssertionError("not called in this variant")
        nn.init.normal_(self.cls, std=0.02)
        self.fc.reset_parameters()

    def forward(self, x):
        return self.fc(x + self.cls)


def test_a_parameter_nothing_reinitialises_is_an_error_naming_it():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 4))
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x + self.cls)

    with pytest.raises(ValueError, match=r"\['cls'\].*reset_parameters"):
        mf.init_params(mf.from_module(Bare(), name="vit"))
    torch.manual_seed(1)
    a = mf.init_params(mf.from_module(TokenNet(True), name="vit"), seed=4)
    torch.manual_seed(2)
    b = mf.init_params(mf.from_module(TokenNet(True), name="vit"), seed=4)
    mt.assert_identical(a, b)


# ------------------------------------------------------------------ 2. randomness is an input

def dropout_scheme(p=0.5):
    net = mf.from_module(nn.Sequential(nn.Linear(4, 16), nn.Dropout(p), nn.ReLU(), nn.Linear(16, 16),
                                       nn.Dropout(p), nn.Linear(16, 3)))
    first, second = mf.split(net, ["2"])
    head = mf.from_module(nn.Sequential(nn.Dropout(p), nn.Linear(16, 3)), name="head")
    return [mf.local_loss(first, head, mf.losses.cross_entropy, name="m0"),
            mf.local_loss(second, None, mf.losses.cross_entropy, name="final")]


@settings(deadline=None, max_examples=10)
@given(key=mt.seeds, global_seed=st.integers(0, 2**31 - 1))
def test_a_step_with_dropout_is_a_function_of_its_inputs(key, global_seed):
    scheme = dropout_scheme()
    opt = mf.optim.sgd(0.1)
    ts = mf.init(scheme, opt, seed=key)
    run = mf.step(scheme, opt)
    batch = vector_batch()
    torch.manual_seed(global_seed)
    a, _ = run(ts, batch)
    before = torch.get_rng_state()
    torch.manual_seed(global_seed + 1)
    b, _ = run(ts, batch)
    mt.assert_identical(a, b)
    torch.manual_seed(global_seed)
    run(ts, batch)
    assert torch.equal(torch.get_rng_state(), before), "a step must leave the global generator as it was"
    c, _ = run(ts._replace(key=mf.randomness.key_from_seed(key + 1)), batch)
    d, _ = run(ts._replace(step=ts.step + 1), batch)
    assert not torch.equal(c.params["0.weight"], a.params["0.weight"])
    assert not torch.equal(d.params["0.weight"], a.params["0.weight"])


def test_a_block_draws_the_same_values_in_every_objective_that_runs_it():
    net = mf.from_module(nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5)))
    params, state = mf.init_params(net)
    x = torch.randn(5, 4)
    with mf.randomness.seeded(mf.randomness.key_from_seed(3), torch.tensor(7)):
        first, _ = net(params, state, x)
        torch.rand(100)  # draws in between (another objective, a loss) change nothing
        second, _ = net(params, state, x)
    assert torch.equal(first, second) and bool((first == 0).any())


def test_compiled_step_with_dropout_is_repeatable():
    scheme = dropout_scheme()
    opt = mf.optim.sgd(0.1)
    ts = mf.init(scheme, opt, seed=2)
    run = mf.step(scheme, opt, compile=True, backend="aot_eager")
    torch.manual_seed(0)
    a, _ = run(ts, vector_batch())
    torch.manual_seed(1)
    b, _ = run(ts, vector_batch())
    mt.assert_identical(a, b)


def test_remat_draws_the_masks_of_the_plain_objective():
    scheme = dropout_scheme(0.3)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=5)
    want = mf.gradients(scheme)(ts, vector_batch())
    got = mf.gradients([mf.remat(o) for o in scheme])(ts, vector_batch())
    mt.assert_close(got.grads, want.grads)


def test_the_oracle_draws_the_engines_dropout_masks():
    scheme = dropout_scheme(0.3)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=5)
    mt.check_oracle(scheme, ts, vector_batch())


# ------------------------------------------------------------------ 3. one name, one block

def test_two_heads_under_one_name_with_other_shapes_are_refused_naming_both():
    a, b = mf.split(mf.from_module(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))), ["0"])
    scheme = [mf.local_loss(a, mf.from_module(nn.Linear(4, 4), name="head"), mf.losses.cross_entropy, name="m0"),
              mf.local_loss(b, mf.from_module(nn.Linear(4, 5), name="head"), mf.losses.cross_entropy, name="m1")]
    with pytest.raises(ValueError, match=r"head\.weight.*'m0'.*'m1'"):
        mf.init(scheme, mf.optim.sgd(0.1))
    with pytest.raises(ValueError, match="another name"):
        mf.step(scheme, mf.optim.sgd(0.1))


def test_a_head_named_like_a_backbone_block_is_refused():
    a, b, c = mf.split(mf.from_module(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))), ["0", "1"])
    same = mf.from_module(nn.Linear(4, 3), name="2")     # same root, type and shapes: one block
    mf.init_params(a, b, c, same)
    head = mf.from_module(nn.Linear(4, 5), name="2")     # a 5-class head called "2"
    scheme = [mf.local_loss(a, head, mf.losses.cross_entropy, name="m0"),
              mf.local_loss(mf.cascade(b, c), None, mf.losses.cross_entropy, name="final")]
    with pytest.raises(ValueError, match=r"two different blocks use the name '2\.weight'.*'m0'.*'final'"):
        mf.init(scheme, mf.optim.sgd(0.1))


# ------------------------------------------------------------------ 4. leap blocks

def test_leap_ema_without_copy_is_refused():
    block = mf.from_module(nn.Linear(3, 3), name="b")
    with pytest.raises(ValueError, match="copy"):
        mf.leap_ema(block, source=block)


def test_two_decays_for_one_twin_are_refused():
    a, b = mf.split(mf.from_module(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))), ["0"])
    head = mf.from_module(nn.Linear(3, 3), name="fc")
    lo = mf.leap_ema(mf.copy(b, "t0"), source=b, decay=0.9)
    hi = mf.leap_ema(mf.copy(b, "t1"), source=b, decay=0.99)
    scheme = [mf.local_loss(a, mf.cascade(lo, head), mf.losses.cross_entropy, name="m0"),
              mf.local_loss(b, mf.cascade(hi, mf.copy(head, "h1")), mf.losses.cross_entropy, name="m1")]
    with pytest.raises(ValueError, match="decay"):
        mf.init(scheme, mf.optim.sgd(0.1))
    fine = [scheme[0], mf.local_loss(b, mf.cascade(mf.leap_ema(mf.copy(b, "t1"), source=b, decay=0.99, twin="tw"),
                                                   mf.copy(head, "h1")), mf.losses.cross_entropy, name="m1")]
    mf.init(fine, mf.optim.sgd(0.1))


# ------------------------------------------------------------------ 5. copy keeps its input

def test_copy_reads_what_its_source_reads():
    modules = mf.split(mf.from_module(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))), ["0"])
    assert mf.copy(modules[1], "aux").input_name == "0"


# ------------------------------------------------------------------ 7. errors say what and how

class Raises(nn.Module):
    def __init__(self, error):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.error = error

    def forward(self, x):
        raise self.error


def test_out_of_memory_and_other_runtime_errors_pass_untouched():
    for error in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("a bug in user code")):
        net = mf.from_module(Raises(error), name="r")
        params, state = mf.init_params(net)
        with pytest.raises(type(error)) as info:
            net(params, state, torch.ones(2, 2))
        assert type(info.value) is type(error)


def test_dtype_mismatch_names_both_dtypes_and_the_fix():
    net = mf.from_module(nn.Linear(4, 2), name="fc")
    params, state = mf.init_params(net)
    with pytest.raises(mf.core.DeviceMismatchError, match=r"float64.*float32.*dtype"):
        net(params, state, torch.ones(3, 4, dtype=torch.float64))


def test_genuine_shape_errors_are_shape_errors():
    net = mf.from_module(nn.Linear(4, 2), name="fc")
    params, state = mf.init_params(net)
    with pytest.raises(ShapeError, match="'fc'"):
        net(params, state, torch.ones(3, 5))


def test_heads_check_the_rank_of_their_input():
    head = mf.from_module(mf.heads.dgl(4, 3, 4), name="head")
    params, state = mf.init_params(head)
    with pytest.raises(ShapeError, match=r"\(N, C, H, W\).*\(3, 4\)"):
        head(params, state, torch.ones(3, 4))


def test_split_and_cascade_on_a_module_point_to_from_module():
    with pytest.raises(TypeError, match="from_module"):
        mf.split(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), ["0"])
    with pytest.raises(TypeError, match="from_module"):
        mf.cascade(nn.Linear(2, 2))


# ------------------------------------------------------------------ 8. routing and accumulation

class SumsItsWeight(nn.Module):
    """Its weight's gradient is an expanded (stride-0) tensor."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 4))

    def reset_parameters(self):
        nn.init.normal_(self.w)

    def forward(self, x):
        return x + self.w.sum()


def test_shared_stride_zero_gradients_are_added_out_of_place():
    shared = mf.from_module(SumsItsWeight(), name="s")
    head = mf.from_module(nn.Linear(4, 3), name="fc")
    scheme = [mf.local_loss(shared, head, mf.losses.cross_entropy, name="a"),
              mf.local_loss(shared, mf.copy(head, "b"), mf.losses.cross_entropy, name="b")]
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    g = mf.gradients(scheme)(ts, vector_batch())
    mt.check_oracle(scheme, ts, vector_batch())
    assert g.grads["s.w"].shape == (4, 4)


# ------------------------------------------------------------------ 11. honest checkers

def zero_head_scheme():
    a, b = mf.split(mf.from_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))), ["1"])

    class ZeroHead(nn.Linear):
        def reset_parameters(self):
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)

    head = mf.from_module(ZeroHead(8, 3), name="head")
    return [mf.local_loss(a, head, mf.losses.cross_entropy, name="m0"),
            mf.local_loss(b, None, mf.losses.cross_entropy, name="final")]


def test_isolation_passes_a_correct_scheme_whose_head_starts_at_zero():
    scheme = zero_head_scheme()
    mt.check_isolation(scheme, mf.init(scheme, mf.optim.sgd(0.1)), vector_batch(d=4))


def forgotten_copy(scheme, at):
    """DGL with module 0's head made of module 1 itself (AugLocal-style, ``copy`` forgotten)."""
    modules = mf.split(mf.from_module(small_resnet()), at)
    leaky = mf.local_loss(modules[0], mf.cascade(modules[1], scheme[1].head), mf.losses.cross_entropy,
                          name=scheme[0].name)
    return [leaky, *scheme[1:]]


@pytest.mark.slow
@settings(deadline=None, max_examples=5)
@given(data=st.data(), method=st.sampled_from(["dgl", "mlaan", "dgl_mlaan"]))
def test_isolation_with_reach_holds_for_published_schemes_and_fails_without_copy(data, method):
    blocks = mf.from_module(small_resnet()).block_names
    at = data.draw(mt.cut_points(blocks, min_modules=3, max_modules=5))
    width = data.draw(st.integers(1, len(at) + 1)) if method != "dgl" else None
    options = {} if width is None else {"width": width}
    scheme = mf.schemes.build(method, mf.from_module(small_resnet()), at, input_shape=SHAPE, **options)
    mt.check_isolation(scheme, mf.init(scheme, mf.optim.sgd(0.1)), image_batch(), expect=mt.expected_reach(scheme))
    dgl = mf.schemes.build("dgl", mf.from_module(small_resnet()), at, input_shape=SHAPE)
    leaky = forgotten_copy(dgl, at)
    with pytest.raises(AssertionError, match="'m0' leaks gradient into"):
        mt.check_isolation(leaky, mf.init(leaky, mf.optim.sgd(0.1)), image_batch())


def test_reference_gradients_is_independent_of_objective_forward(monkeypatch):
    scheme = mf.schemes.build("dgl_mlaan", mf.from_module(small_resnet()), ["1.0", "1.1", "2.1"], input_shape=SHAPE)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    want = mf.gradients(scheme)(ts, image_batch())
    monkeypatch.setattr(mf.combinators.Objective, "forward", lambda *a, **k: pytest.fail("used forward"))
    monkeypatch.setattr(mf.core.Block, "apply", lambda *a, **k: pytest.fail("used Block.apply"))
    grads, state = mt.reference_gradients(scheme)(ts.params, ts.state, image_batch(), key=ts.key, step=ts.step)
    mt.assert_close(grads, want.grads, 1e-4, "gradient")
    mt.assert_close(state, want.state, 1e-4, "state")


def test_the_oracle_fails_when_the_engine_is_wrong(monkeypatch):
    scheme = mf.schemes.build("dgl", mf.from_module(small_resnet()), ["1.0", "2.0"], input_shape=SHAPE)
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    real = mf.engine.gradients

    def doubled(objectives, **kw):
        run = real(objectives, **kw)
        return lambda ts, b: run(ts, b)._replace(grads={k: 2 * v for k, v in run(ts, b).grads.items()})

    monkeypatch.setattr(mf.engine, "gradients", doubled)
    with pytest.raises(AssertionError, match="gradient"):
        mt.check_oracle(scheme, ts, image_batch())
