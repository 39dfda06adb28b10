"""Heads (shapes, initialisation) and losses (against torch and naive references)."""

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mlaan_func import heads, losses
from mlaan_func.losses import Batch

SETTINGS = settings(deadline=None, max_examples=10)
channels = st.integers(1, 8)
sides = st.integers(1, 12)
seeds = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These ops are tiny: intra-op threads only spin, badly so on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def all_heads(c, n, h, w):
    return {
        "linear": heads.linear(c, n),
        "dgl": heads.dgl(c, n, (h, w)),
        "dgl_wide": heads.dgl_wide(c, n),
        "decoder": heads.infopro_decoder(c, 2, (h + 1, w + 2)),
        "classifier": heads.infopro_classifier(c, n, final_width=False),
        "infopro": heads.infopro(c, n, 3, (h, w), final_width=True, contrastive=False),
    }


# ---------------------------------------------------------------- heads


@SETTINGS
@given(c=channels, n=st.integers(1, 7), h=sides, w=sides, train=st.booleans())
def test_head_output_shapes(c, n, h, w, train):
    x = torch.randn(3, c, h, w)
    hs = {k: v.train(train) for k, v in all_heads(c, n, h, w).items()}
    for name in ("linear", "dgl", "dgl_wide", "classifier"):
        assert hs[name](x).shape == (3, n), name
    assert hs["decoder"](x).shape == (3, 2, h + 1, w + 2)
    recon, task = hs["infopro"](x)
    assert recon.shape == (3, 3, h, w) and task.shape == (3, n)
    assert ((recon >= 0) & (recon <= 1)).all()


@SETTINGS
@given(c=channels, h=sides, w=sides, final=st.booleans(), contrastive=st.booleans())
def test_infopro_classifier_widths(c, h, w, final, contrastive):
    head = heads.infopro(c, 10, 3, 8, final_width=final, contrastive=contrastive)
    conv = head.classifier.layers[0]
    assert conv.out_channels == (c if final else 2 * c) and conv.stride == ((1, 1) if final else (2, 2))
    _, task = head.eval()(torch.randn(2, c, h, w))
    assert task.shape == (2, heads.FEATURE_DIM if contrastive else 10)


@SETTINGS
@given(c=channels, h=st.integers(1, 40), w=st.integers(1, 40))
def test_dgl_pools_to_a_quarter_side_at_least_two(c, h, w):
    head = heads.dgl(c, 3, (h, w))
    pools = [m for m in head.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    assert [p.output_size for p in pools] == [(max(2, h // 4), max(2, w // 4)), (2, 2)]
    assert head.pool_size == (max(2, h // 4), max(2, w // 4))
    assert heads.dgl(c, 3, h).pool_size == (max(2, h // 4),) * 2
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(4 * c, 4 * c)] * 2 + [(4 * c, 3)]


def test_dgl_wide_layout():
    head = heads.dgl_wide(5, 7)
    convs = [(m.in_channels, m.out_channels, m.kernel_size) for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(5, 128, (1, 1)), (128, 128, (1, 1)), (128, 128, (1, 1))]
    linears = [(m.in_features, m.out_features) for m in head.modules() if isinstance(m, nn.Linear)]
    assert linears == [(128, 512), (512, 512), (512, 512), (512, 7)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 3


def _poison(module):
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.fill_(7 if not t.is_floating_point() else math.nan)


@SETTINGS
@given(seed=seeds, c=channels)
def test_reset_parameters_reinitialises_everything_deterministically(seed, c):
    for name, head in all_heads(c, 4, 6, 5).items():
        assert hasattr(head, "reset_parameters"), name
        head.train()(torch.randn(3, c, 6, 5))  # move the BN statistics
        _poison(head)
        torch.manual_seed(seed)
        head.reset_parameters()
        first = {k: v.clone() for k, v in head.state_dict().items()}
        assert all(not v.is_floating_point() or torch.isfinite(v).all() for v in first.values()), name
        head.train()(torch.randn(3, c, 6, 5))
        torch.manual_seed(seed)
        head.reset_parameters()
        for k, v in head.state_dict().items():
            assert torch.equal(v, first[k]), (name, k)
        for m in head.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert (m.weight == 1).all() and (m.bias == 0).all()
                assert (m.running_mean == 0).all() and (m.running_var == 1).all()
                assert int(m.num_batches_tracked) == 0


def test_conv_init_scale_and_linear_default():
    torch.manual_seed(0)
    head = heads.dgl_wide(64, 10).requires_grad_(False)
    conv = head.layers[3]  # 128→128 1×1
    assert abs(float(conv.weight.detach().std()) - math.sqrt(2 / 128)) < 0.01
    fc = head.layers[-1]
    bound = 1 / math.sqrt(fc.in_features)
    assert float(fc.weight.abs().max()) <= bound and float(fc.bias.abs().max()) <= bound
    decoder = heads.infopro_decoder(4, 3, 8).requires_grad_(False)
    assert (decoder.layers[-2].bias == 0).all()


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "3"])
def test_heads_reject_bad_arguments(bad):
    for make in (lambda: heads.linear(bad, 3), lambda: heads.dgl(4, bad, 8), lambda: heads.dgl(4, 3, (8, bad)),
                 lambda: heads.dgl_wide(bad, 3), lambda: heads.infopro_decoder(4, bad, 8),
                 lambda: heads.infopro_classifier(4, bad, True),
                 lambda: heads.infopro(4, bad, 3, 8, final_width=False)):
        with pytest.raises(ValueError):
            make()
    with pytest.raises(ValueError, match="pair"):
        heads.dgl(4, 3, (8, 8, 8))


# ---------------------------------------------------------------- losses


def labelled(seed, n, classes, dim=None, image=(3, 4, 4)):
    g = gen(seed)
    x = torch.randn(n, *image, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    out = torch.randn(n, dim or classes, generator=g)
    return out, Batch(x, y)


@SETTINGS
@given(seed=seeds, n=st.integers(1, 9), classes=st.integers(1, 6))
def test_cross_entropy_matches_torch(seed, n, classes):
    out, batch = labelled(seed, n, classes)
    loss, m = losses.cross_entropy(out, batch)
    torch.testing.assert_close(loss, F.cross_entropy(out, batch.y))
    assert set(m) == {"loss", "accuracy"} and all(v.dim() == 0 for v in m.values())
    assert torch.equal(m["accuracy"], (out.argmax(1) == batch.y).float().mean())


def test_cross_entropy_rejects_mismatched_batch():
    out, batch = labelled(0, 4, 3)
    with pytest.raises(ValueError, match="3 outputs but 4 labels"):
        losses.cross_entropy(out[:3], batch)
    with pytest.raises(ValueError, match="shape"):
        losses.cross_entropy(out[:, :, None], batch)


@SETTINGS
@given(seed=seeds, c=st.integers(1, 3))
def test_reconstruction_bce_matches_torch_on_denormalised_image(seed, c):
    g = gen(seed)
    mean = torch.rand(c, generator=g).tolist()
    std = (torch.rand(c, generator=g) + 0.1).tolist()
    x = torch.randn(3, c, 5, 4, generator=g) * 2
    recon = torch.rand(3, c, 5, 4, generator=g).clamp(0.01, 0.99)
    loss, m = losses.reconstruction_bce(mean, std)(recon, Batch(x, torch.zeros(3, dtype=torch.long)))
    target = (x * torch.tensor(std).view(1, c, 1, 1) + torch.tensor(mean).view(1, c, 1, 1)).clamp(0, 1)
    torch.testing.assert_close(loss, F.binary_cross_entropy(recon, target))
    assert set(m) == {"loss"}


def test_reconstruction_bce_errors():
    with pytest.raises(ValueError):
        losses.reconstruction_bce([0.5, 0.5], [0.5])
    with pytest.raises(ValueError):
        losses.reconstruction_bce([0.5], [0.0])
    bce = losses.reconstruction_bce([0.5] * 3, [0.5] * 3)
    with pytest.raises(ValueError, match="shape"):
        bce(torch.rand(2, 3, 4, 4), Batch(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)))


def supcon_reference(features, y, temperature):
    """Khosla et al., one anchor and one positive at a time."""
    f = F.normalize(features.double(), dim=1)
    n, per_anchor = len(y), []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        denom = sum(torch.exp(f[i] @ f[j] / temperature) for j in others)
        pos = [j for j in others if y[j] == y[i]]
        if pos:
            per_anchor.append(sum(-(torch.log(torch.exp(f[i] @ f[p] / temperature) / denom)) for p in pos) / len(pos))
    return sum(per_anchor) / len(per_anchor) if per_anchor else torch.zeros((), dtype=torch.double)


@SETTINGS
@given(seed=seeds, n=st.integers(1, 8), classes=st.integers(1, 4), dim=st.integers(2, 6),
       temperature=st.sampled_from([0.07, 0.5, 1.0]))
def test_supervised_contrastive_equals_naive_reference(seed, n, classes, dim, temperature):
    out, batch = labelled(seed, n, classes, dim=dim)
    loss, m = losses.supervised_contrastive(temperature, "with_positive")(out, batch)
    want = supcon_reference(out, batch.y, temperature)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    assert set(m) == {"loss"}


@SETTINGS
@given(seed=seeds, n=st.integers(1, 8))
def test_supervised_contrastive_no_nan_without_positives(seed, n):
    out, batch = labelled(seed, n, 1, dim=5)
    batch = Batch(batch.x, torch.arange(n))  # all labels distinct
    out.requires_grad_(True)
    loss, _ = losses.supervised_contrastive()(out, batch)
    (grad,) = torch.autograd.grad(loss, out)
    assert float(loss.detach()) == 0.0 and torch.isfinite(grad).all()
    # the same under torch.func.grad
    g = torch.func.grad(lambda o: losses.supervised_contrastive()(o, batch)[0])(out.detach())
    assert torch.isfinite(g).all()


@SETTINGS
@given(seed=seeds, w0=st.floats(0, 5), w1=st.floats(0, 5), tensor_weights=st.booleans())
def test_weighted_sum_equals_manual_sum(seed, w0, w1, tensor_weights):
    g = gen(seed)
    x = torch.randn(4, 3, 4, 4, generator=g)
    y = torch.tensor([0, 1, 0, 2])
    batch = Batch(x, y)
    recon = torch.rand(4, 3, 4, 4, generator=g).clamp(0.01, 0.99)
    logits = torch.randn(4, 3, generator=g)
    bce = losses.reconstruction_bce([0.4, 0.5, 0.6], [0.2, 0.3, 0.25])
    weights = (torch.tensor(w0), torch.tensor(w1)) if tensor_weights else (w0, w1)
    fn = losses.weighted_sum((bce, weights[0]), (losses.cross_entropy, weights[1]))
    loss, m = fn((recon, logits), batch)
    want = w0 * bce(recon, batch)[0] + w1 * F.cross_entropy(logits, y)
    torch.testing.assert_close(loss, want.to(loss.dtype))
    assert torch.equal(m["loss"], loss.detach())
    assert torch.equal(m["accuracy"], losses.cross_entropy(logits, batch)[1]["accuracy"])
    assert set(m) == {"loss", "accuracy", "0.loss", "1.loss", "1.accuracy"}


def test_weighted_sum_errors():
    with pytest.raises(ValueError):
        losses.weighted_sum()
    with pytest.raises(ValueError):
        losses.weighted_sum(losses.cross_entropy)
    fn = losses.weighted_sum((losses.cross_entropy, 1.0), (losses.cross_entropy, 1.0))
    out, batch = labelled(0, 3, 2)
    with pytest.raises(ValueError, match="2-tuple"):
        fn(out, batch)
    with pytest.raises(ValueError, match="2-tuple"):
        fn((out,), batch)


def test_infopro_lambdas_endpoints():
    lam = (5.0, 0.5, 1.0, 2.0)
    assert losses.infopro_lambdas(0, 6, *lam) == (5.0, 0.5)
    assert losses.infopro_lambdas(4, 6, *lam) == (1.0, 2.0)  # i = K-2
    l1, l2 = losses.infopro_lambdas(2, 6, *lam)
    assert l1 == pytest.approx(3.0) and l2 == pytest.approx(1.25)
    assert losses.infopro_lambdas(0, 2, *lam) == (5.0, 0.5)  # K = 2: r = 0
    assert all(isinstance(v, float) for v in losses.infopro_lambdas(1, 3, *lam))
    for i, k in [(-1, 4), (4, 4), (0, 0)]:
        with pytest.raises(ValueError):
            losses.infopro_lambdas(i, k, *lam)


def test_infopro_head_and_loss_compose_under_torch_func():
    head = heads.infopro(4, 5, 3, 8, final_width=False).train()
    params = dict(head.named_parameters())
    buffers = {k: v.clone() for k, v in head.named_buffers()}
    fn = losses.weighted_sum((losses.reconstruction_bce([0.5] * 3, [0.25] * 3), 2.0),
                             (losses.supervised_contrastive(), 0.5))
    batch = Batch(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 0, 1, 2, 3]))
    h = torch.randn(6, 4, 4, 4)

    def objective(p, b):  # BatchNorm writes the buffers, so they are inputs
        return fn(torch.func.functional_call(head, (p, b), (h,)), batch)

    grads, (loss, metrics) = torch.func.grad_and_value(objective, has_aux=True)(params, buffers)
    assert set(grads) == set(params) and all(torch.isfinite(g).all() for g in grads.values())
    assert torch.isfinite(loss) and set(metrics) == {"loss", "0.loss", "1.loss"}


@pytest.mark.parametrize("module", [heads, losses])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
