"""ImageNet ResNets: standard sizes, published tables and heads, split identity and the
oracle for DGL and MLAAN on ResNet-18 at small resolution."""


import pytest
import torch

import mlaan_func as mf
from mlaan_func import imagenet_heads
from mlaan_func import testing as mt
from mlaan_func.models import imagenet_resnet
from mlaan_func.trunks import leap_trunk_rule
from oracles import local_reference

CLASSES = 5
SHAPE = (3, 16, 16)  # stem /4, then 4×4, 2×2, 1×1, 1×1


@pytest.mark.parametrize("arch, count", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                         ("resnet50", 25_557_032), ("resnet101", 44_549_160),
                                         ("resnet152", 60_192_808)])
def test_parameter_counts_equal_torchvision(arch, count):
    net = getattr(mf.models, arch)()
    assert sum(p.numel() for p in net.parameters()) == count


def test_blocks_widths_strides_and_zero_init():
    net = mf.models.resnet50(num_classes=7, zero_init_residual=True)
    names = [n for n, _ in net.named_blocks()]
    assert names[:5] == ["stem", "1.0", "1.1", "1.2", "2.0"] and names[-2:] == ["4.2", "classifier"]
    blocks = dict(net.named_blocks())
    assert blocks["2.0"].conv2.stride == (2, 2) and blocks["2.0"].conv1.stride == (1, 1)  # v1.5: stride on 3×3
    assert blocks["4.2"].out_channels == 2048 and bool((blocks["4.2"].bn3.weight == 0).all())
    assert bool((mf.models.resnet50().named_blocks()[1][1].bn3.weight == 1).all())
    out = net(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, 7)
    with pytest.raises(ValueError, match="choose one of"):
        imagenet_resnet.ImageNetResNet("resnet19")


@pytest.mark.parametrize("arch, k", [("resnet34", 16), ("resnet101", 33), ("resnet152", 50)])
def test_one_block_per_module_splits_fuse_the_stem(arch, k):
    names = mf.from_module(getattr(mf.models, arch)(num_classes=10)).block_names
    at = mf.published_split(arch, k)
    assert len(at) + 1 == k and "stem" not in at
    assert at == [n for n in names if n not in ("stem", "classifier")][:-1]


def test_released_infopro_k2_and_trunk_tables_chain():
    assert mf.published_split("resnet101", 2) == ["2.0"] and mf.published_split("resnet152", 2) == ["2.5"]
    assert mf.infopro_lambda_table("infopro", "resnet101", 2) == (5.0, 0.75, 5.0, 0.75)
    for arch, k in (("resnet101", 33), ("resnet152", 50), ("resnet34", 16)):
        table = mf.leap_trunk_table(arch, k)
        assert len(table) == k - 1
    # resnet101's released trunks chain on the module outputs (224 → 56×56 after the stem)
    net = mf.from_module(mf.models.resnet101(num_classes=10))
    modules = mf.split(net, mf.published_split("resnet101", 33))
    shapes = mf.schemes.module_shapes(modules, (3, 64, 64))
    for i, row in enumerate(mf.leap_trunk_table("resnet101", 33)[2:], start=2):
        mf.trunks.leap_trunk(net, row, f"t{i}", 0.995, input_shape=(1, *shapes[i]))


def test_a_trunk_that_repeats_a_block_is_refused():
    net = mf.from_module(mf.models.resnet34(num_classes=10))
    row = mf.leap_trunk_table("resnet34", 16)[13]  # released: ['4.1', '4.1', '4.2']
    assert row == ["4.1", "4.1", "4.2"]
    with pytest.raises(ValueError, match="more than once"):
        mf.trunks.leap_trunk(net, row, "t", 0.995)


def test_released_imagenet_heads_narrow_and_wide():
    narrow, wide = mf.schemes.classifier_head("imagenet", (64, 7, 7), 10), mf.schemes.classifier_head(
        "imagenet", (256, 7, 7), 10)
    convs = [m for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(64, 128, (1, 1)), (128, 64, (1, 1))]
    assert not [m for m in wide.modules() if isinstance(m, torch.nn.Conv2d)]
    assert narrow(torch.randn(2, 64, 7, 7)).shape == wide(torch.randn(2, 256, 7, 7)).shape == (2, 10)


@pytest.mark.parametrize("arch, k", [("resnet18", 9), ("resnet34", 17)])
def test_a_k_the_arch_cannot_be_split_into_is_a_clear_error(arch, k):
    names = mf.from_module(getattr(mf.models, arch)(num_classes=10)).block_names
    with pytest.raises(ValueError, match=f"cannot be split into {k} modules"):
        mf.published.split_for(arch, names, k)


def small_resnet18():
    return mf.models.resnet18(num_classes=CLASSES)


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(n) % CLASSES


@pytest.mark.parametrize("at", [["1.1", "2.1", "3.1"], ["stem", "2.0", "4.0"]])
def test_split_and_cascade_give_back_resnet18(at):
    net = mf.from_module(small_resnet18())
    ts = mf.init(mf.schemes.e2e(net), mf.optim.sgd(0.1), seed=0)
    mt.check_split_identity(net, at, ts.params, ts.state, batch()[0])
    mt.check_split_identity(net, at, ts.params, ts.state, batch()[0], train=False)


def reference(scheme, at, width, method):
    """DGL or MLAAN on the small ResNet-18 as plain nn.Module code, one backward()."""
    model = small_resnet18()
    names = [n for n, _ in model.named_blocks()]
    return local_reference(model, scheme, at, method, lambda i, end: leap_trunk_rule(names, end), width=width)


@pytest.mark.parametrize("method, options", [("dgl", {}), ("mlaan", {"head": "imagenet", "width": 3}),
                                             ("mlaan", {})])
def test_oracle_on_resnet18_at_small_resolution(method, options):
    at = ["1.1", "2.1", "3.1"]
    scheme = mf.schemes.build(method, mf.from_module(small_resnet18()), at, input_shape=SHAPE, **options)
    width = options.get("width", mf.schemes.DEFAULT_WIDTH.get(method, 1))
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    mt.check_oracle(scheme, ts, batch(seed=1), reference(scheme, at, width, method), rtol=1e-4)


def test_infopro_with_the_released_imagenet_heads():
    net = mf.from_module(small_resnet18())
    scheme = mf.schemes.build("infopro", net, ["2.0"], input_shape=SHAPE, head="imagenet", contrastive=False)
    head = scheme[0].head.blocks[0].module
    assert isinstance(head.decoder, imagenet_heads.InfoProImageNetDecoder)
    recon, logits = head(torch.randn(2, 128, 2, 2))
    assert recon.shape == (2, *SHAPE) and logits.shape == (2, CLASSES)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=0)
    _, metrics = mf.step(scheme, mf.optim.sgd(0.1))(ts, batch())
    assert set(metrics) == {"m0", "final"}
    with pytest.raises(ValueError, match="unknown InfoPro head"):
        mf.schemes.build("infopro", net, ["2.0"], input_shape=SHAPE, head="dgl")
