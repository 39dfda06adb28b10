"""The one training engine: a step is a plan (``plan``) run by one executor (``execute``),
with ``step``, ``gradients``, ``evaluate``, ``init``, ``save`` and ``load`` on top (``step``),
the train state (``state``), the differentiation primitive (``vjp``), compiled block kernels
(``kernels``), remat (``remat``), the memory-budget planner (``budget``), the routing fold (``routing``) and checkpoints
(``checkpoint``). See docs/design.md §4.
"""
