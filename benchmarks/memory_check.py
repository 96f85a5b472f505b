"""Wall time and peak memory of real requests: a big photo, and four threads on one ``Upscaler``.

    .venv/bin/python -m esrdf.bench.memory_check big --lr 512        # 512x512 -> 2048x2048, default model
    .venv/bin/python -m esrdf.bench.memory_check threads --threads 4  # 4 threads vs serial, bit-identical?

Each mode runs in its own process (peak RSS, ``ru_maxrss``, is per process) with the shipped default model,
``backend="auto"`` and its recommended sampling (DDIM 20 steps, eta 1), as ``esrdf-run`` would. ``big``
also reports the HR output canvas (the blend's float32 sum and weight, 16 bytes per HR pixel), the one
thing that should grow with the image: run it at two sizes to compare peak RSS less canvas.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from esrdf.bench.machine import describe_machine


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _photo(lr: int) -> np.ndarray:
    from esrdf.bench.quality import held_out_photos

    astronaut = held_out_photos(["astronaut"])["astronaut"]  # 512 x 512
    reps = -(-lr // 512)
    return np.ascontiguousarray(np.tile(astronaut, (reps, reps, 1))[:lr, :lr])


def _upscaler(threads: int | None) -> Any:
    from esrdf.default_model import default_bundle_dir
    from esrdf.runtime import Upscaler

    return Upscaler(default_bundle_dir(), threads=threads)


def big(lr: int, threads: int | None) -> dict[str, Any]:
    from esrdf.default_model import RECOMMENDED_SAMPLING

    upscaler = _upscaler(threads)
    rgb = _photo(lr)
    upscaler(rgb[:64, :64], RECOMMENDED_SAMPLING)  # compile this tile shape (and first-use parity) first
    start = time.perf_counter()
    out = upscaler(rgb, RECOMMENDED_SAMPLING)
    seconds = time.perf_counter() - start
    return {
        "mode": "big",
        "lr": list(rgb.shape[:2]),
        "hr": list(out.shape[:2]),
        "backend": upscaler.choice.backend,
        "precisions": getattr(upscaler.engine, "precisions", upscaler.choice.precision),
        "tile": upscaler.tile,
        "batch": upscaler.batch,
        "seconds": round(seconds, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "canvas_mib": round(16 * out.shape[0] * out.shape[1] / 2**20, 1),
    }


def threaded(count: int, lr: int, threads: int | None) -> dict[str, Any]:
    from esrdf.config import SamplingOptions
    from esrdf.default_model import RECOMMENDED_SAMPLING

    upscaler = _upscaler(threads)
    photo = _photo(512)
    images = [np.ascontiguousarray(photo[64 * i : 64 * i + lr, 32 * i : 32 * i + lr]) for i in range(count)]
    options = [SamplingOptions("ddim", RECOMMENDED_SAMPLING.steps, 1.0, i) for i in range(count)]
    start = time.perf_counter()
    serial = [upscaler(img, o) for img, o in zip(images, options, strict=True)]
    serial_s = time.perf_counter() - start
    serial_rss = peak_rss_mib()
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = upscaler(images[i], options[i])

    start = time.perf_counter()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {
        "mode": "threads",
        "threads": count,
        "lr": [lr, lr],
        "backend": upscaler.choice.backend,
        "bit_identical": all(np.array_equal(results[i], serial[i]) for i in range(count)),
        "serial_seconds": round(serial_s, 1),
        "threaded_seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mib_serial": round(serial_rss, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("mode", choices=["big", "threads"])
    p.add_argument("--lr", type=int, default=None, help="LR side [big: 512, threads: 128]")
    p.add_argument("--threads", type=int, default=4, help="threads mode: concurrent calls")
    p.add_argument("--engine-threads", type=int, default=None, help="the engine's intra-op threads")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.mode == "big":
        report = big(args.lr or 512, args.engine_threads)
    else:
        report = threaded(args.threads, args.lr or 128, args.engine_threads)
    report["machine"] = describe_machine()
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
