"""Language-model local learning: sequence cross-entropy, the decoder-only LM, the local
scheme against plain PyTorch, and the example program."""

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch
from hypothesis import given, settings
from torch.nn import functional as F

import mlaan_func as mf
from mlaan_func import testing as mt
from oracles import Reference

VOCAB, CONTEXT = 16, 8
ROOT = Path(__file__).resolve().parents[1]


def lm():
    return mf.models.lm_micro(vocab_size=VOCAB, context=CONTEXT)


def tokens(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    sequence = torch.randint(0, VOCAB, (n, CONTEXT + 1), generator=g)
    return sequence[:, :-1], sequence[:, 1:]


def test_sequence_cross_entropy_is_the_token_mean_of_torch_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits, (x, y) = torch.randn(3, 5, 7, generator=g), (torch.zeros(3, 5, dtype=torch.long),
                                                         torch.randint(0, 7, (3, 5), generator=g))
    loss, metrics = mf.losses.sequence_cross_entropy(logits, (x, y))
    want = sum(F.cross_entropy(logits[i, t][None], y[i, t][None]) for i in range(3) for t in range(5)) / 15
    mt.assert_close(loss, want)
    assert float(metrics["accuracy"]) == float((logits.argmax(-1) == y).float().mean())
    with pytest.raises(ValueError, match=r"need targets of shape \(3, 5\)"):
        mf.losses.sequence_cross_entropy(logits, (x, y[:, :4]))
    with pytest.raises(ValueError, match="for \\(N, V\\) logits use cross_entropy"):
        mf.losses.sequence_cross_entropy(logits[:, 0], (x, y))


def test_the_lm_is_causal_and_its_net_is_the_module():
    model = lm().eval()
    net = mf.from_module(model)
    mt.check_equivalent(model, net, [tokens()[0]])
    x = tokens()[0]
    changed = x.clone()
    changed[:, 5] = (changed[:, 5] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.equal(a[:, :5], b[:, :5]) and not torch.equal(a[:, 5:], b[:, 5:])


def lm_reference(at):
    """Module ``i`` runs on the detached boundary; its readout copy scores next tokens."""
    model = lm()
    blocks = dict(model.named_blocks())
    names = list(blocks)
    ends = [names.index(a) for a in at] + [len(names) - 1]
    per_module = [names[(ends[j - 1] + 1 if j else 0):ends[j] + 1] for j in range(len(ends))]

    def reference(params, state, xy):
        x, y = xy
        ref = Reference(params, state)
        h, total = x, 0.0
        for i, module in enumerate(per_module):
            h = h.detach()
            for b in module:
                h = ref.run(b, blocks[b], h)
            out = h if i == len(per_module) - 1 else ref.run(f"readout{i}.readout", blocks["readout"], h)
            total = total + F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
        total.backward()
        return ref.grads(), {**state, **ref.new_state}

    return reference


@pytest.mark.parametrize("at", [["blocks.1"], ["embed", "blocks.0", "blocks.2"]])
def test_lm_local_one_step_equals_plain_backward(at):
    scheme = mf.schemes.lm_local(mf.from_module(lm()), at, shared=False)
    ts = mf.init(scheme, mf.optim.adamw(1e-3), seed=2)
    mt.check_oracle(scheme, ts, tokens(seed=3), lm_reference(at), rtol=1e-4)


@settings(deadline=None, max_examples=4)
@given(at=mt.cut_points(mf.from_module(lm()).block_names, min_modules=2, max_modules=4),
       batch=mt.token_batches(VOCAB, CONTEXT))
def test_lm_local_laws_isolation_and_purity(at, batch):
    scheme = mf.schemes.lm_local(mf.from_module(lm()), at, shared=False)
    opt = mf.optim.adamw(1e-3)
    ts = mf.init(scheme, opt)
    p, _ = mf.init_params(scheme)
    assert torch.equal(p["readout0.readout.unembed.weight"], p["readout.unembed.weight"])
    mt.check_isolation(scheme, ts, batch)
    mt.check_purity(mf.step(scheme, opt), ts, batch)


def test_lm_example_trains_both_and_reports_perplexity():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "lm_local.py"), "--steps", "40"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    found = dict(re.findall(r"^(e2e|local) .*perplexity ([\d.]+)", r.stdout, re.MULTILINE))
    assert set(found) == {"e2e", "local"}, r.stdout
    for value in found.values():
        assert 1.0 < float(value) < VOCAB * 2


def shared_reference(at):
    """SOLO-style: module ``i`` scores its next tokens through the final readout itself, with
    the readout's parameters detached; only the final module trains the readout."""
    model = lm()
    blocks = dict(model.named_blocks())
    names = list(blocks)
    ends = [names.index(a) for a in at] + [len(names) - 1]
    per_module = [names[(ends[j - 1] + 1 if j else 0):ends[j] + 1] for j in range(len(ends))]

    def reference(params, state, xy):
        x, y = xy
        ref = Reference(params, state)
        readout = blocks["readout"]
        h, total = x, 0.0
        for i, module in enumerate(per_module):
            h = h.detach()
            for b in module:
                h = ref.run(b, blocks[b], h)
            if i < len(per_module) - 1:
                frozen_out = torch.func.functional_call(
                    readout, {n: params[f"readout.{n}"].detach() for n, _ in readout.named_parameters()}, (h,))
                total = total + F.cross_entropy(frozen_out.reshape(-1, VOCAB), y.reshape(-1))
            else:
                total = total + F.cross_entropy(h.reshape(-1, VOCAB), y.reshape(-1))
        total.backward()
        return ref.grads(), {**state, **ref.new_state}

    return reference


@pytest.mark.parametrize("at", [["blocks.1"], ["embed", "blocks.0", "blocks.2"]])
def test_shared_readout_one_step_equals_plain_backward(at):
    scheme = mf.schemes.lm_local(mf.from_module(lm()), at)
    ts = mf.init(scheme, mf.optim.adamw(1e-3), seed=2)
    assert not any(k.startswith("readout0") for k in ts.params)   # no copies: one readout
    mt.check_oracle(scheme, ts, tokens(seed=3), shared_reference(at), rtol=1e-4)
    mt.check_isolation(scheme, ts, tokens(seed=3))


def test_a_view_follows_its_source_without_refresh_and_never_trains_it():
    net = mf.from_module(lm())
    scheme = mf.schemes.lm_local(net, ["blocks.1"])
    opt = mf.optim.sgd(0.5)
    ts = mf.init(scheme, opt, seed=1)
    ts2, _ = mf.step(scheme, opt)(ts, tokens(seed=4))
    assert not torch.equal(ts2.params["readout.unembed.weight"], ts.params["readout.unembed.weight"])
    # the view reads the updated readout at once: m0 scored through the readout itself, in eval mode
    plain = [attrs.evolve(scheme[0], head=net.block("readout")), scheme[1]]
    got = mf.evaluate(scheme, ts2, [tokens(seed=5)], select="loss")
    want = mf.evaluate(plain, ts2, [tokens(seed=5)], select="loss")
    assert got == want


def test_a_view_whose_source_nobody_trains_is_refused():
    net = mf.from_module(lm())
    head_only = [mf.local_loss(mf.split(net, ["blocks.1"])[0], mf.frozen(net.block("readout")),
                               mf.losses.sequence_cross_entropy, name="m0")]
    with pytest.raises(ValueError, match="no objective of the scheme trains them"):
        mf.gradients(head_only)
