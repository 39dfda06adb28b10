"""Parallel execution over ``torch.distributed``: data parallel and module parallel steps,
each the executor plus communication (``distributed``)."""
