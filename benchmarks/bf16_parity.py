"""OpenVINO bf16 against f32 end to end on the held-out photos: the figure README reports for bf16.

    .venv/bin/python -m esrdf.bench.bf16_parity --json out/bf16_parity.json    # a few minutes on 2 cores

The engine chooses each graph's precision from its first-use measurement on one photo
(``esrdf.engines.openvino_parity``); this checks the choice on every held-out photo (``esrdf.bench.quality``:
scikit-image's and scikit-learn's), with the shipped default model and its recommended sampling (DDIM, 20
steps, eta 1, the bundle's prior), the same seed for both, against ``END_TO_END_BF16`` (PSNR on [0, 1]).
The LR input is a centre crop of each photo, downsampled 4x with PIL's bicubic, one tile of the bundle.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from esrdf.bench.machine import describe_machine
from esrdf.runtime.images import to_model_range
from esrdf.runtime.tolerances import END_TO_END_BF16


def lr_crop(photo: np.ndarray, lr_size: int, scale: int) -> np.ndarray:
    """Centre ``scale * lr_size`` HR crop, bicubic-downsampled to ``lr_size``: (3, lr, lr) in [-1, 1]."""
    side = min(scale * lr_size, photo.shape[0], photo.shape[1])
    y, x = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    hr = Image.fromarray(np.ascontiguousarray(photo[y : y + side, x : x + side]))
    return to_model_range(np.asarray(hr.resize((side // scale,) * 2, Image.Resampling.BICUBIC)))


def psnr01(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean(((a.astype(np.float64) - b) / 2.0) ** 2))  # [-1, 1] -> [0, 1]
    return 100.0 if mse == 0.0 else -10.0 * math.log10(mse)


def run(bundle_dir: Path | None, threads: int | None) -> dict[str, Any]:
    from esrdf.bench.quality import held_out_photos
    from esrdf.default_model import RECOMMENDED_SAMPLING, default_bundle_dir
    from esrdf.runtime import Upscaler

    bundle_dir = bundle_dir or default_bundle_dir()
    f32 = Upscaler(bundle_dir, "openvino", precision="fp32", threads=threads)
    bf16 = Upscaler(bundle_dir, "openvino", precision="bf16", threads=threads)
    options = RECOMMENDED_SAMPLING
    rows = {}
    for name, photo in held_out_photos().items():
        lr = lr_crop(photo, f32.tile, f32.scale)
        rows[name] = round(psnr01(bf16.upscale_array(lr, options), f32.upscale_array(lr, options)), 2)
        print(f"{name}: bf16 vs f32 {rows[name]} dB", flush=True)
    worst = min(rows.values())
    return {
        "what": "OpenVINO bf16 (per-graph choice) vs OpenVINO f32, end to end, same seed, PSNR on [0, 1]",
        "bundle": str(bundle_dir),
        "precisions": bf16.engine.precisions,
        "sampling": {"sampler": options.sampler, "steps": options.steps, "eta": options.eta, "seed": 0},
        "lr_tile": f32.tile,
        "psnr_db": rows,
        "min_psnr_db": worst,
        "bar": {"end_to_end_bf16": END_TO_END_BF16.min_psnr_db},
        "within_bar": worst >= (END_TO_END_BF16.min_psnr_db or 0.0),
        "machine": describe_machine(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--engine", type=Path, default=None, help="bundle [the shipped default model]")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    report = run(args.engine, args.threads)
    bar = END_TO_END_BF16.min_psnr_db
    print(f"min {report['min_psnr_db']} dB (bar {bar}): within the bar: {report['within_bar']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["within_bar"] else 1


if __name__ == "__main__":
    sys.exit(main())
