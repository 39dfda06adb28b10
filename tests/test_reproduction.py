"""Fidelity to the released InfoPro / MLAAN code: λ by stage, the two SupCon averagings, the
reconstruction loss's memory, and the released DGL baseline head (issue 16)."""

import attrs
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mlaan_func as mf
from mlaan_func import heads, losses
from mlaan_func.losses import Batch
from mlaan_func.memory import peak_live_bytes, track_memory
from mlaan_func.models.resnet import CifarResNet

SETTINGS = settings(deadline=None, max_examples=10)


# ----------------------------------------------------------------------------- λ by stage

# The released ResNet-32 InfoPro/MLAAN module table (networks/config2.py): [stage, block] where
# each module ends; the released ratio is ``stage / (local_module_num - 2)``.
RELEASED_ENDS = {
    8: [[1, 0], [1, 2], [1, 4], [2, 1], [2, 3], [3, 0], [3, 2], [3, 4]],
    15: [[s, b] for s in (1, 2, 3) for b in range(5)],
}


def released_lambdas(i, k, ixx_1, ixy_1, ixx_2, ixy_2):
    local_index, _ = RELEASED_ENDS[k][i]
    ratio = local_index / (k - 2) if k > 2 else 0
    return ixx_1 * (1 - ratio) + ixx_2 * ratio, ixy_1 * (1 - ratio) + ixy_2 * ratio


def solve_lambdas(loss_fn, recon_shape, classes):
    """(λ1, λ2) of ``λ1·BCE + λ2·task`` from two probes (a 2×2 linear system)."""
    g = torch.Generator().manual_seed(0)
    rows, totals = [], []
    for _ in range(2):
        x = torch.randn(*recon_shape, generator=g)
        y = torch.randint(0, classes, (recon_shape[0],), generator=g)
        out = (torch.rand(*recon_shape, generator=g).clamp(0.05, 0.95),
               torch.randn(recon_shape[0], classes, generator=g) * 3)
        total, m = loss_fn(out, Batch(x, y))
        rows.append([float(m["0.loss"]), float(m["1.loss"])])
        totals.append(float(total))
    return torch.linalg.solve(torch.tensor(rows, dtype=torch.double), torch.tensor(totals, dtype=torch.double))


@pytest.mark.parametrize("k", [8, 15])
def test_infopro_mlaan_lambda_by_stage_matches_the_released_formula(k):
    lambdas = (5.0, 0.5, 1.0, 2.0)  # every coefficient matters
    backbone = mf.from_module(mf.models.resnet32())
    at = mf.published.published_split("resnet32", k)
    assert [[int(p) for p in name.split(".")] for name in at] == RELEASED_ENDS[k][:-1]
    scheme = mf.schemes.infopro_mlaan(backbone, at, lambdas=lambdas, lambda_by="stage", trunks=None)
    checked = 0
    for o in scheme:
        if o.name.endswith(".cascaded"):
            i = int(o.name.split(".")[0][1:])
            got = solve_lambdas(o.loss, (4, 3, 32, 32), 10)
            want = torch.tensor(released_lambdas(i, k, *lambdas), dtype=torch.double)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked == k - 3  # windows of W = 3 end at modules 2 … K-2


def test_stage_fraction_reaches_stage_three():
    assert mf.schemes.stage_fraction("3.4", 15) == 3 / 13
    assert mf.schemes.stage_fraction("1.0", 8) == 1 / 6
    assert mf.schemes.stage_fraction("stem", 16) == 0.0


# ----------------------------------------------------------------------------- SupCon averagings

def released_supcon(features, labels, temperature=0.07, base_temperature=0.07):
    """Transcription of the released InfoPro ``SupConLoss`` (one view, contrast_mode 'all')."""
    features = F.normalize(features, dim=1).unsqueeze(1)
    batch_size = features.shape[0]
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).float()
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature, anchor_count, contrast_count = contrast_feature, 1, 1
    anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(batch_size).view(-1, 1), 0)
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mask_sum = mask.sum(1)
    mask_sum[mask_sum == 0] += 1
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask_sum
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(anchor_count, batch_size).mean()


def khosla_with_positive(features, y, temperature=0.07):
    """Khosla et al. Eq. 2 per anchor, averaged over the anchors that have a positive."""
    f = F.normalize(features, dim=1)
    n, per_anchor = len(y), []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        denom = sum(torch.exp(f[i] @ f[j] / temperature) for j in others)
        pos = [j for j in others if y[j] == y[i]]
        if pos:
            per_anchor.append(sum(-torch.log(torch.exp(f[i] @ f[p] / temperature) / denom) for p in pos) / len(pos))
    return sum(per_anchor) / len(per_anchor)


def with_singleton(seed, n):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    y[0] = 2  # a label that occurs once: anchor 0 has no positive
    y[1:3] = torch.tensor([0, 1])  # and every other label at least twice
    y[3:5] = torch.tensor([0, 1])
    return torch.randn(n, 6, generator=g, dtype=torch.double), y


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(5, 16))
def test_supcon_averagings_equal_their_transcriptions_in_value_and_gradient(seed, n):
    features, y = with_singleton(seed, n)
    batch = Batch(torch.zeros(n, 1, 1, 1), y)
    for anchors, reference in (("all", released_supcon), ("with_positive", khosla_with_positive)):
        f1 = features.clone().requires_grad_(True)
        f2 = features.clone().requires_grad_(True)
        got, _ = losses.supervised_contrastive(0.07, anchors)(f1, batch)
        want = reference(f2, y)
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
        (g1,), (g2,) = torch.autograd.grad(got, f1), torch.autograd.grad(want, f2)
        torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-9)
    # with a singleton the two averagings really differ
    a = losses.supervised_contrastive(0.07, "all")(features, batch)[0]
    p = losses.supervised_contrastive(0.07, "with_positive")(features, batch)[0]
    torch.testing.assert_close(a, p * (n - 1) / n)


def test_supcon_anchors_reach_the_infopro_schemes():
    backbone = mf.from_module(CifarResNet(14, num_classes=5, widths=(4, 8, 8)))
    n, classes = 6, 5
    x = torch.randn(n, 3, 8, 8)
    y = torch.tensor([0, 0, 1, 1, 2, 4])
    out = (torch.rand(n, 3, 8, 8).clamp(0.05, 0.95), torch.randn(n, 128, dtype=torch.float))
    values = {}
    for anchors in ("all", "with_positive"):
        for method in ("infopro", "infopro_mlaan"):
            scheme = mf.schemes.build(method, backbone, ["1.1", "2.1", "3.0"], input_shape=(3, 8, 8),
                                      supcon_anchors=anchors, lambdas=(0.0, 1.0, 0.0, 1.0))
            o = next(o for o in scheme if o.name in ("m0", "m2.independent"))
            values[anchors, method] = float(o.loss(out, Batch(x, y))[1]["1.loss"])
    for method in ("infopro", "infopro_mlaan"):
        assert values["all", method] == pytest.approx(values["with_positive", method] * 4 / 6)
    with pytest.raises(ValueError, match="anchors"):
        losses.supervised_contrastive(0.07, "mean")


# ----------------------------------------------------------------------------- reconstruction memory

def test_reconstruction_loss_and_metric_do_not_keep_the_per_pixel_buffer():
    shape = (64, 3, 32, 32)
    recon, x = torch.rand(*shape).clamp(0.05, 0.95), torch.randn(*shape)
    batch = Batch(x, torch.zeros(64, dtype=torch.long))
    bce = losses.reconstruction_bce([0.5] * 3, [0.25] * 3)
    with track_memory() as meter:
        loss, metrics = bce(recon, batch)
    assert meter.live_bytes < 1024, meter.report()  # the loss and its metric: a few bytes
    # the same under the engine's transform: the value it returns is small too
    _, report = peak_live_bytes(torch.func.grad_and_value(lambda r: bce(r, batch)[0]), recon)
    assert report.live_bytes - recon.nbytes < 1024, report


def reference_bce(mean, std):
    """Reconstruction BCE whose 0-d loss owns its storage (the per-pixel buffer dies at once)."""
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)

    def loss(output, batch):
        value = F.binary_cross_entropy(output, (batch.x * s + m).clamp(0, 1), reduction="none").mean()
        return value, {"loss": value.detach()}
    return loss


def test_infopro_step_peak_is_that_without_the_aliasing():
    backbone = mf.from_module(CifarResNet(14, num_classes=5, widths=(4, 8, 8)))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    scheme = mf.schemes.infopro(backbone, ["1.1", "2.1"], input_shape=(3, 32, 32), mean=mean, std=std,
                                contrastive=False)
    reference = [attrs.evolve(o, loss=losses.weighted_sum((reference_bce(mean, std), 1.0),
                                                          (losses.cross_entropy, 0.5)))
                 if o.name != "final" else o for o in scheme]
    opt = mf.optim.sgd(0.1)
    batch = (torch.randn(64, 3, 32, 32), torch.arange(64) % 5)
    peaks = []
    for s in (scheme, reference):
        ts = mf.init(s, opt, seed=0)
        _, report = peak_live_bytes(mf.step(s, opt), ts, batch)
        peaks.append(report.peak_bytes)
    buffer = 64 * 3 * 32 * 32 * 4
    assert peaks[0] < peaks[1] + buffer // 8, (peaks, buffer)


# ----------------------------------------------------------------------------- the released DGL head

def released_1c2f(inplanes, class_num=10, feature_dim=128):
    """Transcription of the released ``AuxClassifier(net_config='1c2f', loss_mode='cross_entropy')``."""
    out = {16: (32, 2), 32: (64, 2), 64: (64, 1)}[inplanes]
    return nn.Sequential(
        nn.Conv2d(inplanes, out[0], kernel_size=3, stride=out[1], padding=1, bias=False),
        nn.BatchNorm2d(out[0]), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
        nn.Linear(out[0], feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, class_num))


def test_dgl_with_the_released_1c2f_head_matches_the_released_classifier():
    backbone = mf.from_module(mf.models.resnet32())
    at = mf.published.published_split("resnet32", 16)
    scheme = mf.schemes.dgl(backbone, at, head="infopro_1c2f")
    assert len(scheme) == 16
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=3)
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (4,), generator=g)
    seen = set()
    for o in scheme[:-1]:
        c = ts.params[o.head.param_names[0]].shape[1]
        shape = {16: (4, 16, 32, 32), 32: (4, 32, 16, 16), 64: (4, 64, 8, 8)}[c]
        h = torch.randn(*shape, generator=g)
        seen.add(c)
        out, _ = o.head.apply(ts.params, ts.state, h, train=True)
        assert out.shape == (4, 10)
        ref = released_1c2f(c)
        values = [ts.params[k] for k in o.head.param_names]
        for p, v in zip(ref.parameters(), values, strict=True):
            assert p.shape == v.shape
            p.data.copy_(v)
        ref.train()
        torch.testing.assert_close(out, ref(h), rtol=1e-5, atol=1e-5)
    assert seen == {16, 32, 64}


def test_infopro_1c2f_head_needs_the_final_width():
    with pytest.raises(ValueError, match="final_width"):
        mf.schemes.classifier_head("infopro_1c2f", (16, 8, 8), 10)
    assert isinstance(mf.schemes.classifier_head("infopro_1c2f", (16, 8, 8), 10, final_width=64),
                      heads.InfoProClassifier)
