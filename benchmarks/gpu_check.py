"""The GPU check: the gpu/tensorrt-marked tests, then the latency benchmark on CUDA, into one JSON.

    bash benchmarks/gpu_check.sh [--budget-s 450] [--repeats 20] [--skip-tests] ...
    python -m esrdf.bench.gpu_check ...            # the same, once the project is installed

A thin command over ``esrdf.bench``: the latency part is ``esrdf.bench.suite.run_benchmark``, so GPU
figures are timed, described and tabled as the CPU ones are (``esrdf.bench.latency``: warm-up, then
rounds of timed calls, CUDA events on a GPU; ``esrdf.bench.machine``; ``esrdf.bench.tables``). Workload:
the ``--preset`` networks (paper: 97.8M-parameter U-Net) with seeded random weights (latency does not
depend on them), ``--lr-tile`` LR tiles (32: 128x128 output at 4x), predictor and step at each of
``--batches``, whole requests at batch 1 and the best batch for each DDIM step count in ``--steps``, on

    eager              the eager PyTorch sampler, fp32 (how the paper's code runs the model)
    torch              runtime driver + torch engine, fp32, one engine call per step
    torch-fp16         runtime driver + torch engine fp16: fp16 weights on CUDA, norms and update fp32
    torch-cuda-graph   the same engine, the whole loop of each batch in one CUDA graph
    tensorrt-graph     TensorRT fp16 plans + CUDA graph, where tensorrt and the export toolchain exist

A request is host LR tiles to host HR tiles through the runtime driver (noise, predictor, N steps, c + x).
The torch backends run from ``esrdf.bench.checkpoint_bundle`` (no export); TensorRT needs a real export,
and is built as static buckets, one per ``--batches`` entry (b1 and b8 by default). Then one request per
batch and step count, same seed, checks graph replay against stream execution of the same graph sampler
(bit-exact), device noise against the driver's host noise, and fp16 against fp32 (``end_to_end_fp16`` bar
of ``esrdf.runtime.tolerances``).

Besides the per-stage figures it times what users run (``esrdf.bench.upscaler_requests``): ``Upscaler``
requests on CUDA, uint8 image in and out, device noise, the bundle's default sampling, with the ratio of
end-to-end to GPU-only time at each batch (torch fp16, and TensorRT where present); and it probes eager-fp16
speed-ups (``esrdf.bench.fp16_probe``), each checked against the fp16 bar and timed as a one-step graph
replay, listing the ones to adopt; torch.compile runs last, only with ``--compile-guard-s`` left.
A time guard trims repeats so the whole check stays under ``--budget-s``; each part records its error in
the JSON instead of stopping the rest.

Without CUDA (e.g. the 2-core CPU dev machine) it writes a JSON saying so and exits 0; there it also saves
the held-out test photos to out/gpu_check/photos.npz, which the tests and the benchmark inputs read on a
GPU machine that lacks scikit-image (carry that file along). ``--device cpu`` is a smoke run of the
benchmark part on the CPU (no tests), e.g. with ``--preset tiny``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esrdf.bench.latency import PHOTOS_ENV
from esrdf.bench.machine import describe_machine

if TYPE_CHECKING:
    from esrdf.bench.suite import BenchOptions
    from esrdf.runtime.bundle import Bundle

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / "out" / "gpu_check" / "photos.npz"
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower")
BACKENDS = ("eager", "torch", "torch-fp16", "torch-cuda-graph", "tensorrt-graph")
GRAPH_PAIR = ("torch-cuda-graph", "torch-fp16")  # (graph replay + device noise, driver loop + host noise)
STREAM_TWIN = "torch-cuda-graph, stream"  # the graph runner's sampler with use_graphs=False
FP16_PAIRS = (("torch-fp16", "torch"), ("tensorrt-graph", "torch"))  # (fp16, fp32 reference)
RESERVE_S = 20.0  # of the budget, kept for the consistency checks and the report
UPSCALER_CASE_S = 6.0  # timed seconds per Upscaler case (end to end, then GPU-only)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "out" / "gpu_check"))
    p.add_argument("--budget-s", type=float, default=450.0, help="whole-run time budget (seconds)")
    p.add_argument("--tests-timeout-s", type=float, default=180.0)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", default="4,10,20")
    p.add_argument("--lr-tile", type=int, default=32, help="LR tile; outputs are 4x (128x128)")
    p.add_argument("--preset", default="paper")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-tensorrt", action="store_true")
    p.add_argument("--skip-probe", action="store_true", help="skip the eager-fp16 speed-up probe")
    p.add_argument(
        "--compile-guard-s",
        type=float,
        default=120.0,
        help="probe torch.compile only with this much of the budget left (compiling cannot be interrupted)",
    )
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: a smoke run of the benchmark code (no tests), e.g. --preset tiny",
    )
    p.add_argument("--photos", type=Path, default=PHOTOS, help="held-out photo cache (.npz), read or saved")
    return p.parse_args(argv)


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


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


def save_photos(path: Path) -> str:
    """Held-out photos for GPU machines without scikit-image/scikit-learn (the tests' fallback)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {n: getattr(data, n)() for n in PHOTO_NAMES[:4]}
    sample = load_sample_images()
    photos |= {Path(f).stem: img for f, img in zip(sample.filenames, sample.images, strict=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {k: np.ascontiguousarray(v[..., :3]) for k, v in photos.items()}
    np.savez_compressed(path, **arrays)
    return str(path)


def run_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    """The gpu- and tensorrt-marked tests in a subprocess, summarised from their JUnit XML."""
    junit = out / "gpu_tests.xml"
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
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
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


def tensorrt_bundle(ckpt: Path, workdir: Path, lr_tile: int, batches: tuple[int, ...]) -> Bundle:
    """Export the fp16 graphs (and torch weights) and build one static TensorRT bucket per batch."""
    from esrdf.engines.tensorrt_build import build_engines_into_bundle
    from esrdf.export.bundle_writer import export_bundle
    from esrdf.runtime.bundle import load_bundle

    path = export_bundle(
        ckpt, workdir / "bundle", precision="fp16", tile=lr_tile, batch=2, progress=False, parity_gate=False
    )
    for batch in sorted(set(batches)):
        build_engines_into_bundle(
            path, tile=lr_tile, batch=batch, opt_level=3, timing_cache_dir=workdir / "timing-cache"
        )
    return load_bundle(path)


def bench_options(args: argparse.Namespace, engine: Path, ckpt: Path, seconds: float) -> BenchOptions:
    """esrdf-bench's options for this check, with a per-case time limit that fits ``seconds``."""
    from esrdf.bench.suite import BenchOptions

    batches, steps = int_list(args.batches), int_list(args.steps)
    backends = tuple(b for b in BACKENDS if not (args.skip_tensorrt and b == "tensorrt-graph"))
    # Stages at every batch, requests at batch 1 and the best batch; half the time goes to timed calls,
    # the rest to warm-ups, CUDA-graph captures and the FLOP count.
    cases = len(backends) * 2 * (len(batches) + len(steps))
    return BenchOptions(
        engine=engine,
        backends=backends,
        steps=steps,
        batches=batches,
        tile=args.lr_tile,
        repeats=args.repeats,
        warmup=args.warmup,
        max_seconds=max(1.0, 0.5 * seconds / cases),
        device=args.device,
        ckpt=ckpt,
    )


def consistency_checks(
    bundle: Bundle, ckpt: Path, options: BenchOptions, lr_tile: int
) -> list[dict[str, Any]]:
    """One request per batch and step count, same seed, through each backend of the pairs that opens here:
    graph replay must equal stream execution bit for bit, fp16 must be within END_TO_END_FP16 of fp32."""
    from esrdf.bench import backends as bk
    from esrdf.bench.latency import lr_tiles, workload_photo
    from esrdf.export.parity import bar_failures, compare
    from esrdf.runtime.sampling import plan_steps
    from esrdf.runtime.tolerances import END_TO_END_FP16

    models = functools.cache(lambda: bk.eager_models(bundle, ckpt))
    runners: dict[str, bk.Runner] = {}
    for name in dict.fromkeys([*GRAPH_PAIR, *(n for pair in FP16_PAIRS for n in pair)]):
        with contextlib.suppress(bk.BackendSkipped):
            runners[name] = bk.open_runner(name, bundle, options.device, options.threads, models)
    graphed = runners.get(GRAPH_PAIR[0])
    if isinstance(graphed, bk.EngineRunner):  # the same engine and graph sampler, as stream execution
        from esrdf.engines.cuda_graph import CudaGraphSampler

        manifest = bundle.manifest
        stream = CudaGraphSampler(graphed.engine, manifest.channels, manifest.scale, "cuda", use_graphs=False)
        runners[STREAM_TWIN] = dataclasses.replace(graphed, name=STREAM_TWIN, graph_sampler=stream)
    photo, _source = workload_photo()
    alphas_cumprod = bundle.manifest.schedule.array()
    checks: list[dict[str, Any]] = []
    for batch in options.batches:
        lr = lr_tiles(photo, batch, lr_tile, bundle.manifest.scale)
        for steps in options.steps:
            plan = plan_steps(alphas_cumprod, "ddim", steps, 0.0)
            out = {name: runner.request_call(lr, plan)() for name, runner in runners.items()}
            where = {"batch": batch, "steps": steps}
            if {GRAPH_PAIR[0], STREAM_TWIN} <= out.keys():
                exact = bool(np.array_equal(out[GRAPH_PAIR[0]], out[STREAM_TWIN]))
                checks.append({"check": "graph replay == stream (fp16)", **where, "bit_exact": exact})
            if set(GRAPH_PAIR) <= out.keys():  # device noise (graph) against the driver's host noise
                diff = float(np.max(np.abs(out[GRAPH_PAIR[0]] - out[GRAPH_PAIR[1]])))
                checks.append({"check": "device noise vs host noise, max abs", **where, "max_abs": diff})
            for fp16, fp32 in FP16_PAIRS:
                if fp16 in out and fp32 in out:
                    figures = compare(out[fp16], out[fp32])
                    checks.append(
                        {
                            "check": f"{fp16} vs {fp32} (fp32) PSNR dB",
                            **where,
                            "psnr_db": round(figures.psnr_db, 2),
                            "within_bar": not bar_failures(figures, END_TO_END_FP16, fp16),
                        }
                    )
    return checks


def benchmark(args: argparse.Namespace, report: dict[str, Any], deadline: float) -> None:
    """Random-weight checkpoint (and bundle), Upscaler requests, the fp16 probe, esrdf-bench's suite, the
    consistency checks, then the torch.compile probe if time is left."""
    from esrdf.bench.checkpoint_bundle import checkpoint_bundle
    from esrdf.bench.random_model import random_checkpoint
    from esrdf.bench.suite import run_benchmark
    from esrdf.config import preset
    from esrdf.engines.tensorrt_build import tensorrt_unavailable_reason

    workdir = Path(tempfile.mkdtemp(prefix="esrdf-gpu-check-"))
    with section(report, "setup") as setup:
        ckpt = random_checkpoint(workdir / "ckpt", preset(args.preset))
        bundle = checkpoint_bundle(ckpt)
        setup |= {"preset": args.preset, "checkpoint": str(ckpt), "lr_tile": args.lr_tile}
    if "setup" in report.get("errors", {}):
        return
    torch_bundle = bundle
    if args.device == "cuda" and not args.skip_tensorrt and tensorrt_unavailable_reason() is None:
        with section(report, "tensorrt_setup"):
            bundle = tensorrt_bundle(ckpt, workdir, args.lr_tile, int_list(args.batches))
    upscaler_section(args, report, torch_bundle, bundle)
    if not args.skip_probe:
        with section(report, "fp16_probe") as probe_part:
            probe_part |= run_probe(args, torch_bundle, ckpt, deadline, compile_too=False)
    compile_slot = 0.0 if args.skip_probe or args.device != "cuda" else args.compile_guard_s
    options = bench_options(args, bundle.root, ckpt, deadline - RESERVE_S - compile_slot - time.monotonic())
    with section(report, "bench"):
        report |= run_benchmark(options, log=lambda line: print(line, flush=True), bundle=bundle)
    with section(report, "consistency"):
        report["checks"] = consistency_checks(bundle, ckpt, options, args.lr_tile)
    if "upscaler" in report and "latency" in report:
        from esrdf.bench.upscaler_requests import eager_speedups

        eager_speedups(report["upscaler"].get("rows", []), report["latency"])
    if compile_slot and "fp16_probe" in report and "rows" in report["fp16_probe"]:
        with section(report, "fp16_probe_compile") as part:
            part |= run_probe(args, torch_bundle, ckpt, deadline, compile_too=True)
            merge_compile_probe(report["fp16_probe"], part)


def upscaler_section(
    args: argparse.Namespace, report: dict[str, Any], torch_bundle: Bundle, bundle: Bundle
) -> None:
    """Upscaler requests: torch (fp16 on CUDA, fp32 on the CPU), and TensorRT fp16 where it was built."""
    from esrdf.bench.latency import workload_photo
    from esrdf.bench.upscaler_requests import bundle_dir, upscaler_cases

    with section(report, "upscaler") as part:
        photo, _source = workload_photo()
        cuda = args.device == "cuda"
        common = dict(batches=int_list(args.batches), lr_tile=args.lr_tile, photo=photo)
        common |= dict(warmup=2 if cuda else 1, repeats=args.repeats, max_seconds=UPSCALER_CASE_S)
        directory = bundle_dir(torch_bundle)
        part["rows"] = upscaler_cases(directory, "torch", args.device, "fp16" if cuda else "fp32", **common)
        if bundle is not torch_bundle:  # a TensorRT export with static buckets
            part["rows"] += upscaler_cases(bundle.root, "tensorrt", "cuda", "fp16", **common)


def run_probe(
    args: argparse.Namespace, bundle: Bundle, ckpt: Path, deadline: float, compile_too: bool
) -> dict[str, Any]:
    """The eager-fp16 probe at ``--batches`` on the 20-step plan's first step; compile only if asked."""
    from esrdf.bench import backends as bk
    from esrdf.bench.fp16_probe import VARIANTS, probe
    from esrdf.bench.latency import workload_photo
    from esrdf.runtime.sampling import plan_steps

    photo, _source = workload_photo()
    plan = plan_steps(bundle.manifest.schedule.array(), "ddim", 20, 0.0)
    if compile_too:
        variants: tuple[str, ...] = ("baseline", "torch_compile")
    elif args.device == "cuda":  # torch.compile comes last, with what is left of the budget
        variants = tuple(v for v in VARIANTS if v != "torch_compile")
    else:  # on the CPU the probe reports torch.compile as skipped
        variants = VARIANTS
    return probe(
        lambda: bk.eager_models(bundle, ckpt),
        bundle.manifest.scale,
        plan,
        photo,
        args.device,
        (max(int_list(args.batches)),)
        if compile_too
        else int_list(args.batches),  # one compile, not one a batch
        args.lr_tile,
        deadline,
        repeats=args.repeats,
        compile_guard_s=args.compile_guard_s if compile_too else 0.0,
        variants=variants,
    )


def merge_compile_probe(probe_part: dict[str, Any], compile_part: dict[str, Any]) -> None:
    """The torch.compile row (with its speed-up against that run's own baseline) joins the first probe."""
    row = next((r for r in compile_part.get("rows", []) if r["variant"] == "torch_compile"), None)
    if row is not None:
        probe_part["rows"].append(row)
        probe_part["adopt"] = [*probe_part["adopt"], *compile_part.get("adopt", [])]


def summary(report: dict[str, Any]) -> str:
    """The benchmark's markdown tables (the CPU results' format), the checks, the Upscaler requests and the
    fp16 probe, or the status alone."""
    from esrdf.bench.fp16_probe import probe_table
    from esrdf.bench.tables import checks_table, markdown_report
    from esrdf.bench.upscaler_requests import upscaler_table

    if "latency" not in report and "upscaler" not in report:
        return str(report["status"])
    text = markdown_report(report) if "latency" in report else ""
    text += "\n" + checks_table(report["checks"]) + "\n" if report.get("checks") else ""
    return text + upscaler_table(report.get("upscaler", {})) + probe_table(report.get("fp16_probe", {}))


def main(argv: list[str] | None = None) -> int:
    from esrdf.bench.cli import json_safe

    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    if args.photos.is_file():  # the tests' and the benchmark's photos where scikit-image is missing
        os.environ[PHOTOS_ENV] = str(args.photos)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": vars(args) | {"out": str(args.out), "photos": str(args.photos)},
    }
    with section(report, "machine_section"):
        report["machine"] = describe_machine()
    machine = report.get("machine", {})
    if args.device == "cpu":
        report["status"] = "CPU smoke run of the benchmark code (not a GPU measurement)"
        benchmark(args, report, deadline)
    elif not machine.get("cuda_available"):
        torch_version = machine.get("libraries", {}).get("torch")
        report["status"] = f"no CUDA (torch {torch_version}, CUDA build {machine.get('torch_cuda_build')})"
        with section(report, "photos") as photos:
            photos["saved"] = save_photos(args.photos)
    else:
        if not args.skip_tests:
            with section(report, "tests") as tests:
                timeout = min(args.tests_timeout_s, max(30.0, deadline - time.monotonic()))
                tests |= run_tests(args.out, timeout)
        benchmark(args, report, deadline)
        report["status"] = "ok" if not report.get("errors") else "completed with errors"
    report["total_seconds"] = round(time.monotonic() - start, 1)
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(json_safe(report), indent=2, default=str) + "\n")
    text = summary(report)
    (args.out / "gpu_check.txt").write_text(text + "\n")
    print(text)
    tests_summary = report.get("tests", {}).get("counts")
    if tests_summary:
        print(f"gpu/tensorrt tests: {tests_summary}")
    print(f"status: {report['status']}; {report['total_seconds']} s; JSON: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
