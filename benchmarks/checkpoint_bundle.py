"""A graph-less bundle view of a checkpoint, so the torch backends can be benchmarked without an export.

Export needs its own toolchain (torch's ONNX exporter with onnxscript, polygraphy, onnxconverter-common),
which an offline GPU machine may lack. The torch backends need none of it: they read the manifest's
shapes and schedule and the checkpoint's weights. This view carries exactly that, as ``esrdf-export``
would write it, minus the graphs; onnxruntime and TensorRT backends then skip with the reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from esrdf.checkpoint import MODEL_FILE, read_config
from esrdf.diffusion.schedule import make_schedule
from esrdf.runtime.bundle import FORMAT_VERSION, Bundle, Manifest, ScheduleEntry, sha256_file


def checkpoint_bundle(ckpt: Path) -> Bundle:
    """The in-memory bundle of checkpoint directory ``ckpt``: no graphs, its weights as the torch weights.

    The bundle's root is the checkpoint's parent, so the torch-weights path is
    ``<ckpt name>/model.safetensors`` (hash-checked by the torch engine, like an exported bundle's).
    """
    ckpt = Path(ckpt)
    cfg = read_config(ckpt)
    alphas_cumprod = np.asarray(make_schedule(cfg.schedule).alphas_cumprod, dtype=np.float64)
    weights = ckpt / MODEL_FILE
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model_name=cfg.name,
        scale=cfg.scale,
        channels=cfg.predictor.in_channels,
        hr_multiple_of=cfg.unet.multiple_of,
        value_range=[-1.0, 1.0],
        schedule=ScheduleEntry(cfg.schedule.kind, cfg.schedule.timesteps, alphas_cumprod.tolist()),
        graphs=[],
        export_info={
            "checkpoint": str(ckpt),
            "torch_weights": f"{ckpt.name}/{MODEL_FILE}",
            "torch_weights_sha256": sha256_file(weights),
        },
        model_config=cfg.to_dict(),
    )
    return Bundle(ckpt.parent, manifest)
