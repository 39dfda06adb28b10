"""FLOPs of one training step (``mf.gradients``): per-objective, shared (the default, bit-identical)
and shared with summed cotangents (``share="sum"``), counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, forward and
backward), per image, and the ratio to E2E.

    python bench/flops.py                       # ResNet-32, K = 16 (15 for MLAAN, released trunks)
    python bench/flops.py --method mlaan --modules 8 --json /tmp/f.json

FLOPs do not depend on the machine's load; a small batch gives the same count per image.
"""

from __future__ import annotations

import argparse
import sys

from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, __import__("os").path.dirname(__file__))
import common  # noqa: E402

import mlaan_func as mf  # noqa: E402
from mlaan_func.train.execute import use_shared  # noqa: E402


def build_released(method: str, arch: str, k: int, trunks: bool = True):
    """The scheme with the released leap-trunk table where one is published (MLAAN family);
    ``trunks=False``: MLM without LAM (no trunks), to separate the backbone's share."""
    backbone = mf.from_module(common.model_for(arch))
    at = [] if method == "e2e" else common.split_for(arch, backbone, k)
    options = {}
    if method.endswith("mlaan") and not trunks:
        return mf.schemes.build(method, backbone, at, input_shape=(3, 32, 32), trunks=None), False
    if method.endswith("mlaan"):
        try:
            options["trunks"] = mf.leap_trunk_table(arch, k)
        except ValueError:
            pass
    return mf.schemes.build(method, backbone, at, input_shape=(3, 32, 32), **options), "trunks" in options


def count(scheme, ts, batch, share: bool | str) -> int:
    fn = mf.gradients(scheme, share=share)
    with FlopCounterMode(display=False) as counter:
        fn(ts, batch)
    return counter.get_total_flops()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(p)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    common.quick_defaults(args)
    methods = [common.method_name(m) for m in (args.method or common.METHODS)]
    arch = (args.arch or ["resnet32"])[0]
    batch_size = (args.batch_size or [8])[0]
    ks = args.modules or [16]
    batch = common.cifar_batch(batch_size, args.device)
    e2e, _ = build_released("e2e", arch, 1)
    ts = mf.init(e2e, common.optimizer(), seed=0, device=args.device)
    e2e_flops = count(e2e, ts, batch, share=False) / batch_size
    rows = []
    for method in methods:
        for k in ([1] if method == "e2e" else ks):
            kk = common.mlaan_k(method, k)
            scheme, released = build_released(method, arch, kk)
            ts = mf.init(scheme, common.optimizer(), seed=0, device=args.device)
            per = count(scheme, ts, batch, share=False) / batch_size
            shareable = use_shared(scheme, share=None, compile=False)
            shared = count(scheme, ts, batch, share="sum") / batch_size if shareable else per
            exact = count(scheme, ts, batch, share=True) / batch_size if shareable else per
            row = {"method": method, "arch": arch, "modules": kk, "batch_size": batch_size,
                   "released_trunks": released, "shared_by_default": shareable,
                   "per_objective_flops_per_image": per, "shared_flops_per_image": shared,
                   "shared_over_per_objective": shared / per, "per_objective_vs_e2e": per / e2e_flops,
                   "shared_vs_e2e": shared / e2e_flops, "e2e_flops_per_image": e2e_flops,
                   "exact_shared_flops_per_image": exact, "exact_shared_over_per_objective": exact / per}
            if method.endswith("mlaan"):  # the same scheme without trunks: what sharing can remove
                bare, _ = build_released(method, arch, kk, trunks=False)
                ts = mf.init(bare, common.optimizer(), seed=0, device=args.device)
                row["no_trunks_per_objective_flops_per_image"] = count(bare, ts, batch, share=False) / batch_size
                row["no_trunks_shared_flops_per_image"] = count(bare, ts, batch, share="sum") / batch_size
                row["no_trunks_exact_shared_flops_per_image"] = count(bare, ts, batch, share=True) / batch_size
                row["trunk_flops_per_image"] = per - row["no_trunks_per_objective_flops_per_image"]
                remat = [mf.remat(o) for o in scheme]  # rematerialised (every block), both engines
                ts = mf.init(remat, common.optimizer(), seed=0, device=args.device)
                row["remat_per_objective_flops_per_image"] = count(remat, ts, batch, share=False) / batch_size
                row["remat_shared_flops_per_image"] = count(remat, ts, batch, share="sum") / batch_size
            rows.append(row)
            print(f"{method:14s} K={kk:<3d} per-objective {per / 1e9:6.3f} G ({per / e2e_flops:4.2f}x E2E)  "
                  f"shared {shared / 1e9:6.3f} G ({shared / e2e_flops:4.2f}x E2E)  ratio {shared / per:.3f}  "
                  f"exact {exact / per:.3f}",
                  file=sys.stderr)
    payload = {**common.environment(sys.argv), "rows": rows}
    common.write_json(args.json or common.RESULTS / "flops.json", payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
