"""Rematerialisation inside a block: its forward in segments, each recomputed in the backward.

``segmented(net, inside)`` is ``net`` with every module block (leap blocks' copies and
twins, stacked nets and read-only views included) running its training forward as a chain
of *segments*: pieces of the block's own ``forward``, traced with ``torch.fx`` through its
containers (``nn.Sequential``, ``nn.ModuleList``) down to its layers. Each segment runs
under ``torch.utils.checkpoint`` (non-reentrant), so the block keeps only the values that
cross a cut (its input, the inputs of the chosen layers, a residual skip) and recomputes
each segment inside the backward, one at a time (docs/design.md §6, "Remat inside blocks").
``inside`` says where to cut:

* ``"block_input"``: nowhere; the block keeps its input and recomputes all of it;
* ``"conv_inputs"``: before every convolution and linear layer (after the first);
* ``"nested"``: both; the block keeps its input, and its recomputation in the backward
  keeps the inputs of its convolutions (each block's convolutions run three times);
* a predicate ``(name, module) -> bool``: before every layer it chooses.

An activation whose backward reads only its output (ReLU, tanh, sigmoid) that ends a
segment runs outside the checkpoint: what it saves is the value it hands on, which stays
alive anyway, where recomputing it would make a second copy.

The function is the same: the same ops on the same values in the same order, so outputs,
gradients and BatchNorm statistics are bit for bit those of the plain block. Statistics
are written once: each segment clones the buffers it writes from the state it was given,
so a recomputation writes into fresh clones that are dropped. Random draws repeat (the
checkpoint replays the generator). Evaluation runs the block as it is.

>>> import torch
>>> from torch import nn
>>> from mlaan_func.core import from_module, init_params
>>> net = from_module(nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))))
>>> params, state = init_params(net)
>>> x = torch.randn(5, 4)
>>> cut = segmented(net, "conv_inputs")
>>> [[s.checkpointed for s in b.segments] for b in cut.blocks]   # Linear | Tanh | Linear
[[True, False, True]]
>>> torch.equal(cut(params, state, x)[0], net(params, state, x)[0])
True
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import torch
from torch import Tensor, fx, nn
from torch.utils.checkpoint import checkpoint

from ..errors import SchemeError, TraceError
from .net import Block, Net, Params, State, Wrapper, _join, call_explained
from .randomness import seed_block
from .swap import swapped_call
from .trace import met_traced_value

Inside = str | Callable[[str, nn.Module], bool]
"""Where a block is cut: ``"block_input"``, ``"conv_inputs"``, ``"nested"`` or a predicate ``(name, module)``."""

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def cut_rule(inside: Inside) -> Callable[[str, nn.Module], bool]:
    """The predicate ``inside`` names; anything else is refused, naming the choices."""
    if inside == "block_input":
        return lambda name, module: False
    if inside in ("conv_inputs", "nested"):
        return lambda name, module: isinstance(module, _WEIGHTED)
    if callable(inside) and not isinstance(inside, str):
        return inside
    raise SchemeError(f"inside= is 'block_input', 'conv_inputs', 'nested' or a predicate (name, module) -> bool "
                      f"choosing the layers to cut before; got {inside!r}")


_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid)
_ACTIVATION_CALLS = {torch.relu, torch.tanh, torch.sigmoid, torch.nn.functional.relu, torch.nn.functional.tanh,
                     torch.nn.functional.sigmoid, "relu", "tanh", "sigmoid"}


def _saves_only_output(node: fx.Node, template: nn.Module) -> bool:
    """Whether ``node`` is an activation whose backward reads only its output (ReLU, tanh,
    sigmoid): run outside a checkpoint, it keeps the boundary it hands on anyway, where a
    recomputation would make a second copy of it."""
    if node.op == "call_module":
        return isinstance(template.get_submodule(str(node.target)), _ACTIVATIONS)
    if node.kwargs.get("inplace"):
        return False
    return node.op in ("call_function", "call_method") and node.target in _ACTIVATION_CALLS


class _LayerTracer(fx.Tracer):
    """Traces a block's ``forward`` through its containers; every other submodule is one call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return not isinstance(m, _CONTAINERS)


def _graph(block: Block) -> fx.Graph:
    template = block.train_template
    try:
        return _LayerTracer().trace(template)
    except (fx.proxy.TraceError, RuntimeError, TypeError) as err:
        if not isinstance(err, fx.proxy.TraceError) and not met_traced_value(err):
            raise
        raise TraceError(
            f"block {block.name!r} ({type(template).__name__}) cannot be cut inside: its forward does not trace "
            f"with torch.fx ({type(err).__name__}: {err}). Rematerialise it whole (mf.remat without inside=), "
            "or make its forward independent of tensor values") from err


@attrs.frozen(eq=False)
class Segment:
    """One piece of a block's forward: ``run(params, state, *values) -> (values out, state
    written)`` on the block's local names; ``buffers`` are the state entries it writes."""

    module: fx.GraphModule = attrs.field(repr=False)
    buffers: tuple[str, ...]
    call: swapped_call = attrs.field(repr=False)
    checkpointed: bool = True

    def run(self, params: Params, state: State, *values: Tensor) -> tuple[tuple[Tensor, ...], State]:
        written = {n: state[n].clone() for n in self.buffers}
        return self.call(params, written, *values), written


def _segments(block: Block, cut: Callable[[str, nn.Module], bool]) -> tuple[tuple[Segment, ...], tuple]:
    """The block's segments and their wiring: the block's input node, for each segment the
    graph nodes it reads, hands on and is the last to read, and the node(s) the block returns."""
    graph = _graph(block)
    template = block.train_template
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    ops = [n for n in nodes if n.op in ("call_module", "call_function", "call_method")]
    (output,) = [n for n in nodes if n.op == "output"]
    if len(inputs) != 1 or not ops:
        raise TraceError(f"block {block.name!r} cannot be cut inside: its forward takes {len(inputs)} inputs "
                         f"and runs {len(ops)} operations; rematerialise it whole (mf.remat without inside=)")
    starts = [0] + [i for i, n in enumerate(ops) if i and n.op == "call_module"
                    and cut(str(n.target), template.get_submodule(str(n.target)))]
    bounds = []  # (start, stop, checkpointed)
    for a, b in zip(starts, starts[1:] + [len(ops)]):
        if b - a > 1 and _saves_only_output(ops[b - 1], template):  # run apart: nothing to recompute
            bounds += [(a, b - 1, True), (b - 1, b, False)]
        else:
            bounds.append((a, b, not (b - a == 1 and _saves_only_output(ops[a], template))))
    segment_of = {n: j for j, (a, b, _) in enumerate(bounds) for n in ops[a:b]}
    local_state = set(block.local_state)

    def sources(n: fx.Node) -> list[fx.Node]:
        return [m for m in n.all_input_nodes if m.op != "get_attr"]

    readers: dict[fx.Node, set] = {}
    for n in ops:
        for m in sources(n):
            readers.setdefault(m, set()).add(segment_of[n])
    for m in sources(output):
        readers.setdefault(m, set()).add(len(bounds))
    segments, wiring = [], []
    for j, (a, b, checkpointed) in enumerate(bounds):
        own = ops[a:b]
        reads = list(dict.fromkeys(m for n in own for m in sources(n) if segment_of.get(m) != j))
        hands = [n for n in own if any(r > j for r in readers.get(n, ()))]
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for m in reads:
            env[m] = g.placeholder(m.name)
        for n in own:
            for m in n.all_input_nodes:
                if m.op == "get_attr" and m not in env:
                    env[m] = g.node_copy(m, lambda v: env[v])
            env[n] = g.node_copy(n, lambda v: env[v])
        g.output(tuple(env[n] for n in hands))
        module = fx.GraphModule(template, g, class_name=f"Segment{j}")
        buffers = tuple(n for n, _ in module.named_buffers() if n in local_state)
        segments.append(Segment(module, buffers, swapped_call(module), checkpointed))
        # values no later segment reads are let go after this one (the block's result never is)
        done = tuple(m for m in reads if max(readers[m]) == j)
        wiring.append((tuple(reads), tuple(hands), done))
    if any(m.op == "get_attr" for m in output.all_input_nodes):
        raise TraceError(f"block {block.name!r} cannot be cut inside: its forward returns a parameter or "
                         "buffer itself; rematerialise it whole (mf.remat without inside=)")
    return tuple(segments), (inputs[0], tuple(wiring), output.args[0])


@attrs.frozen(eq=False)
class SegmentedBlock(Wrapper):
    """``block`` whose training forward runs in ``segments`` (see the module docstring)."""

    block: Block
    segments: tuple[Segment, ...]
    wiring: tuple = attrs.field(repr=False)
    nested: bool = False

    @classmethod
    def of(cls, block: Block, inside: Inside) -> "SegmentedBlock":
        segments, wiring = _segments(block, cut_rule(inside))
        return cls(block, segments, wiring, nested=inside == "nested")

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.block.param_names

    def init(self, seed: int) -> tuple[Params, State]:
        return self.block.init(seed)

    def apply(self, params: Params, state: State, x: Tensor, *, train: bool) -> tuple[Tensor, State]:
        block = self.block
        if not train:
            return block.apply(params, state, x, train=False)
        p, s = block.gather(params, state, train=False)  # each segment clones what it writes
        seed_block(block.name)
        placeholder, wiring, result = self.wiring

        def segments(x: Tensor) -> tuple[Any, State]:
            values, written = {placeholder: x}, {}
            for segment, (reads, hands, done) in zip(self.segments, wiring):
                args = [values[m] for m in reads]
                if segment.checkpointed and torch.is_grad_enabled():
                    outs, new = checkpoint(segment.run, p, s, *args, use_reentrant=False)
                else:
                    outs, new = segment.run(p, s, *args)
                values.update(zip(hands, outs))
                for m in done:
                    del values[m]
                del args, outs
                written.update(new)
            return fx.node.map_arg(result, lambda n: values[n]), written

        def run() -> tuple[Any, State]:
            if self.nested and torch.is_grad_enabled():  # the block keeps its input; its recomputation, the cuts
                return checkpoint(segments, x, use_reentrant=False)
            return segments(x)

        y, written = call_explained(block, x, p, run)
        return y, {_join(block.prefix, n): v for n, v in written.items()}


def segmented(net: Net, inside: Inside) -> Net:
    """``net`` with every module block cut inside as ``inside`` says (see the module docstring)."""
    cut_rule(inside)

    def convert(b: Any) -> Any:
        if isinstance(b, Block):
            return SegmentedBlock.of(b, inside)
        children = b.children()
        return b.with_children(tuple(convert(c) for c in children)) if children else b

    return Net(tuple(convert(b) for b in net.blocks), input_name=net.input_name)
