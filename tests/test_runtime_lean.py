"""The onnxruntime path, imported and run, loads no torch (docs/DESIGN.md section 2: a service needs numpy
plus one engine library)."""

from __future__ import annotations

import subprocess
import sys

import pytest

LEAN_IMPORTS = """
import sys
import esrdf.runtime
from esrdf.runtime import Upscaler
import esrdf.runtime.cli, esrdf.runtime.driver, esrdf.runtime.tiling, esrdf.runtime.noise
import esrdf.engines.onnxruntime_engine, esrdf.runtime.backends
import numpy as np
from esrdf.config import SamplingOptions
from esrdf.default_model import default_bundle_dir
from esrdf.runtime.images import load_image
# Run the onnxruntime path end to end: the shipped bundle on a crop of its sample photo, 2 steps, 2 tiles.
photo = load_image(default_bundle_dir().parent / "sample" / "chelsea.png")
rgb = np.ascontiguousarray(photo[100:108, 200:212])
for backend in ("onnxruntime", "auto"):  # auto: OpenVINO where it is installed and the CPU has bf16
    out = Upscaler(default_bundle_dir(), backend, threads=1, tile=8, overlap=0)(rgb, SamplingOptions(steps=2))
    assert out.shape == (32, 48, 3) and out.dtype == np.uint8, out.shape
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "tensorrt", "torchvision", "onnx"})
training = sorted(m for m in sys.modules if m.startswith(("esrdf.models", "esrdf.diffusion", "esrdf.training",
                                                          "esrdf.losses", "esrdf.export")))
print(heavy + training)
"""


def test_runtime_and_an_onnxruntime_upscale_leave_torch_unimported() -> None:
    result = subprocess.run([sys.executable, "-c", LEAN_IMPORTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the lean runtime imported: {result.stdout.strip()}"


def test_the_lean_check_can_fail() -> None:
    """Guard against a vacuous check: importing torch in the same script is detected."""
    script = LEAN_IMPORTS.replace("import sys\n", "import sys\nimport torch\n", 1)
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "'torch'" in result.stdout
