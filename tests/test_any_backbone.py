"""Any backbone: torch.fx splits of a module's real forward, the ViT, heads for every feature
rank, the generic leap-trunk rule, block access by name, and the laws on a ViT."""


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.trace import TraceError
from mlaan_func.trunks import leap_trunk_blocks, leap_trunk_rule
from oracles import local_reference

SETTINGS = settings(deadline=None, max_examples=6)
CLASSES = 5


# ----------------------------------------------------------------------------- models written here

class TorchvisionBlock(nn.Module):
    """torchvision's BasicBlock: the skip is written in forward."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TorchvisionResNet(nn.Module):
    """A torchvision-style ResNet: not a Sequential, no named_blocks, flatten in forward."""

    def __init__(self, classes=CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(TorchvisionBlock(4, 4), TorchvisionBlock(4, 4))
        self.layer2 = nn.Sequential(TorchvisionBlock(4, 8, 2), TorchvisionBlock(8, 8))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


TV_BLOCKS = ["conv1", "bn1", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc"]


class ClsTokenModel(nn.Module):
    """Tokens in, a cls token and a positional embedding added in forward."""

    def __init__(self, tokens=5, features=6, dim=8, classes=CLASSES):
        super().__init__()
        self.proj = nn.Linear(features, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.enc1 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.enc2 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, classes)

    def forward(self, x):
        t = self.proj(x)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        t = self.enc2(self.enc1(t))
        return self.fc(self.norm(t)[:, 0])


CLS_BLOCKS = ["proj", "enc1", "enc2", "norm", "fc"]


def vit(image=8, classes=CLASSES):
    return mf.models.vit_micro(num_classes=classes, in_channels=3, image_size=image)


VIT_BLOCKS = ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "classifier"]


@st.composite
def ordered_subsets(draw, names, last_required=False):
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
    if last_required and names[-1] not in chosen:
        chosen.append(names[-1])
    return [n for n in names if n in chosen]


def images(seed, n=4, shape=(3, 8, 8)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- fx splits

@SETTINGS
@given(cuts=ordered_subsets(TV_BLOCKS), seed=st.integers(0, 2**16))
def test_torchvision_style_resnet_splits_at_drawn_cuts_and_equals_its_forward(cuts, seed):
    model = TorchvisionResNet()
    net = mf.from_module(model, blocks=cuts)
    assert net.block_names == tuple(cuts)
    assert set(net.param_names) == {k for k, _ in model.named_parameters()}
    mt.check_equivalent(model, net, [images(seed), images(seed + 1, n=3)])


@SETTINGS
@given(cuts=ordered_subsets(VIT_BLOCKS), seed=st.integers(0, 2**16))
def test_vit_splits_at_drawn_cuts_and_equals_its_forward(cuts, seed):
    model = vit()
    net = mf.from_module(model, blocks=cuts)
    mt.check_equivalent(model, net, images(seed))
    # the named_blocks net has the same keys and computes the same function
    assert set(mf.from_module(model).param_names) == set(net.param_names)


@SETTINGS
@given(cuts=ordered_subsets(CLS_BLOCKS), seed=st.integers(0, 2**16))
def test_cls_token_model_splits_at_drawn_cuts_and_equals_its_forward(cuts, seed):
    model = ClsTokenModel()
    net = mf.from_module(model, blocks=cuts)
    owner = {k: b.name for b in net.blocks for k in b.param_names}
    after_proj = cuts[cuts.index("proj") + 1:] if "proj" in cuts else cuts
    assert owner["cls"] == owner["pos"] == (after_proj or cuts)[0]  # the block that runs the cat
    mt.check_equivalent(model, net, torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(seed)))


def test_a_predicate_chooses_blocks_in_execution_order():
    model = TorchvisionResNet()
    net = mf.from_module(model, blocks=lambda name, m: isinstance(m, (TorchvisionBlock, nn.Linear)))
    assert net.block_names == ("layer1.0", "layer1.1", "layer2.0", "layer2.1", "fc")
    mt.check_equivalent(model, net, images(0))


def test_check_equivalent_fails_on_a_net_that_differs():
    class Shifted(TorchvisionResNet):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = TorchvisionResNet()
    net = mf.from_module(model, blocks=TV_BLOCKS)
    with pytest.raises(AssertionError, match="output"):
        mt.check_equivalent(Shifted(), net, images(0))


# ----------------------------------------------------------------------------- named_blocks vs forward

class ForgetfulBlocks(nn.Module):
    """named_blocks() lists a and b, but forward also applies a ReLU between them."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

    def named_blocks(self):
        return [("a", self.a), ("b", self.b)]

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_named_blocks_that_drop_part_of_forward_are_refused():
    # issue #11 item 6: on main this built a net without the ReLU, silently
    with pytest.raises(TraceError, match=r"\['relu'\].*blocks=\["):
        mf.from_module(ForgetfulBlocks())


def test_named_blocks_that_match_forward_are_accepted_and_equivalent():
    model = mf.models.CifarResNet(8, num_classes=CLASSES, widths=(4, 4, 8))
    mt.check_equivalent(model, mf.from_module(model), images(1))
    model = vit()
    mt.check_equivalent(model, mf.from_module(model), images(2))


# ----------------------------------------------------------------------------- bad input

def test_a_cut_that_is_not_a_submodule_names_the_fix():
    with pytest.raises(TraceError, match="'layer3' is not a submodule.*named_modules"):
        mf.from_module(TorchvisionResNet(), blocks=["layer1", "layer3"])


def test_cuts_out_of_execution_order_are_refused_with_the_order():
    with pytest.raises(TraceError, match=r"out of execution order.*\['layer1', 'layer2'\]"):
        mf.from_module(TorchvisionResNet(), blocks=["layer2", "layer1"])


def test_a_cut_inside_a_residual_block_ends_after_its_skip():
    # issue #23: the block of layer1.0.bn1 runs on to the end of layer1.0 (out += identity; relu)
    model = TorchvisionResNet()
    net = mf.from_module(model, blocks=["layer1.0.bn1", "fc"])
    assert {k.rsplit(".", 1)[0] for k in net.blocks[0].param_names} >= {"layer1.0.conv2", "layer1.0.bn2"}
    assert not any(k.startswith("layer1.1") for k in net.blocks[0].param_names)
    mt.check_equivalent(model, net, images(0), exact=True)


def test_a_cut_with_no_single_value_before_the_next_block_names_the_skip():
    with pytest.raises(TraceError, match=r"'layer1.0.bn1' cannot end at one value.*next block 'layer1.0.conv2'.*"
                                         r"'relu' \(output of relu, from `x = self.relu\(self.bn1\(self.conv1\(x\)\)\)`"
                                         r".*stays live.*Name a different block"):
        mf.from_module(TorchvisionResNet(), blocks=["layer1.0.bn1", "layer1.0.conv2", "fc"])


def test_nested_and_repeated_cuts_are_refused():
    with pytest.raises(TraceError, match="lies inside"):
        mf.from_module(TorchvisionResNet(), blocks=["layer1", "layer1.0"])
    with pytest.raises(TraceError, match="twice"):
        mf.from_module(TorchvisionResNet(), blocks=["layer1", "layer1"])


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) if h.sum() > 0 else h


def test_an_untraceable_model_says_how_to_fix_it():
    with pytest.raises(TraceError, match="cannot be traced.*named_blocks"):
        mf.from_module(DataDependent(), blocks=["a", "b"])


def test_a_cut_inside_code_that_needs_real_tensors_is_a_trace_error():
    # the ViT's attention reshapes with einops, which a torch.fx proxy cannot go through
    with pytest.raises(TraceError, match=r"needs real tensors.*einops.*\['blocks.1.attn'\].*around that code"):
        mf.from_module(vit(), blocks=["blocks.1.attn.qkv", "classifier"])


def test_a_head_given_the_wrong_rank_names_the_head_to_use():
    with pytest.raises(mf.ShapeError, match=r"\(N, C, H, W\).*heads.dgl_tokens"):
        mf.heads.dgl(4, 3, 4)(torch.randn(2, 5, 4))
    with pytest.raises(mf.ShapeError, match=r"\(N, T, D\).*heads.dgl, heads.linear"):
        mf.heads.dgl_tokens(4, 3)(torch.randn(2, 4, 3, 3))
    with pytest.raises(mf.ShapeError, match=r"shape \(2, 4, 1, 1, 1\); use einops.rearrange"):
        mf.heads.linear(4, 3)(torch.randn(2, 4, 1, 1, 1))


def test_a_trunk_asked_for_more_blocks_than_remain_is_refused():
    net = mf.from_module(vit())
    with pytest.raises(ValueError, match="only 1 blocks remain.*lower the trunk depth"):
        leap_trunk_blocks(net, "blocks.2", 3, input_shape=(3, 8, 8), exact=True)
    assert leap_trunk_blocks(net, "blocks.2", 3, input_shape=(3, 8, 8)) == ["blocks.3"]


# ----------------------------------------------------------------------------- block access, fresh copies

def test_block_by_name_and_name_slices():
    net = mf.from_module(mf.models.CifarResNet(14, widths=(4, 4, 8)))
    part = net["1.0":"2.0"]
    assert part.block_names == ("1.0", "1.1", "2.0") and part.input_name == "stem"
    assert net.block("2.1").block_names == ("2.1",) and net.block("2.1").input_name == "2.0"
    assert net[:"stem"].input_name == "input" and net["3.1":].block_names == ("3.1", "classifier")
    params, state = mf.init_params(net)
    x = images(0)
    h, _ = net[:"1.1"](params, state, x)
    mt.assert_close(net["2.0":](params, state, h)[0], net(params, state, x)[0])
    with pytest.raises(KeyError, match="no block '4.0'"):
        net["4.0":]
    with pytest.raises(ValueError, match="block order"):
        net["2.0":"1.0"]


def test_fresh_copy_has_its_own_initialisation():
    block = mf.from_module(vit()).block("blocks.1")
    same, fresh = mf.copy(block, "aux"), mf.copy(block, "aux2", fresh=True)
    params, _ = mf.init_params(block, same, fresh, seed=3)
    key = "blocks.1.mlp.0.weight"
    assert torch.equal(params[key], params[f"aux.{key}"])
    assert not torch.equal(params[key], params[f"aux2.{key}"])
    again, _ = mf.init_params(fresh, seed=3)
    assert torch.equal(again[f"aux2.{key}"], params[f"aux2.{key}"])


# ----------------------------------------------------------------------------- heads on every rank

@pytest.mark.parametrize("shape", [(6, 4, 4), (5, 6), (6,)])
@pytest.mark.parametrize("kind", ["linear", "dgl"])
def test_heads_take_maps_tokens_and_vectors(kind, shape):
    head = mf.heads.for_shape(kind, shape, 3)
    out = head(torch.randn(2, *shape))
    assert out.shape == (2, 3)
    mt.assert_close(head(torch.ones(2, *shape))[0], head(torch.ones(2, *shape))[1])


def test_linear_head_pools_tokens_by_cls_or_mean():
    x = torch.randn(2, 5, 4)
    cls, mean = mf.heads.linear(4, 3, tokens="cls"), mf.heads.linear(4, 3, tokens="mean")
    mean.load_state_dict(cls.state_dict())
    mt.assert_close(cls(x), cls.layers[1](x[:, 0]))
    mt.assert_close(mean(x), mean.layers[1](x.mean(1)))


def test_infopro_token_head_predicts_patch_pixels():
    head = mf.heads.infopro_tokens(8, 10, 3, 8, tokens=17, contrastive=False)
    recon, task = head(torch.randn(2, 17, 8))
    assert recon.shape == (2, 3, 8, 8) and task.shape == (2, 10)
    assert float(recon.detach().min()) >= 0 and float(recon.detach().max()) <= 1
    with pytest.raises(ValueError, match="not square patches"):
        mf.heads.infopro_tokens(8, 10, 3, 8, tokens=7)


# ----------------------------------------------------------------------------- schemes on the ViT

VIT_SHAPE = (3, 8, 8)
SPLITS = {2: ["blocks.1"], 4: ["blocks.0", "blocks.1", "blocks.2"], 6: VIT_BLOCKS[:-1]}


def vit_scheme(method, k, **options):
    return mf.schemes.build(method, mf.from_module(vit()), SPLITS[k], input_shape=VIT_SHAPE, **options)


def vit_batch(seed=0, n=6):
    return images(seed, n), torch.arange(n) % CLASSES


@pytest.mark.parametrize("method", ["dgl", "infopro", "mlaan", "dgl_mlaan", "infopro_mlaan"])
def test_published_schemes_run_on_the_vit_unchanged(method):
    scheme = vit_scheme(method, 4)
    opt = mf.optim.sgd(0.05)
    ts = mf.init(scheme, opt, seed=0)
    ts, metrics = mf.step(scheme, opt)(ts, vit_batch())
    assert all(torch.isfinite(m["loss"]) for m in metrics.values())


def test_generic_trunk_rule_equals_the_resnet_rule():
    for model in (mf.models.resnet32(), mf.models.resnet110()):
        net = mf.from_module(model)
        names = net.block_names
        for depth in (1, 2, 4):
            for after in names[:-1]:
                assert leap_trunk_blocks(net, after, depth, input_shape=(3, 32, 32)) == \
                    leap_trunk_rule(names, after, depth), (after, depth)


def vit_reference(scheme, at, method, detach=True):
    """DGL or MLAAN (docs/design.md §2) on the ViT as plain nn.Module code, one backward()."""
    model = vit()
    backbone = mf.from_module(model)
    return local_reference(model, scheme, at, method,
                           lambda i, end: leap_trunk_blocks(backbone, end, 4, input_shape=VIT_SHAPE),
                           width=min(2, len(at) + 1), detach=detach)


@pytest.mark.parametrize("k", [2, 4, 6])
@pytest.mark.parametrize("method", ["dgl", "mlaan"])
def test_laws_on_the_vit(method, k):
    """Split/cascade identity, purity, isolation and the oracle for dgl and mlaan on the ViT
    at K = 2, 4 and one module per block."""
    scheme = vit_scheme(method, k)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=7)
    xy = vit_batch(seed=k)
    net = mf.from_module(vit())
    mt.check_split_identity(net, SPLITS[k], ts.params, ts.state, xy[0])
    mt.check_purity(mf.step(scheme, opt), ts, xy)
    mt.check_isolation(scheme, ts, xy)
    mt.check_oracle(scheme, ts, xy, vit_reference(scheme, SPLITS[k], method), rtol=1e-4)


def test_the_vit_oracle_can_fail():
    scheme = vit_scheme("dgl", 4)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=7)
    wrong = vit_reference(scheme, SPLITS[4], "dgl", detach=False)  # gradient flows back across modules
    with pytest.raises(AssertionError, match="gradient"):
        mt.check_oracle(scheme, ts, vit_batch(), wrong, rtol=1e-4)


@pytest.mark.slow
def test_a_compiled_vit_scheme_compiles_once_per_objective():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    scheme = vit_scheme("mlaan", 4)
    opt = mf.optim.sgd(0.05, momentum=0.9)
    eager, compiled = mf.step(scheme, opt), mf.step(scheme, opt, compile=True, backend=counter, share=False)
    a = b = mf.init(scheme, opt, seed=1)
    for i in range(2):
        a, _ = eager(a, vit_batch(seed=i))
        b, _ = compiled(b, vit_batch(seed=i))
    mt.assert_close(b.params, a.params, 1e-4)
    assert counter.frame_count == len(scheme)


# ----------------------------------------------------------------------------- program, example, benchmarks

def _run(script, *args, timeout=600):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, str(root / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=root)


def test_every_model_name_is_an_arch_and_gets_a_near_equal_cost_split():
    assert {"resnet32", "resnet110", "vit_tiny", "vit_mini", "vit_micro"} <= set(mf.models.arch_names())
    net = mf.from_module(mf.models.create("vit_tiny", num_classes=10, in_channels=3, image_size=32))
    for k in (1, 2, 3, 5, 12):
        at = mf.splits.default_split("vit_tiny", net, k, (3, 32, 32))
        assert len(at) == k - 1
        modules = _module_costs(net, at)
        costs, largest = [sum(c) for c in modules], max(max(c) for c in modules)
        assert max(costs) <= sum(costs) / k + largest  # within one block of the ideal
    resnet = mf.from_module(mf.models.resnet32())
    assert mf.splits.default_split("resnet32", resnet, 3, (3, 32, 32)) == \
        mf.published.split_for("resnet32", resnet.block_names, 3)


def _module_costs(net, at):
    costs = mf.splits.block_costs(net, (3, 32, 32))
    names = list(net.block_names)
    ends = [names.index(a) for a in at] + [len(names) - 1]
    return [costs[(ends[j - 1] + 1 if j else 0):ends[j] + 1] for j in range(len(ends))]


@pytest.mark.slow
def test_program_trains_a_vit_and_the_vit_example_reports_three_accuracies(tmp_path):
    import json

    r = _run("examples/cifar_mlaan.py", "--dataset", "synthetic", "--synthetic-size", "64", "--arch", "vit_micro",
             "--method", "mlaan", "--modules", "3", "--epochs", "1", "--max-steps", "2", "--batch-size", "16",
             "--lr", "0.05", "--no-progress", "--out", str(tmp_path / "prog"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "prog" / "summary.json").read_text())["arch"] == "vit_micro"
    r = _run("examples/vit_mlaan.py", "--dataset", "synthetic", "--arch", "vit_micro", "--steps", "2",
             "--batch-size", "16", "--out", str(tmp_path / "vit"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [line.split()[0] for line in r.stdout.splitlines() if "test accuracy" in line][-3:] == ["e2e", "dgl", "mlaan"]
    for method in ("e2e", "dgl", "mlaan"):
        assert (tmp_path / "vit" / method / "metrics.jsonl").exists()
        assert (tmp_path / "vit" / method / "curves.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("script", ["bench/memory.py", "bench/speed.py"])
def test_benchmarks_take_a_vit_arch(tmp_path, script):
    import json

    out = tmp_path / "bench.json"
    r = _run(script, "--quick", "--arch", "vit_micro", "--method", "mlaan", "--modules", "3", "--json", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(out.read_text())["rows"][0]["arch"] == "vit_micro"


def test_a_traced_net_exports_and_loads_the_models_own_state_dict():
    model = TorchvisionResNet().eval()
    net = mf.from_module(model, blocks=TV_BLOCKS)
    own = model.state_dict()
    params = {k: own[k] for k in net.param_names}
    state = {k: own[k] for k in net.state_names}
    x = images(3)
    exported = mf.to_module(net, params, state).eval()
    mt.assert_close(exported(x), model(x))
    mt.assert_close(net(params, state, x, train=False)[0], model(x))
