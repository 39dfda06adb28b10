"""Local learning of a small decoder-only language model, with end-to-end training beside it.

The corpus is generated here from a seed: a second-order Markov chain over a small
vocabulary in which every pair of tokens is followed by one of a few successors (a sparse
random transition table), so a model must attend to the token before the last, and its best
perplexity is known (the chain's entropy rate, printed as the floor; the first token of each
sequence is uniform, so a little above it). The LM (`mf.models.lm_micro`) is split into K gradient-isolated
modules (`mf.schemes.lm_local`); each module predicts the next token through its own readout,
a trainable copy of the final readout that starts equal to it. (SOLO-style shared readouts,
every module reading the final unembedding read-only, need read-only views, which the library
does not have yet.) Perplexity is ``exp`` of the held-out next-token cross-entropy.

    python examples/lm_local.py                 # about a minute on one CPU thread
    python examples/lm_local.py --steps 40      # a smoke run
"""

from __future__ import annotations

import argparse
import math

import torch

import mlaan_func as mf

VOCAB, CONTEXT, SUCCESSORS = 16, 32, 3


def markov_chain(seed: int) -> tuple[torch.Tensor, float]:
    """A sparse second-order transition table (each pair of tokens has ``SUCCESSORS`` possible
    successors, so the model must attend to the token before the last) and the chain's
    entropy rate under its stationary distribution over pairs, in nats."""
    g = torch.Generator().manual_seed(seed)
    table = torch.zeros(VOCAB, VOCAB, VOCAB)
    for a in range(VOCAB):
        for b in range(VOCAB):
            successors = torch.randperm(VOCAB, generator=g)[:SUCCESSORS]
            table[a, b, successors] = torch.rand(SUCCESSORS, generator=g) + 0.2
    table = table / table.sum(dim=2, keepdim=True)
    pairs = torch.full((VOCAB, VOCAB), 1.0 / VOCAB ** 2)
    for _ in range(300):
        pairs = torch.einsum("ab,abc->bc", pairs, table)
    rows = -(table * table.clamp(min=1e-12).log()).sum(dim=2)
    return table, float((pairs * rows).sum())


def corpus(table: torch.Tensor, sequences: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``sequences`` token sequences of the chain: (tokens, next tokens), each (n, CONTEXT)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(sequences, CONTEXT + 1, dtype=torch.long)
    out[:, :2] = torch.randint(0, VOCAB, (sequences, 2), generator=g)
    for t in range(1, CONTEXT):
        out[:, t + 1] = torch.multinomial(table[out[:, t - 1], out[:, t]], 1, generator=g).squeeze(1)
    return out[:, :-1], out[:, 1:]


def train(scheme, steps: int, data, batch: int, seed: int):
    opt = mf.optim.adamw(mf.optim.warmup_cosine(3e-3, warmup_steps=10, total_steps=steps), weight_decay=0.01)
    ts, train_step = mf.init(scheme, opt, seed=seed), mf.step(scheme, opt)
    x, y = data
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        pick = torch.randint(0, x.shape[0], (batch,), generator=g)
        ts, _ = train_step(ts, (x[pick], y[pick]))
    return ts


def perplexities(scheme, ts, held_out) -> dict[str, float]:
    x, y = held_out
    batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, x.shape[0], 256)]
    losses = mf.evaluate(scheme, ts, batches, select="loss")
    return {name: math.exp(loss) for name, loss in losses.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--at", nargs="*", default=["blocks.0", "blocks.2"], help="cut points (K = len + 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    table, entropy = markov_chain(args.seed)
    train_data, held_out = corpus(table, 4096, args.seed + 1), corpus(table, 512, args.seed + 2)
    print(f"corpus: vocabulary {VOCAB}, context {CONTEXT}; perplexity floor {math.exp(entropy):.2f}, "
          f"uniform {VOCAB}")
    for label, at in (("e2e", []), ("local", args.at)):     # no cut points: one module, end to end
        net = mf.from_module(mf.models.lm_micro(vocab_size=VOCAB, context=CONTEXT))
        scheme = mf.schemes.lm_local(net, at)
        ts = train(scheme, args.steps, train_data, args.batch, args.seed)
        ppl = perplexities(scheme, ts, held_out)
        modules = ", ".join(f"{n} {v:.2f}" for n, v in ppl.items() if n != "final")
        print(f"{label} (K={len(at) + 1}): final readout perplexity {ppl['final']:.2f}"
              + (f"; module readouts {modules}" if modules else ""))


if __name__ == "__main__":
    main()
