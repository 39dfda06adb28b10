"""One error hierarchy: every error the library raises on purpose is an ``MlaanError``, and
also the builtin it refines, so ``except ValueError`` keeps working where it did.

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> net = mf.from_module(nn.Linear(4, 2), name="fc")
>>> params, state = mf.init_params(net)
>>> try:
...     net(params, state, torch.ones(3, 5))
... except mf.errors.MlaanError as err:
...     print(type(err).__name__, isinstance(err, ValueError))
ShapeError True

Messages say what went wrong and how to fix it; out-of-memory and other torch errors the
library did not raise pass through untouched.
"""

from __future__ import annotations


class MlaanError(Exception):
    """The common base of the errors ``mlaan_func`` raises on purpose."""


class ShapeError(MlaanError, ValueError):
    """A block was given an input it cannot take (channels, spatial size, dims)."""


class DeviceMismatchError(MlaanError, ValueError, TypeError):
    """A batch or block input and the parameters live on different devices or have
    different dtypes (a ``ValueError``; also a ``TypeError``, as it was first)."""


class IdentityError(MlaanError, ValueError):
    """Two different blocks (class, configuration or tensors) under one name, or two EMA
    twins of one source that disagree: a name is an identity."""


class KeysError(MlaanError, KeyError):
    """Dict keys (parameters, state, batch entries) that do not match what is asked for.
    Its message is a sentence, printed as it is (a plain ``KeyError`` quotes it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SchemeError(MlaanError, ValueError):
    """A scheme that cannot run: objectives out of order, repeated names, an unknown
    boundary, a hook the engine cannot honour."""


class MemoryBudgetError(SchemeError):
    """A memory budget (``mf.step(..., memory_budget=)``) below the peak of every plan the
    planner can make; the message names the smallest reachable figure."""


class BatchError(MlaanError, ValueError):
    """A batch the step cannot take: empty, labels that do not match the inputs, another
    structure than the first batch."""


class NonFiniteLossError(MlaanError, FloatingPointError):
    """A local loss was NaN or infinite; the train state passed in is left as it was."""


class TraceError(MlaanError, ValueError):
    """A module cannot be split from its ``forward`` (untraceable, or a cut the graph does
    not allow); the message says what and how to fix it."""


class CheckpointError(MlaanError, ValueError):
    """A checkpoint that cannot be read safely: unreadable, truncated, corrupted (checksum
    mismatch), from another format, or holding a type the reader does not allow. Nothing in
    the file was executed."""


class DatasetError(MlaanError, RuntimeError):
    """A dataset is missing, corrupted or could not be downloaded; the message says what to do."""


class DistributedError(MlaanError, RuntimeError):
    """A collective failed or timed out: a rank died, hangs, or runs another configuration."""


__all__ = ["BatchError", "CheckpointError", "DatasetError", "DeviceMismatchError", "DistributedError",
           "IdentityError", "KeysError", "MemoryBudgetError", "MlaanError", "NonFiniteLossError", "SchemeError",
           "ShapeError", "TraceError"]
