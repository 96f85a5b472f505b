"""Benchmarks: latency per backend and stage, FLOPs and achieved FLOP/s, quality against steps, plots.

``esrdf-bench`` (``esrdf.bench.cli``) is the command; ``esrdf.bench.suite.run_benchmark`` is the typed
function behind it. Import-light on purpose: torch, onnxruntime and matplotlib are imported by the modules
that use them, so ``import esrdf.bench`` costs nothing.
"""
