"""Rematerialisation: an objective's gradients at the memory of one block.

``remat(objective, every=n)`` runs the objective's chain (its net, then its head) forward
without keeping a graph, storing only the input of every n-th block, then walks back segment
by segment, recomputing each segment just before its backward (``torch.autograd.grad``, which
frees each saved tensor as soon as it is used). The
loss, gradients and new state are those of the plain objective: BatchNorm statistics come
from the first (stored) forward and are never touched by a recomputation, and random draws
repeat (each block reseeds from the step's key inside a step; outside one the generator's
state is replayed).

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> net = mf.from_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
>>> obj = remat(mf.local_loss(net, None, mf.losses.cross_entropy, name="final"))
>>> opt = mf.optim.sgd(0.1)
>>> ts, _ = mf.step([obj], opt)(mf.init([obj], opt), (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])))
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
import torch
from torch import Tensor

from .combinators import Objective
from .core import Net, Params, State
from .randomness import seed_block
from .vjp import dense, input_leaf, param_leaves, vjp


def _rng_devices(x: Tensor) -> list[int]:
    return [x.device.index or 0] if x.is_cuda else []


def _run_segment(blocks: Sequence[Any], params: Params, state: State, x: Tensor,
                 taps: dict[str, Tensor] | None = None) -> tuple[Tensor, State]:
    return Net(tuple(blocks)).run(params, state, x, train=True, taps=taps)


def _vjp(fn: Callable, params: Params, inp: Tensor, cotangent: Tensor | None, input_grad: bool):
    """Run ``fn(params, inp) -> (out, aux)`` with autograd and pull ``cotangent`` back to the
    parameters (and to the input when ``input_grad``); the graph is freed as it is used."""
    leaves = param_leaves(params, params)
    inp_leaf, value = input_leaf(inp, input_grad)
    with torch.enable_grad():
        out, aux = fn(leaves, value)
        targets = [*leaves.values(), inp_leaf] if input_grad else list(leaves.values())
        grads = vjp(out, targets, cotangent)
    param_grads = dense({k: g for k, g in zip(params, grads) if g is not None}, params)
    return out.detach(), aux, param_grads, (grads[-1] if input_grad else None)


def _segment_params(seg: Sequence[Any], params: Params) -> Params:
    return {k: params[k] for b in seg for k in b.param_names if k in params}


def remat_grad_fn(every: int = 1) -> Callable:
    """A ``grad_fn`` factory for ``Objective``: see ``remat``."""
    if every < 1:
        raise ValueError(f"remat granularity must be a positive number of blocks, got {every}")

    def factory(objective: Objective, taps: tuple[str, ...]) -> Callable:
        blocks = objective.net.blocks + (objective.head.blocks if objective.head is not None else ())
        segments = [blocks[i:i + every] for i in range(0, len(blocks), every)]
        wanted = (*taps, objective.output_name)

        def grad_and_value(params: Params, state: State, x: Tensor, batch: Any, step: Tensor | None = None):
            devices = _rng_devices(x)
            inputs, rngs, updates = [], [], {}
            outputs: dict[str, Tensor | None] = dict.fromkeys(wanted)
            h = x
            with torch.no_grad():
                for seg in segments[:-1]:
                    inputs.append(h)
                    rngs.append(_rng_state(devices))
                    h, new = _run_segment(seg, params, state, h, outputs)
                    for k, v in new.items():
                        updates.setdefault(k, v)

            # The last segment, with the loss: its forward runs once, with the live generator.
            last_params = _segment_params(segments[-1], params)
            seg_taps: dict[str, Tensor | None] = dict.fromkeys(wanted)

            def last_fn(p: Params, inp: Tensor):
                z, new = _run_segment(segments[-1], p, state, inp, seg_taps)
                seed_block("loss:" + objective.name)
                loss, metrics = objective.score(z, batch, state, step)
                return loss, (new, metrics)

            loss, (new, metrics), grads, cotangent = _vjp(last_fn, last_params, h, None, len(segments) > 1)
            for k, v in new.items():
                updates.setdefault(k, v)
            outputs.update({k: v.detach() for k, v in seg_taps.items() if v is not None})
            for j in range(len(segments) - 2, -1, -1):
                seg = segments[j]
                with torch.random.fork_rng(devices=devices):
                    _set_rng_state(rngs[j], devices)
                    _, _, seg_grads, cotangent = _vjp(
                        lambda p, i: (_run_segment(seg, p, state, i)[0], None),
                        _segment_params(seg, params), inputs[j], cotangent, j > 0)
                inputs[j] = None  # free the stored input before the next recomputation
                for k, g in seg_grads.items():
                    grads[k] = grads[k] + g if k in grads else g
            aux = ({k: v.detach() for k, v in updates.items()},
                   {k: v.detach() for k, v in outputs.items() if v is not None},
                   {k: v.detach() for k, v in metrics.items()})
            return grads, (loss.detach(), aux)

        return grad_and_value

    factory.remat_every = every  # lets the shared step rematerialise its pieces the same way
    return factory


def _rng_state(devices: list[int]):
    cpu = torch.get_rng_state()
    cuda = [torch.cuda.get_rng_state(d) for d in devices]
    return cpu, cuda


def _set_rng_state(state, devices: list[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


def remat(objective: Objective, every: int = 1) -> Objective:
    """The same objective, differentiated by rematerialisation every ``every`` blocks.

    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> from mlaan_func.testing import assert_close
    >>> net = mf.from_module(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    >>> plain = mf.local_loss(net, None, mf.losses.cross_entropy, name="final")
    >>> ts = mf.init([plain], mf.optim.sgd(0.1))
    >>> batch = (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> want = mf.gradients([plain])(ts, batch).grads
    >>> got = mf.gradients([remat(plain, every=2)])(ts, batch).grads
    >>> assert_close(got, want)
    """
    return attrs.evolve(objective, grad_fn=remat_grad_fn(every))
