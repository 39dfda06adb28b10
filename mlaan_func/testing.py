"""Hypothesis strategies and law checkers for schemes, public so user schemes get the same
property tests as the built-in ones (docs/design.md §5).

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> net = mf.from_module(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)))
>>> params, state = mf.init_params(net)
>>> check_split_identity(net, ["0"], params, state, torch.randn(4, 3))
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from hypothesis import strategies as st
from torch import Tensor, nn

from .combinators import LeapBlock, Objective, StackBlock, cascade, split
from .core.batch import as_batch
from .core.net import INPUT, Block, Net, Params, State, to_module
from .core.objective import LossContext
from .core.randomness import seed_block, seeded
from .host_reads import count_host_reads  # noqa: F401  (re-exported for the tests)
from .schemes.heads import ChannelGroup, Detached
from .schemes.losses import input_of
from .train.plan import plan_routes
from .train.routing import fold
from .train.state import TrainState

RTOL = 1e-5


def relative_error(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / max(‖b‖, 1e-12), the tolerance measure of docs/design.md §5."""
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
                         *, train: bool = True, rtol: float = RTOL, exact: bool = False) -> None:
    """``cascade(*split(net, at))`` equals ``net``: outputs and new state (bit for bit with
    ``exact=True``: the same operations run in the same order)."""
    y, s = net(params, state, x, train=train)
    y2, s2 = cascade(*split(net, at))(params, state, x, train=train)
    _same(y2, y, rtol, exact, "output")
    _same(s2, s, rtol, exact, "new state")


def _same(a: Any, b: Any, rtol: float, exact: bool, what: str) -> None:
    if exact:
        assert_identical(a, b, f"{what} (bit for bit)")
    else:
        assert_close(a, b, rtol, what)


def reference_losses(objectives: Sequence[Objective], ts: TrainState, batch: Any,
                     params: Params | None = None) -> tuple[list[Tensor], State]:
    """Each objective's loss through the library's own ``Objective.forward`` (inputs
    detached at module boundaries) and the new state, first writer wins. Pass ``params``
    that require grad to differentiate. (It checks routing, not gradients: for an oracle
    independent of the library's forward, use ``reference_gradients``.)"""
    routes = plan_routes(objectives)
    batch = as_batch(batch)
    params = ts.params if params is None else params
    losses, updates = [], {}
    published: dict[str, dict[str, Tensor]] = {}   # loss-context values, detached

    def run(i: int, o: Objective, x: Tensor) -> dict[str, Tensor]:
        loss, new, outputs, _ = o.forward(params, ts.state, x.detach(), batch, taps=routes[i].taps,
                                          step=ts.step, published=published)
        losses.append(loss)
        for k, v in new.items():
            updates.setdefault(k, v)
        return outputs

    fold(objectives, routes, input_of(batch), run, free=False)
    return losses, {**ts.state, **updates}


def expected_reach(objectives: Sequence[Objective]) -> list[frozenset[str]]:
    """The parameters each objective's loss may reach, from the scheme's structure: the
    blocks of its net (from its input boundary to its output) and the blocks of its head
    that no objective's net owns (its own head, trunk copies). A head that runs a block of
    another objective's net (a forgotten ``copy``) is outside the reach.

    >>> import mlaan_func as mf
    >>> from torch import nn
    >>> a, b = mf.split(mf.from_module(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))), ["0"])
    >>> leaky = mf.local_loss(a, b, mf.losses.cross_entropy, name="leaky")   # head = block 1 itself
    >>> [sorted(r) for r in expected_reach([leaky, mf.local_loss(b, None, mf.losses.cross_entropy)])]
    [['0.bias', '0.weight'], ['1.bias', '1.weight']]
    """
    in_nets = {k for o in objectives for k in o.net.param_names}
    reach = []
    for o in objectives:
        head = set(o.head.param_names) if o.head is not None else set()
        reach.append(frozenset(set(o.net.param_names) | (head - in_nets)))
    return reach


Rows = dict[str, tuple[int, int]]
"""Width-wise reach of one objective: parameter name -> the ``[start, stop)`` rows of its
first dimension (output channels / features) the loss may reach."""


def channel_group_of(objective: Objective) -> tuple[int, int] | None:
    """``(group, groups)`` when the objective's head starts with a channel-group view
    (``heads.channel_group``): its loss supervises that group of its module's output. A
    head that starts with ``stack`` qualifies when one of its nets starts with such a view
    and every other starts by detaching the map (``heads.detached``: the other groups' heads,
    as in ``schemes.neuron_groups``' diversity term)."""
    first = objective.head.blocks[0] if objective.head is not None else None
    if isinstance(first, StackBlock):
        starts = [getattr(n.blocks[0], "module", None) for n in first.nets]
        views = [(m.group, m.groups) for m in starts if isinstance(m, ChannelGroup)]
        rest = [m for m in starts if not isinstance(m, ChannelGroup)]
        return views[0] if len(views) == 1 and all(isinstance(m, Detached) for m in rest) else None
    module = getattr(first, "module", None)
    return (module.group, module.groups) if isinstance(module, ChannelGroup) else None


def expected_rows(objectives: Sequence[Objective], params: Params) -> list[Rows]:
    """The width-wise reach of each objective, from the scheme's structure: an objective whose
    head views channel group ``g`` of ``G`` (``heads.channel_group``) may reach only rows
    ``[g·d/G, (g+1)·d/G)`` of every parameter of its net (``d`` = the parameter's first
    dimension: a conv's or linear's output channels, a BatchNorm's channels); other
    objectives have no width-wise limit (``{}``). That holds only if each group's neurons
    read no other group's neurons inside the module (grouped convolutions after its first
    layer), which ``check_isolation`` then checks.

    >>> import mlaan_func as mf
    >>> from torch import nn
    >>> net = mf.from_module(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))
    >>> view = mf.cascade(mf.from_module(mf.heads.channel_group(1, 2), name="view"),
    ...                   mf.from_module(mf.heads.linear(4, 3), name="head"))
    >>> scheme = [mf.local_loss(net, view, mf.losses.cross_entropy, name="final")]
    >>> expected_rows(scheme, mf.init_params(scheme)[0])
    [{'0.weight': (2, 4), '0.bias': (2, 4)}]
    """
    out: list[Rows] = []
    for o in objectives:
        group = channel_group_of(o)
        if group is None:
            out.append({})
            continue
        g, groups = group
        rows: Rows = {}
        for k in o.net.param_names:
            d = params[k].shape[0] if params[k].dim() else 1
            if d % groups or not params[k].dim():
                raise ValueError(f"objective {o.name!r} supervises channel group {g} of {groups}, but "
                                 f"parameter {k!r} has {d} rows, which do not split into {groups} groups; "
                                 "a neuron-group module needs widths divisible by the number of groups")
            rows[k] = (g * d // groups, (g + 1) * d // groups)
        out.append(rows)
    return out


def check_isolation(objectives: Sequence[Objective], ts: TrainState, batch: Any,
                    expect: Sequence[Any] | None = None, rows: Sequence[Rows] | None = None) -> None:
    """Each objective's loss reaches exactly its expected parameters.

    ``expect[i]`` is the set of parameter names objective ``i`` may reach (default:
    ``expected_reach(objectives)``). The check fails if the loss has a nonzero gradient on
    any other parameter, or if some block inside its reach is not connected to the loss at
    all. Connection, not a nonzero value, is what counts inside the reach, so a head that
    starts at zero passes. ``rows[i]`` narrows it width-wise (default:
    ``expected_rows(objectives, ts.params)``): a nonzero gradient outside a parameter's rows
    fails too, so a neuron-group module whose groups read each other's neurons (a plain
    convolution after its first layer) fails.

    An objective with its own ``grad_fn`` (other than ``mf.remat``'s) is checked on what its
    function returns, run on the objective's input: a nonzero gradient outside its reach
    fails, and so does a block inside its reach that its loss reaches but the function gives
    no gradient (a ``grad_fn`` that returns zeros).

    >>> import mlaan_func as mf
    >>> from torch import nn
    >>> a, b = mf.split(mf.from_module(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))), ["0"])
    >>> leaky = [mf.local_loss(a, b, mf.losses.cross_entropy, name="leaky"),
    ...          mf.local_loss(b, None, mf.losses.cross_entropy)]
    >>> ts = mf.init(leaky, mf.optim.sgd(0.1))
    >>> try:
    ...     check_isolation(leaky, ts, (torch.randn(4, 2), torch.tensor([0, 1, 0, 1])))
    ... except AssertionError as err:
    ...     print(err)
    objective 'leaky' leaks gradient into '1.weight', outside its reach
    """
    expect = expected_reach(objectives) if expect is None else [frozenset(e) for e in expect]
    rows = expected_rows(objectives, ts.params) if rows is None else list(rows)
    if len(expect) != len(objectives) or len(rows) != len(objectives):
        raise ValueError(f"expect and rows have {len(expect)} and {len(rows)} entries for "
                         f"{len(objectives)} objectives")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in ts.params.items()}
    losses, _ = reference_losses(objectives, ts, batch, params)
    own = _own_gradients(objectives, ts, batch)
    keys = list(params)
    for i, (o, loss, reach, own_rows) in enumerate(zip(objectives, losses, expect, rows)):
        grads = torch.autograd.grad(loss, [params[k] for k in keys], allow_unused=True, retain_graph=False)
        if i in own:
            _check_own_gradients(o, own[i], dict(zip(keys, grads)), reach)
            grads = [own[i].get(k) for k in keys]
        connected: set[str] = set()
        for k, g in zip(keys, grads):
            if g is None:
                continue
            connected.add(k)
            if k not in reach and bool(g.abs().max() > 0):
                raise AssertionError(f"objective {o.name!r} leaks gradient into {k!r}, outside its reach")
            if k in own_rows:
                start, stop = own_rows[k]
                outside = torch.cat([g[:start], g[stop:]])
                if outside.numel() and bool(outside.abs().max() > 0):
                    raise AssertionError(f"objective {o.name!r} leaks gradient into rows of {k!r} outside "
                                         f"its channel group [{start}, {stop}): the group's neurons read "
                                         "other groups' neurons (use grouped convolutions after the "
                                         "module's first layer)")
        for block in (b for net in o.nets for b in net.blocks):
            names = set(block.param_names) & reach
            if names and not names & connected:
                raise AssertionError(f"objective {o.name!r} does not reach block {block.name!r}")


def _own_gradients(objectives: Sequence[Objective], ts: TrainState, batch: Any) -> dict[int, Params]:
    """The gradients each objective with its own ``grad_fn`` (not ``mf.remat``'s) returns,
    run on its input."""
    custom = [i for i, o in enumerate(objectives)
              if o.grad_fn is not None and getattr(o.grad_fn, "remat_every", None) is None]
    if not custom:
        return {}
    routes = plan_routes(objectives)
    batch = as_batch(batch)
    found: dict[int, Params] = {}
    published: dict[str, dict[str, Tensor]] = {}

    def run(i: int, o: Objective, x: Tensor) -> dict[str, Tensor]:
        if i in custom:
            fn = o.grad_fn(o, routes[i].taps)
            grads, (_, (_, outputs, _)) = fn({k: ts.params[k] for k in o.param_names}, ts.state, x.detach(),
                                             batch, ts.step)
            found[i] = dict(grads)
            return outputs
        with torch.no_grad():
            return o.forward(ts.params, ts.state, x, batch, taps=routes[i].taps, step=ts.step,
                             published=published)[2]

    fold(objectives, routes, input_of(batch), run, free=False)
    return found


def _check_own_gradients(o: Objective, own: Params, reference: dict[str, Tensor | None], reach) -> None:
    for block in (b for net in o.nets for b in net.blocks):
        names = [k for k in block.param_names if k in reach]
        if not names or all(reference.get(k) is None or not bool(reference[k].abs().max() > 0) for k in names):
            continue
        if all(k not in own or not bool(own[k].abs().max() > 0) for k in names):
            raise AssertionError(f"objective {o.name!r}'s grad_fn gives no gradient to block {block.name!r}, "
                                 "which its loss reaches; the grad_fn must return the loss's gradients")


class _Leap(nn.Module):
    """``z ↦ copy(z) + twin(z)`` as plain modules (``s·copy(z) + (2 − s)·twin(z)`` with a
    learnable ``scale``); the twin's tensors are frozen."""

    def __init__(self, copy: nn.Module, twin: nn.Module, scale: nn.Parameter | None = None):
        super().__init__()
        self.copy, self.twin, self.scale = copy, twin, scale

    def forward(self, z: Tensor) -> Tensor:
        if self.scale is None:
            return self.copy(z) + self.twin(z)
        return self.scale * self.copy(z) + (2 - self.scale) * self.twin(z)


class _Exported(NamedTuple):
    module: nn.Module
    params: dict[str, nn.Parameter]   # scheme key -> the module's own parameter
    buffers: dict[str, Tensor]        # scheme key -> the module's buffer (updated in place)


def _export(block: Any, params: Params, state: State) -> _Exported:
    """An ordinary module for a block, holding copies of its tensors (``to_module``)."""
    if isinstance(block, Block):
        module = to_module(Net((block,)), params, state).blocks[0]
        local = dict(module.named_parameters())
        bufs = dict(module.named_buffers())
        return _Exported(module, {k: local[n] for k, n in zip(block.param_names, block.local_params)},
                         {k: bufs[n] for k, n in zip(block.state_names, block.local_state)})
    if isinstance(block, LeapBlock):
        copies = [_export(b, params, state) for b in block.copy.blocks]
        twins = [_export(b, {**state}, state) for b in block.twin.blocks]
        for t in twins:
            t.module.requires_grad_(False)
        scale = None if block.scale is None else nn.Parameter(params[block.scale].detach().clone())
        module = _Leap(nn.Sequential(*(c.module for c in copies)), nn.Sequential(*(t.module for t in twins)), scale)
        own = {k: v for c in copies for k, v in c.params.items()}
        return _Exported(module, own if scale is None else {**own, block.scale: scale},
                         {k: v for part in copies + twins for k, v in part.buffers.items()})
    raise TypeError(f"reference_gradients exports plain and leap blocks; {block.name!r} is a "
                    f"{type(block).__name__}: pass your own reference to check_oracle")


def reference_gradients(objectives: Sequence[Objective]) -> Callable[..., tuple[Params, State]]:
    """The scheme written as ordinary ``nn.Module`` code, for ``check_oracle``:
    ``reference(params, state, batch, key=None, step=0) -> (grads, new_state)``.

    Each objective gets its own modules (``to_module`` copies of its blocks, in training
    mode), reads the boundary it names with an explicit ``.detach()``, and the weighted sum
    of every objective's loss gets one ``.backward()``; a name's gradient is the sum over
    every module that holds it, and a state key takes the value of its first writer. Only
    the user's loss functions and weights are shared with the library, not
    ``Objective.forward``. With ``key``, each block is seeded as in a step. A loss that
    takes a context gets its input (a leaf that requires grad), its net's output and the
    values its sources published (detached), built here too.

    >>> import mlaan_func as mf
    >>> from torch import nn
    >>> net = mf.from_module(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
    ...                                    nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
    >>> scheme = mf.schemes.dgl(net, ["1"], input_shape=(3, 8, 8))
    >>> ts = mf.init(scheme, mf.optim.sgd(0.1))
    >>> check_oracle(scheme, ts, (torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])))
    """
    objectives = list(objectives)
    plan_routes(objectives)

    def reference(params: Params, state: State, batch: Any, key: Tensor | None = None,
                  step: Tensor | int = 0) -> tuple[Params, State]:
        batch = as_batch(batch)
        acts: dict[str, Tensor] = {INPUT: input_of(batch)}
        held: list[tuple[str, nn.Parameter]] = []
        new_state: State = {}
        total = None
        published: dict[str, dict[str, Tensor]] = {}
        scope = seeded(key, step, input_of(batch).device) if key is not None else contextlib.nullcontext()
        with scope, torch.enable_grad():
            for o in objectives:
                h = acts[o.input_name].detach()
                h.requires_grad_(o.loss_takes_context and h.is_floating_point())
                x_in, net_out = h, None
                for part, net in (("net", o.net), ("head", o.head)):
                    if part == "head":
                        net_out = h
                    for block in (net.blocks if net is not None else ()):
                        exported = _export(block, params, state)
                        exported.module.train()
                        held += list(exported.params.items())
                        seed_block(block.name)
                        h = exported.module(h)
                        if part == "net":
                            acts.setdefault(block.name, h)
                        for k, v in exported.buffers.items():
                            new_state.setdefault(k, v)
                seed_block("loss:" + o.name)
                context = None
                if o.loss_takes_context:
                    sources = {name: published[name] for name in o.context_from if name in published}
                    context = LossContext(o.name, x_in, net_out, True, torch.as_tensor(step), sources,
                                          o.context_from, {})
                term, _ = o.score(h, batch, state, torch.as_tensor(step), context)
                if context is not None:
                    published[o.name] = context.published
                total = term if total is None else total + term
            total.backward()
        grads: Params = {k: torch.zeros_like(v) for k, v in params.items()}
        for k, p in held:
            if p.grad is not None:
                grads[k] = grads[k] + p.grad
        return grads, {**state, **{k: v.detach() for k, v in new_state.items()}}

    return reference


def check_oracle(objectives: Sequence[Objective], ts: TrainState, batch: Any,
                 reference: Callable[[Params, State, Any], tuple[Params, State]] | None = None,
                 *, rtol: float = RTOL, compile: bool = False, backend: str = "aot_eager") -> None:
    """The engine's summed gradients and new state equal ``reference(params, state, batch)``:
    by default ``reference_gradients(objectives)``, the scheme as plain ``nn.Module`` code
    with one ``backward()`` of the summed local losses; or a reference written by hand."""
    from .train.step import gradients

    got = gradients(objectives, compile=compile, backend=backend)(ts, batch)
    if reference is None:
        want_grads, want_state = reference_gradients(objectives)(ts.params, ts.state, batch,
                                                                 key=ts.key, step=ts.step)
    else:
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


def token_batches(vocab_size: int = 16, length: int = 8, max_batch: int = 6) -> st.SearchStrategy:
    """Small next-token ``(tokens, targets)`` batches drawn from a seed: ``(n, length)`` int64
    tokens and the same sequences shifted by one (``targets[:, t] = tokens[:, t + 1]``).

    >>> from hypothesis import given
    >>> @given(token_batches(vocab_size=5, length=4))
    ... def shifted(batch):
    ...     tokens, targets = batch
    ...     assert tokens.shape == targets.shape and bool((tokens[:, 1:] == targets[:, :-1]).all())
    >>> shifted()
    """
    @st.composite
    def build(draw):
        n = draw(st.integers(2, max_batch))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        sequence = torch.randint(0, vocab_size, (n, length + 1), generator=g)
        return sequence[:, :-1], sequence[:, 1:]
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
                     rtol: float = RTOL, seed: int = 0, gradients: bool = True, exact: bool = False) -> None:
    """``net`` (and ``cascade(*net.blocks)``) computes what ``model`` does: on each input,
    in eval and in training mode, the outputs agree, the gradients of a fixed random
    projection of the output agree for every parameter and for a floating-point input
    (``gradients=False`` skips them), and, in training, the new state equals the model's
    buffers after its forward (BatchNorm statistics). The net runs on the model's own
    tensors. With ``exact=True`` every comparison is bit for bit instead of within ``rtol``:
    a net cut out of ``forward`` runs the model's own operations in its order, so it is on
    the CPU (on a GPU, under ``torch.use_deterministic_algorithms(True)``: some kernels,
    convolution backward among them, may otherwise sum in a different order run to run).

    Use it on a net from ``from_module(model, blocks=[...])`` or from ``named_blocks()``
    (which ``from_module`` already checks structurally), with inputs drawn by hypothesis.

    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    >>> check_equivalent(model, mf.from_module(model, blocks=["1", "2"]), torch.randn(5, 3), exact=True)
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
    for n, x in enumerate([inputs] if isinstance(inputs, Tensor) else list(inputs)):
        for train in (False, True):
            mode = "train" if train else "eval"
            reference = copy.deepcopy(model).train(train)
            tensors = reference.state_dict(keep_vars=True)
            ref_params = [tensors[keys[k]] for k in net.param_names]
            net_params = {k: v.requires_grad_(gradients) for k, v in
                          ((k, params[k].detach()) for k in net.param_names)}
            ref_x, net_x = (x.detach().clone().requires_grad_(gradients and x.is_floating_point())
                            for _ in range(2))
            with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(gradients):
                torch.manual_seed(seed)
                want = reference(ref_x)
            with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(gradients):
                torch.manual_seed(seed)
                got, new_state = chained(net_params, state, net_x, train=train)
            _same(got.detach(), want.detach(), rtol, exact, f"output ({mode})")
            if train:
                after = reference.state_dict()
                _same({k: new_state[k] for k in net.state_names},
                      {k: after[keys[k]] for k in net.state_names}, rtol, exact, "buffers after forward")
            if gradients and want.is_floating_point() and want.requires_grad:
                projection = torch.randn(want.shape, dtype=want.dtype, generator=torch.Generator()
                                         .manual_seed(seed + n)).to(want.device)
                inputs_too = [ref_x] if ref_x.requires_grad else []
                expected = _grads(want, projection, [*ref_params, *inputs_too])
                found = _grads(got, projection, [*net_params.values(), *([net_x] if inputs_too else [])])
                names = [*net.param_names, *(["input"] if inputs_too else [])]
                _same(dict(zip(names, found)), dict(zip(names, expected)), rtol, exact,
                      f"gradient ({mode})")


def _grads(out: Tensor, projection: Tensor, wrt: list[Tensor]) -> list[Tensor]:
    found = torch.autograd.grad((out * projection).sum(), wrt, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, found)]
