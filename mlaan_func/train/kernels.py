"""Compiled block kernels: one compiled function per kind of block, shared by every block of
that kind.

A block computes a function of its module-local tensors and its input; its names only say
where those tensors live. Blocks whose modules have the same type, configuration and tensor
shapes therefore compute the same function, so one ``torch.compile``d kernel serves them all:
the fifteen BasicBlocks of a ResNet-32 stage, their trunk copies and their EMA twins compile
once (once per variant dynamo tells apart: input with or without gradient, parameters with or
without gradient), however many modules the scheme has. The compiled step of
the executor (``mlaan_func.train.execute``) runs every block through its kernel; losses stay eager.

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
