"""An objective: what a local loss reads, runs and scores (made by ``local_loss``).

>>> import torch
>>> from torch import nn
>>> import mlaan_func as mf
>>> obj = mf.local_loss(mf.from_module(nn.Linear(4, 3), name="m"), None, mf.losses.cross_entropy)
>>> isinstance(obj, Objective), obj.input_name, obj.output_name
(True, 'input', 'm')
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import attrs
import torch
from torch import Tensor

from . import hyper
from ..errors import SchemeError
from .net import AfterStep, Net, Params, State
from .randomness import seed_block

LossFn = Callable[[Any, Any], tuple[Tensor, dict[str, Tensor]]]

Published = dict[str, dict[str, Tensor]]
"""Values published through loss contexts during one step: objective name -> key -> detached
tensor."""


class LossContext(NamedTuple):
    """What a loss that takes a ``context`` keyword receives besides its output and the batch
    (``loss(output, batch, *, context)``).

    ``input`` is the objective's input (the boundary its net reads, detached from the
    objective that produced it) and ``net_output`` its net's output (what later objectives
    read; the ``output`` itself when there is no head), both in the graph that produced
    ``output``. While the step differentiates (``differentiable``: training with gradients
    enabled) a floating-point ``input`` is a leaf that requires grad, so the loss may take
    gradients of its own terms with respect to it or to ``net_output``
    (``torch.autograd.grad``, with ``create_graph=True`` for a term whose own gradient the
    step should follow).

    ``read(objective, key)`` gives a value an earlier objective of the same step published;
    the objective must name that source in ``local_loss(..., context_from=)``, so the plan
    checks the order. ``publish(key, value)`` hands a value to later objectives: it is
    detached, so no gradient ever crosses from one objective to another through it.

    >>> import torch
    >>> from torch import nn
    >>> import mlaan_func as mf
    >>> def first(output, batch, *, context):
    ...     context.publish("mean", output.mean())
    ...     return mf.losses.cross_entropy(output, batch)
    >>> def second(output, batch, *, context):
    ...     loss, metrics = mf.losses.cross_entropy(output, batch)
    ...     return loss + (output.mean() - context.read("m0", "mean")) ** 2, metrics
    >>> a, b = mf.split(mf.from_module(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))), ["0"])
    >>> scheme = [mf.local_loss(a, None, first, name="m0"),
    ...           mf.local_loss(b, None, second, name="m1", context_from=["m0"])]
    >>> g = mf.gradients(scheme)(mf.init(scheme, mf.optim.sgd(0.1)), (torch.randn(5, 4), torch.arange(5) % 3))
    >>> sorted(g.losses)
    ['m0', 'm1']
    """

    objective: str
    input: Tensor
    net_output: Tensor
    train: bool
    step: Tensor | None
    received: Mapping[str, Mapping[str, Tensor]]
    sources: tuple[str, ...]
    published: dict[str, Tensor]

    @property
    def differentiable(self) -> bool:
        """Whether the step differentiates this loss (training, gradients enabled): only then
        does a floating-point ``input`` require grad."""
        return self.train and torch.is_grad_enabled()

    def read(self, objective: str, key: str) -> Tensor:
        """The value ``objective`` published under ``key`` earlier in this step (detached)."""
        if objective not in self.sources:
            raise SchemeError(f"objective {self.objective!r}'s loss reads a value of {objective!r}, which it does "
                              f"not name as a source; pass local_loss(..., context_from=[{objective!r}]) so the "
                              "plan knows the dependency")
        values = self.received.get(objective, {})
        if key not in values:
            raise SchemeError(f"objective {self.objective!r}'s loss reads {key!r} from {objective!r}, which "
                              f"published {sorted(values)} in this step; publish it there with "
                              f"context.publish({key!r}, value) in every mode this loss reads it in "
                              "(training, when context.differentiable, and evaluation)")
        return values[key]

    def publish(self, key: str, value: Tensor) -> None:
        """Hand ``value`` (detached) to later objectives of this step under ``key``."""
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise TypeError(f"objective {self.objective!r}'s loss publishes a {type(value).__name__} under "
                            f"{key!r}; publish tensors under string keys")
        if key in self.published:
            raise SchemeError(f"objective {self.objective!r}'s loss publishes {key!r} twice in one step")
        self.published[key] = value.detach()


@attrs.frozen(eq=False)
class Objective:
    """A local loss: ``forward(params, state, x, batch, *, train) -> (loss, state updates,
    outputs, metrics)`` over the parameters of ``net`` and ``head``.

    ``x`` is the (detached) input ``net`` reads, named by ``input_name``; ``net``'s output
    (and any tapped block output inside it) is what later objectives may read; ``score``
    gives the weighted loss at ``step``.

    ``context_from`` names the earlier objectives whose published values its loss reads
    (``LossContext``); a loss that takes a ``context`` keyword gets one (``loss_takes_context``).
    The executor runs such an objective on its own blocks, eagerly (never shared,
    rematerialised or compiled: its loss may differentiate through the whole of its graph).

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
    context_from: tuple[str, ...] = attrs.field(default=(), converter=lambda names: _names(names))
    loss_takes_step: bool = attrs.field(init=False)
    loss_takes_context: bool = attrs.field(init=False)

    def __attrs_post_init__(self):
        object.__setattr__(self, "loss_takes_step", hyper.takes_step(self.loss))
        object.__setattr__(self, "loss_takes_context", hyper.takes_keyword(self.loss, "context"))
        if self.context_from and not self.loss_takes_context:
            raise SchemeError(f"objective {self.name!r} names context sources {list(self.context_from)}, but its "
                              "loss takes no context keyword; write it as loss(output, batch, *, context)")
        if self.name in self.context_from:
            raise SchemeError(f"objective {self.name!r} names itself as a context source; a loss reads only "
                              "values that earlier objectives published")

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

    def score(self, z: Any, batch: Any, state: State, step: Tensor | None = None,
              context: LossContext | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """``(weight · loss(z, batch), metrics)`` at ``step``: the loss gets ``step=`` when it
        takes one, and ``context=`` when it takes one (see ``context``); the weight is a
        number, a schedule of the step or held in ``state``."""
        kwargs: dict[str, Any] = {"step": step} if self.loss_takes_step else {}
        if self.loss_takes_context:
            if context is None:
                raise SchemeError(f"objective {self.name!r}'s loss takes a context, which this caller does not "
                                  "give; score it through Objective.forward (or pass context=self.context(...))")
            kwargs["context"] = context
        out = self.loss(z, batch, **kwargs)
        loss, metrics = self._checked(out)
        weight = hyper.resolve(self.weight, state, step, f"objective {self.name!r}'s weight")
        return weight * loss, metrics

    def context(self, x: Tensor, h: Tensor, *, train: bool, step: Tensor | None = None,
                published: Published | None = None) -> LossContext:
        """The ``LossContext`` of this objective for input ``x`` and net output ``h``, reading
        the values its sources put in ``published`` (this step's board)."""
        received = {} if published is None else {n: published.get(n, {}) for n in self.context_from}
        return LossContext(self.name, x, h, train, step, received, self.context_from, {})

    def input_for_context(self, x: Tensor, train: bool) -> Tensor:
        """``x`` as this objective's loss context sees it: a leaf that requires grad while
        the step differentiates (training, gradients enabled) and ``x`` is floating point
        (not token ids), else ``x`` itself."""
        if self.loss_takes_context and train and torch.is_grad_enabled() and x.is_floating_point():
            return x.detach().requires_grad_(True)
        return x

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
                known: dict[str, Tensor] | None = None, published: Published | None = None
                ) -> tuple[Tensor, State, dict[str, Tensor], dict[str, Tensor]]:
        """``(loss, state updates, outputs, metrics)``; ``outputs`` maps ``output_name`` and
        each block named in ``taps`` to its output. ``step`` (the train state's step) reaches
        schedules and losses that take it.

        ``published`` is this step's board of context values (``LossContext``): a loss that
        takes a context reads its sources' values there and its own (detached) go in under
        its name.

        ``known`` (eval mode only): block outputs already computed in this pass, by block name;
        the net then starts after the last of its blocks found there, so each block runs once."""
        x = self.input_for_context(x, train)
        x_in = x
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
        context = self.context(x_in, h, train=train, step=step, published=published) \
            if self.loss_takes_context else None
        loss, metrics = self.score(z, batch, state, step, context)
        if context is not None and published is not None:
            published[self.name] = context.published
        return loss, updates, outputs, metrics


def _names(names: Any) -> tuple[str, ...]:
    """``context_from`` as a tuple of objective names (a lone string is refused, as a typo)."""
    if isinstance(names, str):
        raise TypeError(f"context_from is a list of objective names, e.g. [{names!r}], not a string")
    names = tuple(names or ())
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"context_from names objectives by their names (strings), got {list(names)}")
    return names
