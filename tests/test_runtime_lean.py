"""The onnxruntime path imports no torch (DESIGN.md section 2: a service needs numpy + one engine)."""

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
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "tensorrt", "torchvision", "onnx"})
training = sorted(m for m in sys.modules if m.startswith(("esrdf.models", "esrdf.diffusion", "esrdf.training",
                                                          "esrdf.losses", "esrdf.export")))
print(heavy + training)
"""


def test_runtime_and_onnxruntime_engine_leave_torch_unimported() -> None:
    result = subprocess.run([sys.executable, "-c", LEAN_IMPORTS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the lean runtime imported: {result.stdout.strip()}"


def test_the_lean_check_can_fail() -> None:
    """Guard against a vacuous check: importing torch in the same script is detected."""
    script = LEAN_IMPORTS.replace("import sys\n", "import sys\nimport torch\n", 1)
    pytest.importorskip("torch")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "'torch'" in result.stdout
