"""The GPU check: gpu/tensorrt-marked tests, then the latency of the whole sampler loop per backend.

Run it through ``benchmarks/gpu_check.sh`` (one command; installs the project offline if needed).

Latency: the paper preset (97.8M-parameter U-Net, random weights: latency does not depend on them) on
128x128 output tiles (LR 32 at 4x), batch 1 and 8, DDIM with 4, 10 and 20 steps, for
    eager_fp32         TorchEngine fp32, one engine call per step (stream execution)
    torch_fp16         TorchCudaEngine fp16 (norms fp32), stream execution
    torch_fp16_graph   the same, whole loop in one CUDA graph (host noise copied in)
    torch_fp16_graph_devnoise   the same, noise drawn inside the graph
    tensorrt_graph     TensorRT fp16 plans + CUDA graph, when tensorrt is installed
A request is copy-in + predictor + N steps + c + x + copy-out, timed with CUDA events after a warm-up;
p50/p95 over the repeats. A time guard trims repeats so the whole check stays under ``--budget-s``.
Each section records its error in the JSON instead of stopping the rest.

Without CUDA (e.g. the 2-core CPU dev machine) it writes a JSON saying so and exits 0; there it also saves
the held-out test photos to out/gpu_check/photos.npz, which the tests read on a GPU machine that lacks
scikit-image (carry that file along).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "out" / "gpu_check" / "photos.npz"
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out" / "gpu_check"))
    p.add_argument("--budget-s", type=float, default=420.0, help="whole-run time budget (seconds)")
    p.add_argument("--tests-timeout-s", type=float, default=180.0)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", default="4,10,20")
    p.add_argument("--lr-tile", type=int, default=32, help="LR tile; outputs are 4x (128x128)")
    p.add_argument("--preset", default="paper")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-tensorrt", action="store_true")
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: a smoke run of the benchmark code (fp32 only, no tests), e.g. --preset tiny",
    )
    return p.parse_args(argv)


@contextlib.contextmanager
def section(report: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """Run one part; an exception is recorded under report["errors"][name] and the check goes on."""
    entry: dict[str, Any] = {}
    report[name] = entry
    start = time.monotonic()
    try:
        yield entry
    except Exception as exc:
        report.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc(limit=8)
        print(f"[{name}] failed: {type(exc).__name__}: {exc}", flush=True)
    entry["seconds"] = round(time.monotonic() - start, 2)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import torch

        info |= {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(),
        }
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info |= {
                "gpu": props.name,
                "sm": f"{props.major}.{props.minor}",
                "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cudnn": torch.backends.cudnn.version(),
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            }
    except ImportError as exc:
        info["torch"] = f"not importable: {exc}"
    from esrdf.engines.tensorrt_build import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    info["tensorrt"] = reason or __import__("tensorrt").__version__
    for mod in ("onnx", "onnxruntime", "numpy"):
        with contextlib.suppress(ImportError):
            info[mod] = __import__(mod).__version__
    with contextlib.suppress(Exception):
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    return info


def save_photos() -> str:
    """Held-out photos for GPU machines without scikit-image/scikit-learn (the tests' fallback)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {n: getattr(data, n)() for n in PHOTO_NAMES[:4]}
    sample = load_sample_images()
    photos |= {Path(f).stem: img for f, img in zip(sample.filenames, sample.images, strict=True)}
    PHOTOS.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {k: np.ascontiguousarray(v[..., :3]) for k, v in photos.items()}
    np.savez_compressed(PHOTOS, **arrays)
    return str(PHOTOS)


def run_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    junit = out / "gpu_tests.xml"
    env = os.environ | ({"ESRDF_TEST_PHOTOS": str(PHOTOS)} if PHOTOS.is_file() else {})
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu or tensorrt",
        "tests",
        "-q",
        "-rsfE",
        "--continue-on-collection-errors",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    result: dict[str, Any] = {
        "command": " ".join(cmd[1:]),
        "returncode": done.returncode,
        "output_tail": (done.stdout + done.stderr)[-6000:],
    }
    if junit.is_file():
        suites = ET.parse(junit).getroot()
        suite = suites if suites.tag == "testsuite" else suites[0]
        result["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        result["failed"] = [
            f"{c.get('classname')}::{c.get('name')}"
            for c in suite.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None
        ]
    return result


def build_engines(preset_name: str, workdir: Path, device: str) -> tuple[Any, dict[str, Any], Path]:
    """Random-init paper models -> checkpoint -> fp32 TorchEngine and fp16 TorchCudaEngine on CUDA."""
    import torch

    from esrdf.checkpoint import save_checkpoint
    from esrdf.config import preset
    from esrdf.engines.torch_cuda_engine import TorchCudaEngine
    from esrdf.engines.torch_engine import TorchEngine
    from esrdf.models.build import build_predictor, build_unet

    cfg = preset(preset_name)
    torch.manual_seed(0)
    predictor = build_predictor(cfg)
    torch.nn.init.normal_(predictor.final_conv.weight, std=0.02)
    ckpt = save_checkpoint(workdir / "ckpt", cfg, predictor, build_unet(cfg))
    engines = {"fp32": TorchEngine.from_checkpoint(ckpt, device=device, precision="fp32")}
    if device == "cuda":
        engines["fp16"] = TorchCudaEngine.from_checkpoint(ckpt, device=device, precision="fp16")
    return cfg, engines, ckpt


def tensorrt_engine(ckpt: Path, workdir: Path, lr_tile: int, max_batch: int) -> Any:
    """Export a bundle (fp16 graphs) and build one dynamic TensorRT profile (batch 1..max, this tile)."""
    from esrdf.engines.tensorrt_build import build_engines_into_bundle
    from esrdf.engines.tensorrt_engine import TensorRTEngine
    from esrdf.export.bundle_writer import export_bundle
    from esrdf.runtime.bundle import load_bundle

    bundle = export_bundle(
        ckpt,
        workdir / "bundle",
        precision="fp16",
        tile=lr_tile,
        batch=2,
        progress=False,
        parity_gate=False,
        torch_weights=False,
    )
    build_engines_into_bundle(bundle, tile=lr_tile, batch=max_batch, dynamic=True, opt_level=3)
    return TensorRTEngine(load_bundle(bundle))


def time_requests(
    fn: Callable[[], np.ndarray], warmup: int, repeats: int, deadline: float, cuda: bool = True
) -> dict[str, Any]:
    """Milliseconds per request (CUDA events; perf_counter on the CPU); at least 3 repeats, fewer than
    ``repeats`` once ``deadline`` has passed."""
    import torch

    for _ in range(warmup):
        out = fn()
    times = []
    for i in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1000.0)
        if i >= 2 and time.monotonic() > deadline:
            break
    ms = np.asarray(times)
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "min_ms": float(ms.min()),
        "repeats": len(times),
        "output": out,
    }


def noise_for(batch: int, steps: int, lr_tile: int, scale: int, cache: dict[int, np.ndarray]) -> np.ndarray:
    """(steps+1, B, 3, H, W) counter-based noise; fields are per index, so fewer steps is a prefix."""
    from esrdf.runtime.noise import noise_field

    if batch not in cache:
        hr = lr_tile * scale
        cache[batch] = np.stack(
            [np.stack([noise_field(1, k, 0, b * hr, hr, hr) for b in range(batch)]) for k in range(21)]
        )
    return cache[batch][: steps + 1]


def lr_input(batch: int, lr_tile: int) -> np.ndarray:
    """LR tiles: photo crops when the photo cache exists, else a smooth pattern (latency is content-free)."""
    if PHOTOS.is_file():
        photo = np.load(PHOTOS)["astronaut"]
        tiles = [photo[40 * b : 40 * b + lr_tile, 50 * b : 50 * b + lr_tile] for b in range(batch)]
        return np.stack(tiles).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    y, x = np.mgrid[0:lr_tile, 0:lr_tile] / lr_tile
    return np.broadcast_to(np.sin(6 * x + 4 * y)[None, None], (batch, 3, lr_tile, lr_tile)).astype(np.float32)


def to_unit_psnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = (np.clip(a, -1, 1) + 1) / 2, (np.clip(b, -1, 1) + 1) / 2
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 200.0 if mse == 0 else 10 * np.log10(1.0 / mse)


def benchmark(args: argparse.Namespace, report: dict[str, Any], deadline: float) -> None:
    import torch

    from esrdf.diffusion.schedule import make_schedule
    from esrdf.runtime.cuda_graph import CudaGraphSampler
    from esrdf.runtime.sampling import plan_steps

    batches = [int(b) for b in args.batches.split(",")]
    steps_list = [int(s) for s in args.steps.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="esrdf-gpu-check-"))
    with section(report, "setup") as setup:
        cfg, engines, ckpt = build_engines(args.preset, workdir, args.device)
        setup |= {
            "preset": args.preset,
            "checkpoint": str(ckpt),
            "lr_tile": args.lr_tile,
            "hr_tile": args.lr_tile * cfg.scale,
            "batches": batches,
            "steps": steps_list,
        }
    if "errors" in report and "setup" in report["errors"]:
        return
    alphas_cumprod = make_schedule(cfg.schedule).alphas_cumprod
    fast = engines.get("fp16", engines["fp32"])  # the CPU smoke run has no fp16 engine
    tag = "torch_fp16" if "fp16" in engines else "cpu_fp32"
    variants: dict[str, tuple[Any, bool, str]] = {
        "eager_fp32": (engines["fp32"], False, "host"),
        tag: (fast, False, "host"),
        f"{tag}_graph": (fast, True, "host"),
        f"{tag}_graph_devnoise": (fast, True, "device"),
    }
    if not args.skip_tensorrt and report["machine"]["tensorrt"][:1].isdigit():
        with section(report, "tensorrt_setup"):
            variants["tensorrt_graph"] = (
                tensorrt_engine(ckpt, workdir, args.lr_tile, max(batches)),
                True,
                "host",
            )
    cells = [(v, b, s) for v in variants for b in batches for s in steps_list]
    results: list[dict[str, Any]] = []
    outputs: dict[tuple[str, int, int], np.ndarray] = {}
    noise_cache: dict[int, np.ndarray] = {}
    samplers = {
        name: CudaGraphSampler(eng, cfg.predictor.in_channels, cfg.scale, args.device, use_graphs=g)
        for name, (eng, g, _noise) in variants.items()
    }
    cuda = args.device == "cuda"
    for index, (name, batch, steps) in enumerate(cells):
        cell_deadline = time.monotonic() + max(5.0, (deadline - time.monotonic()) / (len(cells) - index))
        row: dict[str, Any] = {"variant": name, "batch": batch, "steps": steps}
        try:
            plan = plan_steps(alphas_cumprod, "ddim", steps, 0.0)
            lr, sampler = lr_input(batch, args.lr_tile), samplers[name]
            if variants[name][2] == "device":
                offsets = np.array([[0, b * args.lr_tile * cfg.scale] for b in range(batch)])
                fn = lambda: sampler.sample_seeded(lr, 1, offsets, plan)  # noqa: B023, E731
            else:
                noises = noise_for(batch, steps, args.lr_tile, cfg.scale, noise_cache)
                fn = lambda: sampler.sample(lr, noises, plan)  # noqa: B023, E731
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            timing = time_requests(fn, args.warmup, args.repeats, cell_deadline, cuda)
            outputs[(name, batch, steps)] = timing.pop("output")
            row |= timing | {
                "tiles_per_s": batch * 1000.0 / timing["p50_ms"],
                "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "graph_captures": sampler.captures,
            }
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        results.append(row)
        print(
            f"  {name:28s} b{batch:<2d} {steps:2d} steps  "
            + (
                f"p50 {row['p50_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f} ms"
                if "p50_ms" in row
                else row["error"]
            ),
            flush=True,
        )
    report["latency"] = results
    report["checks"] = consistency_checks(outputs)


def consistency_checks(outputs: dict[tuple[str, int, int], np.ndarray]) -> list[dict[str, Any]]:
    """Same inputs, same noise: graph replay vs stream must be bit-exact; fp16 vs fp32 by PSNR (>= 40 dB)."""
    checks = []
    for (name, batch, steps), out in outputs.items():
        stream = outputs.get(("torch_fp16", batch, steps))
        fp32 = outputs.get(("eager_fp32", batch, steps))
        if name == "torch_fp16_graph" and stream is not None:
            checks.append(
                {
                    "check": "graph replay == stream (fp16)",
                    "batch": batch,
                    "steps": steps,
                    "bit_exact": bool(np.array_equal(out, stream)),
                }
            )
        if name in ("torch_fp16", "tensorrt_graph") and fp32 is not None:
            checks.append(
                {
                    "check": f"{name} vs eager_fp32 PSNR dB",
                    "batch": batch,
                    "steps": steps,
                    "psnr_db": round(to_unit_psnr(out, fp32), 2),
                }
            )
    return checks


def table(report: dict[str, Any]) -> str:
    rows = [r for r in report.get("latency", []) if "p50_ms" in r]
    base = {(r["batch"], r["steps"]): r["p50_ms"] for r in rows if r["variant"] == "eager_fp32"}
    lines = [
        f"{'variant':28s} {'batch':>5s} {'steps':>5s} {'p50 ms':>9s} {'p95 ms':>9s} {'tiles/s':>8s} "
        f"{'vs fp32':>7s}"
    ]
    for r in rows:
        speedup = base.get((r["batch"], r["steps"]), float("nan")) / r["p50_ms"]
        lines.append(
            f"{r['variant']:28s} {r['batch']:5d} {r['steps']:5d} {r['p50_ms']:9.2f} {r['p95_ms']:9.2f} "
            f"{r['tiles_per_s']:8.1f} {speedup:6.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args) | {"out": str(args.out)},
    }
    with section(report, "machine_section"):
        report["machine"] = machine_info()
    machine = report.get("machine", {})
    if args.device == "cpu":
        report["status"] = "CPU smoke run of the benchmark code (not a GPU measurement)"
        benchmark(args, report, start + args.budget_s - 20.0)
    elif not machine.get("cuda_available"):
        report["status"] = f"no CUDA (torch {machine.get('torch')}, CUDA build {machine.get('torch_cuda')})"
        with section(report, "photos"):
            report["photos"]["saved"] = save_photos()
    else:
        if not args.skip_tests:
            with section(report, "tests") as tests:
                tests |= run_tests(
                    args.out, min(args.tests_timeout_s, max(30.0, deadline - time.monotonic()))
                )
        benchmark(args, report, start + args.budget_s - 20.0)
        report["status"] = "ok" if not report.get("errors") else "completed with errors"
    report["total_seconds"] = round(time.monotonic() - start, 1)
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = table(report) if "latency" in report else report["status"]
    (args.out / "gpu_check.txt").write_text(text + "\n")
    print(text)
    tests_summary = report.get("tests", {}).get("counts")
    if tests_summary:
        print(f"gpu/tensorrt tests: {tests_summary}")
    print(f"status: {report['status']}; {report['total_seconds']} s; JSON: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
