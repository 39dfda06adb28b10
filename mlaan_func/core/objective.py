"""An objective: what a local loss reads, runs and scores (made by ``local_loss``).

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> obj = mf.local_loss(mf.from_module(nn.Linear(4, 3), name="m"), None, mf.losses.cross_entropy)
>>> isinstance(obj, Objective), obj.input_name, obj.output_name
(True, 'input', 'm')
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from torch import Tensor

from . import hyper
from ..errors import SchemeError
from .net import AfterStep, Net, Params, State
from .randomness import seed_block

LossFn = Callable[[Any, Any], tuple[Tensor, dict[str, Tensor]]]


@attrs.frozen(eq=False)
class Objective:
    """A local loss: ``forward(params, state, x, batch, *, train) -> (loss, state updates,
    outputs, metrics)`` over the parameters of ``net`` and ``head``.

    ``x`` is the (detached) input ``net`` reads, named by ``input_name``; ``net``'s output
    (and any tapped block output inside it) is what later objectives may read; ``score``
    gives the weighted loss at ``step``.

    ``active``, when given, is a schedule of the step saying whether the objective runs at
    that step (``mf.step`` neither computes a switched-off objective nor moves what only it
    trains: parameters, momentum, decay); ``None``: always.

    ``grad_fn``, when given, is how this objective is differentiated instead of by the
    executor: a factory ``grad_fn(objective, taps) -> fn`` called once when the step is
    built, where ``taps`` names the blocks inside ``net`` that later objectives read, and
    ``fn(params, state, x, batch, step) -> (grads, (loss, (updates, outputs, metrics)))``
    runs on the objective's own parameters and its input: ``grads`` by parameter name,
    ``updates`` the state entries it wrote, ``outputs`` the output of ``net`` and of each
    tapped block, by block name, everything detached. ``mf.remat`` is one such factory;
    ``mlaan_func.execute.gradient_fns`` shows the default one. An objective with its own
    ``grad_fn`` never shares blocks with others (``share=True`` refuses it), and the
    checkers (``mlaan_func.testing``) run it to see its reach.

    >>> import torch
    >>> from torch import nn
    >>> from mlaan_func.core import from_module, init_params
    >>> from mlaan_func.losses import Batch, cross_entropy
    >>> from mlaan_func.combinators import local_loss
    >>> obj = local_loss(from_module(nn.Linear(4, 3), name="m"), None, cross_entropy, weight=0.5,
    ...                  name="final")
    >>> obj.name, obj.input_name, obj.output_name, obj.param_names
    ('final', 'input', 'm', ('m.weight', 'm.bias'))
    >>> params, state = init_params(obj)
    >>> x = torch.randn(2, 4)
    >>> loss, updates, outputs, metrics = obj.forward(params, state, x, Batch(x, torch.tensor([0, 1])))
    >>> sorted(outputs), sorted(metrics), bool(loss == 0.5 * metrics["loss"])
    (['m'], ['accuracy', 'loss'], True)

    A custom ``grad_fn`` (here: the default computation, written out):

    >>> import mlaan_func as mf
    >>> def plain_gradients(objective, taps):
    ...     def fn(params, state, x, batch, step=None):
    ...         leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    ...         with torch.enable_grad():
    ...             loss, updates, outputs, metrics = objective.forward(leaves, state, x, batch, taps=taps, step=step)
    ...             grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    ...         detach = lambda d: {k: v.detach() for k, v in d.items()}
    ...         return grads, (loss.detach(), (detach(updates), detach(outputs), detach(metrics)))
    ...     return fn
    >>> own = attrs.evolve(obj, grad_fn=plain_gradients)
    >>> batch = (x, torch.tensor([0, 1]))
    >>> a = mf.gradients([own])(mf.init([own], mf.optim.sgd(0.1)), batch)
    >>> b = mf.gradients([obj])(mf.init([obj], mf.optim.sgd(0.1)), batch)
    >>> all(torch.equal(a.grads[k], b.grads[k]) for k in a.grads)
    True
    """

    name: str
    net: Net
    head: Net | None
    loss: LossFn
    weight: Tensor
    grad_fn: Callable | None = None
    active: Callable[[Tensor], Any] | None = None
    loss_takes_step: bool = attrs.field(init=False)

    def __attrs_post_init__(self):
        object.__setattr__(self, "loss_takes_step", hyper.takes_step(self.loss))

    @property
    def nets(self) -> tuple[Net, ...]:
        return (self.net,) if self.head is None else (self.net, self.head)

    @property
    def input_name(self) -> str:
        return self.net.input_name

    @property
    def output_name(self) -> str:
        return self.net.output_name

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(k for n in self.nets for k in n.param_names))

    @property
    def reads(self) -> tuple[str, ...]:
        """Parameters it reads without training them (read-only views of other blocks)."""
        return tuple(dict.fromkeys(k for n in self.nets for k in n.reads))

    @property
    def state_names(self) -> tuple[str, ...]:
        held = (self.weight.key,) if isinstance(self.weight, hyper.Held) else ()
        return tuple(dict.fromkeys(k for n in self.nets for k in n.state_names)) + held

    @property
    def after_steps(self) -> tuple[AfterStep, ...]:
        return tuple(a for n in self.nets for a in n.after_steps)

    def score(self, z: Any, batch: Any, state: State, step: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(weight · loss(z, batch), metrics)`` at ``step``: the loss gets ``step=`` when it
        takes one; the weight is a number, a schedule of the step or held in ``state``."""
        out = self.loss(z, batch, step=step) if self.loss_takes_step else self.loss(z, batch)
        loss, metrics = self._checked(out)
        weight = hyper.resolve(self.weight, state, step, f"objective {self.name!r}'s weight")
        return weight * loss, metrics

    def _checked(self, out: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """What the loss returned, checked by its metadata only (no value is read)."""
        what = f"objective {self.name!r}'s loss"
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise SchemeError(f"{what} returned {type(out).__name__}; a loss returns (loss, metrics), a 0-d "
                              "tensor and a dict of 0-d tensors, e.g. (loss, {}) when it reports nothing")
        loss, metrics = out
        if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.is_floating_point():
            shown = f"a {loss.dtype} tensor of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else \
                f"a {type(loss).__name__}"
            raise SchemeError(f"{what} is {shown}; it must be a 0-d floating tensor the step can differentiate "
                              "(average a per-sample loss over the batch, e.g. .mean())")
        return loss, metrics

    def forward(self, params: Params, state: State, x: Tensor, batch: Any, *, train: bool = True,
                taps: tuple[str, ...] = (), step: Tensor | None = None,
                known: dict[str, Tensor] | None = None
                ) -> tuple[Tensor, State, dict[str, Tensor], dict[str, Tensor]]:
        """``(loss, state updates, outputs, metrics)``; ``outputs`` maps ``output_name`` and
        each block named in ``taps`` to its output. ``step`` (the train state's step) reaches
        schedules and losses that take it.

        ``known`` (eval mode only): block outputs already computed in this pass, by block name;
        the net then starts after the last of its blocks found there, so each block runs once."""
        net = self.net
        if known and not train:
            done = [i for i, b in enumerate(net.blocks) if b.name in known]
            if done:
                x = known[net.blocks[done[-1]].name]
                rest = net.blocks[done[-1] + 1:]
                net = Net(rest, input_name=net.blocks[done[-1]].name) if rest else None
        outputs = dict.fromkeys(taps)
        if net is None:
            h, updates = x, {}
        else:
            h, updates = net.run(params, state, x, train=train, taps=outputs)
        for name in taps:
            if outputs[name] is None and known and name in known:
                outputs[name] = known[name]
        outputs[self.output_name] = h
        z = h
        if self.head is not None:
            z, head_updates = self.head.run(params, state, h, train=train)
            updates = {**updates, **head_updates}
        if train:
            seed_block("loss:" + self.name)
        loss, metrics = self.score(z, batch, state, step)
        return loss, updates, outputs, metrics
