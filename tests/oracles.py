"""Test oracles shared by the test files: docs/design.md §2 written with ordinary modules,
``.backward()`` and explicit BatchNorm bookkeeping, independent of the library's engine."""

import copy

import torch
from torch.nn import functional as F

from mlaan_func import optim


class Reference:
    """Blocks as ordinary modules loaded from the library's tensors: every run of a block
    starts from the step's initial statistics; the first run writes."""

    def __init__(self, params, state):
        self.params, self.state, self.new_state, self.modules = params, state, {}, {}

    def module(self, prefix, template, in_state=False):
        if prefix not in self.modules:
            m = copy.deepcopy(template).train()
            source = self.state if in_state else self.params
            for k, v in m.named_parameters():
                v.data.copy_(source[f"{prefix}.{k}"])
                v.requires_grad_(not in_state)
            self.modules[prefix] = (m, in_state)
        return self.modules[prefix][0]

    def run(self, prefix, template, x, in_state=False):
        m = self.module(prefix, template, in_state)
        for k, v in m.named_buffers():
            v.data.copy_(self.state[f"{prefix}.{k}"])
        y = m(x)
        for k, v in m.named_buffers():
            self.new_state.setdefault(f"{prefix}.{k}", v.detach().clone())
        return y

    def grads(self):
        out = {}
        for prefix, (m, in_state) in self.modules.items():
            if not in_state:
                out.update({f"{prefix}.{k}": (v.grad if v.grad is not None else torch.zeros_like(v))
                            for k, v in m.named_parameters()})
        return out


def ce(out, x, y):
    return F.cross_entropy(out, y)


def local_reference(model, scheme, at, method, trunk_of=None, *, width=2, ind_loss=None, cas_loss=None,
                    w_x=0.001, w_y=0.999, detach=True):
    """``(params, state, (x, y)) -> (grads, new state)`` of DGL (``method="dgl"``) or MLAAN with
    windows of ``width`` over ``model``'s ``named_blocks()`` cut after ``at``, in plain PyTorch.

    ``trunk_of(i, end)``: the block names of the leap trunk of the window ending at module ``i``
    (whose last block is ``end``); ``ind_loss(i)`` / ``cas_loss(i)``: module ``i``'s loss
    ``(output, x, y) -> loss`` (default cross-entropy); ``detach=False`` lets gradient cross
    module boundaries (a broken scheme, for checkers that must fail)."""
    blocks = dict(model.named_blocks())
    names = list(blocks)
    ends = [names.index(a) for a in at] + [len(names) - 1]
    per_module = [names[(ends[j - 1] + 1 if j else 0):ends[j] + 1] for j in range(len(ends))]
    k = len(per_module)
    heads = {b.prefix: b.module for o in scheme if o.head is not None for b in o.head.blocks if hasattr(b, "module")}
    ind_loss = ind_loss or (lambda i: ce)
    cas_loss = cas_loss or (lambda i: ce)
    cut = (lambda h: h.detach()) if detach else (lambda h: h)

    def reference(params, state, xy):
        x, y = xy
        ref = Reference(params, state)

        def run(j, h):
            for b in per_module[j]:
                h = ref.run(b, blocks[b], h)
            return h

        hs = [x]
        for j in range(k):
            hs.append(cut(run(j, cut(hs[-1]))))
        total = 0.0
        if method == "dgl":
            for i in range(k - 1):
                total = total + F.cross_entropy(ref.run(f"head{i}", heads[f"head{i}"], run(i, hs[i])), y)
            total = total + F.cross_entropy(run(k - 1, hs[k - 1]), y)
        else:
            for i in range(width - 1, k - 1):
                z = hs[i - width + 1]
                for j in range(i - width + 1, i + 1):
                    z = run(j, z)
                trunk = trunk_of(i, names[ends[i]])
                t = z
                if trunk:
                    t = ref.run(f"trunk{i}.{trunk[0]}", blocks[trunk[0]], z) + \
                        ref.run(f"twin.{trunk[0]}", blocks[trunk[0]], z, in_state=True)
                    for b in trunk[1:]:
                        t = ref.run(f"trunk{i}.{b}", blocks[b], t)
                total = total + w_y * cas_loss(i)(ref.run(f"chead{i}", heads[f"chead{i}"], t), x, y)
                total = total + w_x * ind_loss(i)(ref.run(f"head{i}", heads[f"head{i}"], run(i, hs[i])), x, y)
            z = hs[k - width]
            for j in range(k - width, k):
                z = run(j, z)
            total = total + F.cross_entropy(z, y)
        total.backward()
        return ref.grads(), {**state, **ref.new_state}

    return reference


def run_pure(opt, params, grads):
    """Apply an optax-style optimizer to a list of gradient dicts, one update each."""
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optim.apply_updates(params, updates)
    return params, state
