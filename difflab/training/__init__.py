"""Training (DESIGN.md "train/"): ``loop`` (the one loop), ``ema`` (weight averages), ``logging`` (log.txt,
stats.jsonl, TensorBoard). The Python entry point is :func:`difflab.train`; checkpoints are in
:mod:`difflab.runio` and process groups in :mod:`difflab.distributed`."""
