"""A graph-less bundle view of a checkpoint, so the torch backends can be benchmarked without an export.

Export needs its own toolchain (torch's ONNX exporter with onnxscript, polygraphy, onnxconverter-common),
which an offline GPU machine may lack. The torch backends need none of it: they read the manifest's
shapes and schedule and the checkpoint's weights. This view carries exactly that, as ``esrdf-export``
would write it, minus the graphs; onnxruntime and TensorRT backends then skip with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esrdf.checkpoint import MODEL_FILE, read_config, read_sampling_defaults
from esrdf.config import SamplingOptions
from esrdf.diffusion.schedule import make_schedule
from esrdf.export.bundle_writer import DEFAULT_BATCH, DEFAULT_TILE, model_manifest, sampling_section
from esrdf.runtime.bundle import Bundle, ExportSettings, WeightsEntry, sha256_file


def checkpoint_bundle(ckpt: Path, tile: int = DEFAULT_TILE, batch: int = DEFAULT_BATCH) -> Bundle:
    """The in-memory bundle of checkpoint directory ``ckpt``: no graphs, its weights as the torch weights.

    The bundle's root is the checkpoint's parent, so the torch-weights path is
    ``<ckpt name>/model.safetensors`` (hash-checked by the torch engine, like an exported bundle's).
    """
    ckpt = Path(ckpt)
    cfg = read_config(ckpt)
    alphas_cumprod = np.asarray(make_schedule(cfg.schedule).alphas_cumprod, dtype=np.float64)
    weights = ckpt / MODEL_FILE
    manifest = model_manifest(
        cfg,
        alphas_cumprod,
        graphs=[],
        export=ExportSettings(checkpoint=str(ckpt), tile=tile, batch=batch),
        torch_weights=WeightsEntry(f"{ckpt.name}/{MODEL_FILE}", sha256_file(weights)),
        # the sampling section the export would write: the checkpoint's sampling.json, else the built-in rule
        sampling=sampling_section(cfg, read_sampling_defaults(ckpt) or SamplingOptions()),
    )
    return Bundle(ckpt.parent, manifest)
