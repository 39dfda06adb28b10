"""A worker process for tests/test_staleness.py: one rank of the streamed pipeline under
declared staleness (argv: rank, world, store, out, and a JSON config with method, at, owner,
steps, ragged, nan_at, staleness and chunks: how many calls of ``run`` the batches are split into,
the carry passed from one to the next)."""

import datetime
import itertools
import json
import os
import sys

import torch
import torch.distributed as dist

import mlaan_func as mf
from mlaan_func import distributed as mfd

sys.path.insert(0, os.path.dirname(__file__))
import pipeline_worker as w  # noqa: E402


def run(rank, world, store, out, config):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10))
    net, objectives = w.scheme(config["method"], config["at"])
    opt = w.optimizer()
    ts = mf.init(objectives, opt, seed=0)
    ends = [m.output_name for m in mf.split(net, config["at"])]
    # staleness > 0 through pipeline_step, which hands it on; 0 directly (pipeline_step refuses a crossing scheme)
    make = mfd.pipeline_step if config["staleness"] else mfd.stale_pipeline_step
    run_pipeline = make(objectives, opt, ends, owner=config["owner"], staleness=config["staleness"])
    data = w.poisoned(w.batches(config["steps"], config.get("ragged", False)), config.get("nan_at"))
    chunks = config.get("chunks", 1)
    cut = [len(data) * c // chunks for c in range(chunks + 1)]
    carry, history, raised = None, [], None
    try:
        for a, b in itertools.pairwise(cut):
            ts, part, carry = run_pipeline(ts, data[a:b], carry)
            history += part
        assert len(history) == config["steps"]
    except mf.NonFiniteLossError as err:
        ts, raised = err.train_state, str(err)
    w.finish(rank, out, ts, history, raised)


if __name__ == "__main__":
    rank, world, store, out, config = sys.argv[1:]
    run(int(rank), int(world), store, out, json.loads(config))
