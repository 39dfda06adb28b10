"""Reproduces the fault that keeps a net with a strided 1×1 convolution of 2 to 6 input
channels out of channels-last on the CPU (``mlaan_func.core.layout``): that convolution's
weight gradient, in channels-last, corrupts the heap (glibc aborts: "corrupted size vs.
prev_size", "double free or corruption"). Each case runs in a fresh process; the table
says which die.

    OMP_NUM_THREADS=1 python bench/layout_fault.py            # torch 2.13 CPU: in_channels 2-6 die
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch


def case(in_channels: int, channels_last: bool) -> None:
    """Forty weight gradients of a 1×1, stride-2 convolution from ``in_channels`` to 8."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for _ in range(40):
        x = torch.randn(16, in_channels, 8, 8).contiguous(memory_format=fmt)
        w = torch.randn(8, in_channels, 1, 1).contiguous(memory_format=fmt).requires_grad_()
        torch.autograd.grad(torch.nn.functional.conv2d(x, w, stride=2).sum(), w)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", nargs=2, type=int, metavar=("IN_CHANNELS", "CHANNELS_LAST"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case:
        case(args.case[0], bool(args.case[1]))
        return 0
    print("in_channels  channels_last  contiguous")
    for cin in range(1, 10):
        codes = [subprocess.run([sys.executable, __file__, "--case", str(cin), str(cl)], capture_output=True).returncode
                 for cl in (1, 0)]
        print(f"{cin:11d}  {'ok' if codes[0] == 0 else 'dies':>13s}  {'ok' if codes[1] == 0 else 'dies':>10s}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
