"""The plan of a shared step: which block applications run once, how far each objective's
gradient may reach through them, and when each can be freed (docs/design.md §7).

Nets are pure and names are identities, so two objectives that run the same block on the
same input compute the same tensor. The planner keys every block application by (block
name, the application that produced its input) and merges the applications of all
objectives into one tree rooted at the batch and at any boundaries *given* from outside
(the activations a module-parallel rank receives). Chains of applications that the same
objectives pass through become one *piece*, computed once per step. An objective's
gradient may *reach* only the pieces on its own path (its window, trunk and head); at each
piece the objectives passing through are grouped by the piece where they start (their
input boundary): a group that started above a piece continues below it, the others stop.
An objective whose loss takes a context (``LossContext``) is never merged, and the values it
reads must be published by earlier objectives (``context_sources``, checked by
``plan_routes``; ``Route.unpublish`` says when each leaves the step's board).

>>> import mlaan_func as mf
>>> backbone = mf.from_module(mf.models.CifarResNet(8, num_classes=5, widths=(4, 8, 8)))
>>> scheme = mf.schemes.mlaan(backbone, ["1.0", "2.0"], input_shape=(3, 8, 8), trunks=None)
>>> [o.name for o in scheme]
['m1.cascaded', 'm1.independent', 'final']
>>> plan = plan_scheme(scheme)
>>> [(p.block_names[-1], p.users) for p in plan.pieces if len(p.users) > 1]
[('2.0', (0, 1, 2))]
>>> plan.reach(scheme, 1)      # the independent objective reaches module 1 and its head only
('2.0', 'head1')
>>> rank = plan_scheme(scheme[1:], given=["1.0"], keep=["2.0"])   # started from a received boundary
>>> [(p.parent, p.block_names, p.users) for p in rank.shared], rank.kept
([('1.0', ('2.0',), (0, 1))], (('2.0', 0),))
"""

from __future__ import annotations

from typing import Any, Iterable, NamedTuple, Sequence

import attrs

from ..combinators import Objective
from ..core.identity import same_block
from ..core.net import INPUT, Net
from ..errors import SchemeError


@attrs.frozen(eq=False)
class Piece:
    """A chain of block applications computed once per step.

    ``parent`` is the piece whose output it reads, or the given boundary it reads by name
    (``"input"``: the batch). ``users`` are the objectives whose gradient passes through
    it, in scheme order; ``groups`` pairs each piece where some of them start above this
    one with those objectives (their gradient continues below); ``stops`` are the users
    that start here. ``children`` counts the pieces that read its output.
    """

    index: int
    net: Net
    parent: int | str
    users: tuple[int, ...]
    groups: tuple[tuple[int, tuple[int, ...]], ...]
    stops: tuple[int, ...]
    children: int

    @property
    def block_names(self) -> tuple[str, ...]:
        return self.net.block_names

    @property
    def param_names(self) -> tuple[str, ...]:
        return self.net.param_names

    @property
    def needs_input_grad(self) -> bool:
        return bool(self.groups)


@attrs.frozen(eq=False)
class ObjectivePath:
    """The pieces an objective runs, from its input boundary to its loss; ``tail`` is where
    the suffix only this objective passes through begins (``len(path)`` when none)."""

    path: tuple[int, ...]
    tail: int

    @property
    def start(self) -> int:
        return self.path[0]


@attrs.frozen(eq=False)
class Plan:
    """Pieces in forward (topological) order and each objective's path through them;
    ``kept`` pairs each boundary asked for with ``keep`` with the piece that ends with it
    (or with its own name, where it is given)."""

    pieces: tuple[Piece, ...]
    objectives: tuple[ObjectivePath, ...]
    kept: tuple[tuple[str, int | str], ...] = ()

    @property
    def shared(self) -> tuple[Piece, ...]:
        """The pieces more than one objective passes through."""
        return tuple(p for p in self.pieces if len(p.users) > 1)

    def reach(self, objectives: Sequence[Objective], i: int) -> tuple[str, ...]:
        """The blocks objective ``i``'s gradient reaches, by name, in path order."""
        return tuple(dict.fromkeys(n for p in self.objectives[i].path for n in self.pieces[p].block_names))

    def free_after(self) -> tuple[tuple[int, ...], ...]:
        """Per objective: the pieces whose graph can be freed once its gradient is delivered
        (their last user in scheme order)."""
        last: list[list[int]] = [[] for _ in self.objectives]
        for p in self.pieces:
            last[max(p.users)].append(p.index)
        return tuple(tuple(x) for x in last)


class Route(NamedTuple):
    """Per objective: block outputs to keep for later objectives, and boundaries to free;
    ``sources`` the earlier objectives (by index) whose published loss-context values it reads,
    ``unpublish`` the objectives whose published values nobody reads after it."""

    taps: tuple[str, ...]
    free_after: frozenset[str]
    sources: tuple[int, ...] = ()
    unpublish: frozenset[str] = frozenset()


def runs_own_grad_fn(objective: Objective) -> bool:
    """Whether an objective is differentiated by its own ``grad_fn`` (not ``mf.remat``'s)."""
    return objective.grad_fn is not None and getattr(objective.grad_fn, "remat_every", None) is None


def context_sources(objectives: Sequence[Objective]) -> list[tuple[int, ...]]:
    """Per objective, the indices of the objectives whose loss-context values it reads
    (``context_from``), checked: each source is an earlier objective of the scheme whose loss
    takes a context and which the executor differentiates itself; a ``SchemeError`` names both
    objectives otherwise."""
    index = {o.name: i for i, o in enumerate(objectives)}
    out = []
    for i, o in enumerate(objectives):
        if o.loss_takes_context and runs_own_grad_fn(o) and not getattr(o.grad_fn, "runs_no_loss", False):
            raise SchemeError(f"objective {o.name!r} brings its own grad_fn and its loss takes a context; the "
                              "executor gives a loss context only to objectives it differentiates itself (or "
                              "through mf.remat), so drop the grad_fn or the context keyword")
        found = []
        for name in o.context_from:
            j = index.get(name)
            if j is None:
                raise SchemeError(f"objective {o.name!r} reads loss-context values of {name!r}, which is not an "
                                  f"objective of this scheme (objectives: {list(index)}); a switched-off "
                                  "objective, or one on another module-parallel rank, publishes nothing")
            if j > i:
                raise SchemeError(f"objective {o.name!r} reads loss-context values of {name!r}, which comes after "
                                  f"it in the scheme; a loss reads only values published earlier in the step, so "
                                  f"put {name!r} before {o.name!r}")
            source = objectives[j]
            if not source.loss_takes_context:
                raise SchemeError(f"objective {o.name!r} reads loss-context values of {name!r}, whose loss takes "
                                  "no context keyword and so publishes nothing; write it as "
                                  "loss(output, batch, *, context) and call context.publish")
            if runs_own_grad_fn(source):
                raise SchemeError(f"objective {o.name!r} reads loss-context values of {name!r}, which runs its "
                                  "own grad_fn (or is switched off and runs forward only) and so publishes "
                                  "nothing")
            found.append(j)
        out.append(tuple(found))
    return out


def plan_routes(objectives: Sequence[Objective], *, given: Iterable[str] = ()) -> list[Route]:
    """Check that every objective's input is produced before it; plan what to keep and free.

    ``given`` names boundaries supplied from outside besides the input (a module-parallel
    rank's received activations): they count as produced from the start."""
    if not objectives:
        raise SchemeError("a scheme needs at least one objective")
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise SchemeError(f"objective names must be unique, {dup} repeat; pass name= to local_loss")
    given = tuple(given)
    available = {INPUT, *given}
    last_use: dict[str, int] = {}
    taps: list[tuple[str, ...]] = []
    for i, o in enumerate(objectives):
        if o.input_name not in available:
            raise SchemeError(
                f"objective {o.name!r} reads the output of block {o.input_name!r}, which no earlier "
                "objective produces" + (f" and which is not given (given: {list(given)})" if given else "")
                + "; order the objectives from the input to the output")
        last_use[o.input_name] = i
        later = {p.input_name for p in objectives[i + 1:]}
        taps.append(tuple(b for b in o.net.block_names[:-1] if b in later and b not in available))
        available |= {o.output_name, *taps[-1]}
    free: list[set[str]] = [set() for _ in objectives]
    for name, i in last_use.items():
        free[i].add(name)
    sources = context_sources(objectives)
    unpublish: list[set[str]] = [set() for _ in objectives]
    for j, o in enumerate(objectives):
        if o.loss_takes_context:
            readers = [i for i, s in enumerate(sources) if j in s]
            unpublish[max(readers, default=j)].add(o.name)
    return [Route(t, frozenset(f), s, frozenset(u)) for t, f, s, u in zip(taps, free, sources, unpublish)]


def plan_scheme(objectives: Sequence[Objective], max_blocks: "int | Sequence[int | None] | None" = None, *,
                given: Iterable[str] = (), keep: Iterable[str] = (), merge: bool = True,
                opaque: Iterable[int] = ()) -> Plan:
    """Merge the objectives' block applications into pieces; see the module docstring.

    The input an objective reads is the output of the first application (in scheme order)
    of the block it names, as in the per-objective engine, unless the boundary is among
    ``given`` (supplied from outside besides the input, e.g. received from another rank).
    Each boundary named in ``keep`` ends a piece, so a step can return its value
    (``Plan.kept``). ``max_blocks`` caps the blocks of a piece (a rematerialised step
    recomputes one piece at a time): one cap, or one per objective (``None``: no cap), a
    piece taking the smallest cap of its users. ``merge=False`` merges nothing (the per-objective
    form: every objective runs its own blocks); the objectives in ``opaque`` (those that
    bring their own gradient function) and those whose loss takes a context never share a
    block application with another.
    """
    objectives = list(objectives)
    given = tuple(given)
    plan_routes(objectives, given=given)  # order and names are checked there, with its error messages
    nodes_block: list[Any] = []
    nodes_parent: list[int | str] = []
    nodes_users: list[list[int]] = []
    index: dict[tuple, list[int]] = {}
    boundary: dict[str, int | str] = {name: name for name in (INPUT, *given)}
    paths: list[list[int]] = []
    alone = set(range(len(objectives))) if not merge else set(opaque)
    alone |= {i for i, o in enumerate(objectives) if o.loss_takes_context}
    for i, o in enumerate(objectives):
        parent = boundary[o.input_name]
        path = []
        for in_net, block in [(True, b) for b in o.net.blocks] + [(False, b) for b in (o.head.blocks if o.head else ())]:
            candidates = index.setdefault((block.name, parent), [])
            node = None if i in alone else next(
                (n for n in candidates if nodes_users[n][0] not in alone and same_block(nodes_block[n], block)), None)
            if node is None:
                node = len(nodes_block)
                nodes_block.append(block)
                nodes_parent.append(parent)
                nodes_users.append([])
                candidates.append(node)
            if not nodes_users[node] or nodes_users[node][-1] != i:
                nodes_users[node].append(i)
            if in_net:
                boundary.setdefault(block.name, node)
            path.append(node)
            parent = node
        paths.append(path)

    keep = tuple(keep)
    unknown = [name for name in keep if name not in boundary]
    if unknown:
        raise ValueError(f"keep names {unknown}, which no objective's net runs and which are not given "
                         f"(given: {list(given)}); keep only boundaries these objectives produce or receive")
    ends = {boundary[name] for name in keep}
    children: dict[int | str, list[int]] = {}
    for n, p in enumerate(nodes_parent):
        children.setdefault(p, []).append(n)
    per_objective = [max_blocks] * len(objectives) if max_blocks is None or isinstance(max_blocks, int) \
        else list(max_blocks)
    caps = [min((per_objective[u] for u in us if per_objective[u] is not None), default=None)
            for us in nodes_users]
    piece_of: list[int] = []
    members: list[list[int]] = []
    for n, p in enumerate(nodes_parent):
        if (isinstance(p, int) and p not in ends and children[p] == [n] and nodes_users[p] == nodes_users[n]
                and (caps[n] is None or len(members[piece_of[p]]) < caps[n])):
            piece_of.append(piece_of[p])
            members[piece_of[p]].append(n)
        else:
            piece_of.append(len(members))
            members.append([n])

    obj_paths = []
    for i, path in enumerate(paths):
        pieces = list(dict.fromkeys(piece_of[n] for n in path))
        obj_paths.append(pieces)
    pieces = []
    for k, nodes in enumerate(members):
        first = nodes[0]
        parent = nodes_parent[first] if isinstance(nodes_parent[first], str) else piece_of[nodes_parent[first]]
        users = tuple(nodes_users[first])
        groups: dict[int, list[int]] = {}
        stops = []
        for u in users:
            start = obj_paths[u][0]
            if start == k:
                stops.append(u)
            else:
                groups.setdefault(start, []).append(u)
        pieces.append(Piece(
            index=k, net=Net(tuple(nodes_block[n] for n in nodes)), parent=parent, users=users,
            groups=tuple((s, tuple(us)) for s, us in groups.items()), stops=tuple(stops),
            children=len(children.get(nodes[-1], ()))))
    plans = []
    for i, path in enumerate(obj_paths):
        tail = len(path)
        while tail > 0 and pieces[path[tail - 1]].users == (i,):
            tail -= 1
        plans.append(ObjectivePath(tuple(path), tail))
    kept = tuple((name, boundary[name] if isinstance(boundary[name], str) else piece_of[boundary[name]])
                 for name in keep)
    return Plan(tuple(pieces), tuple(plans), kept)
