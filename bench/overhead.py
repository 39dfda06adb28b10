"""The library's per-step overhead: an E2E step of ``mf.step`` against the same step in plain
PyTorch (``nn.Module`` forward, ``loss.backward()``, ``torch.optim.SGD``), ResNet-32, one
thread, CPU time per step (``time.process_time``), rounds interleaved in one process.

    python bench/overhead.py                        # batch 8 and 128, 7 rounds
    python bench/overhead.py --batch-size 8 --rounds 11 --json bench/results/overhead.json
    python bench/overhead.py --keep-host-memory     # glibc keeps freed memory (mlaan_func.host_memory)
    PYTHONPATH=../old python bench/overhead.py --json /tmp/old.json   # an earlier checkout's library

Both start from the same parameters and do the same update (SGD, momentum 0.9, Nesterov,
weight decay 1e-4); after the timed steps their parameters are compared (float32 rounding:
the two order the weight-decay sum differently). The ratio ``library / plain`` is the median
of per-round ratios; ``pair_ratio`` is the median over single steps taken in pairs (library
then plain, plain then library, alternating), which the machine's drift disturbs least.
Minor page faults per step (``getrusage``) count the fresh pages each step touched: with
glibc's default settings freed blocks go back to the system between steps, and each 4 KiB
a step touches again costs a fault; ``--keep-host-memory`` calls
``mlaan_func.host_memory.keep_freed_memory()`` first, for both steps alike (one process).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import mlaan_func as mf  # noqa: E402
try:
    from mlaan_func.host_reads import count_host_reads  # noqa: E402
except ImportError:  # an earlier checkout (PYTHONPATH=../old python bench/overhead.py): its ratio only
    count_host_reads = None


def library_checkout() -> str:
    """The commit of the ``mlaan_func`` being measured (``+`` when its tree has changes)."""
    import subprocess
    where = Path(mf.__file__).resolve().parent
    git = ["git", "-C", str(where)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "."], capture_output=True, text=True).stdout.strip()
    return (head or "unknown") + ("+" if dirty else "")


def _host_memory():
    """This checkout's ``mlaan_func.host_memory`` (loaded from its file, so an earlier
    checkout under PYTHONPATH, which has none, is measured the same way: the settings and
    the counter are glibc's and the kernel's, the same for any library)."""
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "mlaan_func" / "host_memory.py"
    spec = importlib.util.spec_from_file_location("this_host_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


host_memory = _host_memory()
minor_page_faults = host_memory.minor_page_faults


def cpu_seconds(fn, steps: int, faults: list[int] | None = None) -> float:
    start, first = time.process_time(), minor_page_faults()
    for _ in range(steps):
        fn()
    seconds = (time.process_time() - start) / steps
    if faults is not None:
        faults.append(minor_page_faults() - first)
    return seconds


def measure(batch_size: int, rounds: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = mf.models.resnet32(num_classes=10)
    scheme = mf.schemes.e2e(mf.from_module(model))
    opt = mf.optim.sgd(common.LR, momentum=0.9, nesterov=True, weight_decay=1e-4)
    ts = mf.init(scheme, opt, seed=0)
    plain = mf.to_module(scheme[0].net, ts.params, ts.state)
    plain.train()
    torch_opt = torch.optim.SGD(plain.parameters(), lr=common.LR, momentum=0.9, nesterov=True, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch_size, 3, 32, 32, generator=g), torch.randint(0, 10, (batch_size,), generator=g)
    step = mf.step(scheme, opt)
    state = {"ts": ts}

    def library():
        state["ts"], _ = step(state["ts"], (x, y))

    def reference():
        torch_opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(plain(x), y).backward()
        torch_opt.step()

    library(), reference()  # warm-up
    ratios, lib_s, ref_s, lib_faults, ref_faults = [], [], [], [], []
    for _ in range(rounds):
        a, b = cpu_seconds(library, steps, lib_faults), cpu_seconds(reference, steps, ref_faults)
        lib_s.append(a), ref_s.append(b), ratios.append(a / b)
    pairs = []
    for i in range(rounds * steps):
        first, second = (library, reference) if i % 2 == 0 else (reference, library)
        t = {first: cpu_seconds(first, 1), second: cpu_seconds(second, 1)}
        pairs.append(t[library] / t[reference])
    reads = None
    if count_host_reads is not None:
        with count_host_reads() as counter:
            library()
        reads = counter.count
    return {"batch_size": batch_size, "rounds": rounds, "steps_per_round": steps,
            "library_ms": 1e3 * statistics.median(lib_s), "plain_ms": 1e3 * statistics.median(ref_s),
            "ratio": statistics.median(ratios), "ratios": ratios, "pairs": len(pairs),
            "pair_ratio": statistics.median(pairs), "library_host_reads": reads,
            "library_faults_per_step": sum(lib_faults) / (rounds * steps),
            "plain_faults_per_step": sum(ref_faults) / (rounds * steps)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, action="append", help="repeatable; default 8 and 128")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=10, help="steps per round at batch 8 (fewer at larger batches)")
    p.add_argument("--keep-host-memory", action="store_true",
                   help="glibc keeps freed memory for reuse (mlaan_func.host_memory.keep_freed_memory), both steps")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    kept = host_memory.keep_freed_memory() if args.keep_host_memory else False
    rows = []
    for b in args.batch_size or [8, 128]:
        rows.append({**measure(b, args.rounds, max(2, args.steps * 8 // b)), "kept_host_memory": kept})
        print(json.dumps(rows[-1]))
    if args.json:
        Path(args.json).write_text(json.dumps({**common.environment(sys.argv), "checkout": library_checkout(),
                                               "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
