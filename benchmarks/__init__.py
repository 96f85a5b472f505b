"""Benchmarks: latency per backend and stage, FLOPs and achieved FLOP/s, quality against steps, plots.

``esrdf-bench`` (``esrdf.bench.cli``) is the command; ``esrdf.bench.suite.run_benchmark`` is the typed
function behind it. Three more commands run on top of it, each with ``python -m``:

- ``esrdf.bench.cpu_bench``: the CPU benchmark behind README's results (exports, esrdf-bench runs, tables);
- ``esrdf.bench.gpu_check``: the gpu/tensorrt tests and the same suite on a CUDA machine
  (``benchmarks/gpu_check.sh``);
- ``esrdf.bench.load_test``: concurrent Triton clients against ``esrdf-serve`` on loopback.

Import-light on purpose: torch, onnxruntime and matplotlib are imported by the modules that use them, so
``import esrdf.bench`` costs nothing. ``benchmarks/results/`` holds measured reports (data, not code).
"""
