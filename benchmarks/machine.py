"""What a benchmark ran on: CPU model, threads, SIMD flags, GPU, library versions, load.

Timings mean nothing without the machine, so every report embeds ``describe_machine()``. The CPU's bf16
support is read from ``/proc/cpuinfo`` flags (``avx512_bf16``, ``amx_bf16``): without either, torch's bf16
autocast is emulated with fp32 arithmetic and is no speed path. Nothing here imports torch unless asked
about a GPU or torch's own settings, and every probe degrades to a string saying why it is unknown.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

# bf16 detection lives in the runtime (which chooses backends by it); re-exported for the bench.
from esrdf.runtime.cpu_info import BF16_FLAGS as BF16_FLAGS
from esrdf.runtime.cpu_info import bf16_support, cpu_flags, cpuinfo_fields

# Flags that decide which fast CPU paths exist (oneDNN / MLAS kernels dispatch on these).
SIMD_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_fp16",
    "amx_int8",
)
LIBRARIES = (
    "numpy",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxconverter_common",
    "tensorrt",
    "openvino",
    "matplotlib",
    "scikit-image:skimage",
    "scikit-learn:sklearn",
    "scipy",
)


def usable_cpus() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), else os.cpu_count()."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: a load above the CPU count means shared, noisy timings."""
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def library_versions() -> dict[str, str]:
    """Installed version of each library a backend may use, or why it is absent."""
    versions: dict[str, str] = {}
    for entry in LIBRARIES:
        label, _, module = entry.partition(":")
        try:
            version = getattr(importlib.import_module(module or label), "__version__", None)
            # tensorrt-stubs installs an importable namespace package without a version (or a runtime)
            versions[label] = (
                str(version) if version else "no __version__ (type stubs or a namespace package)"
            )
        except Exception as exc:  # ImportError, or a broken install raising something else at import
            versions[label] = f"not available ({type(exc).__name__})"
    return versions


def torch_description() -> dict[str, Any]:
    """torch's threads, SIMD dispatch level and CUDA devices; empty when torch is not installed."""
    try:
        import torch
    except ImportError:
        return {}
    info: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "gpu_sm": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
        }
    return info


def git_commit(root: Path | None = None) -> str | None:
    where = root or Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return done.stdout.strip() or None
    return None


def describe_machine(with_torch: bool = True) -> dict[str, Any]:
    """Everything a reader needs to compare timings across machines (JSON-ready)."""
    fields = cpuinfo_fields()
    flags = cpu_flags(fields)
    native_bf16, bf16_reason = bf16_support(flags)
    info: dict[str, Any] = {
        "cpu_model": fields.get("model name") or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "simd_flags": [f for f in SIMD_FLAGS if f in flags],
        "bf16_native": native_bf16,
        "bf16_evidence": bf16_reason,
        "memory_gib": _memory_gib(),
        "load_average": load_average(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": library_versions(),
        "git_commit": git_commit(),
    }
    if with_torch:
        info |= torch_description()
    return info


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return None
