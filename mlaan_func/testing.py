"""Hypothesis strategies and law checkers for schemes, public so user schemes get the same
property tests as the built-in ones (DESIGN.md §5).

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> net = mf.from_module(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)))
>>> params, state = mf.init_params(net)
>>> check_split_identity(net, ["0"], params, state, torch.randn(4, 3))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from hypothesis import strategies as st
from torch import Tensor

from .combinators import Objective, cascade, split
from .core import INPUT, Net, Params, State
from .engine import TrainState, _as_batch, plan_routes

RTOL = 1e-5


def relative_error(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / max(‖b‖, 1e-12), the tolerance measure of DESIGN.md §5."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), 1e-12))


def assert_close(a: Any, b: Any, rtol: float = RTOL, what: str = "value") -> None:
    """Tensors, or dicts/tuples of them, equal within ``rtol`` per tensor (exact for integers)."""
    if isinstance(a, Mapping):
        assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))[:5]}"
        for k in a:
            assert_close(a[k], b[k], rtol, f"{what}[{k!r}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{what}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close(x, y, rtol, f"{what}[{i}]")
    elif isinstance(a, Tensor):
        assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.is_floating_point():
            err = relative_error(a, b)
            assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"
        else:
            assert torch.equal(a, b), f"{what}: integers differ"
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def assert_identical(a: Any, b: Any, what: str = "value") -> None:
    """Bit-identical tensors (or trees of them)."""
    if isinstance(a, Mapping):
        assert set(a) == set(b), f"{what}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, (tuple, list)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{what}[{i}]")
    elif isinstance(a, Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{what} changed"
    else:
        assert a == b, f"{what} changed"


def _clone_tree(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        return {k: _clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_clone_tree(v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_clone_tree(v) for v in tree)
    return tree


def check_purity(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` and assert every tensor argument is bit-identical afterwards."""
    before = _clone_tree((args, kwargs))
    out = fn(*args, **kwargs)
    assert_identical((args, kwargs), before, "argument")
    return out


def check_split_identity(net: Net, at: Sequence[str], params: Params, state: State, x: Tensor,
                         *, train: bool = True, rtol: float = RTOL) -> None:
    """``cascade(*split(net, at))`` equals ``net``: outputs and new state."""
    y, s = net(params, state, x, train=train)
    y2, s2 = cascade(*split(net, at))(params, state, x, train=train)
    assert_close(y2, y, rtol, "output")
    assert_close(s2, s, rtol, "new state")


def reference_losses(objectives: Sequence[Objective], ts: TrainState, batch: Any,
                     params: Params | None = None) -> tuple[list[Tensor], State]:
    """Each objective's loss with ordinary autograd (inputs detached at module boundaries)
    and the new state, first writer wins. Pass ``params`` that require grad to differentiate."""
    routes = plan_routes(objectives)
    batch = _as_batch(batch)
    params = ts.params if params is None else params
    acts, losses, updates = {INPUT: batch.x}, [], {}
    for o, route in zip(objectives, routes):
        loss, new, outputs, _ = o.forward(params, ts.state, acts[o.input_name].detach(), batch,
                                          taps=route.taps)
        losses.append(loss)
        for k, v in new.items():
            updates.setdefault(k, v)
        for name, out in outputs.items():
            acts.setdefault(name, out)
    return losses, {**ts.state, **updates}


def check_isolation(objectives: Sequence[Objective], ts: TrainState, batch: Any) -> None:
    """Each objective's loss has exactly zero gradient on every parameter it does not own,
    and reaches every block it owns (some nonzero gradient per block)."""
    params = {k: v.detach().clone().requires_grad_(True) for k, v in ts.params.items()}
    losses, _ = reference_losses(objectives, ts, batch, params)
    keys = list(params)
    for o, loss in zip(objectives, losses):
        grads = torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True, retain_graph=False)
        owned = set(o.param_names)
        reached: set[str] = set()
        for k, g in zip(keys, grads):
            if g is None:
                continue
            if k not in owned:
                assert not bool(g.abs().max() > 0), f"objective {o.name!r} leaks gradient into {k!r}"
            elif bool(g.abs().max() > 0):
                reached.add(k)
        for net in o.nets:
            for block in net.blocks:
                names = set(block.param_names)
                if names:
                    assert names & reached, f"objective {o.name!r} does not reach block {block.name!r}"


def check_oracle(objectives: Sequence[Objective], ts: TrainState, batch: Any,
                 reference: Callable[[Params, State, Any], tuple[Params, State]],
                 *, rtol: float = RTOL, compile: bool = False, backend: str = "aot_eager") -> None:
    """The engine's summed gradients and new state equal ``reference(params, state, batch)``,
    typically one ``backward()`` of the summed local losses through plain ``nn.Module`` code."""
    from .engine import gradients

    got = gradients(objectives, compile=compile, backend=backend)(ts, batch)
    want_grads, want_state = reference(ts.params, ts.state, batch)
    assert_close(got.grads, want_grads, rtol, "gradient")
    assert_close(got.state, want_state, rtol, "state")


@st.composite
def cut_points(draw: Callable, block_names: Sequence[str], min_modules: int = 1,
               max_modules: int | None = None) -> list[str]:
    """A valid split of a net with ``block_names``: sorted, distinct, never after the last."""
    cuttable = list(block_names[:-1])
    hi = len(cuttable) + 1 if max_modules is None else min(max_modules, len(cuttable) + 1)
    k = draw(st.integers(min_value=min_modules, max_value=hi))
    chosen = draw(st.lists(st.sampled_from(range(len(cuttable))), min_size=k - 1, max_size=k - 1,
                           unique=True)) if cuttable else []
    return [cuttable[i] for i in sorted(chosen)]


def image_batches(channels: int = 3, size: int = 8, num_classes: int = 10,
                  max_batch: int = 6) -> st.SearchStrategy:
    """Small ``(x, y)`` image batches drawn from a seed (batch ≥ 2 for BatchNorm)."""
    @st.composite
    def build(draw):
        n = draw(st.integers(2, max_batch))
        seed = draw(st.integers(0, 2**31 - 1))
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(n, channels, size, size, generator=g),
                torch.randint(0, num_classes, (n,), generator=g))
    return build()


seeds = st.integers(min_value=0, max_value=2**31 - 1)
"""Seeds for ``init``."""


def _model_keys(model: "torch.nn.Module", net: Net) -> dict[str, str]:
    """Net key -> the model's own key for the same tensor."""
    own = set(model.state_dict(keep_vars=True))
    keys = [*net.param_names, *net.state_names]
    if all(k in own for k in keys):
        return {k: k for k in keys}
    if not hasattr(model, "named_blocks"):
        raise ValueError("check_equivalent: the net's keys are not the model's; build the net with "
                         "from_module(model) or from_module(model, blocks=[...]) from this model")
    paths = {id(m): p for p, m in model.named_modules()}
    mapping = {}
    for name, module in model.named_blocks():
        for local in module.state_dict(keep_vars=True):
            mapping[f"{name}.{local}"] = f"{paths[id(module)]}.{local}".lstrip(".")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"check_equivalent: net keys {missing[:3]} are not tensors of the model; build "
                         "the net with from_module from this model")
    return {k: mapping[k] for k in keys}


def check_equivalent(model: "torch.nn.Module", net: Net, inputs: Tensor | Sequence[Tensor], *,
                     rtol: float = RTOL, seed: int = 0) -> None:
    """``net`` (and ``cascade(*net.blocks)``) computes what ``model`` does: on each input,
    in eval and in training mode, the outputs agree and, in training, the new state equals
    the model's buffers after its forward. The net runs on the model's own tensors.

    Use it on a net from ``from_module(model, blocks=[...])`` or from ``named_blocks()``
    (which ``from_module`` already checks structurally), with inputs drawn by hypothesis.

    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    >>> check_equivalent(model, mf.from_module(model, blocks=["1", "2"]), torch.randn(5, 3))
    >>> other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sigmoid())
    >>> check_equivalent(model, mf.from_module(other), torch.randn(5, 3))
    Traceback (most recent call last):
    ...
    AssertionError: output (eval): relative error ...
    """
    import copy

    keys = _model_keys(model, net)
    own = model.state_dict()
    params = {k: own[keys[k]].detach() for k in net.param_names}
    state = {k: own[keys[k]].detach().clone() for k in net.state_names}
    chained = cascade(*(Net((b,)) for b in net.blocks))
    for x in ([inputs] if isinstance(inputs, Tensor) else list(inputs)):
        for train in (False, True):
            reference = copy.deepcopy(model).train(train)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                want = reference(x)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                got, new_state = chained(params, state, x, train=train)
            assert_close(got, want, rtol, f"output ({'train' if train else 'eval'})")
            if train:
                after = reference.state_dict()
                assert_close({k: new_state[k] for k in net.state_names},
                             {k: after[keys[k]] for k in net.state_names}, rtol, "buffers after forward")
