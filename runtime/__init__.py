"""The lean ESRDF runtime: bundle format, sampler driver, tiling and the embeddable ``Upscaler``.

Needs numpy, pillow and one engine library; never torch on the onnxruntime path. ``Upscaler`` is
resolved lazily (PEP 562) so that ``import esrdf.runtime.bundle`` (the export side) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esrdf.runtime.upscaler import Upscaler

__all__ = ["Upscaler"]


def __getattr__(name: str) -> Any:
    if name == "Upscaler":
        from esrdf.runtime.upscaler import Upscaler

        return Upscaler
    raise AttributeError(f"module 'esrdf.runtime' has no attribute {name!r}")
