"""Executable engines implementing the runtime's protocol (``esrdf.runtime.engine``): onnxruntime, torch,
TensorRT, and the CUDA-graph sampler the CUDA engines offer.

Import-light on purpose: open one with ``esrdf.runtime.backends.open_engine``, which imports only the
backend asked for.
"""
