"""One block identity (docs/design.md, "Names are identities"): a block's fingerprint covers
its class, its configuration and its tensors; the identity check and the planner use it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import mlaan_func as mf
from mlaan_func.errors import IdentityError
from mlaan_func.identity import check_identity, fingerprint, same_block
from mlaan_func.plan import plan_scheme


class GroupHead(nn.Module):
    """A head whose plain attribute ``group`` picks which channel half passes gradient."""

    def __init__(self, group: int, scale: float = 1.0):
        super().__init__()
        self.group, self.scale = group, scale
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        halves = x.chunk(2, dim=1)
        kept = [h if i == self.group else h.detach() for i, h in enumerate(halves)]
        return self.fc(torch.cat(kept, dim=1)) * self.scale


def two_head_scheme(group_a: int, group_b: int, scale_a: float = 1.0, scale_b: float = 1.0):
    body = mf.from_module(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    a = mf.from_module(GroupHead(group_a, scale_a), name="head")
    b = mf.from_module(GroupHead(group_b, scale_b), name="head")
    return [mf.local_loss(body, a, mf.losses.cross_entropy, name="a"),
            mf.local_loss(body, b, mf.losses.cross_entropy, name="b")]


def test_two_heads_that_differ_in_a_plain_attribute_are_refused_at_init():
    with pytest.raises(IdentityError, match=r"two different blocks use the name 'head\.fc\.weight'.*"
                                            r"attribute 'group' of the module \(GroupHead\): 0 against 1"):
        mf.init(two_head_scheme(0, 1), mf.optim.sgd(0.1))


def test_the_refusal_is_a_value_error_naming_both_users():
    with pytest.raises(ValueError, match=r"objective 'a'.*objective 'b'"):
        check_identity(two_head_scheme(0, 1))


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 1), st.integers(0, 1), st.sampled_from([1.0, 2.0]), st.sampled_from([1.0, 2.0]))
def test_same_fingerprint_iff_accepted_under_one_name(group_a, group_b, scale_a, scale_b):
    scheme = two_head_scheme(group_a, group_b, scale_a, scale_b)
    head_a, head_b = scheme[0].head.blocks[0], scheme[1].head.blocks[0]
    same = fingerprint(head_a) == fingerprint(head_b)
    assert same == ((group_a, scale_a) == (group_b, scale_b))
    try:
        check_identity(scheme)
        accepted = True
    except IdentityError:
        accepted = False
    assert accepted == same
    # the planner merges exactly the blocks the identity check accepts as one
    shared_head = any("head" in p.block_names for p in plan_scheme(scheme).shared)
    assert shared_head == same == same_block(head_a, head_b)


def test_accepted_twins_compute_the_same_gradients_shared_or_not():
    scheme = two_head_scheme(1, 1)
    ts = mf.init(scheme, mf.optim.sgd(0.1))
    batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    shared = mf.gradients(scheme)(ts, batch)
    alone = mf.gradients(scheme, share=False)(ts, batch)
    assert all(torch.equal(shared.grads[k], alone.grads[k]) for k in alone.grads)


def test_fingerprint_sees_submodule_configuration_and_tensors():
    f = lambda m: fingerprint(mf.from_module(m, name="x").blocks[0])  # noqa: E731
    assert f(nn.Sequential(nn.Conv2d(3, 4, 3, stride=1))) != f(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)))
    assert f(nn.Sequential(nn.Linear(3, 4))) != f(nn.Sequential(nn.Linear(3, 4).double()))
    assert f(nn.Sequential(nn.Dropout(0.1))) != f(nn.Sequential(nn.Dropout(0.2)))
    assert f(nn.Sequential(nn.ReLU())) != f(nn.Sequential(nn.GELU()))
    assert f(nn.Sequential(nn.Linear(3, 4))) == f(nn.Sequential(nn.Linear(3, 4)))


def test_a_hook_makes_a_block_its_own():
    hooked = nn.Linear(2, 2)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    a, b = mf.from_module(hooked, name="fc"), mf.from_module(nn.Linear(2, 2), name="fc")
    with pytest.raises(IdentityError, match="_forward_hooks"):
        check_identity(a, b)


def test_leap_blocks_expose_their_children():
    block = mf.from_module(nn.Linear(3, 3), name="b")
    leap = mf.leap_ema(mf.copy(block, "trunk"), source=block).blocks[0]
    assert [c.name for c in leap.children()] == ["trunk.b", "twin.b"]
    rebuilt = leap.with_children(leap.children())
    assert rebuilt.param_names == leap.param_names and rebuilt.state_names == leap.state_names
