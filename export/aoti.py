"""AOTInductor packages of the predictor and step graphs, for the C++ runtime's libtorch backend.

``add_aoti_packages(bundle_dir)`` compiles the bundle's own torch weights (``torch/``, written by
``export_bundle``) with ``torch._inductor.aoti_compile_and_package`` at the bundle's fixed tile/batch shape
(the manifest's ``export.tile``/``export.batch``), and writes them into ``bundle/aoti/``::

    aoti/
      aoti.json        sidecar: sha256 of each package, torch version, shape, weights they came from
      predictor.pt2    coarse = P(lr), paper Section 4.2, Fig. 5
      step.pt2         one reverse step with the sampler update folded in (paper Eq. 5-7)

The modules are the ones ONNX export traces (``esrdf.models.step_module``), so every backend runs the same
arithmetic. Static shapes: AOTInductor compiles a fixed-shape graph faster and runs it faster, and the
runtime feeds fixed-shape tiles anyway (the last batch is padded).

The manifest format has no slot for extra files, hence the sidecar; the C++ runtime checks its hashes, that
its ``torch_weights_sha256`` equals the manifest's ``torch_weights.sha256`` (packages from other weights are
stale), and the torch major.minor. The ``aoti/`` directory is built under a temp name and renamed into
place, so a failed build never leaves a half-written one (``esrdf.atomic.atomic_dir``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esrdf.atomic import atomic_dir
from esrdf.runtime.bundle import BundleError, load_bundle, sha256_file
from esrdf.runtime.graph_spec import GRAPH_ROLES, NUM_STEP_COEFS, PREDICTOR, STEP

AOTI_DIR = "aoti"
SIDECAR = "aoti.json"
SIDECAR_VERSION = 1


class AotiError(RuntimeError):
    """AOTInductor could not export or compile a graph (no C++ compiler, an unsupported op, ...)."""


def sample_inputs(role: str, batch: int, tile: int, scale: int, channels: int) -> tuple[Any, ...]:
    """Inputs of the graph contract at one static shape (their values do not matter to the compiler)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    hr = (batch, channels, tile * scale, tile * scale)
    if role == PREDICTOR:
        return (torch.rand((batch, channels, tile, tile), generator=generator) * 2 - 1,)
    return (
        torch.randn(hr, generator=generator),  # x_t
        torch.rand(hr, generator=generator) * 2 - 1,  # cond
        torch.full((batch,), 10.0),  # t: the timestep index as float
        torch.rand((batch, NUM_STEP_COEFS), generator=generator),  # coefs
        torch.randn(hr, generator=generator),  # noise
    )


def compile_package(module: Any, inputs: tuple[Any, ...], path: Path) -> None:
    """torch.export the module at the inputs' static shapes, then compile and package it with AOTInductor."""
    import torch

    try:
        with torch.no_grad():
            program = torch.export.export(module, inputs, strict=False)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:  # torch.export and inductor raise many types; the CLI shows one line
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AotiError(f"AOTInductor could not compile {path.name}: {first_line}") from exc


def add_aoti_packages(
    bundle_dir: str | os.PathLike[str],
    tile: int | None = None,
    batch: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Compile the bundle's predictor and step modules into ``bundle/aoti/``; return that directory.

    ``tile``/``batch`` default to the shape the bundle was exported at. An existing ``aoti/`` is replaced.
    """
    from esrdf.checkpoint import load_checkpoint
    from esrdf.models.step_module import PredictorModule, StepModule

    bundle = load_bundle(bundle_dir, verify=True)  # checks the torch weights' sha256 too
    if bundle.manifest.torch_weights is None:
        raise BundleError(
            f"{bundle.root}: no torch weights in this bundle (exported with --no-torch-weights)"
        )
    weights, weights_sha = bundle.manifest.torch_weights.file, bundle.manifest.torch_weights.sha256
    tile = bundle.manifest.export.tile if tile is None else tile
    batch = bundle.manifest.export.batch if batch is None else batch
    if tile < 1 or tile % bundle.manifest.lr_multiple_of or batch < 1:
        raise BundleError(
            f"AOTInductor packages need a positive tile (multiple of {bundle.manifest.lr_multiple_of}) "
            f"and batch; got tile={tile}, batch={batch}"
        )
    ckpt = load_checkpoint((bundle.root / weights).parent)
    assert ckpt.unet is not None  # export_bundle writes torch/ only with a U-Net
    modules = {
        PREDICTOR: PredictorModule(ckpt.predictor).eval(),
        STEP: StepModule.for_model(ckpt.unet, ckpt.config).eval(),
    }
    manifest = bundle.manifest
    target = bundle.root / AOTI_DIR
    with atomic_dir(target) as tmp:
        packages = []
        for role in GRAPH_ROLES:
            start = time.perf_counter()
            inputs = sample_inputs(role, batch, tile, manifest.scale, manifest.channels)
            compile_package(modules[role], inputs, tmp / f"{role}.pt2")
            packages.append(
                {"role": role, "file": f"{AOTI_DIR}/{role}.pt2", "sha256": sha256_file(tmp / f"{role}.pt2")}
            )
            if progress is not None:
                progress(f"compiled the {role} AOTInductor package ({time.perf_counter() - start:.1f} s)")
        (tmp / SIDECAR).write_text(json.dumps(_sidecar(packages, tile, batch, weights_sha), indent=2) + "\n")
    return target


def _sidecar(packages: list[dict[str, str]], tile: int, batch: int, weights_sha: str) -> dict[str, Any]:
    import torch

    return {
        "format_version": SIDECAR_VERSION,
        "torch_version": torch.__version__,
        "device": "cpu",
        "precision": "fp32",
        "tile": tile,
        "batch": batch,
        "torch_weights_sha256": weights_sha,
        "packages": packages,
    }
