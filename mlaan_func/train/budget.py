"""A step that fits a memory budget: the planner picks, per objective, plain or ``mf.remat``
(of pieces of blocks, or inside the blocks).

``budgeted_step(scheme, budget, build)`` (what ``mf.step(..., memory_budget=)`` returns) plans
on its first batch with ``plan_memory``, which measures the scheme on that batch (peak live
step bytes, ``mlaan_func.memory``; FLOPs, ``torch.utils.flop_counter``) in a few probe steps,
whose results are discarded (a step is a pure function, so a probe changes nothing):

* the step as given (the no-remat peak a float budget is a fraction of);
* every objective rematerialised (``mf.remat(o, 1)``), and every objective cut inside its
  blocks (``mf.remat(o, inside=rule)`` for each rule of ``insides``), in the step's own form;
* the per-objective form (``share=False``): each objective runs its own blocks in turn, so
  the step's peak is ``max(before, max_i(live_i + extra_i[mode_i]), after)`` where
  ``live_i`` (the bytes alive when objective ``i`` starts: gradients so far, boundaries kept
  for later objectives) does not depend on any mode and ``extra_i[mode]`` (objective ``i``'s
  own peak above it) depends only on its own mode. One probe per mode (plain, remat every
  ``n`` for ``n`` in ``granularities``, remat inside for each rule of ``insides``), cut into
  segments at each objective
  (``executor(observe=)``, ``MemoryMeter.reset_peak``), gives every term; for each
  objective the planner then takes the cheapest mode (fewest FLOPs) under the budget.

Of the plans whose peak is under the budget the one with the fewest FLOPs wins (the step
as given on a tie), so a budget at or above the no-remat peak changes nothing. Every plan
has the unbudgeted step's gradients, state and losses bit for bit (rematerialisation and
the per-objective form are exact; ``tests/test_budget.py``). A budget below every plan's
peak raises ``MemoryBudgetError`` with the smallest reachable figure. Objectives that bring
their own ``grad_fn`` (``mf.remat`` included) or whose loss takes a context keep what they
have. The figures are of the batch planned on: a batch of another shape is planned anew.

>>> import torch
>>> import mlaan_func as mf
>>> backbone = mf.from_module(mf.models.CifarResNet(8, num_classes=5, widths=(4, 8, 8)))
>>> scheme = mf.schemes.e2e(backbone)
>>> opt = mf.optim.sgd(0.1)
>>> ts = mf.init(scheme, opt)
>>> batch = (torch.randn(8, 3, 8, 8), torch.arange(8) % 5)
>>> train_step = mf.step(scheme, opt, memory_budget=0.97)
>>> new, _ = train_step(ts, batch)
>>> print(train_step.plan)
memory plan (every objective cut inside its blocks (conv_inputs)): predicted peak 57.4 KiB (0.667 of the no-remat 85.9 KiB) under the budget 83.4 KiB; smallest reachable 50.0 KiB; FLOPs x1.351; peak set by final
  final: remat inside=conv_inputs, peak 57.4 KiB
  before: peak 0 B
  after: peak 21.4 KiB
>>> mf.step(scheme, opt, memory_budget=0.5)(ts, batch)
Traceback (most recent call last):
  ...
mlaan_func.errors.MemoryBudgetError: memory_budget 44006 bytes (0.500 of the no-remat peak 88012) is below what any plan reaches on this batch: the smallest is 51244 bytes (0.583); pass memory_budget=51244 (or 0.583) or more, or lower the batch size or split the scheme into more modules
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import attrs
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from ..combinators import Objective
from ..core.batch import as_batch, input_of
from ..errors import MemoryBudgetError, SchemeError
from ..memory import track_memory
from .remat import remat

INSIDES = ("block_input", "conv_inputs", "nested")
"""The ``inside=`` rules the planner tries besides rematerialising pieces."""

Build = Callable[[Sequence[Objective], Any, Any], Callable]
"""``build(scheme, share, observe) -> train_step``: the step the planner measures and runs."""


class FlopMeter(TorchDispatchMode):
    """``FlopCounterMode``'s per-op formulas over every op that runs, without its module
    tracker (whose hooks on every module call would change the memory measured beside it).

    >>> import torch
    >>> with FlopMeter() as meter:
    ...     _ = torch.ones(2, 3) @ torch.ones(3, 4)
    >>> meter.total
    48
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def check_budget(budget: Any) -> int | float:
    """A budget as ``mf.step`` takes it: positive bytes (an int) or a positive fraction (a float)
    of the scheme's own no-remat peak; anything else is refused, naming both forms."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
        raise SchemeError(f"memory_budget must be a positive number of bytes (an int) or a positive fraction of "
                          f"the scheme's no-remat peak (a float, e.g. 0.5), got {budget!r}")
    return budget


def budget_bytes(budget: int | float, no_remat_peak: int) -> int:
    """The budget in bytes: an int as it is, a float times the no-remat peak (rounded down).

    >>> budget_bytes(1000, 5000), budget_bytes(0.5, 5000)
    (1000, 2500)
    """
    budget = check_budget(budget)
    return budget if isinstance(budget, int) else int(budget * no_remat_peak)


def readable(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps a figure of at least 1.

    >>> readable(512), readable(85000), readable(3 * 2 ** 30)
    ('512 B', '83.0 KiB', '3.0 GiB')
    """
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{nbytes} B"


@attrs.frozen(eq=False)
class MemoryPlan:
    """The plan a budget chose, and why: ``objectives`` (the scheme to run, marked with
    ``mf.remat`` where chosen) in form ``share``; ``modes`` pairs each objective's name with
    ``"plain"``, ``"remat every=n"`` or ``"as given"``; peaks in bytes (predicted: of this
    plan; ``floor_bytes``: the smallest any plan reaches) and FLOPs of the step
    (``recompute``: this plan's over the no-remat step's). ``str(plan)`` is a readable summary."""

    objectives: tuple[Objective, ...] = attrs.field(repr=False)
    share: Any
    form: str
    modes: tuple[tuple[str, str], ...]
    budget_bytes: int
    predicted_peak_bytes: int
    no_remat_peak_bytes: int
    floor_bytes: int
    flops: int
    no_remat_flops: int
    segment_peaks: tuple[tuple[str, int], ...] = ()

    @property
    def binding(self) -> str:
        """The part of the step whose peak is the step's: an objective's name, ``"before"`` (until
        the first objective) or ``"after"`` (after the last: the optimizer update)."""
        return max(self.segment_peaks, key=lambda x: x[1])[0] if self.segment_peaks else ""

    @property
    def recompute(self) -> float:
        """This plan's step FLOPs over the no-remat step's (1.0: no recomputation)."""
        return self.flops / self.no_remat_flops if self.no_remat_flops else 1.0

    def __str__(self) -> str:
        head = (f"memory plan ({self.form}): predicted peak {readable(self.predicted_peak_bytes)} "
                f"({self.predicted_peak_bytes / self.no_remat_peak_bytes:.3f} of the no-remat "
                f"{readable(self.no_remat_peak_bytes)}) under the budget {readable(self.budget_bytes)}; "
                f"smallest reachable {readable(self.floor_bytes)}; FLOPs x{self.recompute:.3f}; "
                f"peak set by {self.binding}")
        peaks = dict(self.segment_peaks)
        return "\n".join([head, *(f"  {name}: {mode}, peak {readable(peaks[name])}" if name in peaks else
                                   f"  {name}: {mode}" for name, mode in self.modes),
                           *(f"  {name}: peak {readable(peaks[name])}" for name in ("before", "after")
                             if name in peaks)])


@attrs.frozen
class Probe:
    """One measured step, in segments: ``before`` (peak until the first objective),
    per objective ``live`` (bytes alive as it starts), ``peak`` (the peak while it runs)
    and ``flops``; ``after`` (peak after the last, the update included); ``flops_rest``
    (the FLOPs outside the objectives)."""

    before: int
    live: tuple[int, ...]
    peak: tuple[int, ...]
    flops: tuple[int, ...]
    after: int
    flops_rest: int

    @property
    def step_peak(self) -> int:
        return max(self.before, self.after, *self.peak)

    @property
    def step_flops(self) -> int:
        return self.flops_rest + sum(self.flops)


def probe(build: Build, objectives: Sequence[Objective], share: Any, ts: Any, batch: Any) -> Probe:
    """Run one step of ``objectives`` in form ``share`` on ``(ts, batch)`` under ``track_memory``
    and a FLOP counter, cut at every objective; the step's result is dropped."""
    marks: list[tuple[int, int, int]] = []
    with track_memory() as meter, FlopMeter() as counter:
        def observe(i: int) -> None:
            marks.append((meter.reset_peak(), meter.live_bytes, counter.total))

        result = build(objectives, share, observe)(ts, batch)
        del result
        after = meter.reset_peak()
        total = counter.total
    n = len(objectives)
    if len(marks) != n + 1:
        raise SchemeError(f"the memory planner saw {len(marks) - 1} objectives of {n} run; a budget needs a scheme "
                          "whose every objective runs at every step")
    return Probe(before=marks[0][0], live=tuple(m[1] for m in marks[:n]), peak=tuple(m[0] for m in marks[1:]),
                 flops=tuple(b[2] - a[2] for a, b in zip(marks, marks[1:])), after=after,
                 flops_rest=total - (marks[n][2] - marks[0][2]))


Mode = Any
"""How the planner differentiates an objective: ``None`` (plain), ``n`` (``mf.remat(o, n)``) or an
``inside=`` rule (``mf.remat(o, inside=rule)``: cut inside its blocks)."""


def mode_name(mode: Mode) -> str:
    """A mode as plans print it.

    >>> mode_name(None), mode_name(2), mode_name("conv_inputs")
    ('plain', 'remat every=2', 'remat inside=conv_inputs')
    """
    if mode is None:
        return "plain"
    return f"remat every={mode}" if isinstance(mode, int) else f"remat inside={rule_name(mode)}"


def rule_name(rule: Any) -> str:
    """An ``inside=`` rule by name: the string itself, or a predicate's ``__name__``."""
    return getattr(rule, "__name__", rule)


def marked_with(objective: Objective, mode: Mode) -> Objective:
    """``objective`` differentiated as ``mode`` says."""
    if mode is None:
        return objective
    return remat(objective, mode) if isinstance(mode, int) else remat(objective, inside=mode)


def plan_memory(objectives: Sequence[Objective], ts: Any, batch: Any, budget: int | float, build: Build, *,
                share: Any = None, granularities: Sequence[int] = (1, 2),
                insides: Sequence[Any] = INSIDES) -> MemoryPlan:
    """The plan with the fewest FLOPs whose peak step bytes on ``(ts, batch)`` stay under
    ``budget`` (see the module docstring); ``MemoryBudgetError`` when none does."""
    objectives = list(objectives)
    check_budget(budget)
    fixed = [o.grad_fn is not None or o.loss_takes_context for o in objectives]
    names = [o.name for o in objectives]

    def marked(mode: Mode) -> list[Objective]:
        return marked_each([mode] * len(objectives))

    def marked_each(chosen: Sequence[Mode]) -> list[Objective]:
        return [o if f else marked_with(o, m) for o, f, m in zip(objectives, fixed, chosen)]

    def modes(chosen: Sequence[Mode]) -> tuple[tuple[str, str], ...]:
        return tuple((n, "as given" if f else mode_name(m)) for n, f, m in zip(names, fixed, chosen))

    given = probe(build, objectives, share, ts, batch)
    limit = budget_bytes(budget, given.step_peak)
    def segments(before: int, each: Sequence[int], after: int) -> tuple[tuple[str, int], ...]:
        return (("before", before), *zip(names, each), ("after", after))

    plans = [("as given", objectives, share, given.step_peak, given.step_flops, modes([None] * len(names)),
              segments(given.before, given.peak, given.after))]
    floors = [given.step_peak]
    for mode in ((1, *insides) if not all(fixed) else ()):
        shared = probe(build, marked(mode), share, ts, batch)
        form = ("every objective rematerialised" if isinstance(mode, int) else
                f"every objective cut inside its blocks ({rule_name(mode)})")
        plans.append((form, marked(mode), share, shared.step_peak, shared.step_flops,
                      modes([mode] * len(names)), segments(shared.before, shared.peak, shared.after)))
        floors.append(shared.step_peak)
    if not all(fixed) and share in (None, False):
        everies = [None, *dict.fromkeys(granularities), *insides]
        probes = {m: probe(build, marked(m), False, ts, batch) for m in everies}
        live = [max(p.live[i] for p in probes.values()) for i in range(len(names))]
        before, after = max(p.before for p in probes.values()), max(p.after for p in probes.values())
        outside = max(before, after)
        rest = max(p.flops_rest for p in probes.values())
        extra = {m: [p.peak[i] - p.live[i] for i in range(len(names))] for m, p in probes.items()}
        options = [everies[:1] if f else everies for f in fixed]
        floors.append(max(outside, *(live[i] + min(extra[m][i] for m in ms) for i, ms in enumerate(options))))
        if floors[-1] <= limit:  # each objective: its cheapest mode under the budget
            chosen = [min((m for m in ms if live[i] + extra[m][i] <= limit),
                          key=lambda m: (probes[m].flops[i], extra[m][i])) for i, ms in enumerate(options)]
            each = [live[i] + extra[m][i] for i, m in enumerate(chosen)]
            plans.append(("per objective", marked_each(chosen), False, max(outside, *each),
                          rest + sum(probes[m].flops[i] for i, m in enumerate(chosen)), modes(chosen),
                          segments(before, each, after)))
    floor = min(floors)
    floor_fraction = math.ceil(floor / given.step_peak * 1000) / 1000
    fitting = [p for p in plans if p[3] <= limit]
    if not fitting:
        raise MemoryBudgetError(
            f"memory_budget {limit} bytes ({limit / given.step_peak:.3f} of the no-remat peak {given.step_peak}) "
            f"is below what any plan reaches on this batch: the smallest is {floor} bytes "
            f"({floor_fraction}); pass memory_budget={floor} (or {floor_fraction}) or more, "
            "or lower the batch size or split the scheme into more modules")
    form, chosen_scheme, form_share, peak, flops, chosen_modes, parts = min(fitting, key=lambda p: (p[4], p[3]))
    return MemoryPlan(tuple(chosen_scheme), form_share, form, chosen_modes, limit, peak, given.step_peak, floor,
                      flops, given.step_flops, parts)


def input_signature(batch: Any) -> tuple:
    """What a plan depends on in a batch: its input's shape, dtype and device."""
    x = input_of(as_batch(batch))
    return tuple(x.shape), x.dtype, x.device


class BudgetedStep:
    """``(ts, batch) -> (ts, metrics)``: the step of the plan ``plan_memory`` makes for a budget,
    planned on the first batch of each input shape; ``plan`` is the latest plan used
    (``None`` before the first call) and ``plans`` every plan by input signature."""

    def __init__(self, objectives: Sequence[Objective], budget: int | float, build: Build, *, share: Any = None,
                 granularities: Sequence[int] = (1, 2)) -> None:
        self.objectives, self.budget, self.build = list(objectives), check_budget(budget), build
        self.share, self.granularities = share, tuple(granularities)
        self.plans: dict[tuple, MemoryPlan] = {}
        self.steps: dict[tuple, Callable] = {}
        self.plan: MemoryPlan | None = None

    def __call__(self, ts: Any, batch: Any):
        key = input_signature(batch)
        if key not in self.plans:
            plan = plan_memory(self.objectives, ts, batch, self.budget, self.build, share=self.share,
                               granularities=self.granularities)
            self.plans[key], self.steps[key] = plan, self.build(plan.objectives, plan.share, None)
        self.plan = self.plans[key]
        return self.steps[key](ts, batch)


def budgeted_step(objectives: Sequence[Objective], budget: int | float, build: Build, *, share: Any = None,
                  granularities: Sequence[int] = (1, 2)) -> BudgetedStep:
    """The step ``mf.step(..., memory_budget=budget)`` returns (see the module docstring)."""
    return BudgetedStep(objectives, budget, build, share=share, granularities=granularities)
