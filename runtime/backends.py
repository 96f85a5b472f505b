"""Open an engine for a bundle by backend name, importing only that backend's module.

The runtime owns the engine protocol (``esrdf.runtime.engine``) and ``esrdf.engines`` implements it; this
module is the one place where the runtime reaches up into ``esrdf.engines``, and only inside
``open_engine``, for the backend asked for (dependency inversion: the layer rule's declared exception).
No import-time registry (BasicSR #663): each backend's module, and its heavy library, is imported when
asked for, so the onnxruntime path never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esrdf.runtime.engine import Engine, EngineError

if TYPE_CHECKING:
    from esrdf.runtime.bundle import Bundle

BACKENDS = ("onnxruntime", "openvino", "torch", "tensorrt")  # "auto" (esrdf.runtime.backend_choice) picks one


def open_engine(
    bundle: Bundle,
    backend: str = "onnxruntime",
    device: str = "cpu",
    precision: str = "fp32",
    threads: int | None = None,
) -> Engine:
    """The engine ``backend`` running ``bundle``'s ``precision`` graphs on ``device``."""
    if backend == "onnxruntime":
        from esrdf.engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine.from_bundle(bundle, precision=precision, device=device, threads=threads)
    if backend == "openvino":
        from esrdf.engines.openvino_engine import OpenVinoEngine

        return OpenVinoEngine.from_bundle(bundle, precision=precision, device=device, threads=threads)
    if backend == "torch":
        try:
            from esrdf.engines.torch_engine import TorchEngine
        except ImportError as exc:
            raise EngineError(
                f"backend 'torch' needs torch installed ({exc}); use --backend onnxruntime"
            ) from exc
        # threads: torch's intra-op pool is process-global (torch.set_num_threads); we leave it to the caller.
        return TorchEngine.from_bundle(bundle, device=device, precision=precision)
    if backend == "tensorrt":
        return _open_tensorrt(bundle, device, precision)
    raise EngineError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def _open_tensorrt(bundle: Bundle, device: str, precision: str) -> Engine:
    """TensorRT plans in the bundle (``esrdf.engines.tensorrt_engine``); CUDA only."""
    if device != "cuda":
        raise EngineError(
            "backend 'tensorrt' runs on CUDA only: pass --device cuda (or use --backend onnxruntime)"
        )
    try:
        from esrdf.engines.tensorrt_build import TensorRTUnavailable
        from esrdf.engines.tensorrt_engine import open_tensorrt_engine
    except ImportError as exc:
        raise EngineError(
            f"backend 'tensorrt' needs torch and tensorrt ({exc}); use --backend onnxruntime"
        ) from exc
    try:
        return open_tensorrt_engine(bundle, device=device, precision=precision)
    except TensorRTUnavailable as exc:
        raise EngineError(
            f"backend 'tensorrt' is unavailable here: {exc}; use --backend onnxruntime"
        ) from exc
