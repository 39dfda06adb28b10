"""Blocks from a module's own ``forward``: ``torch.fx`` partitions at named submodules.

``split_module(model, blocks)`` traces ``model.forward`` symbolically, treating each named
submodule as one call, and cuts the graph after each of those calls, at the first point
where ``forward`` holds exactly one live value: right after the call when nothing else is
read later, or after the residual add when ``forward`` writes the skip itself
(``h = h + f(self.b(h))`` cut at ``b`` ends after the add). Whatever ``forward`` does from
there up to the next named submodule (skips, reshapes, a cls token, a positional
embedding) belongs to the block that ends at the later one; anything after the last named
submodule belongs to the last block. Where no such point comes before the next named
submodule's call, ``TraceError`` names the block, the values that stay live and the fix.
Each block is a ``torch.fx.GraphModule`` whose parameter names are the model's own
(``"layer1.0.conv1.weight"``, ``"cls_token"``), so a net made from it uses the keys of
``model.state_dict()`` (docs/design.md §7, "Any backbone").

>>> import torch
>>> from torch import nn
>>> class Skip(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a, self.b, self.fc = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
...     def forward(self, x):
...         h = self.a(x)
...         h = h + torch.tanh(self.b(h))       # the residual, written in forward
...         return self.fc(torch.relu(h))
>>> pieces = split_module(Skip(), ["a", "b", "fc"])
>>> [(name, sorted(dict(piece.named_parameters()))) for name, piece in pieces]
[('a', ['a.bias', 'a.weight']), ('b', ['b.bias', 'b.weight']), ('fc', ['fc.bias', 'fc.weight'])]
>>> [node.name for node in pieces[1][1].graph.nodes]           # block b ends after the add
['x', 'b', 'tanh', 'add', 'output']

``check_chain(model, named)`` is the cheap structural check ``from_module`` runs on a module
that offers ``named_blocks()``: its traced ``forward`` must be exactly those blocks in order.
"""

from __future__ import annotations

import os
import re
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


def met_traced_value(err: Exception) -> bool:
    """Whether ``err`` (a ``RuntimeError`` or ``TypeError`` raised while tracing) is code that
    needs real tensors meeting an ``fx`` proxy, rather than a bug of its own."""
    return isinstance(err, (RuntimeError, TypeError)) and "Proxy" in str(err)


def _trace(model: nn.Module, cuts: Sequence[str], train: bool, stacks: bool = False) -> fx.Graph:
    was_training = model.training
    model.train(train)
    try:
        tracer = _CutTracer(cuts)
        tracer.record_stack_traces = stacks
        return tracer.trace(model)
    except fx.proxy.TraceError as err:
        raise TraceError(
            f"{type(model).__name__}.forward cannot be traced with torch.fx ({err}). Make the "
            "control flow in forward independent of tensor values, or give the module a "
            "named_blocks() method that lists its blocks in order (its forward must then run "
            "exactly those blocks one after another)") from err
    except (RuntimeError, TypeError) as err:
        if not met_traced_value(err):
            raise
        inside = sorted({c.rsplit(".", 1)[0] for c in cuts if "." in c})
        raise TraceError(
            f"{type(model).__name__}.forward cannot be traced with torch.fx: code that needs real "
            f"tensors (einops, NumPy, a C extension) met a traced value ({type(err).__name__}: {err}). "
            "The tracer steps into every module that contains a cut"
            f"{f' (here {inside[:4]})' if inside else ''}: cut at submodules around that code instead, "
            "or give the module a named_blocks() method") from err
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


def _describe(node: fx.Node, where: dict[str, str] | None = None) -> str:
    line = f", from {where[node.name]}" if where and where.get(node.name) else ""
    if node.op == "placeholder":
        return f"{node.name!r} (the model's input)"
    if node.op == "call_module":
        return f"{node.name!r} (output of {node.target}{line})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.name!r} ({target}{line})"


_FRAME = re.compile(r'File "(?P<path>[^"]*)", line (?P<line>\d+), in [^\n]*\n\s*(?P<code>[^\n]*)')


def _source_lines(model: nn.Module, cuts: Sequence[str], train: bool) -> dict[str, str]:
    """Node name -> the line of ``forward`` that computed it (``"`h = h + r` at model.py:52"``),
    from a second trace that records stack traces (slower, so only to explain an error)."""
    try:
        graph = _trace(model, cuts, train, stacks=True)
    except TraceError:
        return {}
    out = {}
    for node in graph.nodes:
        frame = _FRAME.search(node.stack_trace or "")
        if frame:
            code = re.sub(r"\s+#.*$", "", frame["code"].strip())   # the line, its comment left off
            out[node.name] = f"`{code}` at {os.path.basename(frame['path'])}:{frame['line']}"
    return out


def _ends(graph: fx.Graph) -> tuple[fx.Node, fx.Node]:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise TraceError(f"forward takes {len(placeholders)} inputs {[n.name for n in placeholders]}; "
                         "a net reads one tensor: wrap the model so forward(x) takes one")
    output = next(n for n in graph.nodes if n.op == "output")
    if not isinstance(output.args[0], fx.Node):
        raise TraceError("forward returns a tuple or dict; a net returns one tensor: wrap the model "
                         "so forward returns only the tensor the loss scores")
    return placeholders[0], output


def _live_after(graph: fx.Graph, placeholder: fx.Node) -> tuple[list[fx.Node], list[list[fx.Node]]]:
    """The graph's computing nodes in order, and for each the values live right after it:
    computed there or before (the input included) and read by a later node or returned.
    ``get_attr`` nodes are not values here: each moves to the block that reads it."""
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    at = {n: i for i, n in enumerate(nodes)}
    end = len(nodes)
    last_use = {}
    for node in (placeholder, *nodes):
        if node.op != "get_attr":
            last_use[node] = max((end if u.op == "output" else at[u] for u in node.users), default=-1)
    live = {placeholder: None} if last_use[placeholder] >= 0 else {}
    after = []
    for i, node in enumerate(nodes):
        if last_use.get(node, -1) > i:
            live[node] = None
        for value in [v for v in live if last_use[v] == i]:
            del live[value]
        after.append(list(live))
    return nodes, after


def _boundaries(graph: fx.Graph, cuts: list[fx.Node], placeholder: fx.Node, names: list[str],
                source: Callable[[], dict[str, str]] = dict) -> list[tuple[fx.Node, fx.Node]]:
    """Where each block but the last ends: ``(last node of the block, the value it passes
    on)``, at the first node from the block's named call, before the next block's call,
    after which exactly one value is live (so a residual written in ``forward`` right after
    the call, ``h = h + f(self.b(h))``, ends up in the block of ``b``). ``source()`` gives
    the lines of ``forward`` that an error names."""
    nodes, after = _live_after(graph, placeholder)
    at = {n: i for i, n in enumerate(nodes)}

    def first_single(start: int, stop: int) -> int | None:
        return next((p for p in range(start, stop) if len(after[p]) == 1), None)

    ends: list[tuple[fx.Node, fx.Node]] = []
    for i, cut in enumerate(cuts[:-1]):
        stop = at[cuts[i + 1]]
        single = first_single(at[cut], stop)
        if single is None:
            begin = at[ends[-1][0]] + 1 if ends else 0
            calls = [n.target for n in graph.nodes if n.op == "call_module"]
            others = [n.target for n in nodes[begin:stop] if n.op == "call_module" and n is not cut
                      and calls.count(n.target) == 1 and first_single(at[n], stop) is not None]
            raise _no_single_value(names[i], names[i + 1], cut, [after[p] for p in range(at[cut], stop)],
                                   others, source())
        ends.append((nodes[single], after[single][0]))
    return ends


def _no_single_value(name: str, following: str, cut: fx.Node, lives: list[list[fx.Node]],
                     others: list[str], where: dict[str, str]) -> TraceError:
    fewest = min(lives, key=len)
    kept = [v for v in lives[0] if v is not cut and all(v in live for live in lives)]
    stays = (f" {', '.join(_describe(v, where) for v in kept)} {'stays' if len(kept) == 1 else 'stay'} live "
             f"all the way (a residual, or another value that forward still reads at or after "
             f"{following!r}), beside the block's own output." if kept else "")
    instead = f" ({', '.join(map(repr, others[-4:]))} would end at one value here)" if others else ""
    return TraceError(
        f"block {name!r} cannot end at one value: from its call up to the call of the next block "
        f"{following!r}, forward always holds at least {len(fewest)} live values (fewest: "
        f"{', '.join(_describe(v) for v in fewest)}).{stays} A boundary between blocks carries one "
        f"tensor. Name a different block{instead}, or give blocks that own their residual (a submodule "
        "whose own forward adds the skip back), or give the model a named_blocks() method")


def _segments(graph: fx.Graph, ends: list[tuple[fx.Node, fx.Node]]) -> dict[fx.Node, int]:
    segment: dict[fx.Node, int] = {}
    current, last_of = 0, {last: i for i, (last, _) in enumerate(ends)}
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        segment[node] = current
        if node in last_of:
            current = last_of[node] + 1
    # what follows the last named block belongs to it
    return segment


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
    """``[(block name, piece)]``: ``model.forward`` cut after each named submodule's call,
    at the first point from there where one value is live (after a residual add that
    ``forward`` writes itself).

    ``blocks`` are submodule names in the order forward calls them (or a predicate over
    ``model.named_modules()``, outermost matches only, taken in execution order). Raises
    ``TraceError`` naming the fix when a name is not a submodule, the order is wrong, no
    point before the next named block carries a single value, or forward cannot be traced.

    >>> from torch import nn
    >>> pieces = split_module(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)), ["0", "2"])
    >>> [name for name, _ in pieces]
    ['0', '2']
    """
    names = _select(model, blocks)
    graph = _trace(model, names, train)
    cuts = _cut_nodes(graph, names, predicate_order=callable(blocks))
    names = [c.target for c in cuts]
    placeholder, output = _ends(graph)
    ends = _boundaries(graph, cuts, placeholder, names, lambda: _source_lines(model, names, train))
    segment = _segments(graph, ends)
    _owner_of_attrs(graph, segment, model, names)
    pieces, reads = [], placeholder
    for i, name in enumerate(names):
        nodes = [n for n in graph.nodes if segment.get(n) == i]
        result = output.args[0] if i == len(names) - 1 else ends[i][1]
        if i == len(names) - 1 and result is placeholder:
            raise TraceError("forward returns its input unchanged; there is nothing to split")
        pieces.append((name, _piece(model, graph, nodes, reads, result, name)))
        reads = result
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
