"""Compiled block kernels: one compiled function per kind of block, shared by every block of
that kind.

A block computes a function of its module-local tensors and its input; its names only say
where those tensors live. Blocks whose modules have the same type, configuration and tensor
shapes therefore compute the same function, so one ``torch.compile``d kernel serves them all:
the fifteen BasicBlocks of a ResNet-32 stage, their trunk copies and their EMA twins compile
once (once per variant dynamo tells apart: input with or without gradient, parameters with or
without gradient), however many modules the scheme has (``kernel_net``: a net compiled block
by block). The compiled step of the executor (``mlaan_func.train.execute``) compiles longer
*runs* the same way (``run_kernel``: an objective's own suffix, or a piece of several
blocks, keyed by the fingerprints of its blocks one by one), since on CPU fusing pays only
across blocks (``worth_compiling``); losses stay eager.

A kernel is called eagerly per block, so the block's random stream is seeded by its name
before the call (``mlaan_func.randomness``), compiled or not.

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> net = mf.from_module(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh()))
>>> table = kernel_table([net], backend="eager")
>>> len(table)            # two Linear(4, 4) and two Tanh: two kernels
2
>>> fast = kernel_net(net, table)
>>> params, state = mf.init_params(net)
>>> x = torch.randn(3, 4)
>>> torch.allclose(fast.run(params, state, x)[0], net.run(params, state, x)[0])
True
"""

from __future__ import annotations

import types
from typing import Any, Callable, Hashable, Iterable

import attrs
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..core.identity import fingerprint, module_blocks
from ..core.net import Block, Net, Params, State, Wrapper, _join, call_explained
from ..core.randomness import seed_block

Kernel = Callable[[Params, State, Tensor], tuple[Tensor, State]]


def signature(block: Block) -> Hashable:
    """What a block computes, as a key: its fingerprint (``mlaan_func.identity``: module
    classes, configuration, tensor shapes and dtypes, without names). Blocks whose
    configuration cannot be compared from the outside (an opaque attribute, a hook) have a
    fingerprint of their own, so they get a kernel of their own.

    >>> a = Block.of("a", nn.Linear(3, 2))
    >>> signature(a) == signature(Block.of("b", nn.Linear(3, 2))) != signature(Block.of("c", nn.Linear(3, 4)))
    True
    """
    return fingerprint(block)


def own_code(fn: Callable, name: str) -> Callable:
    """``fn`` behind a code object of its own, named ``name``, so that ``torch.compile``
    keeps a separate cache (and recompile limit) for it: distinct objectives, or kernels,
    never count against one another's."""
    def call(*args):
        return fn(*args)

    code = call.__code__.replace(co_name=name)
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


def _train_kernel(template: nn.Module) -> Kernel:
    def kernel(params: Params, state: State, x: Tensor) -> tuple[Tensor, State]:
        state = {n: v.clone() for n, v in state.items()}  # BatchNorm writes into these
        return functional_call(template, (params, state), (x,), strict=True), state

    return kernel


def kernel_table(nets: Iterable[Any], *, backend: str = "inductor") -> dict[Hashable, Kernel]:
    """One compiled training kernel per block signature found in ``nets`` (nets, or anything
    with ``.nets`` such as objectives), keyed by ``signature``."""
    table: dict[Hashable, Kernel] = {}
    flat = [n for item in nets for n in getattr(item, "nets", (item,))]
    for block in (m for net in flat for b in net.blocks for m in module_blocks(b)):
        key = signature(block)
        if key not in table:
            label = f"block_kernel_{len(table)}_{type(block.module).__name__}"
            table[key] = torch.compile(own_code(_train_kernel(block.train_template), label),
                                       backend=backend, dynamic=False)
    return table


def retainable():
    """The context to run (and differentiate) kernels in: compiled without donated buffers,
    since the shared step takes several VJPs through one forward (``retain_graph=True``),
    which a backward that donates its buffers refuses. Backward graphs compile lazily, at
    the first VJP, so the whole step runs inside it."""
    return torch._functorch.config.patch(donated_buffer=False)


@attrs.frozen(eq=False)
class KernelBlock(Wrapper):
    """``block`` whose training forward runs through a shared compiled kernel (evaluation
    runs the block itself)."""

    block: Block
    kernel: Kernel

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.block.param_names

    def apply(self, params: Params, state: State, x: Tensor, *, train: bool) -> tuple[Tensor, State]:
        if not train:
            return self.block.apply(params, state, x, train=False)
        block = self.block
        p, s = block.gather(params, state, train=False)  # the kernel clones what it writes
        seed_block(block.name)
        y, s = call_explained(block, x, p, lambda: self.kernel(p, s, x))
        return y, {_join(block.prefix, n): v for n, v in s.items()}


def kernel_net(net: Net, table: dict[Hashable, Kernel]) -> Net:
    """``net`` with every block (leap blocks' copies and twins included) running through its
    kernel from ``table``; blocks of other kinds run as they are."""
    def convert(b: Any) -> Any:
        if isinstance(b, Block):
            return KernelBlock(b, table[signature(b)])
        children = b.children()
        return b.with_children(tuple(convert(c) for c in children)) if children else b

    return Net(tuple(convert(b) for b in net.blocks), input_name=net.input_name)


def run_signature(nets: tuple[Net, ...]) -> Hashable:
    """What a run of nets computes, as a key: the fingerprints of its blocks, where each net
    ends, and which of its tensor slots name the same tensor. Two runs with equal keys
    compute the same function of their tensors taken in order (``run_names``), whatever
    the names."""
    blocks = [b for net in nets for b in net.blocks]
    first: dict[str, int] = {}
    pattern = tuple(first.setdefault(n, len(first)) for b in blocks
                    for n in (*b.param_names, *b.reads, *b.state_names))
    return (tuple(fingerprint(b) for b in blocks), tuple(len(net.blocks) for net in nets), pattern)


def run_names(nets: tuple[Net, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The parameters (read-only views' sources included) and the state a run reads, in
    block order, each once."""
    params = tuple(dict.fromkeys(n for net in nets for n in (*net.param_names, *net.reads)))
    return params, tuple(dict.fromkeys(n for net in nets for n in net.state_names))


def _run_kernel(nets: tuple[Net, ...]) -> Callable:
    def run(params: Params, state: State, x: Tensor) -> tuple[tuple[Tensor, ...], tuple[State, ...]]:
        outs, updates = [], []
        for net in nets:
            x, new = net.run(params, state, x, train=True)
            outs.append(x)
            updates.append(new)
        return tuple(outs), tuple(updates)

    return run


@attrs.frozen(eq=False)
class RunKernel:
    """A run of nets (consecutive pieces of a plan) in training, as one compiled graph
    shared by every run with the same ``run_signature``: the graph is traced on the names
    of the first such run, and each call renames its tensors to those and the state it
    writes back. ``__call__(params, state, x) -> (outputs, updates)`` gives each net's
    output and state writes, as running the nets one after another does.

    >>> import torch
    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> a, b = (mf.from_module(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)), name=n) for n in "ab")
    >>> table = {}
    >>> ka, kb = run_kernel((a,), table, backend="aot_eager"), run_kernel((b,), table, backend="aot_eager")
    >>> len(table), ka.compiled is kb.compiled
    (1, True)
    >>> params, state = mf.init_params(b)
    >>> (y,), (new,) = kb(params, state, torch.randn(4, 3))
    >>> sorted(new) == sorted(b.state_names), y.shape
    (True, torch.Size([4, 3]))
    """

    compiled: Callable
    first_block: str
    params: tuple[tuple[str, str], ...]   # (own name, the traced run's name)
    state: tuple[tuple[str, str], ...]
    back: dict[str, str]                  # the traced run's state name -> own name

    def __call__(self, params: Params, state: State, x: Tensor) -> tuple[tuple[Tensor, ...], tuple[State, ...]]:
        seed_block(self.first_block)
        outs, updates = self.compiled({t: params[n] for n, t in self.params},
                                      {t: state[n] for n, t in self.state}, x)
        return outs, tuple({self.back[t]: v for t, v in u.items()} for u in updates)


def run_kernel(nets: tuple[Net, ...], table: dict[Hashable, tuple], *, backend: str = "inductor") -> RunKernel:
    """The ``RunKernel`` of ``nets``, compiling it into ``table`` (keyed by ``run_signature``)
    unless a run that computes the same function is there already."""
    key = run_signature(nets)
    if key not in table:
        label = f"run_kernel_{len(table)}_{len(key[0])}_blocks"
        table[key] = (torch.compile(own_code(_run_kernel(nets), label), backend=backend, dynamic=False),
                      run_names(nets))
    compiled, (traced_params, traced_state) = table[key]
    own_params, own_state = run_names(nets)
    return RunKernel(compiled, nets[0].blocks[0].name, tuple(zip(own_params, traced_params)),
                     tuple(zip(own_state, traced_state)), dict(zip(traced_state, own_state)))


def worth_compiling(net: Net, x: Tensor) -> bool:
    """Whether a piece computed apart from an objective's tail runs through its compiled
    kernel: on CUDA always; on CPU only a run of several module blocks. CPU inductor's code
    for one block's normalisation and activations is slower than ATen's, and fusing pays
    only across blocks (``bench/compile.py``, docs/benchmarks.md "Compiled steps")."""
    return x.is_cuda or sum(1 for b in net.blocks for _ in module_blocks(b)) > 1
