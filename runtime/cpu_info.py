"""What this CPU is and which fast paths it has, from ``/proc/cpuinfo`` (no library imported to ask).

The runtime reads it to choose a backend (``esrdf.runtime.backend_choice``) and to key compiled-engine
caches by CPU; the benchmarks embed it in every report. bf16 is native only with ``avx512_bf16`` or
``amx_bf16``: without either, a bf16 hint is emulated in fp32 and is no speed path.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_fields(text: str | None = None) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as {key: value} (empty where it is unreadable)."""
    if text is None:
        try:
            text = CPUINFO.read_text()
        except OSError:
            return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # one processor is enough: all cores of one machine report the same model and flags
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(fields: dict[str, str] | None = None) -> set[str]:
    info = cpuinfo_fields() if fields is None else fields
    return set(info.get("flags", "").split())


def cpu_model(fields: dict[str, str] | None = None) -> str:
    info = cpuinfo_fields() if fields is None else fields
    return info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_identity(fields: dict[str, str] | None = None) -> dict[str, str]:
    """CPU model and a digest of its full flag set: what a compiled CPU engine depends on."""
    info = cpuinfo_fields() if fields is None else fields
    flags = " ".join(sorted(cpu_flags(info)))
    return {"cpu_model": cpu_model(info), "cpu_flags_sha256": hashlib.sha256(flags.encode()).hexdigest()}


def bf16_support(flags: set[str] | None = None) -> tuple[bool, str]:
    """(does the CPU run bf16 natively?, the evidence) from its /proc/cpuinfo flags."""
    have = cpu_flags() if flags is None else flags
    native = [f for f in BF16_FLAGS if f in have]
    if native:
        return True, f"CPU has {', '.join(native)}"
    if not have:
        return False, "CPU flags unknown (/proc/cpuinfo unreadable)"
    return False, f"CPU has none of {', '.join(BF16_FLAGS)}: bf16 would be emulated in fp32"
