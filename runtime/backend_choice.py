"""``--backend auto``: which engine and precision to open, by a fixed rule (no timing at start-up).

The rule, for the fastest installed engine that meets the parity bars (``esrdf.runtime.tolerances``):

- ``device="cuda"``: TensorRT where it is installed and the bundle has plans (fp16), else torch, else
  onnxruntime (its CUDA provider).
- ``device="cpu"``, CPU with ``avx512_bf16`` or ``amx_bf16`` and openvino installed: OpenVINO "bf16", i.e.
  bf16 for each graph that meets ``BF16_GRAPH`` and, together, ``END_TO_END_BF16`` on this machine (measured
  on first use and cached, ``esrdf.engines.openvino_parity``), fp32 for any graph that misses.
- any other CPU: the faster fp32 engine as measured on this project's CPU machine, onnxruntime (OpenVINO
  f32 was slower on the U-Net step: 261 against 213 ms at 128x128 HR, 2-core AMD EPYC, issue 13).

An explicit precision narrows the rule: "bf16" is OpenVINO's only (an error without it, or on a CPU
without native bf16, where it would be emulated); "fp32" and "fp16" on the CPU are onnxruntime's graphs.
An explicit backend is never second-guessed: ``resolve_backend`` returns it unchanged.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING

from esrdf.runtime.cpu_info import bf16_support
from esrdf.runtime.engine import EngineError

if TYPE_CHECKING:
    from esrdf.runtime.bundle import Bundle

AUTO = "auto"


@dataclass(frozen=True)
class BackendChoice:
    backend: str
    precision: str
    reason: str  # one line: why this backend (what esrdf-run -v prints)


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def default_precision(backend: str) -> str:
    """A named backend's precision when none is given: OpenVINO's parity-checked bf16, fp32 elsewhere."""
    return "bf16" if backend == "openvino" else "fp32"


def resolve_backend(
    backend: str, device: str, precision: str | None, bundle: Bundle | None = None
) -> BackendChoice:
    """``backend`` as given (with its default precision), or the rule above for ``"auto"``."""
    if backend != AUTO:
        chosen = precision or default_precision(backend)
        return BackendChoice(backend, chosen, f"--backend {backend} given")
    if device == "cuda":
        return _cuda_choice(precision, bundle)
    return _cpu_choice(precision, native_bf16=bf16_support(), openvino=installed("openvino"))


def _cpu_choice(precision: str | None, native_bf16: tuple[bool, str], openvino: bool) -> BackendChoice:
    has_bf16, evidence = native_bf16
    if precision in (None, "bf16") and has_bf16 and openvino:
        return BackendChoice(
            "openvino",
            "bf16",
            f"{evidence} and openvino is installed: OpenVINO bf16 per graph (parity-checked)",
        )
    if precision == "bf16":
        missing = "openvino is not installed (pip install 'esrdf[openvino]')" if not openvino else evidence
        raise EngineError(f"precision bf16 needs OpenVINO on a CPU with native bf16: {missing}")
    why = "openvino is not installed" if not openvino else evidence
    return BackendChoice(
        "onnxruntime",
        precision or "fp32",
        f"{why}: onnxruntime {precision or 'fp32'} (the faster measured f32 CPU engine)",
    )


def _cuda_choice(precision: str | None, bundle: Bundle | None) -> BackendChoice:
    plans = bundle is not None and bool(bundle.manifest.engines)
    if precision in (None, "fp16") and plans and installed("tensorrt"):
        return BackendChoice("tensorrt", "fp16", "CUDA, tensorrt installed and the bundle has TensorRT plans")
    if installed("torch"):
        return BackendChoice("torch", precision or "fp32", "CUDA: the torch engine (no TensorRT plans here)")
    return BackendChoice(
        "onnxruntime", precision or "fp32", "CUDA without torch: onnxruntime's CUDA provider"
    )
