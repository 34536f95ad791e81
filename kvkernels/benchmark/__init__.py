"""Benchmarks and roofline profiling for kvkernels (`kvkernels bench ...`).

Every point of a sweep runs each implementation side by side, in one process, on the same inputs;
results are records of one JSON schema (results.py) that also renders to a Markdown table and
PNG plots. Modules:

  timing.py    CUDA-event / do_bench / CUDA-graph timing with L2-defeating input rotation, and
               the two ceilings (device-to-device copy GB/s, large bf16 matmul TFLOP/s)
  peers.py     the implementations compared: our cuda and triton backends, SDPA backends,
               FlexAttention, a naive PyTorch version, FlashInfer when importable
  results.py   the results schema, merge, Markdown, plots
  runner.py    the sweep loop shared by the ops (budget, progress bar, records)
  decode.py prefill.py append.py generate.py   one module per benchmarked op
  presets.py   head shapes of real models
  cli.py       `kvkernels bench {decode,prefill,append,generate}`

Without a GPU everything still runs at tiny sizes (PyTorch on CPU, Triton interpreted); the
results then say device "cpu", and their timings are not GPU figures.
"""

import torch

if not torch.cuda.is_available():
    # Sets TRITON_INTERPRET=1 before any Triton kernel is defined, so backend="triton" runs on CPU.
    import kvkernels.triton  # noqa: F401  (imported for its side effect)
