"""The four combinators every scheme is composed from: split, cascade, leap_ema, local_loss
(and ``frozen`` views and ``stack``, which runs several nets side by side).

Each takes and returns the core types (``Net``; ``local_loss`` makes an ``Objective``), so
they nest:

>>> import torch
>>> from torch import nn
>>> from mlaan_func.core import from_module, init_params
>>> net = from_module(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
>>> first, second = split(net, at=["1"])
>>> params, state = init_params(net)
>>> x = torch.randn(3, 4)
>>> torch.equal(cascade(first, second)(params, state, x)[0], net(params, state, x)[0])
True
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
import torch
from torch import Tensor

from .core import hyper
from .core.net import AfterStep, Net, Params, State, Wrapper, copy
from .core.objective import LossContext, LossFn, Objective  # noqa: F401  (LossContext re-exported)
from .errors import KeysError, SchemeError


def _require_net(net: Any, what: str) -> None:
    if not isinstance(net, Net):
        hint = (" (an nn.Module: wrap it first, mlaan_func.from_module(module))"
                if isinstance(net, torch.nn.Module) else "")
        raise TypeError(f"{what} takes nets made by from_module / split / cascade, got "
                        f"{type(net).__name__}{hint}")


def split(net: Net, at: Sequence[str]) -> tuple[Net, ...]:
    """The gradient-isolated modules of ``net``: a module ends after each block in ``at``.

    The final block is implied, so ``K = len(at) + 1``; module ``i`` reads the output of
    module ``i - 1`` (its ``input_name`` names that boundary).

    >>> from torch import nn
    >>> from mlaan_func.core import from_module
    >>> [m.block_names for m in split(from_module(nn.Sequential(*[nn.ReLU() for _ in range(4)])), ["0", "2"])]
    [('0',), ('1', '2'), ('3',)]
    """
    _require_net(net, "split")
    if isinstance(at, str):
        raise TypeError(f"split's cut points are a list of block names, e.g. [{at!r}], not a string")
    if at is None:
        raise TypeError("split's cut points are a list of block names (e.g. ['1.0', '2.0']); [] keeps one "
                        "module, got None")
    names = net.block_names
    index = {n: i for i, n in enumerate(names)}
    cuts: list[int] = []
    for name in at:
        if name not in index:
            raise ValueError(f"unknown cut point {name!r}: the blocks are {list(names)}")
        i = index[name]
        if i == len(names) - 1:
            raise ValueError(
                f"cutting after the final block {name!r} would leave an empty last module; "
                f"the final block is implied, so cut only after one of {list(names[:-1])}")
        if cuts and i == cuts[-1]:
            raise ValueError(f"cut point {name!r} appears twice; each module must have a block")
        if cuts and i < cuts[-1]:
            raise ValueError(
                f"cut points must follow the block order: {name!r} comes before {names[cuts[-1]]!r}; "
                f"sort them as in {list(names)}")
        cuts.append(i)
    ends = cuts + [len(names) - 1]
    modules, start, reads = [], 0, net.input_name
    for end in ends:
        modules.append(Net(net.blocks[start:end + 1], input_name=reads))
        reads, start = names[end], end + 1
    return tuple(modules)


def cascade(*nets: Net) -> Net:
    """One net that runs ``nets`` in order (a window, a trunk, a head after a trunk).

    It reads what the first net reads.

    >>> from torch import nn
    >>> from mlaan_func.core import from_module
    >>> a, b = from_module(nn.Linear(2, 3), name="a"), from_module(nn.Linear(3, 1), name="b")
    >>> both = cascade(a, b)
    >>> both.block_names, both.param_names
    (('a', 'b'), ('a.weight', 'a.bias', 'b.weight', 'b.bias'))
    """
    if not nets:
        raise ValueError("cascade needs at least one net")
    for n in nets:
        _require_net(n, "cascade")
    return Net(tuple(b for n in nets for b in n.blocks), input_name=nets[0].input_name)


def _decay_tensor(decay: float | Tensor) -> Tensor:
    if isinstance(decay, hyper.Held):
        _decay_tensor(decay.value)
        return decay
    if hyper.is_schedule(decay):
        return decay
    value = torch.as_tensor(decay, dtype=torch.float32).detach().clone()
    if value.ndim != 0 or not bool((value >= 0) & (value <= 1)):
        raise ValueError(f"EMA decay must be a number in [0, 1] (1 freezes the twin, 0 copies the source), got {decay}")
    return value


@attrs.frozen(eq=False)
class LeapBlock:
    """``z ↦ copy(z) + twin(z)``, where the twin is an EMA of ``source`` kept in state; with
    ``scale`` (the key of a learnable scalar ``s``), ``z ↦ s·copy(z) + (2 − s)·twin(z)``.

    Made by ``leap_ema``; the single block of the net it returns.

    >>> from torch import nn
    >>> from mlaan_func.core import copy, from_module
    >>> block = from_module(nn.Linear(3, 3), name="b")
    >>> leap = leap_ema(copy(block, "trunk"), source=block).blocks[0]
    >>> isinstance(leap, LeapBlock), leap.name, [a.key for a in leap.after_steps]
    (True, 'trunk.b', ['ema:twin.b'])
    """

    copy: Net
    twin: Net
    source: Net
    decay: Tensor
    scale: str | None = None

    @property
    def name(self) -> str:
        return self.copy.output_name

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.copy.param_names + ((self.scale,) if self.scale is not None else ())

    @property
    def state_names(self) -> tuple[str, ...]:
        held = (self.decay.key,) if isinstance(self.decay, hyper.Held) else ()
        return self.copy.state_names + self.twin.param_names + self.twin.state_names + held

    @property
    def after_steps(self) -> tuple[AfterStep, ...]:
        twin_keys, source_keys, decay = self.twin.param_names, self.source.param_names, self.decay

        def ema(params: Params, state: State, step: Tensor | None = None) -> State:
            missing = [k for k in source_keys if k not in params]
            if missing:
                raise KeysError(f"the EMA twin {self.twin.block_names} follows {missing[:3]}, which no "
                               "objective of the scheme trains; include the source blocks in the scheme")
            m = hyper.resolve(decay, state, step, f"the EMA decay of twin {self.twin.block_names}")
            m = m.to(params[source_keys[0]].device) if source_keys else m
            twins = [state[k] for k in twin_keys]
            new = torch._foreach_add(torch._foreach_mul(twins, m),
                                     torch._foreach_mul([params[k] for k in source_keys], 1 - m))
            return {**state, **dict(zip(twin_keys, new))}

        return (AfterStep("ema:" + ",".join(self.twin.block_names), ema),) + self.copy.after_steps

    @property
    def reads(self) -> tuple[str, ...]:
        return self.copy.reads

    def children(self) -> tuple:
        return (*self.copy.blocks, *self.twin.blocks)

    def with_children(self, children: tuple) -> "LeapBlock":
        n = len(self.copy.blocks)
        return attrs.evolve(self, copy=Net(tuple(children[:n]), input_name=self.copy.input_name),
                            twin=Net(tuple(children[n:]), input_name=self.twin.input_name))

    def configuration(self) -> tuple:
        """What besides its children makes the block: the source its twin follows, the decay."""
        decay = self.decay.key if isinstance(self.decay, hyper.Held) else (
            ("tensor", float(self.decay)) if isinstance(self.decay, Tensor) else ("schedule", id(self.decay)))
        return (self.source.param_names, decay) + ((("scale", self.scale),) if self.scale is not None else ())

    def meta_forward(self, x: Tensor) -> Tensor:
        for block in self.copy.blocks:
            x = block.meta_forward(x)
        return x

    def apply(self, params: Params, state: State, x: Tensor, *, train: bool) -> tuple[Tensor, State]:
        y, updates = self.copy.run(params, state, x, train=train)
        y_twin, twin_updates = self.twin.run(state, state, x, train=train)
        if self.scale is None:
            return y + y_twin, {**updates, **twin_updates}
        s = params[self.scale]
        return s * y + (2 - s) * y_twin, {**updates, **twin_updates}

    def init(self, seed: int) -> tuple[Params, State]:
        params: Params = {}
        state: State = {}
        for block in self.copy.blocks:
            p, s = block.init(seed)
            params.update(p)
            state.update(s)
        for block in self.twin.blocks:
            p, s = block.init(seed)
            state.update(p)
            state.update(s)
        if isinstance(self.decay, hyper.Held):
            state[self.decay.key] = self.decay.value.clone()
        if self.scale is not None:
            params[self.scale] = torch.ones(())
        return params, state

    def renamed(self, prefix: str) -> "LeapBlock":
        scale = None if self.scale is None else f"{prefix}.{self.scale}"
        return attrs.evolve(self, copy=copy(self.copy, prefix), scale=scale)


@attrs.frozen(eq=False)
class FrozenBlock(Wrapper):
    """A read-only view of ``block``: the same function on the same parameters and
    statistics, by the same names, with no gradient into them and no state written. Made by
    ``frozen``."""

    block: Any

    @property
    def param_names(self) -> tuple[str, ...]:
        return ()

    @property
    def reads(self) -> tuple[str, ...]:
        return self.block.param_names

    def children(self) -> tuple:
        return (self.block,)

    def with_children(self, children: tuple) -> "FrozenBlock":
        return FrozenBlock(children[0])

    def apply(self, params: Params, state: State, x: Tensor, *, train: bool) -> tuple[Tensor, State]:
        missing = [k for k in self.block.param_names if k not in params]
        if missing:
            raise KeysError(f"the read-only view of block {self.block.name!r} reads {missing[:3]}, which the "
                            "parameters passed in lack; a view's source must be trained by the scheme")
        viewed = {**params, **{k: params[k].detach() for k in self.block.param_names}}
        y, _ = self.block.apply(viewed, state, x, train=train)
        return y, {}

    def init(self, seed: int) -> tuple[Params, State]:
        return {}, {}

    def renamed(self, prefix: str) -> "FrozenBlock":
        raise SchemeError(f"copy() of a read-only view of {self.block.name!r} would read names no block "
                          "holds; copy the source net and take frozen() of the copy")


def frozen(net: Net) -> Net:
    """A read-only view of ``net``: the same function on the same parameters, following
    them every step without a refresh, with no gradient flowing into them (the loss that
    reads it does not train them) and no statistics written. The source must be trained by
    some objective of the scheme; the checkers know the dependency (``Objective.reads``),
    so a view is outside its objective's reach.

    >>> from torch import nn
    >>> from mlaan_func.core import from_module
    >>> readout = from_module(nn.Linear(4, 3), name="readout")
    >>> view = frozen(readout)
    >>> view.param_names, view.reads
    ((), ('readout.weight', 'readout.bias'))
    """
    _require_net(net, "frozen")
    return Net(tuple(FrozenBlock(b) for b in net.blocks), input_name=net.input_name)


@attrs.frozen(eq=False)
class StackBlock:
    """``z ↦ torch.stack([net(z) for net in nets], dim=1)``: several nets on one input, their
    outputs side by side. Made by ``stack``; the single block of the net it returns."""

    nets: tuple[Net, ...]
    name: str

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for n in self.nets for k in n.param_names))

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for n in self.nets for k in n.state_names))

    @property
    def after_steps(self) -> tuple[AfterStep, ...]:
        return tuple(a for n in self.nets for a in n.after_steps)

    @property
    def reads(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for n in self.nets for k in n.reads))

    def children(self) -> tuple:
        return tuple(b for n in self.nets for b in n.blocks)

    def with_children(self, children: tuple) -> "StackBlock":
        nets, at = [], 0
        for n in self.nets:
            nets.append(Net(tuple(children[at:at + len(n.blocks)]), input_name=n.input_name))
            at += len(n.blocks)
        return attrs.evolve(self, nets=tuple(nets))

    def configuration(self) -> tuple:
        """What besides its children makes the block: how many blocks each net has."""
        return ("stack", tuple(len(n.blocks) for n in self.nets))

    def meta_forward(self, x: Tensor) -> Tensor:
        outs = []
        for n in self.nets:
            y = x
            for block in n.blocks:
                y = block.meta_forward(y)
            outs.append(y)
        return torch.stack(outs, dim=1)

    def apply(self, params: Params, state: State, x: Tensor, *, train: bool) -> tuple[Tensor, State]:
        outs, updates = [], {}
        for n in self.nets:
            y, new = n.run(params, state, x, train=train)
            outs.append(y)
            updates.update(new)
        return torch.stack(outs, dim=1), updates

    def init(self, seed: int) -> tuple[Params, State]:
        params: Params = {}
        state: State = {}
        for block in self.children():
            p, s = block.init(seed)
            params.update(p)
            state.update(s)
        return params, state

    def renamed(self, prefix: str) -> "StackBlock":
        return attrs.evolve(self, nets=tuple(copy(n, prefix) for n in self.nets), name=f"{prefix}.{self.name}")


def stack(*nets: Net, name: str) -> Net:
    """A net ``z ↦ torch.stack([net(z) for net in nets], dim=1)``: each net reads the same
    input (outputs of one shape), and the result holds their outputs side by side, ``(N,
    len(nets), …)``. It trains what its nets train and reads what they read, so a read-only
    view among them (``frozen``) lets a loss compare its own prediction with another
    objective's without training it (``schemes.neuron_groups``' diversity term). ``name``
    names the block (the boundary it writes).

    >>> from torch import nn
    >>> from mlaan_func.core import from_module, init_params
    >>> a, b = from_module(nn.Linear(4, 3), name="a"), from_module(nn.Linear(4, 3), name="b")
    >>> both = stack(a, frozen(b), name="ab")
    >>> params, state = init_params(a, b)
    >>> both(params, state, torch.randn(2, 4))[0].shape, both.param_names, both.reads
    (torch.Size([2, 2, 3]), ('a.weight', 'a.bias'), ('b.weight', 'b.bias'))
    """
    if not nets:
        raise ValueError("stack needs at least one net")
    for n in nets:
        _require_net(n, "stack")
    if not isinstance(name, str) or not name:
        raise ValueError(f"stack needs a block name (the boundary it writes), got {name!r}")
    return Net((StackBlock(tuple(nets), name),), input_name=nets[0].input_name)


def leap_ema(copy_net: Net, source: Net, decay: float | Tensor = 0.995, *, twin: str = "twin",
             scale: str | None = None) -> Net:
    """A net ``z ↦ copy(z) + twin(z)``; the twin starts equal to ``source`` and lives in state.

    After each optimizer update the engine runs the net's ``after_steps``:
    ``twin ← decay · twin + (1 − decay) · source`` on parameters; the twin's BatchNorm
    statistics follow its own forward passes. Twins are keyed ``"<twin>.<source key>"``,
    so two leap nets with the same ``twin`` prefix and source share one twin. ``decay`` may
    also be a schedule of the step or ``mlaan_func.hyper.held(m)`` (see ``mlaan_func.hyper``).

    >>> from torch import nn
    >>> from mlaan_func.core import copy, from_module
    >>> block = from_module(nn.Linear(3, 3), name="b")
    >>> leap = leap_ema(copy(block, "trunk"), source=block, decay=0.99)
    >>> leap.param_names, leap.state_names
    (('trunk.b.weight', 'trunk.b.bias'), ('twin.b.weight', 'twin.b.bias'))

    ``scale="<key>"`` blends the two by a learnable scalar ``s`` stored under that key (a
    parameter of the net, initialised to 1, so the net starts as the plain sum):
    ``z ↦ s·copy(z) + (2 − s)·twin(z)`` (MAN++'s learnable scaling, ``schemes.man_pp``).
    ``s`` is trained with the copy by the loss that reads the net.

    >>> blended = leap_ema(copy(block, "lb"), source=block, scale="lb.s")
    >>> blended.param_names, float(blended.blocks[0].init(0)[0]["lb.s"])
    (('lb.b.weight', 'lb.b.bias', 'lb.s'), 1.0)
    """
    roots_copy = [getattr(b, "root", None) for b in copy_net.blocks]
    roots_source = [getattr(b, "root", None) for b in source.blocks]
    if roots_copy != roots_source:
        raise ValueError("leap_ema's first argument must be a copy of its source "
                         "(mlaan_func.copy(source, prefix)); got blocks "
                         f"{copy_net.block_names} for source {source.block_names}")
    shared = sorted(set(copy_net.param_names + copy_net.state_names)
                    & set(source.param_names + source.state_names))
    if shared:
        raise ValueError(
            f"leap_ema's copy shares names with its source ({shared[:3]}…): the loss would train "
            "the source block itself. Pass a renamed copy: leap_ema(mlaan_func.copy(source, "
            "'trunk3'), source=source)")
    twin_net = copy(source, twin)
    if scale is not None:
        taken = set(copy_net.param_names + copy_net.state_names + source.param_names + source.state_names
                    + twin_net.param_names + twin_net.state_names)
        if not isinstance(scale, str) or not scale or scale in taken:
            raise ValueError(f"leap_ema's scale names its learnable scalar: a non-empty key no tensor of the "
                             f"copy, source or twin uses, got {scale!r}")
    decay = _decay_tensor(decay)
    if isinstance(decay, hyper.Held):
        decay = attrs.evolve(decay, key=hyper.decay_key(twin_net.block_names))
    block = LeapBlock(copy=copy_net, twin=twin_net, source=source, decay=decay, scale=scale)
    return Net((block,), input_name=copy_net.input_name)


def local_loss(net: Net, head: Net | None, loss: LossFn, weight: float | Tensor = 1.0, *,
               name: str | None = None, active: Callable[[Tensor], Any] | None = None,
               context_from: Sequence[str] = ()) -> Objective:
    """An objective: ``weight · loss(head(net(x)), batch)``; with ``head=None`` the net's own
    output is scored (the last module's classifier).

    ``weight`` is a number, a schedule (a function of the step tensor) or
    ``mlaan_func.hyper.held(w)``, a value kept in the train state. ``loss(output, batch)``
    may also take a ``step`` keyword to receive the step, and a ``context`` keyword to
    receive a ``LossContext``: its objective's input and net output (in the loss's graph) and
    the detached values that the earlier objectives named in ``context_from`` published in
    the same step (``docs/combinators.md``, "A loss context").

    >>> from torch import nn
    >>> from mlaan_func.core import from_module
    >>> from mlaan_func.losses import cross_entropy
    >>> obj = local_loss(from_module(nn.Linear(4, 4), name="m"),
    ...                  from_module(nn.Linear(4, 3), name="head"), cross_entropy)
    >>> obj.param_names
    ('m.weight', 'm.bias', 'head.weight', 'head.bias')
    """
    if not isinstance(net, Net) or (head is not None and not isinstance(head, Net)):
        raise TypeError("local_loss takes nets (from_module / split / cascade) for net and head")
    default = f"{net.output_name}" if head is None else f"{net.output_name}/{head.output_name}"
    name = name or default
    if isinstance(weight, hyper.Held):
        return Objective(name=name, net=net, head=head, loss=loss,
                         weight=attrs.evolve(weight, key=hyper.weight_key(name)), active=active,
                         context_from=context_from)
    if hyper.is_schedule(weight):
        return Objective(name=name, net=net, head=head, loss=loss, weight=weight, active=active,
                         context_from=context_from)
    w = torch.as_tensor(weight, dtype=torch.float32).detach().clone()
    if w.ndim != 0 or not bool(torch.isfinite(w)):
        raise ValueError(f"a loss weight must be a finite number, a schedule of the step or "
                         f"mlaan_func.hyper.held(w), got {weight}")
    return Objective(name=name, net=net, head=head, loss=loss, weight=w, active=active, context_from=context_from)
