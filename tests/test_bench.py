"""esrdf-bench on the tiny preset: report schema, FLOP counts, skipped backends, quality sweep, CLI errors.

Real components throughout (exported tiny bundle, onnxruntime, eager torch, esrdf-eval's scoring) on real
photo crops. Timings themselves are never asserted against speed goals, only against what the clock must
see (a sleep lasts at least its length; 200 steps take longer than 1).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_bundle import tiny_bundle, tiny_checkpoint

from esrdf.bench import backends as bk
from esrdf.bench.cli import main
from esrdf.bench.flops import conv2d_flops, count_flops, step_flops
from esrdf.bench.latency import summarize, time_call, time_interleaved
from esrdf.bench.machine import bf16_support, cpuinfo_fields
from esrdf.bench.quality import QualityOptions, quality_sweep
from esrdf.checkpoint import load_checkpoint
from esrdf.runtime.bundle import Bundle, load_bundle

TOP_KEYS = {
    "schema",
    "created",
    "options",
    "machine",
    "bundle",
    "workload",
    "flops",
    "gemm_peak",
    "backends",
    "latency",
    "best_batch",
    "comparisons",
    "cpu_tuning",
    "notes",
}
MACHINE_KEYS = {
    "cpu_model",
    "cpu_count",
    "usable_cpus",
    "simd_flags",
    "bf16_native",
    "libraries",
    "torch_threads",
    "load_average",
}
ROW_KEYS = {
    "backend",
    "stage",
    "batch",
    "lr_tile",
    "hr_tile",
    "precision",
    "p50_ms",
    "p95_ms",
    "mean_ms",
    "repeats",
    "warmup",
    "clock",
    "tiles_per_s",
    "hr_megapixels_per_s",
    "peak_rss_mib",
}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def cli_report(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One real CLI run: onnxruntime, eager, a CUDA-only backend, the DDPM reference, CPU tuning, a plot."""
    out = tmp_path_factory.mktemp("bench")
    plot = ["--plot", str(out / "latency.png")] if _has_matplotlib() else []
    result = CliRunner().invoke(
        main,
        [
            "--engine",
            str(bundle_dir),
            "--backends",
            "onnxruntime,eager,torch-fp16,openvino-auto",
            "--steps",
            "1,2",
            "--batch",
            "1,2",
            "--repeats",
            "3",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--reference",
            "--cpu-tuning",
            "--json",
            str(out / "bench.json"),
            *plot,
        ],
    )
    assert result.exit_code == 0, result.output
    return json.loads((out / "bench.json").read_text()), out


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


@pytest.mark.slow
def test_report_has_the_schema_fields(cli_report):
    report, out = cli_report
    assert TOP_KEYS <= set(report), TOP_KEYS - set(report)
    assert report["schema"] == "esrdf-bench/1"
    assert MACHINE_KEYS <= set(report["machine"]), MACHINE_KEYS - set(report["machine"])
    assert {"onnxruntime", "torch"} <= set(report["machine"]["libraries"])
    stages = {(r["backend"], r["stage"], r["batch"], r.get("steps")) for r in report["latency"]}
    for backend in ("onnxruntime", "eager"):
        for batch in (1, 2):
            assert {(backend, "predictor", batch, None), (backend, "step", batch, None)} <= stages
        assert {(backend, "request", 1, 1), (backend, "request", 1, 2)} <= stages
    for row in report["latency"]:
        assert ROW_KEYS <= set(row), (row["backend"], ROW_KEYS - set(row))
        assert row["achieved_gflops"] > 0 and row["gflop"] > 0
    reference = [r for r in report["latency"] if r.get("reference")]
    assert [(r["backend"], r["sampler"], r["steps"]) for r in reference] == [("eager", "ddpm", 200)]
    versus = {
        (c["backend"], c["steps"], c["versus"].split(",")[0].split(":")[0]) for c in report["comparisons"]
    }
    assert {("onnxruntime", 1, "eager PyTorch"), ("onnxruntime", 2, "paper-code reference")} <= versus
    assert all(c["speedup"] > 0 for c in report["comparisons"])
    assert {"onnxruntime", "eager"} <= set(report["best_batch"]) <= {"onnxruntime", "eager", "openvino-auto"}
    assert (out / "bench.md").read_text().count("| onnxruntime |") >= 2


@pytest.mark.slow
def test_timings_follow_the_options_and_the_work(cli_report):
    report, _out = cli_report
    for row in report["latency"]:
        assert row["clock"] == "perf_counter" and row["min_ms"] > 0
        # --warmup 1 per case; the reference is warmed up by a 1-step run instead (its own calls: none)
        assert row["warmup"] == (0 if row.get("reference") else 1), row
        # 3 repeats asked: every case gets them; only the 200-step reference may stop at its time limit
        assert row["repeats"] == 3 or (row.get("reference") and 1 <= row["repeats"] <= 3), row
        assert row["tiles_per_s"] == pytest.approx(row["batch"] * 1000.0 / row["p50_ms"], rel=1e-3)
    for candidate in report["cpu_tuning"]["candidates"]:
        assert 1 <= candidate["repeats"] <= 3 and candidate["p50_ms"] > 0
    # The clock sees the work: 200 eager DDPM steps take longer than one eager DDIM step, same model.
    reference = next(r for r in report["latency"] if r.get("reference"))
    one_step = next(
        r
        for r in report["latency"]
        if (r["backend"], r["stage"], r["batch"], r.get("steps"), r.get("reference"))
        == ("eager", "request", 1, 1, None)
    )
    assert reference["min_ms"] > one_step["p95_ms"]


@pytest.mark.slow
def test_cpu_tuning_checks_every_candidate_against_its_bar(cli_report):
    tuning = cli_report[0]["cpu_tuning"]
    labels = [c["label"] for c in tuning["candidates"]]
    assert labels[0] == "torch eager fp32" and "engine default" in labels and "fp16 graph" in labels
    for c in tuning["candidates"]:
        assert c["bar"] == {"fp32": "fp32_graph", "fp16": "fp16_graph", "bf16": "bf16_graph"}[c["precision"]]
        assert c["within_bar"] == (not c["failures"])
        assert math.isfinite(c["parity"]["psnr_db"])
    # onnxruntime and OpenVINO fp32 must match eager fp32 within the fp32 bar under any setting
    assert all(c["within_bar"] for c in tuning["candidates"] if c["precision"] == "fp32")
    if importlib.util.find_spec("openvino") is not None:
        assert {"openvino fp32", "openvino fp32, 1 thread(s)"} <= set(labels)
    assert tuning["fastest_within_bars"] in labels


@pytest.mark.slow
def test_missing_backend_is_skipped_with_a_reason(cli_report, bundle_dir):
    statuses = {s["name"]: s for s in cli_report[0]["backends"]}
    assert statuses["torch-fp16"]["status"] == "skipped"
    if importlib.util.find_spec("openvino") is not None and bf16_support()[0]:
        assert statuses["openvino-auto"]["status"] == "ok", statuses["openvino-auto"]
    assert "CUDA" in statuses["torch-fp16"]["reason"]
    # RSS need not grow (pages freed by an earlier backend are reused), so only its presence is checked.
    assert statuses["onnxruntime"]["status"] == "ok" and statuses["onnxruntime"]["rss_added_mib"] >= 0
    bundle = load_bundle(bundle_dir)
    fp32_only = Bundle(
        bundle.root,
        dataclasses.replace(
            bundle.manifest, graphs=[g for g in bundle.manifest.graphs if g.precision == "fp32"]
        ),
    )
    with pytest.raises(bk.BackendSkipped, match="no fp16 graphs"):
        bk.open_runner("onnxruntime-fp16", fp32_only, "cpu")
    with pytest.raises(bk.BackendSkipped, match="CUDA"):
        bk.open_runner("tensorrt-graph", bundle, "cpu")


@pytest.mark.slow
@pytest.mark.skipif(not _has_matplotlib(), reason="matplotlib (the 'plot' extra) is not installed")
def test_latency_plot_is_a_png(cli_report):
    data = (cli_report[1] / "latency.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_conv_flops_equal_the_analytic_count():
    conv = torch.nn.Conv2d(12, 24, kernel_size=3, stride=2, padding=1, groups=3)
    x = torch.zeros(2, 12, 17, 20)
    out_h, out_w = conv(x).shape[-2:]
    assert count_flops(conv, x) == conv2d_flops(2, 12, 24, 3, out_h, out_w, groups=3)
    assert count_flops(conv, x) == 2 * 2 * 24 * 9 * 10 * 4 * 9


def test_step_flops_scale_with_area_and_batch(bundle_dir):
    unet = load_checkpoint(tiny_checkpoint(bundle_dir.parent)).unet
    small, large = step_flops(unet, 1, 8, 4), step_flops(unet, 1, 16, 4)
    assert 3.8 <= large.flops / small.flops <= 4.6  # 4x the pixels; attention adds a little more
    assert step_flops(unet, 3, 8, 4).flops == 3 * small.flops


def test_summarize_percentiles_and_time_call_counts():
    timing = summarize([4.0, 1.0, 3.0, 2.0, 100.0], warmup=0, clock="perf_counter")
    assert (timing.p50_ms, timing.min_ms, timing.max_ms) == (3.0, 1.0, 100.0)
    # p95 interpolates linearly between the two largest samples (numpy's default), as documented
    assert timing.p95_ms == pytest.approx(4.0 + 0.8 * 96.0) and timing.mean_ms == pytest.approx(22.0)
    slept = time_call(lambda: time.sleep(0.005), warmup=0, repeats=3)
    assert slept.min_ms >= 5.0 and slept.repeats == 3  # the clock runs around the call
    calls = []
    assert time_call(lambda: calls.append(1), warmup=2, repeats=5).repeats == 5
    assert len(calls) == 7
    a, b = [], []
    timings = time_interleaved([(lambda: a.append(1), False), (lambda: b.append(1), False)], 0, 5, rounds=2)
    assert [t.repeats for t in timings] == [5, 5]
    assert len(a) == len(b) == 7  # 5 timed + one untimed settle call per round


def test_bf16_support_reads_cpu_flags():
    assert bf16_support({"avx2", "avx512f"})[0] is False
    assert bf16_support({"avx512_bf16"}) == (True, "CPU has avx512_bf16")
    fields = cpuinfo_fields(
        "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu amx_bf16\n\nprocessor\t: 1\n"
    )
    assert fields["model name"] == "Some CPU" and "processor" in fields


def test_quality_sweep_rows_are_finite(bundle_dir, astronaut):
    photo = {"astronaut": astronaut[40:104, 180:244]}
    result = quality_sweep(
        tiny_checkpoint(bundle_dir.parent),
        QualityOptions(steps=(1, 3), etas=(0.0, 1.0), ddpm=True, lpips=False, max_size=64),
        photos=photo,
        log=lambda _m: None,
    )
    rows = [(r["method"], r["sampler"], r["steps"], r["eta"]) for r in result["rows"]]
    assert rows == [
        ("bicubic", None, 0, None),
        ("predictor", None, 0, None),
        ("esrdf", "ddim", 1, 0.0),
        ("esrdf", "ddim", 3, 0.0),
        ("esrdf", "ddim", 1, 1.0),
        ("esrdf", "ddim", 3, 1.0),
        ("esrdf", "ddpm", 200, 1.0),
    ]
    for r in result["rows"]:
        assert all(np.isfinite(r[k]) for k in ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")), r
        assert r["lpips"] is None
    assert result["images"] == [
        {"name": "astronaut.png", "original_size": [64, 64], "evaluated_size": [64, 64]}
    ]
    assert result["lpips"]["scored"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "/nonexistent/bundle"], "/nonexistent/bundle: does not exist"),
        (["--steps", "0"], "positive integers"),
        (["--steps", "500"], "steps must be in 1..200"),
        (["--backends", "onnxruntime,warp-drive"], "unknown backend"),
        (["--tile", "0"], "tile must be a positive multiple"),
        (
            ["--device", "cuda", "--cpu-tuning"],
            "searches CPU settings" if torch.cuda.is_available() else "no CUDA device",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(bundle_dir, args, message):
    argv = ["--engine", str(bundle_dir), "--repeats", "1", *args]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
