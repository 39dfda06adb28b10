"""Host reads in a training step (docs/design.md §4, "host reads"): the default step of every
published scheme reads the device once (the finite flag), and not at all without the
non-finite check; value checks are deferred inside the step and still name their cause."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import mlaan_func as mf
from mlaan_func.testing import count_host_reads

SHAPE = (3, 8, 8)


def published(method: str, dropout: bool = False, classes: int = 5):
    net = mf.from_module(mf.models.CifarResNet(14, num_classes=classes, widths=(4, 8, 8)))
    if dropout:
        drop = mf.from_module(nn.Dropout(0.25), name="drop").blocks[0]
        net = mf.core.Net((net.blocks[0], drop, *net.blocks[1:]))
    return mf.schemes.build(method, net, ["1.0", "1.1", "2.1"], input_shape=SHAPE)


def batch(seed: int = 0, labels: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, *SHAPE, generator=g), torch.randint(0, 5, (6,), generator=g)
    return x, (y if labels is None else labels)


def reads_of_a_step(scheme, **options) -> count_host_reads:
    opt = mf.optim.sgd(0.1, momentum=0.9)
    step = mf.step(scheme, opt, **options)
    ts, _ = step(mf.init(scheme, opt, seed=0), batch(0))  # the first step may probe randomness
    with count_host_reads() as reads:
        step(ts, batch(1))
    return reads


@pytest.mark.parametrize("method", mf.schemes.SCHEMES)
def test_the_default_step_reads_the_device_once_for_the_finite_flag(method):
    reads = reads_of_a_step(published(method))
    assert reads.count == 1, f"{method}: {reads.count} host reads per step, at {dict(reads.where)}"


@pytest.mark.parametrize("method", ["dgl", "mlaan"])
def test_without_the_finite_check_a_step_reads_nothing(method):
    reads = reads_of_a_step(published(method), check_finite=False)
    assert reads.count == 0, dict(reads.where)


def test_a_scheme_that_draws_reads_key_and_step_once_more():
    reads = reads_of_a_step(published("dgl", dropout=True))
    assert reads.count == 3, dict(reads.where)  # the finite flag, the key, the step


def test_the_counter_sees_a_read_inside_a_loss():
    """The law's checker can fail: a loss that reads its value on the host is counted."""
    def reading_loss(output, b):
        loss = F.cross_entropy(output, b[1])
        return loss, {"loss": torch.tensor(loss.item())}

    scheme = [mf.local_loss(mf.from_module(nn.Sequential(nn.Flatten(), nn.Linear(192, 5))), None, reading_loss)]
    assert reads_of_a_step(scheme).count == 2


def test_labels_out_of_range_in_a_step_name_the_classes_and_update_nothing():
    scheme = published("dgl")
    opt = mf.optim.sgd(0.1)
    ts = mf.init(scheme, opt, seed=0)
    step = mf.step(scheme, opt)
    before = {k: v.clone() for k, v in ts.params.items()}
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\).*from 0 to 7.*num_classes=8"):
        step(ts, batch(0, labels=torch.tensor([0, 1, 7, 2, 3, 4])))
    assert all(torch.equal(before[k], v) for k, v in ts.params.items())


def test_deferred_labels_poison_the_loss_and_gradients_but_leave_good_batches_exact():
    from mlaan_func.core.deferred import deferred_checks
    out = torch.randn(4, 3, requires_grad=True)
    good, bad = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 3, 0])
    eager, _ = mf.losses.cross_entropy(out, (None, good))
    with deferred_checks():
        deferred, _ = mf.losses.cross_entropy(out, (None, good))
        poisoned, _ = mf.losses.cross_entropy(out, (None, bad))
    assert torch.equal(eager, deferred)
    assert torch.equal(*(torch.autograd.grad(v, out)[0] for v in (eager, deferred)))
    assert torch.isnan(poisoned) and torch.isnan(torch.autograd.grad(poisoned, out)[0]).all()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        mf.losses.cross_entropy(out, (None, bad))  # outside a step: at once


def test_a_drawing_scheme_gets_the_seeded_draws_from_its_first_call_on():
    """The first call runs unseeded, sees the generator move, and runs again seeded: the same
    gradients as a call that knows it draws; the global generator is left as it was."""
    scheme = published("mlaan", dropout=True)
    ts = mf.init(scheme, mf.optim.sgd(0.1), seed=1)
    grads = mf.gradients(scheme)
    state = torch.get_rng_state()
    first, second = grads(ts, batch(0)), grads(ts, batch(0))
    assert torch.equal(state, torch.get_rng_state())
    assert all(torch.equal(first.grads[k], second.grads[k]) for k in first.grads)
    other = grads(ts._replace(step=ts.step + 1), batch(0))
    assert any(not torch.equal(first.grads[k], other.grads[k]) for k in first.grads)  # draws follow the step
