"""torch -> ONNX export of ESRDF, and the bundles the runtime reads (docs/DESIGN.md section 3).

- ``step_module``: the modules behind the two graphs (``PredictorModule``; ``StepModule`` = U-Net + fp32
  sampler update), shared with the torch engine;
- ``onnx_export``: the dynamo exporter with the spec's dynamic axes;
- ``cleanup``: scope-named nodes, spec-named axes, constant folding, full check, saving;
- ``fp16``: mixed-precision variants (norms, softmax, time embedding and update in fp32);
- ``parity``: eager vs onnxruntime figures on a real photo, and polygraphy I/O files;
- ``bundle_writer``: ``export_bundle``, the whole pipeline into an atomically written bundle;
- ``cli``: ``esrdf-export``.

Import-light: torch and onnx load only when a submodule (or ``export_bundle``) is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from esrdf.export.bundle_writer import export_bundle

__all__ = ["export_bundle"]


def __getattr__(name: str) -> Any:
    if name == "export_bundle":
        return importlib.import_module("esrdf.export.bundle_writer").export_bundle
    raise AttributeError(f"module 'esrdf.export' has no attribute {name!r}")
