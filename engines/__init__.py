"""Executable engines behind one protocol (``esrdf.engines.protocol``): onnxruntime, torch, TensorRT.

Import-light on purpose: open one with ``esrdf.engines.registry.open_engine``, which imports only the
backend asked for.
"""
