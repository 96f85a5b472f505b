"""Console-script entry points that name the missing extra instead of crashing with ``ModuleNotFoundError``.

The base install is the lean runtime (numpy, pillow, onnxruntime): ``esrdf-run`` works there, and every
other script needs an optional extra (pyproject ``[project.optional-dependencies]``). Each entry here
imports its command module when called, and runs it; a missing optional library, at import or later
inside the command (torch is imported where it is used), becomes one line naming the pip command:

    esrdf-export: needs 'onnx', which is not installed: pip install 'esrdf[export]'

A ``ModuleNotFoundError`` for anything else (one of our own modules, say) is a bug and propagates.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# Top-level module -> the extra that installs it. torch is in several extras: a script's own extra wins.
MODULE_EXTRAS = {
    "torch": "torch",
    "onnx": "export",
    "onnxscript": "export",
    "polygraphy": "export",
    "onnx_graphsurgeon": "export",
    "onnxconverter_common": "export",
    "skimage": "train",
    "tqdm": "train",
    "matplotlib": "plot",
    "pytriton": "serve",
    "tritonclient": "serve",
}

# script -> (command module, whose ``main`` it runs; the extra the script is installed with)
SCRIPTS: dict[str, tuple[str, str]] = {
    "esrdf-train": ("esrdf.cli.train", "train"),
    "esrdf-eval": ("esrdf.cli.evaluate", "train"),
    "esrdf-export": ("esrdf.export.cli", "export"),
    "esrdf-serve": ("esrdf.runtime.serving.serve", "serve"),
    "esrdf-bench": ("esrdf.bench.cli", "export"),
}

EXTRA_PACKAGES = {  # what each extra adds that the script may miss
    "export": {"torch", "onnx", "onnxscript", "polygraphy", "onnx_graphsurgeon", "onnxconverter_common"},
    "train": {"torch", "skimage", "tqdm"},
    "serve": {"pytriton", "tritonclient"},
}


def missing_extra(script: str, exc: ModuleNotFoundError) -> str | None:
    """The one-line message for ``exc`` raised by ``script``, or None if it is not an optional library."""
    module = (exc.name or "").split(".")[0]
    if module not in MODULE_EXTRAS:
        return None
    own = SCRIPTS[script][1]
    extra = own if module in EXTRA_PACKAGES.get(own, set()) else MODULE_EXTRAS[module]
    return f"{script}: needs {module!r}, which is not installed: pip install 'esrdf[{extra}]'"


def run_script(script: str) -> None:
    """Import ``script``'s command module and call its ``main``; a missing extra is one line, exit 1."""
    module_name, _extra = SCRIPTS[script]
    try:
        main: Callable[[], object] = importlib.import_module(module_name).main
        main()
    except ModuleNotFoundError as exc:
        message = missing_extra(script, exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        sys.exit(1)


def train() -> None:
    run_script("esrdf-train")


def evaluate() -> None:
    run_script("esrdf-eval")


def export() -> None:
    run_script("esrdf-export")


def serve() -> None:
    run_script("esrdf-serve")


def bench() -> None:
    run_script("esrdf-bench")
