"""The functional core: parameters and state as flat dicts, nets as pure functions.

A *net* is an ordered chain of named blocks. Each block is an ``nn.Module`` template run
through ``torch.func.functional_call`` on the tensors it finds under its prefix in the
``params`` and ``state`` dicts, so calling a net never touches a module's own tensors and
never mutates its inputs:

>>> import torch
>>> from torch import nn
>>> net = from_module(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU()))
>>> params, state = init_params(net, seed=0)
>>> sorted(params)[:2]
['0.bias', '0.weight']
>>> y, new_state = net(params, state, torch.randn(5, 4), train=True)
>>> bool((new_state['1.running_mean'] != state['1.running_mean']).any())
True
"""

from __future__ import annotations

import copy as _copy
import functools
import zlib
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import attrs
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import DeviceMismatchError, KeysError, ShapeError
from .identity import check_identity
from .randomness import seed_block
from .swap import swapped_call
from .trace import check_chain, split_module

Params = dict[str, Tensor]
"""Trainable tensors: a flat dict from dotted names (``"1.0.conv1.weight"``) to tensors."""

State = dict[str, Tensor]
"""Non-trainable tensors (BatchNorm statistics, EMA twins): a flat dict like ``Params``."""

INPUT = "input"
"""The name of a net's input boundary when it reads the raw data."""


class AfterStep(NamedTuple):
    """A pure ``fn(params, state) -> state`` run after each optimizer update.

    ``key`` identifies it: the engine runs each distinct key once per step.

    >>> halve = AfterStep("halve", lambda params, state: {k: v / 2 for k, v in state.items()})
    >>> halve.fn({}, {"s": torch.ones(2)})
    {'s': tensor([0.5000, 0.5000])}
    """

    key: str
    fn: Callable[[Params, State], State]


class BlockLike(Protocol):
    """What a net's chain is made of: a module block or a composite such as a leap block."""

    name: str

    @property
    def param_names(self) -> tuple[str, ...]: ...
    @property
    def state_names(self) -> tuple[str, ...]: ...
    @property
    def after_steps(self) -> tuple[AfterStep, ...]: ...
    def apply(self, params: Params, state: State, x: Tensor, *, train: bool) -> tuple[Tensor, State]: ...
    def init(self, seed: int) -> tuple[Params, State]: ...
    def renamed(self, prefix: str) -> "BlockLike": ...
    def children(self) -> tuple["BlockLike", ...]:
        """The blocks it is made of (``()`` for a module block): traversals (identity,
        kernels, fingerprints) walk these instead of knowing each composite."""
    def with_children(self, children: tuple["BlockLike", ...]) -> "BlockLike":
        """The same composite over ``children`` (as many, in the order ``children()`` gives)."""
    def meta_forward(self, x: Tensor) -> Tensor:
        """Its output for ``x`` on the meta device (shapes only)."""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _reset(module: nn.Module) -> None:
    """Re-initialise ``module``: a submodule that defines ``reset_parameters`` owns the
    initialisation of everything below it; otherwise its children are re-initialised first
    and then its own ``_reset_parameters`` (``nn.MultiheadAttention``), if any, runs, as in
    a constructor."""
    if hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    for child in module.children():
        _reset(child)
    if hasattr(module, "_reset_parameters"):
        module._reset_parameters()


def reinitialise(module: nn.Module, seed: int) -> nn.Module:
    """``module`` with every parameter drawn again under a generator seeded with ``seed``.

    The rule: ``reset_parameters`` (or ``_reset_parameters``) of the module and its
    submodules must write every parameter. A parameter that nothing writes (a bare
    ``nn.Parameter`` such as a class token) is an error, because its value would come from
    whatever the global generator held when the module was built; give its module a
    ``reset_parameters`` that initialises it.

    >>> class WithToken(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.token = nn.Parameter(torch.zeros(1, 4))
    ...         self.fc = nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return self.fc(x + self.token)
    >>> try:
    ...     reinitialise(WithToken(), seed=0)
    ... except ValueError as err:
    ...     print(str(err).split(";")[0])
    WithToken: nothing re-initialises parameter(s) ['token']
    >>> class Fixed(WithToken):
    ...     def reset_parameters(self):
    ...         nn.init.normal_(self.token, std=0.02)
    ...         self.fc.reset_parameters()
    >>> a, b = reinitialise(Fixed(), seed=3), reinitialise(Fixed(), seed=3)
    >>> torch.equal(a.token, b.token)
    True
    """
    module = _copy.deepcopy(module)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _reset(module)
    missed = [n for n, p in module.named_parameters() if bool(torch.isnan(p).any())]
    if missed:
        raise ValueError(
            f"{type(module).__name__}: nothing re-initialises parameter(s) {missed[:8]}; "
            "mlaan_func draws every tensor from the seed, by calling reset_parameters / "
            "_reset_parameters. Give the module that holds them a reset_parameters() that "
            "initialises them (e.g. nn.init.normal_(self.token, std=0.02)) and its children.")
    return module


def _seed_for(seed: int, root: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(root.encode())) % (2**63)


def _meta_template(module: nn.Module, train: bool) -> nn.Module:
    template = _copy.deepcopy(module).to("meta")
    return template.train(train)


class BlockDefaults:
    """What a block has unless it says otherwise: no after-steps, no read-only views, no
    children."""

    @property
    def after_steps(self) -> tuple[AfterStep, ...]:
        return ()

    @property
    def reads(self) -> tuple[str, ...]:
        """Parameters it reads without training them (a read-only view's source)."""
        return ()

    def children(self) -> tuple:
        return ()

    def with_children(self, children: tuple) -> Any:
        return self


class Wrapper(BlockDefaults):
    """A block that runs another one, ``self.block``, under its name and state."""

    @property
    def name(self) -> str:
        return self.block.name

    @property
    def state_names(self) -> tuple[str, ...]:
        return self.block.state_names

    def meta_forward(self, x: Tensor) -> Tensor:
        return self.block.meta_forward(x)


@attrs.frozen(eq=False)
class Block(BlockDefaults):
    """One named block: ``module`` run with the tensors stored under ``prefix``.

    ``root`` is the name of the block it was first made from; copies keep it, so a copy
    is initialised with exactly its source's values.

    >>> block = Block.of("fc", nn.Linear(2, 3))
    >>> block.param_names, block.state_names
    (('fc.weight', 'fc.bias'), ())
    >>> renamed = block.renamed("trunk")
    >>> renamed.param_names, renamed.root
    (('trunk.fc.weight', 'trunk.fc.bias'), 'fc')
    """

    name: str
    prefix: str
    root: str
    module: nn.Module = attrs.field(repr=False)
    train_template: nn.Module = attrs.field(repr=False)
    eval_template: nn.Module = attrs.field(repr=False)
    local_params: tuple[str, ...]
    local_state: tuple[str, ...]
    _calls: tuple[swapped_call, swapped_call] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        # built again by attrs.evolve, so they always call the current templates
        object.__setattr__(self, "_calls", (swapped_call(self.train_template), swapped_call(self.eval_template)))

    @classmethod
    def of(cls, name: str, module: nn.Module) -> "Block":
        return cls(
            name=name, prefix=name, root=name, module=_copy.deepcopy(module),
            train_template=_meta_template(module, True),
            eval_template=_meta_template(module, False),
            local_params=tuple(n for n, _ in module.named_parameters()),
            local_state=tuple(n for n, _ in module.named_buffers()),
        )

    @functools.cached_property
    def param_names(self) -> tuple[str, ...]:
        return tuple(_join(self.prefix, n) for n in self.local_params)

    @functools.cached_property
    def state_names(self) -> tuple[str, ...]:
        return tuple(_join(self.prefix, n) for n in self.local_state)

    def meta_forward(self, x: Tensor) -> Tensor:
        try:
            return self.eval_template(x)
        except RuntimeError as err:
            raise ShapeError(f"block '{self.name}' ({type(self.module).__name__}) cannot take an "
                             f"input of shape {tuple(x.shape)}: {err}") from err

    def renamed(self, prefix: str) -> "Block":
        return attrs.evolve(self, name=_join(prefix, self.name), prefix=_join(prefix, self.prefix) if self.prefix else prefix)

    def init(self, seed: int) -> tuple[Params, State]:
        module = reinitialise(self.module, _seed_for(seed, self.root))
        params = {_join(self.prefix, n): p.detach().clone() for n, p in module.named_parameters()}
        state = {_join(self.prefix, n): b.detach().clone() for n, b in module.named_buffers()}
        return params, state

    def gather(self, params: Params, state: State, train: bool) -> tuple[Params, State]:
        """The module-local tensors; state is cloned in training, where BatchNorm writes it."""
        try:
            p = {n: params[k] for n, k in zip(self.local_params, self.param_names)}
            if train:
                s = {n: state[k].clone() for n, k in zip(self.local_state, self.state_names)}
            else:
                s = {n: state[k] for n, k in zip(self.local_state, self.state_names)}
        except KeyError as err:
            raise KeysError(
                f"block '{self.name}' needs {err.args[0]!r}, which is not in the dict passed in; "
                "build params and state with mlaan_func.init_params / mlaan_func.init from the "
                "same nets (names are identities: a renamed copy needs its own entries)"
            ) from None
        return p, s

    def apply(self, params: Params, state: State, x: Tensor, *, train: bool) -> tuple[Tensor, State]:
        p, s = self.gather(params, state, train)
        if train:
            seed_block(self.name)
        if torch.compiler.is_compiling():  # dynamo traces functional_call, not our swap
            template = self.train_template if train else self.eval_template
            y = functional_call(template, (p, s), (x,), strict=True)
        else:
            call = self._calls[0] if train else self._calls[1]
            y = call_explained(self, x, p, lambda: call(p, s, x))
        new_state = dict(zip(self.state_names, s.values())) if train else {}
        return y, new_state


def call_explained(block: "Block", x: Tensor, params: Params, call: Callable[[], Any]) -> Any:
    """``call()``, which runs ``block`` on ``x``; a failure is re-raised as ``_explain`` says
    (shape and device errors named, out-of-memory untouched)."""
    if torch.compiler.is_compiling():
        return call()
    try:
        return call()
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:
        raise _explain(block, x, params, err) from err


_SHAPE_WORDS = ("shape", "size", "dimension", "channels", "mat1 and mat2", "must match",
                "expected input", "out of bounds", "too small", "number of elements")


def _explain(block: "Block", x: Tensor, params: Params, err: RuntimeError) -> Exception:
    """The error a block's failure should raise: a device or dtype mismatch names both sides
    and the fix; a shape error becomes ``ShapeError``; anything else passes unchanged."""
    where = f"block '{block.name}' ({type(block.module).__name__})"
    tensors = [t for t in params.values() if isinstance(t, Tensor)]
    devices = {t.device for t in tensors} - {x.device}
    if devices:
        return DeviceMismatchError(
            f"{where} got its input on {x.device} but its parameters are on "
            f"{sorted(map(str, devices))[0]}; move the batch to the parameters' device "
            "(x.to(device)) or build the train state there (mlaan_func.init(..., device=...)).")
    dtypes = {t.dtype for t in tensors if t.is_floating_point()} - {x.dtype}
    if x.is_floating_point() and dtypes:
        return DeviceMismatchError(
            f"{where} got a {x.dtype} input but its parameters are {sorted(map(str, dtypes))[0]}; "
            "cast the batch (x.to(dtype)) or build the train state in the input's dtype "
            "(mlaan_func.init(..., dtype=...)).")
    message = str(err)
    if any(word in message.lower() for word in _SHAPE_WORDS):
        return ShapeError(
            f"{where} cannot run on an input of shape {tuple(x.shape)}: {message}. If this is a "
            "head or a trunk, build it for the channels and spatial size its module actually outputs.")
    return err


def _chain_names(blocks, attr: str) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for b in blocks:
        for n in getattr(b, attr):
            seen.setdefault(n, None)
    return tuple(seen)


@attrs.frozen(eq=False)
class Net:
    """A pure function ``(params, state, x, *, train) -> (y, state)``: a chain of blocks.

    ``input_name`` names the boundary it reads (``"input"`` for the data, or the name of
    the block before its first one once it has been split out of a larger net).

    >>> net = from_module(nn.Sequential(nn.Linear(2, 4), nn.ReLU()))
    >>> net.block_names, net.input_name, net.output_name
    (('0', '1'), 'input', '1')
    >>> params, state = init_params(net)
    >>> y, new_state = net(params, state, torch.ones(5, 2), train=False)
    >>> tuple(y.shape)
    (5, 4)
    """

    blocks: tuple[Any, ...]
    input_name: str = INPUT

    def __attrs_post_init__(self):
        if not self.blocks:
            raise ValueError("a net needs at least one block")

    @property
    def output_name(self) -> str:
        return self.blocks[-1].name

    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    @functools.cached_property
    def param_names(self) -> tuple[str, ...]:
        return _chain_names(self.blocks, "param_names")

    @functools.cached_property
    def state_names(self) -> tuple[str, ...]:
        return _chain_names(self.blocks, "state_names")

    @property
    def after_steps(self) -> tuple[AfterStep, ...]:
        return tuple(a for b in self.blocks for a in b.after_steps)

    @property
    def reads(self) -> tuple[str, ...]:
        """Parameters its blocks read without training them (read-only views)."""
        return _chain_names(self.blocks, "reads")

    def run(self, params: Params, state: State, x: Tensor, *, train: bool = True,
            taps: dict[str, Tensor] | None = None) -> tuple[Tensor, State]:
        """Run the chain; returns the output and only the state entries it wrote.

        ``taps``, when given, receives the output of every block whose name it already
        holds as a key (the engine routes module boundaries inside a window this way).
        """
        updates: State = {}
        for block in self.blocks:
            x, new = block.apply(params, state, x, train=train)
            updates.update(new)
            if taps is not None and block.name in taps:
                taps[block.name] = x
        return x, updates

    def block(self, name: str) -> "Net":
        """The one-block net of block ``name``; it reads the boundary before that block.

        >>> net = from_module(nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)))
        >>> net.block("1").block_names, net.block("1").input_name
        (('1',), '0')
        """
        return self[name:name]

    def __getitem__(self, names: "slice | str") -> "Net":
        """Blocks by name: ``net["1.0":"2.0"]`` runs from block ``"1.0"`` through ``"2.0"``
        (both included, like a label slice; either end may be left out); ``net["1.0"]`` is
        ``net.block("1.0")``. The result reads the boundary before its first block.

        >>> net = from_module(nn.Sequential(*[nn.ReLU() for _ in range(4)]))
        >>> net["1":"2"].block_names, net["1":].block_names, net[:"0"].input_name
        (('1', '2'), ('1', '2', '3'), 'input')
        """
        if isinstance(names, str):
            names = slice(names, names)
        if not isinstance(names, slice) or names.step is not None:
            raise TypeError("index a net by block name (net['1.0']) or a name slice (net['1.0':'2.0'])")
        index = {n: i for i, n in enumerate(self.block_names)}
        for end in (names.start, names.stop):
            if end is not None and end not in index:
                raise KeysError(f"no block {end!r} in this net; its blocks are {list(self.block_names)}")
        start = 0 if names.start is None else index[names.start]
        stop = len(self.blocks) - 1 if names.stop is None else index[names.stop]
        if stop < start:
            raise ValueError(f"block {names.stop!r} comes before {names.start!r}; a slice runs in "
                             f"block order: {list(self.block_names)}")
        reads = self.input_name if start == 0 else self.blocks[start - 1].name
        return Net(self.blocks[start:stop + 1], input_name=reads)

    def apply(self, params: Params, state: State, x: Tensor, *, train: bool = True) -> tuple[Tensor, State]:
        """Run the chain; returns the output and ``state`` with this net's entries replaced."""
        y, updates = self.run(params, state, x, train=train)
        return y, ({**state, **updates} if updates else state)

    __call__ = apply


def from_module(module: nn.Module, *, name: str | None = None, blocks: Any = None) -> Net:
    """A net over ``module``'s blocks.

    Blocks are, in this order of preference: the submodules named in ``blocks`` (dotted
    paths in execution order, or a predicate ``(name, module) -> bool``), cut out of the
    module's real ``forward`` with ``torch.fx`` (see ``mlaan_func.trace``; parameters keep
    the module's own keys), each block ending at the first point after its named call where
    ``forward`` holds one live value, so a residual that ``forward`` adds after the call
    (``h = h + f(self.b(h))``) stays in the block of ``b`` (where no such point comes before
    the next named block, ``TraceError`` names the values that stay live and the fix);
    ``module.named_blocks()`` when the module offers it (its traced
    ``forward`` must run exactly those blocks in order, or this refuses it); the children of
    an ``nn.Sequential``; or else the whole module as one block called ``name`` (default
    ``"net"``). Parameters are keyed ``"<block>.<parameter path>"``.

    >>> from torch import nn
    >>> from_module(nn.Sequential(nn.Linear(2, 3), nn.ReLU())).block_names
    ('0', '1')
    >>> from_module(nn.Linear(2, 3), name="head").param_names
    ('head.weight', 'head.bias')
    >>> from_module(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), blocks=["1", "2"]).param_names
    ('0.weight', '0.bias', '2.weight', '2.bias')
    """
    if blocks is not None:
        return _traced_net(module, blocks, name)
    if hasattr(module, "named_blocks"):
        named = list(module.named_blocks())
        check_chain(module, named)
    elif isinstance(module, nn.Sequential) and name is None:
        named = list(module.named_children())
    else:
        named = [(name or "net", module)]
    if not named:
        raise ValueError("the module has no blocks; give it at least one layer")
    if name is not None and hasattr(module, "named_blocks"):
        named = [(_join(name, n), m) for n, m in named]
    return Net(tuple(Block.of(n, m) for n, m in named))


def _traced_net(module: nn.Module, blocks: Any, name: str | None) -> Net:
    train_pieces = split_module(module, blocks, train=True)
    eval_pieces = split_module(module, blocks, train=False)
    out = []
    for (block_name, piece), (_, eval_piece) in zip(train_pieces, eval_pieces):
        block = attrs.evolve(Block.of(block_name, piece), prefix="")
        if eval_piece.code != piece.code:  # forward branches on self.training
            block = attrs.evolve(block, eval_template=_meta_template(eval_piece, False))
        out.append(block.renamed(name) if name else block)
    return Net(tuple(out))


def copy(net: Net, prefix: str, *, fresh: bool = False) -> Net:
    """The same function under new names: every key gets ``prefix + "."`` in front.

    A copy starts equal to its source (``init_params`` gives both the same values), is
    trained as a separate set of parameters, and reads the same boundary as its source.
    With ``fresh=True`` it gets its own initialisation instead (seeded by its new name), as
    AugLocal's auxiliary nets do.

    >>> from torch import nn
    >>> copy(from_module(nn.Linear(2, 3), name="fc"), "trunk").param_names
    ('trunk.fc.weight', 'trunk.fc.bias')
    >>> fc = from_module(nn.Linear(2, 3), name="fc")
    >>> params, _ = init_params(fc, copy(fc, "aux", fresh=True))
    >>> torch.equal(params["fc.weight"], params["aux.fc.weight"])
    False
    """
    if not prefix:
        raise ValueError("copy needs a non-empty prefix, e.g. copy(net, 'trunk3')")
    blocks = tuple(b.renamed(prefix) for b in net.blocks)
    if fresh:
        blocks = tuple(_fresh(b) for b in blocks)
    return Net(blocks, input_name=net.input_name)


def _fresh(block: Any) -> Any:
    if not isinstance(block, Block):
        raise TypeError(f"copy(..., fresh=True) re-initialises plain blocks; {block.name!r} is a "
                        f"{type(block).__name__}: make a fresh copy of its source net instead")
    return attrs.evolve(block, root=block.name)


def init_params(*nets: Any, seed: int = 0, device: torch.device | str | None = None,
                dtype: torch.dtype | None = None) -> tuple[Params, State]:
    """Fresh ``(params, state)`` for every block of ``nets`` (nets, heads or objectives).

    Each block is initialised from ``(seed, block root name)`` alone, so a block gets the
    same values whichever nets it appears in, and a copy equals its source. Two different
    blocks under one name are refused (``mlaan_func.identity.check_identity``).

    >>> fc = from_module(nn.Linear(2, 2), name="fc")
    >>> params, state = init_params(fc, copy(fc, "trunk"), seed=1)
    >>> sorted(params)
    ['fc.bias', 'fc.weight', 'trunk.fc.bias', 'trunk.fc.weight']
    >>> torch.equal(params["fc.weight"], params["trunk.fc.weight"])
    True
    """
    check_identity(*nets)
    params: Params = {}
    state: State = {}
    for block in _unique_blocks(nets):
        p, s = block.init(seed)
        params.update({k: v for k, v in p.items() if k not in params})
        state.update({k: v for k, v in s.items() if k not in state})
    params = {k: _to(v, device, dtype).requires_grad_(False) for k, v in params.items()}
    state = {k: _to(v, device, dtype) for k, v in state.items()}
    return params, state


def _to(t: Tensor, device, dtype) -> Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device) if device is not None else t


def _unique_blocks(items) -> list:
    seen: dict[int, Any] = {}
    for item in items:
        for block in blocks_of(item):
            seen.setdefault(id(block), block)
    return list(seen.values())


def blocks_of(item: Any) -> tuple:
    """All blocks an item (net, block, objective or a sequence of them) is made of."""
    if isinstance(item, Net):
        return item.blocks
    if hasattr(item, "nets"):
        return tuple(b for n in item.nets for b in blocks_of(n))
    if isinstance(item, (list, tuple)):
        return tuple(b for i in item for b in blocks_of(i))
    if item is None:
        return ()
    return (item,)


def check_keys(what: str, given: dict, expected: tuple[str, ...]) -> None:
    """Raise a ``KeyError`` naming the missing and unexpected keys of ``given``."""
    if len(given) == len(expected) and all(map(given.__contains__, expected)):
        return
    expected_set = set(expected)
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected_set]
    raise KeysError(
        f"{what} does not match the scheme: missing {missing[:5]}{'…' if len(missing) > 5 else ''}"
        f" ({len(missing)} in all), unexpected {extra[:5]}{'…' if len(extra) > 5 else ''}"
        f" ({len(extra)} in all). Build it with mlaan_func.init for this scheme, or load a "
        "checkpoint written by the same scheme."
    )


def output_shape(net: Net, input_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape ``net`` outputs for an input of ``input_shape`` (batch included), worked
    out on the meta device: no memory, no compute.

    >>> from torch import nn
    >>> output_shape(from_module(nn.Conv2d(3, 8, 3, stride=2, padding=1), name="c"), (2, 3, 32, 32))
    (2, 8, 16, 16)
    """
    x = torch.empty(tuple(input_shape), device="meta")
    for block in net.blocks:
        x = block.meta_forward(x)
    return tuple(x.shape)


class ExportedNet(nn.Module):
    """An ordinary ``nn.Module`` running a net's blocks in order (see ``to_module``)."""

    def __init__(self, names: Sequence[str], modules: Sequence[nn.Module]):
        super().__init__()
        self.names = list(names)
        self.blocks = nn.ModuleList(modules)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def to_module(net: Net, params: Params, state: State) -> ExportedNet:
    """The net as a plain ``nn.Module`` holding copies of its tensors: a trained backbone
    without the auxiliary heads, trunks and twins of the scheme that trained it.

    >>> from torch import nn
    >>> net = from_module(nn.Sequential(nn.Linear(2, 2)))
    >>> params, state = init_params(net)
    >>> module = to_module(net, params, state).eval()
    >>> x = torch.randn(3, 2)
    >>> torch.equal(module(x), net(params, state, x, train=False)[0])
    True
    """
    modules = []
    for block in net.blocks:
        if not isinstance(block, Block):
            raise TypeError(f"to_module exports plain blocks; {block.name!r} is a {type(block).__name__}")
        module = _copy.deepcopy(block.module)
        p, s = block.gather(params, state, train=False)
        module.load_state_dict({**p, **s}, strict=True)
        modules.append(module.to(next(iter(p.values())).device) if p else module)
    return ExportedNet(net.block_names, modules)
