"""Recipes of issue #23 (HPFF, neuron groups, AugLocal, MAN, MAN++, PGL): plain-PyTorch oracles
written here from the papers and released code, and the laws through the checkers."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import mlaan_func as mf
from mlaan_func import testing as mt
from mlaan_func.models.resnet import CifarResNet
from oracles import Reference

SETTINGS = settings(deadline=None, max_examples=4)
CLASSES = 5
SHAPE = (3, 8, 8)
WIDTHS = (4, 8, 8)


def small_resnet():
    return CifarResNet(14, num_classes=CLASSES, widths=WIDTHS)


BLOCKS = mf.from_module(small_resnet()).block_names  # stem 1.0 1.1 2.0 2.1 3.0 3.1 classifier


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(n) % CLASSES


def modules_of(model, at):
    """Block names of each module of ``model`` cut after ``at``."""
    names = [n for n, _ in model.named_blocks()]
    ends = [names.index(a) for a in at] + [len(names) - 1]
    return [names[(ends[j - 1] + 1 if j else 0):ends[j] + 1] for j in range(len(ends))]


def head_templates(scheme):
    """Every module block of the heads (inside leap and stack blocks too), by prefix."""
    return {b.prefix: b.module for o in scheme if o.head is not None for top in o.head.blocks
            for b in mf.identity.module_blocks(top)}


def quadrants(t):
    """The 2×2 patches of a map, row by row, cut at h // 2 and w // 2 as the released HPFF."""
    h, w = t.shape[2], t.shape[3]
    return [t[:, :, :h // 2, :w // 2], t[:, :, :h // 2, w // 2:], t[:, :, h // 2:, :w // 2], t[:, :, h // 2:, w // 2:]]


# ----------------------------------------------------------------------------- HPFF

MEAN = torch.tensor(mf.schemes.CIFAR10_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(mf.schemes.CIFAR10_STD).view(1, 3, 1, 1)


def hpff_reference(scheme, at, head, trunk_of=None, w_x=0.001, w_y=0.999, width=2, contrastive=False):
    """HPFF written after the released CIFAR ``InfoProResNet.forward``: module 0 has no loss of
    its own; for 1 ≤ i ≤ K-2, ``w_x · L(aux(E_i(x)))`` and ``w_y · L(patch aux(E_i(E_{i-1}(y))))``;
    the last module ``w_x · CE(E_{K-1}(x)) + w_y · CE(E_{K-1}(E_{K-2}(y)))``."""
    model = small_resnet()
    blocks = dict(model.named_blocks())
    per_module = modules_of(model, at)
    k = len(per_module)
    templates = head_templates(scheme)
    supcon = mf.losses.supervised_contrastive(0.07)

    def task(out, x, y):
        return supcon(out, mf.Batch(x, y))[0] if contrastive else F.cross_entropy(out, y)

    def reference(params, state, xy):
        x, y = xy
        ref = Reference(params, state)
        image = (x * STD + MEAN).clamp(0, 1)

        def run(j, h):
            for b in per_module[j]:
                h = ref.run(b, blocks[b], h)
            return h

        hs = [x]
        for j in range(k):
            hs.append(run(j, hs[-1].detach()).detach())
        total = 0.0
        for i in range(width - 1, k - 1):
            z = hs[i - width + 1]
            for j in range(i - width + 1, i + 1):
                z = run(j, z)
            trunk = trunk_of(i, per_module[i][-1]) if trunk_of else []
            if trunk:
                z = ref.run(f"trunk{i}.{trunk[0]}", blocks[trunk[0]], z) + \
                    ref.run(f"twin.{trunk[0]}", blocks[trunk[0]], z, in_state=True)
                for b in trunk[1:]:
                    z = ref.run(f"trunk{i}.{b}", blocks[b], z)
            chead = templates[f"chead{i}"]
            if head == "dgl":
                logits = [ref.run(f"chead{i}.heads.{q}", chead.heads[q], p) for q, p in enumerate(quadrants(z))]
                cas = F.cross_entropy(sum(logits) / 4, y)
            else:
                lam1, lam2 = mf.losses.infopro_lambdas(i, k, *mf.schemes.DEFAULT_LAMBDAS)
                bce = sum(F.binary_cross_entropy(ref.run(f"chead{i}.decoder.heads.{q}", chead.decoder.heads[q], p), o)
                          for q, (p, o) in enumerate(zip(quadrants(z), quadrants(image))))
                cas = lam1 * bce + lam2 * task(ref.run(f"chead{i}.classifier", chead.classifier, z), x, y)
            ind_out = ref.run(f"head{i}", templates[f"head{i}"], run(i, hs[i]))
            ind = task(ind_out, x, y) if head == "infopro" else F.cross_entropy(ind_out, y)
            total = total + w_y * cas + w_x * ind
        z = hs[k - width]
        for j in range(k - width, k):
            z = run(j, z)
        total = total + w_x * F.cross_entropy(run(k - 1, hs[k - 1]), y) + w_y * F.cross_entropy(z, y)
        total.backward()
        return ref.grads(), {**state, **ref.new_state}

    return reference


def build_hpff(at, **options):
    return mf.schemes.hpff(mf.from_module(small_resnet()), at, input_shape=SHAPE, **options)


@pytest.mark.parametrize("head", ["dgl", "infopro"])
@pytest.mark.parametrize("trunks", [None, "rule"])
def test_hpff_one_step_equals_plain_backward(head, trunks):
    at = ["stem", "1.1", "2.1"]
    scheme = build_hpff(at, head=head, trunks=trunks)
    backbone = mf.from_module(small_resnet())
    trunk_of = (lambda i, end: mf.trunks.leap_trunk_blocks(backbone, end, 4, input_shape=SHAPE)) if trunks else None
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=5)
    mt.check_oracle(scheme, ts, batch(seed=1), hpff_reference(scheme, at, head, trunk_of), rtol=1e-4)


def test_hpff_contrastive_infopro_one_step_equals_plain_backward():
    at = ["1.0", "1.1", "2.1"]
    scheme = build_hpff(at, head="infopro", contrastive=True)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=6)
    xy = batch(n=8, seed=2)   # labels repeat, so the contrastive loss has positives
    mt.check_oracle(scheme, ts, xy, hpff_reference(scheme, at, "infopro", contrastive=True), rtol=1e-4)


def test_hpff_patch_heads_have_their_own_parameters_and_tile_the_image():
    scheme = build_hpff(["1.1", "2.1"], head="infopro")
    cascaded = next(o for o in scheme if o.name == "m1.cascaded")
    decoder = cascaded.head.blocks[0].module.decoder
    recon = decoder(torch.randn(2, 8, 4, 4))
    assert recon.shape == (2, 3, 8, 8) and len(decoder.heads) == 4
    keys = [k for k in cascaded.param_names if ".decoder.heads." in k and k.endswith("layers.1.weight")]
    assert len(keys) == 4


@SETTINGS
@given(at=mt.cut_points(BLOCKS, min_modules=2, max_modules=4), head=st.sampled_from(["dgl", "infopro"]),
       trunks=st.sampled_from([None, "rule"]))
def test_hpff_laws_isolation_and_purity(at, head, trunks):
    scheme = build_hpff(at, head=head, trunks=trunks)
    assert scheme[-1].name == "final" and len({o.name for o in scheme}) == len(scheme)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=0)
    mt.check_isolation(scheme, ts, batch())
    mt.check_purity(mf.step(scheme, opt), ts, batch())


def test_hpff_refuses_an_image_the_patch_decoders_cannot_tile():
    net = mf.from_module(CifarResNet(14, num_classes=CLASSES, in_channels=3, widths=WIDTHS))
    with pytest.raises(ValueError, match="does not split"):
        mf.schemes.hpff(net, ["1.1", "2.1"], input_shape=(3, 9, 9), head="infopro")
    with pytest.raises(ValueError, match="unknown HPFF head"):
        build_hpff(["1.1"], head="linear")


# ----------------------------------------------------------------------------- neuron groups


GROUP_AT = ["5", "11"]


def group_net(groups, grouped=True):
    """Two conv modules of width 8 and a classifier; inside a module every conv after the
    first is grouped when ``grouped`` (the first reads the detached boundary). No conv bias
    before BatchNorm: its gradient is zero up to rounding, which a relative test cannot compare."""
    g = groups if grouped else 1
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=g, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=g, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))


def build_groups(groups, grouped=True, head="dgl", **options):
    return mf.schemes.neuron_groups(mf.from_module(group_net(groups, grouped)), GROUP_AT, groups,
                                    input_shape=SHAPE, head=head, **options)


def released_div_loss(group_logits, labels, temperature):
    """The released GN-DGL ``div_loss_calc``: tempered softmax of each group head, the true
    class removed, renormalised, L2-normalised; the mean over ordered pairs of distinct heads
    and samples of their inner product."""
    probs = torch.softmax(torch.stack(group_logits) / temperature, dim=2)
    heads_, n, classes = probs.shape
    keep = torch.ones(n, classes)
    keep[range(n), labels] = 0
    probs = probs * keep.unsqueeze(0)
    probs = probs / (probs.sum(dim=2, keepdim=True) + 1e-8)
    probs = probs / torch.sqrt((probs ** 2).sum(dim=2, keepdim=True) + 1e-8)
    cov = torch.einsum("kij,lij->ikl", probs, probs)
    return (cov * (1 - torch.eye(heads_))).sum() / (n * (heads_ - 1) * heads_)


def groups_reference(scheme, groups, grouped, diversity=0.0, temperature=3.0):
    """Neuron groups in plain PyTorch, after the released ``InfoProResNet.forward``: each
    module runs on the detached boundary; group ``g``'s head reads the module output with the
    channels of the other groups detached; the module's loss is the sum of the group CEs plus
    ``diversity · div_loss`` over its group heads' logits, one backward."""
    model = group_net(groups, grouped)
    layers = dict(model.named_children())
    per_module = [[str(j) for j in range(6)], [str(j) for j in range(6, 12)], [str(j) for j in range(12, 15)]]
    templates = head_templates(scheme)

    def reference(params, state, xy):
        x, y = xy
        ref = Reference(params, state)
        h, total = x, 0.0
        for i, names in enumerate(per_module):
            h = h.detach()
            for b in names:
                h = ref.run(b, layers[b], h)
            if i == len(per_module) - 1:
                total = total + F.cross_entropy(h, y)
                break
            width, logits = h.shape[1] // groups, []
            for g in range(groups):
                x_detached = h.clone().detach()
                x_detached[:, g * width:(g + 1) * width] = h[:, g * width:(g + 1) * width].clone()
                logits.append(ref.run(f"head{i}.{g}", templates[f"head{i}.{g}"], x_detached))
                total = total + F.cross_entropy(logits[-1], y)
            if diversity:
                total = total + diversity * released_div_loss(logits, y, temperature)
        total.backward()
        return ref.grads(), {**state, **ref.new_state}

    return reference


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("diversity", [0.0, 0.5])
def test_neuron_groups_one_step_equals_plain_backward(groups, grouped, diversity):
    scheme = build_groups(groups, grouped, diversity=diversity)
    assert [o.name for o in scheme][:groups] == [f"m0.g{g}" for g in range(groups)]
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=2)
    mt.check_oracle(scheme, ts, batch(seed=3), groups_reference(scheme, groups, grouped, diversity), rtol=1e-4)


def test_neuron_groups_diversity_reads_the_other_heads_and_changes_the_step():
    plain, diverse = build_groups(2, diversity=0.0), build_groups(2, diversity=2.0, temperature=1.5)
    assert [o.reads for o in plain] == [()] * 5
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in diverse[0].reads} == {"head0.1"}
    ts = mf.init(plain, mf.optim.sgd(0.1), seed=2)
    a = mf.gradients(plain)(ts, batch(seed=3)).grads
    b = mf.gradients(diverse)(ts, batch(seed=3)).grads
    assert set(a) == set(b) and not torch.allclose(a["head0.0.layers.1.weight"], b["head0.0.layers.1.weight"])
    mt.check_oracle(diverse, ts, batch(seed=3), groups_reference(diverse, 2, True, 2.0, 1.5), rtol=1e-4)


@SETTINGS
@given(groups=st.sampled_from([2, 4, 8]), head=st.sampled_from(["dgl", "linear"]), seed=mt.seeds,
       diversity=st.sampled_from([0.0, 0.5]))
def test_neuron_groups_are_isolated_width_wise_with_grouped_convolutions(groups, head, seed, diversity):
    scheme = build_groups(groups, grouped=True, head=head, diversity=diversity)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=seed)
    rows = mt.expected_rows(scheme, ts.params)
    assert rows[0]["3.weight"] == (0, 8 // groups) and rows[-1] == {}
    mt.check_isolation(scheme, ts, batch(seed=seed % 7))
    mt.check_purity(mf.step(scheme, opt), ts, batch(seed=seed % 5))


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("diversity", [0.0, 0.5])
def test_a_neuron_group_build_without_grouped_convolutions_fails_the_checker(groups, diversity):
    scheme = build_groups(groups, grouped=False, diversity=diversity)
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    mt.check_isolation(scheme, ts, batch(), rows=[{} for _ in scheme])   # by name alone it passes
    with pytest.raises(AssertionError, match=r"m0\.g0.*rows of '0\.weight' outside its channel group"):
        mt.check_isolation(scheme, ts, batch())


def test_width_that_does_not_split_into_groups_is_refused():
    scheme = build_groups(3, grouped=False)
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        mt.expected_rows(scheme, ts.params)


def loaded(prefix, template, ts):
    """``template`` in eval mode holding the train state's tensors under ``prefix``."""
    m = copy.deepcopy(template).eval()
    for k, v in [*m.named_parameters(), *m.named_buffers()]:
        v.data.copy_({**ts.params, **ts.state}[f"{prefix}.{k}"])
    return m


def trained_groups(diversity):
    scheme = build_groups(2, diversity=diversity)
    opt = mf.optim.sgd(0.1)
    ts = mf.init(scheme, opt)
    ts, _ = mf.step(scheme, opt)(ts, batch(seed=1))
    return scheme, ts


@pytest.mark.parametrize("diversity", [0.0, 0.5])
def test_ensemble_metric_is_the_mean_softmax_of_the_group_heads(diversity):
    scheme, ts = trained_groups(diversity)
    templates = head_templates(scheme)
    xy = batch(n=8, seed=4)
    model = mf.to_module(mf.from_module(group_net(2)), ts.params, ts.state).eval()
    probs, h = [], xy[0]
    with torch.no_grad():
        for i, (start, stop) in enumerate(((0, 6), (6, 12))):
            for block in list(model.blocks)[start:stop]:
                h = block(h)
            probs.append([loaded(f"head{i}.{g}", templates[f"head{i}.{g}"], ts)(h).softmax(dim=1) for g in range(2)])
        for block in list(model.blocks)[12:]:
            h = block(h)
        probs.append([h.softmax(dim=1)])
    last = [o for o in scheme if o.name.startswith("m1.")]
    got = mf.evaluate(scheme, ts, [xy], select=None, metrics={
        "ensemble": mf.schemes.ensemble_metric(last), "layerwise": mf.schemes.ensemble_metric(scheme, layerwise=True)})
    want = float((sum(probs[1]).argmax(dim=1) == xy[1]).float().mean())
    assert abs(got["ensemble"]["accuracy"] - want) < 1e-6
    # the released layerwise ensemble: module i's mean softmax weighted 2^i / (1 + 2 + 4)
    mixed = sum(2 ** i / 7 * torch.stack(p).mean(dim=0) for i, p in enumerate(probs))
    want = float((mixed.argmax(dim=1) == xy[1]).float().mean())
    assert abs(got["layerwise"]["accuracy"] - want) < 1e-6


# ----------------------------------------------------------------------------- AugLocal

def released_aux(in_width, widths, classes):
    """The released ``AuxNetwork('unifSamp')`` for a map of ``in_width`` channels and sampled
    layer widths: BasicBlocks with one stride 2 per width doubling, pool, BN1d at depth ≤ 1,
    linear; laid out with the library head's indices so its tensors load by name."""
    from mlaan_func.models.resnet import BasicBlock
    layers, c, pools = [], in_width, 0
    for w in widths:
        pools += {1: 0, 2: 1, 4: 2}[w // c]
        stride = 2 if pools >= 1 else 1
        pools -= 1 if stride == 2 else 0
        layers.append(BasicBlock(c, w, stride))
        c = w
    layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    if len(widths) <= 1:
        layers.append(nn.BatchNorm1d(c))
    return nn.Sequential(*layers, nn.Linear(c, classes))


def auglocal_reference(at, depth):
    model = small_resnet()
    blocks = dict(model.named_blocks())
    names = list(blocks)[:-1]
    widths = [WIDTHS[0]] + [WIDTHS[int(n[0]) - 1] for n in names[1:]]   # stem, then by stage
    per_module = modules_of(model, at)
    k = len(per_module)

    def reference(params, state, xy):
        x, y = xy
        ref = Reference(params, state)
        h, total = x, 0.0
        for i, module in enumerate(per_module):
            h = h.detach()
            for b in module:
                h = ref.run(b, blocks[b], h)
            if i == k - 1:
                total = total + F.cross_entropy(h, y)
                break
            d = max(1, round(depth * (1 - i / (k - 2)) + i / (k - 2))) if k > 2 else depth
            last = names.index(module[-1])
            rest = len(names) - 1 - last
            picks = list(range(last + 1, len(names))) if d >= rest else \
                [round(last + rest / d * j) for j in range(1, d + 1)]
            aux = released_aux(widths[last], [widths[j] for j in picks], CLASSES)
            total = total + F.cross_entropy(ref.run(f"aux{i}.layers", aux, h), y)
        total.backward()
        return ref.grads(), {**state, **ref.new_state}

    return reference


def build_auglocal(at, **options):
    return mf.schemes.auglocal(mf.from_module(small_resnet()), at, input_shape=SHAPE, **options)


@pytest.mark.parametrize("at", [["stem", "1.0", "2.0"], ["1.0", "2.1"], ["stem", "1.0", "1.1", "2.0", "2.1"]])
@pytest.mark.parametrize("depth", [1, 3])
def test_auglocal_one_step_equals_plain_backward(at, depth):
    scheme = build_auglocal(at, depth=depth)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=4)
    mt.check_oracle(scheme, ts, batch(seed=2), auglocal_reference(at, depth), rtol=1e-4)


def test_auglocal_aux_nets_are_fresh_and_shrink_deeper_up():
    scheme = build_auglocal(["stem", "1.0", "1.1", "2.0", "2.1"], depth=4)
    depths = [sum(isinstance(m, mf.models.BasicBlock) for m in o.head.blocks[0].module.layers) for o in scheme[:-1]]
    assert depths == mf.schemes.auglocal_depths(6, 4) == [4, 3, 2, 2, 1]   # round(2.5) = 2: halves to even
    params, _ = mf.init_params(scheme)
    assert not torch.equal(params["aux1.layers.0.conv1.weight"], params["aux2.layers.0.conv1.weight"])


@SETTINGS
@given(at=mt.cut_points(BLOCKS, min_modules=2, max_modules=5), depth=st.integers(1, 4), pyramid=st.booleans())
def test_auglocal_laws_isolation_and_purity(at, depth, pyramid):
    scheme = build_auglocal(at, depth=depth, pyramid=pyramid)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=1)
    mt.check_isolation(scheme, ts, batch())
    mt.check_purity(mf.step(scheme, opt), ts, batch())


# ----------------------------------------------------------------------------- MAN

def man_reference(scheme, at, head, scaled=False):
    """MAN after the released CIFAR ``InfoProResNet.forward``: ``y = LB_i(x) + EMA_i(x)`` on
    module ``i``'s output, LB and EMA copies of the next module's first block; the heads score
    ``y`` with λ at ``stage / (K-2)`` of that block; the last module on the classifier.
    ``scaled``: MAN++ after the released ``resnetInfoPro_MANPP`` / ``resnetDGL_MANPP``,
    ``y = s_i·LB_i(x) + (2 - s_i)·EMA_i(x)`` with ``s_i`` an ``nn.Parameter`` (``ema_s[i]``)."""
    model = small_resnet()
    blocks = dict(model.named_blocks())
    per_module = modules_of(model, at)
    k = len(per_module)
    templates = head_templates(scheme)

    def reference(params, state, xy):
        x, y = xy
        ref = Reference(params, state)
        image = (x * STD + MEAN).clamp(0, 1)
        h, total, ema_s = x, 0.0, {}
        for i, module in enumerate(per_module):
            h = h.detach()
            for b in module:
                h = ref.run(b, blocks[b], h)
            if i == k - 1:
                total = total + F.cross_entropy(h, y)
                break
            first = per_module[i + 1][0]
            if first == "classifier":
                z = h
            elif scaled:
                s = ema_s[f"lb{i}.scale"] = torch.nn.Parameter(params[f"lb{i}.scale"].detach().clone())
                z = s * ref.run(f"lb{i}.{first}", blocks[first], h) + \
                    (2 - s) * ref.run(f"twin.{first}", blocks[first], h, in_state=True)
            else:
                z = ref.run(f"lb{i}.{first}", blocks[first], h) + ref.run(f"twin.{first}", blocks[first], h, in_state=True)
            aux = templates[f"head{i}"]
            if head == "dgl":
                total = total + F.cross_entropy(ref.run(f"head{i}", aux, z), y)
                continue
            ratio = int(first.split(".")[0]) / (k - 2) if k > 2 and first[0].isdigit() else 0.0
            ratio = min(ratio, 1.0)   # released: unbounded, so λ < 0 past stage K-2 (the recipe holds it at 1)
            ixx_1, ixy_1, ixx_2, ixy_2 = mf.schemes.DEFAULT_LAMBDAS
            lam1, lam2 = ixx_1 * (1 - ratio) + ixx_2 * ratio, ixy_1 * (1 - ratio) + ixy_2 * ratio
            bce = F.binary_cross_entropy(ref.run(f"head{i}.decoder", aux.decoder, z), image)
            total = total + lam1 * bce + lam2 * F.cross_entropy(ref.run(f"head{i}.classifier", aux.classifier, z), y)
        total.backward()
        return {**ref.grads(), **{k: v.grad for k, v in ema_s.items()}}, {**state, **ref.new_state}

    return reference


def build_man(at, scaled=False, **options):
    recipe = mf.schemes.man_pp if scaled else mf.schemes.man
    return recipe(mf.from_module(small_resnet()), at, input_shape=SHAPE, **options)


@pytest.mark.parametrize("head", ["infopro", "dgl"])
@pytest.mark.parametrize("at", [["stem", "1.1", "2.1"], ["1.0", "2.0", "3.1"]])
def test_man_one_step_equals_plain_backward_and_twins_follow_the_next_block(head, at):
    scheme = build_man(at, head=head)
    opt = mf.optim.sgd(0.5)
    ts = mf.init(scheme, opt, seed=7)
    xy = batch(seed=5)
    reference = man_reference(scheme, at, head)
    mt.check_oracle(scheme, ts, xy, reference, rtol=1e-4)
    grads, _ = reference(ts.params, ts.state, xy)
    new, _ = mf.step(scheme, opt)(ts, xy)
    twins = [key for key in ts.state if key.startswith("twin.") and key[5:] in ts.params]
    for first in (m[0] for m in modules_of(small_resnet(), at)[1:] if m[0] != "classifier"):
        assert any(key.startswith(f"twin.{first}.") for key in twins), first
    for key in twins:
        src = key[len("twin."):]
        mt.assert_close(new.state[key], 0.995 * ts.state[key] + 0.005 * (ts.params[src] - 0.5 * grads[src]), 1e-4, key)


@SETTINGS
@given(at=mt.cut_points(BLOCKS, min_modules=2, max_modules=5), head=st.sampled_from(["infopro", "dgl"]))
def test_man_laws_isolation_and_purity(at, head):
    scheme = build_man(at, head=head)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=3)
    assert not any(k.startswith("twin") for k in ts.params)
    mt.check_isolation(scheme, ts, batch())
    mt.check_purity(mf.step(scheme, opt), ts, batch())


# ----------------------------------------------------------------------------- MAN++

@pytest.mark.parametrize("head", ["infopro", "dgl"])
@pytest.mark.parametrize("at", [["stem", "1.1", "2.1"], ["1.0", "2.0", "3.1"]])
def test_man_pp_one_step_equals_plain_backward_with_the_learnable_blend(head, at):
    scheme = build_man(at, scaled=True, head=head)
    opt = mf.optim.sgd(0.5)
    ts = mf.init(scheme, opt, seed=7)
    scales = sorted(k for k in ts.params if k.endswith(".scale"))
    assert scales == [f"lb{i}.scale" for i, m in enumerate(modules_of(small_resnet(), at)[1:]) if m[0] != "classifier"]
    # copy and twin start equal (leap_ema), where s has no gradient (s·y + (2 - s)·y = 2y): move the
    # twins as a few steps would, and s away from 1, so that the blend's two sides weigh differently
    ts = ts._replace(params={**ts.params, **{k: torch.tensor(0.7 + 0.2 * j) for j, k in enumerate(scales)}},
                     state={k: 0.9 * v if k.startswith("twin.") and v.is_floating_point() else v
                            for k, v in ts.state.items()})
    xy = batch(seed=5)
    reference = man_reference(scheme, at, head, scaled=True)
    mt.check_oracle(scheme, ts, xy, reference, rtol=1e-4)
    grads, _ = reference(ts.params, ts.state, xy)
    moved = [bool(grads[k].abs() > 0) for k in scales]
    # InfoPro's λ at stage / (K-2) is (0, 0) for a block of the last stage but one at K = 4: no loss there
    assert all(moved) if head == "dgl" else any(moved)
    new, _ = mf.step(scheme, opt)(ts, xy)
    for k in scales:
        mt.assert_close(new.params[k], ts.params[k] - 0.5 * grads[k], 1e-5, k)


def test_man_pp_at_its_initial_blend_is_man():
    at = ["1.0", "2.0", "3.1"]
    plain, blended = build_man(at, head="dgl"), build_man(at, scaled=True, head="dgl")
    ts = mf.init(blended, mf.optim.sgd(0.1), seed=1)
    a = mf.gradients(plain)(ts._replace(params={k: v for k, v in ts.params.items() if not k.endswith(".scale")}),
                            batch(seed=2)).grads
    b = mf.gradients(blended)(ts, batch(seed=2)).grads
    assert all(float(ts.params[k]) == 1.0 for k in b if k.endswith(".scale"))
    mt.assert_close({k: v for k, v in b.items() if k in a}, a, 1e-5, "gradient")


def test_the_generic_reference_exports_the_learnable_blend():
    """``testing.reference_gradients`` (the scheme as plain modules) carries ``s`` too."""
    scheme = build_man(["1.0", "2.0", "3.1"], scaled=True, head="dgl")
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=4)
    ts = ts._replace(params={**ts.params, "lb1.scale": torch.tensor(1.3)},
                     state={k: 0.8 * v if k.startswith("twin.") and v.is_floating_point() else v
                            for k, v in ts.state.items()})
    mt.check_oracle(scheme, ts, batch(seed=6), rtol=1e-4)


@SETTINGS
@given(at=mt.cut_points(BLOCKS, min_modules=2, max_modules=5), head=st.sampled_from(["infopro", "dgl"]))
def test_man_pp_laws_isolation_and_purity(at, head):
    scheme = build_man(at, scaled=True, head=head)
    opt = mf.optim.sgd(0.1, momentum=0.9)
    ts = mf.init(scheme, opt, seed=3)
    assert not any(k.startswith("twin") for k in ts.params)
    mt.check_isolation(scheme, ts, batch())
    mt.check_purity(mf.step(scheme, opt), ts, batch())
    assert mf.labels.by_objective(scheme)(ts.params).get("lb0.scale", "trunks") == "trunks"


# ----------------------------------------------------------------------------- PGL

def load_blocks(named, tensors, prefix=""):
    """Each module of ``named`` with its tensors from ``tensors`` (keys ``"<prefix><name>.<local>"``)."""
    for name, module in named.items():
        for k, v in [*module.named_parameters(), *module.named_buffers()]:
            v.data.copy_(tensors[f"{prefix}{name}.{k}"])
    return named


@pytest.mark.parametrize("every", [2, 3])
def test_pgl_equals_torch_sgd_with_heads_skipped_on_global_steps(every):
    """PGL in plain PyTorch: one ``torch.optim.SGD`` (momentum, weight decay) over the backbone
    and the heads; a global step backpropagates the backbone's CE end to end, so the heads'
    gradients are ``None`` and ``torch.optim`` leaves them (and their momentum) alone."""
    at = ["1.1", "2.1"]
    backbone = mf.from_module(small_resnet())
    local, whole = mf.schemes.dgl(backbone, at, input_shape=SHAPE), mf.schemes.e2e(backbone)
    opt = mf.optim.sgd(0.05, momentum=0.9, weight_decay=5e-4)
    ts = mf.init(local, opt, seed=3)
    train_step = mf.step(mf.schemes.pgl(local, whole, every=every), opt)

    model, templates = small_resnet().train(), head_templates(local)
    blocks = load_blocks(dict(model.named_blocks()), {**ts.params, **ts.state})
    aux = load_blocks({k: copy.deepcopy(v).train() for k, v in templates.items()}, {**ts.params, **ts.state})
    torch_opt = torch.optim.SGD([p for m in [*blocks.values(), *aux.values()] for p in m.parameters()],
                                lr=0.05, momentum=0.9, weight_decay=5e-4)
    per_module = modules_of(model, at)
    for i in range(2 * every + 1):
        x, y = batch(seed=10 + i)
        ts, metrics = train_step(ts, (x, y))
        torch_opt.zero_grad(set_to_none=True)
        h, total, is_global = x, 0.0, i % every == every - 1
        assert ("global.final" in metrics) == is_global and ("m0" in metrics) != is_global
        for j, names in enumerate(per_module):
            h = h if is_global else h.detach()
            for b in names:
                h = blocks[b](h)
            if j < len(per_module) - 1 and not is_global:
                total = total + F.cross_entropy(aux[f"head{j}"](h), y)
        (total + F.cross_entropy(h, y)).backward()
        torch_opt.step()
    want = {f"{n}.{k}": v.detach() for group in (blocks, aux) for n, m in group.items()
            for k, v in [*m.named_parameters(), *m.named_buffers()]}
    mt.assert_close(ts.params, {k: want[k] for k in ts.params}, 1e-4, "params")
    mt.assert_close(ts.state, {k: want[k] for k in ts.state}, 1e-4, "state")


def test_pgl_global_step_keeps_untouched_adam_moments_and_advances_the_shared_count():
    backbone = mf.from_module(small_resnet())
    local, whole = mf.schemes.dgl(backbone, ["1.1"], input_shape=SHAPE), mf.schemes.e2e(backbone)
    opt = mf.optim.adamw(1e-2)
    ts = mf.init(local, opt)
    train_step = mf.step(mf.schemes.pgl(local, whole, every=2), opt)
    ts, _ = train_step(ts, batch(seed=0))
    before = ts
    ts, _ = train_step(ts, batch(seed=1))   # step 1: global
    adam = ts.opt_state[0]
    heads = [k for k in ts.params if k.startswith("head0.")]
    assert heads and int(adam.count) == 2
    for k in heads:
        assert torch.equal(ts.params[k], before.params[k])
        assert torch.equal(adam.mu[k], before.opt_state[0].mu[k]) and torch.equal(adam.nu[k], before.opt_state[0].nu[k])
    assert not torch.equal(ts.params["stem.conv.weight"], before.params["stem.conv.weight"])


def test_pgl_refuses_a_global_scheme_over_other_parameters_and_a_bad_period():
    backbone = mf.from_module(small_resnet())
    local = mf.schemes.dgl(backbone, ["1.1"], input_shape=SHAPE)
    other = mf.schemes.e2e(mf.from_module(small_resnet(), name="other"))
    with pytest.raises(ValueError, match="does not hold"):
        mf.schemes.pgl(local, other, every=2)
    with pytest.raises(ValueError, match="positive int"):
        mf.schemes.pgl(local, mf.schemes.e2e(backbone), every=0)
