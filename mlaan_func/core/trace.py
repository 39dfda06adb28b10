"""Blocks from a module's own ``forward``: ``torch.fx`` partitions at named submodules.

``split_module(model, blocks)`` traces ``model.forward`` symbolically, treating each named
submodule as one call, and cuts the graph right after each of those calls. Everything
``forward`` does between two named submodules (skips, reshapes, a cls token, a positional
embedding) belongs to the block that ends at the later one; anything after the last named
submodule belongs to the last block. Each block is a ``torch.fx.GraphModule`` whose parameter
names are the model's own (``"layer1.0.conv1.weight"``, ``"cls_token"``), so a net made from
it uses the keys of ``model.state_dict()``.

>>> import torch
>>> from torch import nn
>>> class Skip(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a, self.b, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
...     def forward(self, x):
...         h = self.a(x)
...         return self.fc(torch.relu(self.b(h) + h))
>>> [(name, sorted(dict(piece.named_parameters()))[:1]) for name, piece in split_module(Skip(), ["a", "fc"])]
[('a', ['a.bias']), ('fc', ['b.bias'])]

``check_chain(model, named)`` is the cheap structural check ``from_module`` runs on a module
that offers ``named_blocks()``: its traced ``forward`` must be exactly those blocks in order.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch  # noqa: F401  (the doctests use it)
from torch import fx, nn

from ..errors import TraceError

BlockSelector = Sequence[str] | Callable[[str, nn.Module], bool]
"""Names of submodules (in execution order), or a predicate ``(name, module) -> bool``."""




class _CutTracer(fx.Tracer):
    """A tracer that steps only into the modules that contain a cut: every other submodule
    (the cuts included) stays one call, so its own code need not be traceable."""

    def __init__(self, cuts: Sequence[str]):
        super().__init__()
        self.enclosing = {c.rsplit(".", i)[0] for c in cuts for i in range(1, c.count(".") + 1)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname not in self.enclosing


def _trace(model: nn.Module, cuts: Sequence[str], train: bool) -> fx.Graph:
    was_training = model.training
    model.train(train)
    try:
        return _CutTracer(cuts).trace(model)
    except fx.proxy.TraceError as err:
        raise TraceError(
            f"{type(model).__name__}.forward cannot be traced with torch.fx ({err}). Make the "
            "control flow in forward independent of tensor values, or give the module a "
            "named_blocks() method that lists its blocks in order (its forward must then run "
            "exactly those blocks one after another)") from err
    finally:
        model.train(was_training)


def _select(model: nn.Module, blocks: BlockSelector) -> list[str]:
    modules = dict(model.named_modules())
    if callable(blocks):
        chosen: list[str] = []
        for name, module in modules.items():
            if name and blocks(name, module) and not any(name.startswith(c + ".") for c in chosen):
                chosen.append(name)
        if not chosen:
            raise TraceError("the block predicate chose no submodule; it is called as "
                             "predicate(name, module) for every name in model.named_modules()")
        return chosen
    if isinstance(blocks, str):
        raise TypeError(f"blocks are a list of submodule names, e.g. [{blocks!r}], not a string")
    names = list(blocks)
    if not names:
        raise TraceError("from_module(model, blocks=[...]) needs at least one submodule name")
    for name in names:
        if name not in modules or not name:
            near = [n for n in modules if n and (n.startswith(name.split(".")[0]) or name.startswith(n))][:8]
            raise TraceError(
                f"{name!r} is not a submodule of {type(model).__name__}; name blocks by their paths "
                f"in model.named_modules(), e.g. {near or [n for n in modules if n][:8]}")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise TraceError(f"block names appear twice: {twice}; list each submodule once")
    for name in names:
        outer = [o for o in names if name.startswith(o + ".")]
        if outer:
            raise TraceError(f"block {name!r} lies inside block {outer[0]!r}; cut at one of them, not both")
    return names


def _cut_nodes(graph: fx.Graph, names: list[str], predicate_order: bool) -> list[fx.Node]:
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    nodes = []
    for name in names:
        found = calls.get(name, [])
        if not found:
            raise TraceError(f"submodule {name!r} is never called by forward, so no block can end "
                             "there; cut at a submodule that forward calls")
        if len(found) > 1:
            raise TraceError(f"submodule {name!r} is called {len(found)} times in forward; a block "
                             "must end at a single call: cut at a submodule called once")
        nodes.append(found[0])
    order = {n: i for i, n in enumerate(graph.nodes)}
    if predicate_order:
        return sorted(nodes, key=order.__getitem__)
    for a, b in zip(nodes, nodes[1:]):
        if order[b] < order[a]:
            ran = [n.target for n in sorted(nodes, key=order.__getitem__)]
            raise TraceError(f"blocks out of execution order: {b.target!r} runs before {a.target!r}; "
                             f"list them as forward runs them: {ran}")
    return nodes


def _describe(node: fx.Node) -> str:
    if node.op == "placeholder":
        return f"{node.name!r} (the model's input)"
    if node.op == "call_module":
        return f"{node.name!r} (output of {node.target})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name!r} ({target})"


def _segments(graph: fx.Graph, cuts: list[fx.Node]) -> tuple[dict[fx.Node, int], fx.Node, fx.Node]:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TraceError(f"forward takes {len(placeholders)} inputs {[n.name for n in placeholders]}; "
                         "a net reads one tensor: wrap the model so forward(x) takes one")
    output = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        raise TraceError("forward returns a tuple or dict; a net returns one tensor: wrap the model "
                         "so forward returns only the tensor the loss scores")
    segment: dict[fx.Node, int] = {}
    current, cut_set = 0, {c: i for i, c in enumerate(cuts)}
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        segment[node] = current
        if node in cut_set:
            current = min(cut_set[node] + 1, len(cuts) - 1)
    # what follows the last named block belongs to it
    return segment, placeholders[0], output


def _owner_of_attrs(graph: fx.Graph, segment: dict[fx.Node, int], model: nn.Module,
                    names: list[str]) -> None:
    """get_attr nodes move to the block that uses them; one used by two blocks is refused,
    and so is a module with parameters called from two blocks."""
    for node in graph.nodes:
        if node.op == "get_attr":
            users = {segment[u] for u in node.users}
            if len(users) > 1:
                blocks = [names[i] for i in sorted(users)]
                raise TraceError(f"{node.target!r} is used by blocks {blocks}; a parameter must stay in "
                                 "one block: move the cuts so its uses fall in one block")
            if users:
                segment[node] = users.pop()
    used: dict[str, set[int]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            used.setdefault(node.target, set()).add(segment[node])
    for target, where in used.items():
        module = model.get_submodule(target)
        has_tensors = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        if len(where) > 1 and has_tensors:
            blocks = [names[i] for i in sorted(where)]
            raise TraceError(f"submodule {target!r} is called from blocks {blocks}; a module with "
                             "parameters must stay in one block: move the cuts around its calls")


def _check_boundaries(graph: fx.Graph, segment: dict[fx.Node, int], cuts: list[fx.Node],
                      placeholder: fx.Node, names: list[str]) -> None:
    for i, cut in enumerate(cuts[:-1]):
        live = []
        for node in [placeholder, *segment]:
            if node.op == "get_attr":
                continue
            at = -1 if node is placeholder else segment[node]
            if at <= i and any(u.op == "output" or segment.get(u, -1) > i for u in node.users):
                live.append(node)
        if live != [cut]:
            crossing = ", ".join(_describe(n) for n in live)
            raise TraceError(
                f"the boundary after block {names[i]!r} carries {len(live)} values: {crossing}; a "
                "boundary must carry one tensor. Move the cut so that the skip (or other reuse) lies "
                "inside one block, or give the model a named_blocks() method")


def _piece(model: nn.Module, graph: fx.Graph, nodes: list[fx.Node], first_input: fx.Node,
           result: fx.Node, name: str) -> fx.GraphModule:
    new = fx.Graph()
    env = {first_input: new.placeholder("x")}
    for node in nodes:
        env[node] = new.node_copy(node, lambda n: env[n])
    new.output(env[result])
    new.lint()
    return fx.GraphModule(model, new, class_name=f"Block_{name.replace('.', '_')}")


def split_module(model: nn.Module, blocks: BlockSelector, *, train: bool = True
                 ) -> list[tuple[str, fx.GraphModule]]:
    """``[(block name, piece)]``: ``model.forward`` cut after each named submodule's call.

    ``blocks`` are submodule names in the order forward calls them (or a predicate over
    ``model.named_modules()``, outermost matches only, taken in execution order). Raises
    ``TraceError`` naming the fix when a name is not a submodule, the order is wrong, a
    boundary carries more than one tensor, or forward cannot be traced.

    >>> from torch import nn
    >>> pieces = split_module(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), ["0", "2"])
    >>> [name for name, _ in pieces]
    ['0', '2']
    """
    names = _select(model, blocks)
    graph = _trace(model, names, train)
    cuts = _cut_nodes(graph, names, predicate_order=callable(blocks))
    names = [c.target for c in cuts]
    segment, placeholder, output = _segments(graph, cuts)
    _owner_of_attrs(graph, segment, model, names)
    _check_boundaries(graph, segment, cuts, placeholder, names)
    pieces, reads = [], placeholder
    for i, name in enumerate(names):
        nodes = [n for n in graph.nodes if segment.get(n) == i]
        result = output.args[0] if i == len(names) - 1 else cuts[i]
        if result is placeholder:
            raise TraceError("forward returns its input unchanged; there is nothing to split")
        pieces.append((name, _piece(model, graph, nodes, reads, result, name)))
        reads = cuts[i]
    return pieces


def check_chain(model: nn.Module, named: Sequence[tuple[str, nn.Module]]) -> None:
    """Assert ``model.forward`` runs exactly the ``named`` blocks one after another (traced
    with each block as one call); raise ``TraceError`` naming what forward does besides.

    >>> from torch import nn
    >>> class Two(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
    ...     def named_blocks(self):
    ...         return [("a", self.a), ("b", self.b)]
    ...     def forward(self, x):
    ...         return self.b(torch.relu(self.a(x)))
    >>> two = Two()
    >>> check_chain(two, two.named_blocks())
    Traceback (most recent call last):
    ...
    mlaan_func.errors.TraceError: Two.forward does not just run its named_blocks() in order: it also computes ['relu'] ...
    """
    by_id = {id(m): n for n, m in named}
    paths = {id(m): p for p, m in model.named_modules()}
    unknown = [n for n, m in named if id(m) not in paths]
    if unknown:
        raise TraceError(f"named_blocks() of {type(model).__name__} returns blocks {unknown} that are not "
                         "its submodules; return the submodules forward calls")
    graph = _trace(model, [paths[id(m)] for _, m in named], model.training)
    ran, extra = [], []
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_module" and id(model.get_submodule(node.target)) in by_id:
            ran.append((by_id[id(model.get_submodule(node.target))], node))
        else:
            extra.append(node.name)
    names = [n for n, _ in named]
    chained = len(ran) == len(names) and [n for n, _ in ran] == names
    if chained:
        placeholder = next(n for n in graph.nodes if n.op == "placeholder")
        output = next(n for n in graph.nodes if n.op == "output")
        feeds = [placeholder] + [node for _, node in ran]
        chained = (all(node.args == (feeds[i],) and not node.kwargs for i, (_, node) in enumerate(ran))
                   and output.args[0] is feeds[-1])
    if extra or not chained:
        what = f"it also computes {extra} " if extra else ""
        raise TraceError(
            f"{type(model).__name__}.forward does not just run its named_blocks() in order: {what}"
            f"(blocks called: {[n for n, _ in ran]}, named_blocks: {names}). A net built from "
            "named_blocks() would silently drop that. Move the extra work into the blocks, or drop "
            "named_blocks() and split the real forward with from_module(model, blocks=[...])")
