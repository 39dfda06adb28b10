"""from_module cuts a model's own forward where it writes its residuals (issue #23): a cut
named at a call inside ``h = h + f(self.b(h))`` lands at the first point after the call where
one value is live (after the add), the cut net is the model's function bit for bit (outputs,
gradients, BatchNorm statistics, train and eval), a DGL scheme on it keeps its modules
isolated, and a cut with no such point before the next named block names the values that
stay live and the fix (docs/backbones.md, docs/design.md §7 "Any backbone")."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.errors import TraceError

SETTINGS = settings(deadline=None, max_examples=8)
CLASSES = 5


# ----------------------------------------------------------------------------- models written here

class Unit(nn.Module):
    """The layers of one pre-activation unit; the model's forward runs them and adds the skip."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.short = nn.Conv2d(c_in, c_out, 1, stride, bias=False) if stride != 1 or c_in != c_out else None


class PreActResNet(nn.Module):
    """A pre-activation ResNet whose residuals are written in the model's own forward."""

    def __init__(self, classes=CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.units = nn.ModuleList([Unit(4, 4), Unit(4, 8, 2), Unit(8, 8)])
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        h = self.stem(x)
        for u in self.units:
            r = u.conv1(F.relu(u.bn1(h)))
            r = u.conv2(F.relu(u.bn2(r)))
            h = r + (u.short(h) if u.short is not None else h)
        return self.fc(F.relu(self.bn(h)).mean(dim=(2, 3)))


UNIT_CALLS = ["bn1", "conv1", "bn2", "conv2"]


class Attention(nn.Module):
    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(n, t, d))


class Layer(nn.Module):
    """The layers of one transformer layer; the model's forward writes both residuals."""

    def __init__(self, dim):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


class Transformer(nn.Module):
    """Tokens in; ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` in the model's forward."""

    def __init__(self, features=6, dim=8, depth=3, classes=CLASSES):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.layers = nn.ModuleList([Layer(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = x + layer.attn(layer.norm1(x))
            x = x + layer.mlp(layer.norm2(x))
        return self.head(self.norm(x).mean(dim=1))


IMAGE = (3, 8, 8)
TOKENS = (5, 6)


def images(seed, n=4):
    return torch.randn(n, *IMAGE, generator=torch.Generator().manual_seed(seed))


def tokens(seed, n=4):
    return torch.randn(n, *TOKENS, generator=torch.Generator().manual_seed(seed))


def labels(n):
    return torch.arange(n) % CLASSES


# ----------------------------------------------------------------------------- drawn cuts

@st.composite
def preact_cuts(draw):
    """Blocks for PreActResNet: optionally the stem, at most one call of each unit (any of
    them ends after the unit's add), optionally the final BatchNorm and the classifier."""
    names = ["stem"] if draw(st.booleans()) else []
    for i in range(3):
        call = draw(st.sampled_from([None, *UNIT_CALLS]))
        if call:
            names.append(f"units.{i}.{call}")
    names += [n for n in ("bn", "fc") if draw(st.booleans())]
    return names or ["fc"]


@st.composite
def transformer_cuts(draw):
    """Blocks for Transformer: optionally the embedding, per layer at most one call of each
    half (norm1 or attn ends after the first add, norm2 or mlp after the second), and
    optionally the final norm and the head."""
    names = ["embed"] if draw(st.booleans()) else []
    for i in range(3):
        for half in (("norm1", "attn"), ("norm2", "mlp")):
            call = draw(st.sampled_from([None, *half]))
            if call:
                names.append(f"layers.{i}.{call}")
    names += [n for n in ("norm", "head") if draw(st.booleans())]
    return names or ["head"]


def owners(net):
    return {k: b.name for b in net.blocks for k in b.param_names}


def residual_of(name):
    """The residual a parameter key or a named call belongs to: 'units.1' (a pre-activation
    unit), 'layers.0.a' / 'layers.0.m' (a layer's attention or MLP half), else its module."""
    parts = name.split(".")
    if parts[0] == "units":
        return ".".join(parts[:2])
    if parts[0] == "layers":
        return f"layers.{parts[1]}." + ("a" if parts[2] in ("norm1", "attn") else "m")
    return parts[0]


@SETTINGS
@given(cuts=preact_cuts(), seed=st.integers(0, 2**16))
def test_preact_resnet_cuts_after_its_residual_adds_and_is_its_forward_bit_for_bit(cuts, seed):
    model = PreActResNet()
    net = mf.from_module(model, blocks=cuts)
    assert net.block_names == tuple(cuts)
    owner = owners(net)
    assert set(owner) == {k for k, _ in model.named_parameters()}   # the model's own keys
    for name in cuts:   # a block owns every parameter of the residual its named call sits in
        assert {owner[k] for k in owner if residual_of(k) == residual_of(name)} == {name}, (name, owner)
    mt.check_equivalent(model, net, [images(seed), images(seed + 1, n=3)], exact=True)


@SETTINGS
@given(cuts=transformer_cuts(), seed=st.integers(0, 2**16))
def test_transformer_cuts_after_its_residual_adds_and_is_its_forward_bit_for_bit(cuts, seed):
    model = Transformer()
    net = mf.from_module(model, blocks=cuts)
    assert net.block_names == tuple(cuts)
    owner = owners(net)
    assert set(owner) == {k for k, _ in model.named_parameters()}
    for name in cuts:
        assert {owner[k] for k in owner if residual_of(k) == residual_of(name)} == {name}, (name, owner)
    mt.check_equivalent(model, net, [tokens(seed), tokens(seed + 1, n=2)], exact=True)


def test_a_cut_right_after_a_call_stays_there_when_one_value_is_live():
    # the embedding's output is the only live value: its block ends at the call, as before
    net = mf.from_module(Transformer(), blocks=["embed", "layers.0.attn", "head"])
    assert owners(net)["layers.0.norm1.weight"] == "layers.0.attn"
    assert set(net.blocks[0].param_names) == {"embed.weight", "embed.bias"}


def test_a_predicate_cuts_at_every_attention_and_mlp():
    model = Transformer()
    net = mf.from_module(model, blocks=lambda name, m: isinstance(m, Attention) or name.endswith(".mlp"))
    assert net.block_names == tuple(f"layers.{i}.{c}" for i in range(3) for c in ("attn", "mlp"))
    assert owners(net)["head.weight"] == "layers.2.mlp"   # what follows the last belongs to it
    mt.check_equivalent(model, net, tokens(0), exact=True)


@SETTINGS
@given(data=st.data(), which=st.sampled_from(["preact", "transformer"]))
def test_any_named_submodules_either_cut_exactly_or_are_refused_by_name(data, which):
    """Any submodules at all, taken in execution order: the net is the model's function bit
    for bit, or from_module refuses with a TraceError (never a wrong net, never another error)."""
    model = PreActResNet() if which == "preact" else Transformer()
    names = [n for n, _ in model.named_modules() if n]
    chosen = set(data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=6, unique=True)))
    try:
        net = mf.from_module(model, blocks=lambda name, m: name in chosen)
    except TraceError as err:
        assert "cannot end at one value" in str(err) or "never called" in str(err), str(err)
        return
    x = images(0) if which == "preact" else tokens(0)
    mt.check_equivalent(model, net, x, exact=True)


# ----------------------------------------------------------------------------- the library on the cut net

@SETTINGS
@given(cuts=transformer_cuts(), data=st.data())
def test_dgl_on_a_cut_transformer_is_isolated_and_matches_its_oracle(cuts, data):
    net = mf.from_module(Transformer(), blocks=cuts)
    at = data.draw(mt.cut_points(net.block_names, min_modules=2, max_modules=4)) if len(cuts) > 1 else []
    scheme = mf.schemes.dgl(net, at, input_shape=TOKENS)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=data.draw(st.integers(0, 2**16)))
    batch = (tokens(data.draw(st.integers(0, 2**16)), n=6), labels(6))
    mt.check_split_identity(net, at, ts.params, ts.state, batch[0], exact=True)
    mt.check_split_identity(net, at, ts.params, ts.state, batch[0], train=False, exact=True)
    mt.check_isolation(scheme, ts, batch)
    mt.check_oracle(scheme, ts, batch)


@SETTINGS
@given(cuts=preact_cuts(), data=st.data())
def test_dgl_on_a_cut_preact_resnet_is_isolated(cuts, data):
    net = mf.from_module(PreActResNet(), blocks=cuts)
    at = data.draw(mt.cut_points(net.block_names, min_modules=2, max_modules=3)) if len(cuts) > 1 else []
    scheme = mf.schemes.dgl(net, at, input_shape=IMAGE)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=data.draw(st.integers(0, 2**16)))
    batch = (images(data.draw(st.integers(0, 2**16)), n=6), labels(6))
    mt.check_split_identity(net, at, ts.params, ts.state, batch[0], exact=True)
    mt.check_isolation(scheme, ts, batch)


def test_e2e_gradients_of_the_cut_net_are_the_models_autograd_gradients():
    model = Transformer()
    net = mf.from_module(model, blocks=["embed", "layers.0.norm2", "layers.1.attn", "layers.2.mlp"])
    scheme = mf.schemes.e2e(net)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    x, y = tokens(7, n=6), labels(6)
    got = mf.gradients(scheme)(ts, (x, y))
    model.load_state_dict({**ts.params, **ts.state})
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    mt.assert_close(got.grads, {k: p.grad for k, p in model.named_parameters()}, 1e-6, "gradient")


# ----------------------------------------------------------------------------- the checker can fail

class Reversed(nn.Module):
    """The same outputs as ``Plain`` bit for bit (2y - y is exact), the gradients negated."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        y = self.b(h + torch.tanh(h))
        return 2 * y.detach() - y


class Plain(Reversed):
    def forward(self, x):
        h = self.a(x)
        return self.b(h + torch.tanh(h))


def test_check_equivalent_compares_gradients_not_just_outputs():
    model, other = Plain(), Reversed()
    other.load_state_dict(model.state_dict())
    net = mf.from_module(other, blocks=["a", "b"])
    mt.check_equivalent(model, net, torch.randn(4, 3), gradients=False, exact=True)
    with pytest.raises(AssertionError, match=r"gradient \(eval\)\['a.weight'\]"):
        mt.check_equivalent(model, net, torch.randn(4, 3))


# ----------------------------------------------------------------------------- no point with one value

def test_a_cut_inside_a_residual_before_the_next_named_block_names_the_residual_and_the_fix():
    # norm2's output and the residual stream are both live up to the mlp's call
    with pytest.raises(TraceError) as err:
        mf.from_module(Transformer(), blocks=["embed", "layers.0.norm2", "layers.0.mlp", "head"])
    message = str(err.value)
    assert "block 'layers.0.norm2' cannot end at one value" in message
    assert "next block 'layers.0.mlp'" in message
    assert "'add' (add, from `x = x + layer.attn(layer.norm1(x))` at test_residual_cuts.py:" in message
    assert "stays live all the way" in message                           # the residual stream
    assert "'layers_0_norm2' (output of layers.0.norm2)" in message
    assert "'layers.0.norm1', 'layers.0.attn' would end at one value here" in message
    assert "Name a different block" in message and "own their residual" in message


def test_two_calls_of_one_preact_unit_are_refused():
    # unit 0's sum (the skip of unit 1) is live from conv1 to conv2; the line that wrote it is named
    with pytest.raises(TraceError, match=r"'units.1.conv1' cannot end at one value.*'add' \(add, from "
                                         r"`h = r \+ \(u.short\(h\).*` at test_residual_cuts.py:\d+\) stays live"
                                         r".*Name a different block \('units.0.bn1'"):
        mf.from_module(PreActResNet(), blocks=["stem", "units.1.conv1", "units.1.conv2", "fc"])


class InputSkip(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.b(self.a(x)) + x)


def test_an_input_read_at_the_end_is_named_as_the_models_input():
    with pytest.raises(TraceError, match=r"'a' cannot end at one value.*'x' \(the model's input\) stays live"):
        mf.from_module(InputSkip(), blocks=["a", "b", "fc"])
    model = InputSkip()   # cut where the skip has been added back: fine
    mt.check_equivalent(model, mf.from_module(model, blocks=["b", "fc"]), torch.randn(4, 3), exact=True)
