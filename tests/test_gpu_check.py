"""The GPU check (``esrdf.bench.gpu_check``) on the CPU: its no-CUDA path, its CPU smoke run, and the parts
it adds to esrdf-bench (the graph-less bundle view of a checkpoint).

The GPU machine has torch, onnx, onnxruntime, safetensors, click, pillow, numpy, rich and pytest, but no
export toolchain, plotting or scikit packages; the smoke run blocks those imports to prove it needs none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_bundle import tiny_bundle, tiny_checkpoint

from esrdf.bench import backends as bk
from esrdf.bench.checkpoint_bundle import checkpoint_bundle
from esrdf.bench.gpu_check import PHOTO_NAMES, main
from esrdf.bench.latency import lr_tiles
from esrdf.runtime.bundle import load_bundle
from esrdf.runtime.sampling import plan_steps

# What the offline GPU machine lacks (see benchmarks/gpu_check.py and README, "The GPU path").
MISSING_ON_THE_GPU_MACHINE = (
    "polygraphy",
    "onnxscript",
    "onnxconverter_common",
    "onnx_graphsurgeon",
    "tensorrt",
    "matplotlib",
    "skimage",
    "sklearn",
    "scipy",
)
# None in sys.modules makes a module absent the documented way: import raises ModuleNotFoundError and
# importlib.util.find_spec returns None, as for a package that is not installed.
BLOCK_IMPORTS = f"import sys\nsys.modules.update(dict.fromkeys({MISSING_ON_THE_GPU_MACHINE!r}))\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


def test_checkpoint_view_is_the_exported_manifest_minus_the_graphs(base: Path, astronaut: np.ndarray):
    exported = load_bundle(tiny_bundle(base))
    view = checkpoint_bundle(tiny_checkpoint(base))
    for field in ("format_version", "model_name", "scale", "channels", "hr_multiple_of", "value_range"):
        assert getattr(view.manifest, field) == getattr(exported.manifest, field), field
    assert view.manifest.schedule == exported.manifest.schedule
    assert view.manifest.model_config == exported.manifest.model_config
    assert view.manifest.graphs == [] and view.precisions() == []
    # The torch backend runs from it and gives the exported bundle's torch backend's output, bit for bit.
    lr = lr_tiles(astronaut, 2, 8, view.manifest.scale)
    plan = plan_steps(view.manifest.schedule.array(), "ddim", 3, 0.0)
    got = bk.open_runner("torch", view, "cpu").request_call(lr, plan)()
    want = bk.open_runner("torch", exported, "cpu").request_call(lr, plan)()
    assert got.shape == (3, 32, 64) and np.array_equal(got, want)
    with pytest.raises(bk.BackendSkipped, match="no fp32 graphs"):
        bk.open_runner("onnxruntime", view, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_without_cuda_it_reports_so_and_saves_the_photos(tmp_path: Path):
    photos = tmp_path / "photos.npz"
    assert main(["--out", str(tmp_path / "out"), "--photos", str(photos)]) == 0
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["status"].startswith("no CUDA (torch ") and "errors" not in report
    assert report["photos"]["saved"] == str(photos) and "latency" not in report
    assert report["machine"]["cuda_available"] is False and report["machine"]["cpu_model"]
    assert (tmp_path / "out" / "gpu_check.txt").read_text().strip() == report["status"]
    with np.load(photos) as saved:
        assert sorted(saved.files) == sorted(PHOTO_NAMES)
        assert all(saved[n].dtype == np.uint8 and saved[n].shape[2] == 3 for n in PHOTO_NAMES)


@pytest.mark.slow
def test_cpu_smoke_run_benchmarks_without_the_missing_libraries(tmp_path: Path, astronaut: np.ndarray):
    photos = tmp_path / "photos.npz"
    np.savez_compressed(photos, astronaut=astronaut)
    out = tmp_path / "out"
    args = ["--device", "cpu", "--preset", "tiny", "--lr-tile", "8", "--batches", "1,2", "--steps", "1,2"]
    args += ["--repeats", "3", "--warmup", "1", "--budget-s", "120", "--out", str(out)]
    args += ["--photos", str(photos)]
    code = BLOCK_IMPORTS + f"from esrdf.bench.gpu_check import main\nsys.exit(main({args!r}))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"].startswith("CPU smoke run") and "errors" not in report, report.get("errors")
    assert report["schema"] == "esrdf-bench/1" and report["workload"]["photo"].endswith("astronaut")
    statuses = {s["name"]: s for s in report["backends"]}
    assert statuses["eager"]["status"] == statuses["torch"]["status"] == "ok"
    for name in ("torch-fp16", "torch-cuda-graph", "tensorrt-graph"):
        assert statuses[name]["status"] == "skipped" and "CUDA" in statuses[name]["reason"], name
    stages = {(r["backend"], r["stage"], r["batch"], r.get("steps")) for r in report["latency"]}
    for backend in ("eager", "torch"):
        assert {(backend, "step", 2, None), (backend, "request", 1, 1), (backend, "request", 1, 2)} <= stages
    assert all(r["clock"] == "perf_counter" and r["repeats"] == 3 for r in report["latency"])
    assert report["checks"] == []  # no graph or fp16 backend opens on the CPU
    # Upscaler requests: uint8 through the public API at each batch, the bundle's default sampling.
    rows = report["upscaler"]["rows"]
    assert [(r["backend"], r["batch"], r["precision"]) for r in rows] == [
        ("torch", 1, "fp32"),
        ("torch", 2, "fp32"),
    ]
    assert all(r["end_to_end"]["repeats"] >= 1 and "gpu_only" not in r for r in rows)
    # The probe ran every variant but torch.compile on the CPU, each within the bar, and adopts nothing.
    probe = report["fp16_probe"]
    variants = {r["variant"]: r for r in probe["rows"]}
    assert variants["torch_compile"]["skipped"] == "CPU smoke run" and probe["adopt"] == []
    for name in ("baseline", "cudnn_benchmark", "channels_last", "groupnorm_fp16", "hoisted_time_embedding"):
        assert [c["within_fp16_bar"] for c in variants[name]["batches"]] == [True, True], name
    text = (out / "gpu_check.txt").read_text()
    assert "Upscaler requests" in text and "fp16 probe" in text
    assert report["machine"]["libraries"]["matplotlib"].startswith("not available")
    assert "| torch |" in (out / "gpu_check.txt").read_text()


def test_bench_command_modules_import_none_of_the_missing_libraries():
    modules = "gpu_check suite latency machine tables backends checkpoint_bundle random_model cli"
    modules += " upscaler_requests fp16_probe"
    code = "import sys\n" + "".join(f"import esrdf.bench.{m}\n" for m in modules.split())
    code += f"print(sorted(m for m in {MISSING_ON_THE_GPU_MACHINE!r} if m in sys.modules))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_probe_variants_change_the_speed_not_the_step(astronaut: np.ndarray):
    """Each eager-fp16 variant, applied on the CPU in fp32, gives the baseline's step output (up to float
    reassociation): the probe measures speed-ups of the same function."""
    import copy

    from esrdf.bench.fp16_probe import applied, half_group_norms, hoist_time_projections
    from esrdf.bench.latency import step_feeds
    from esrdf.bench.random_model import random_models
    from esrdf.config import preset
    from esrdf.engines.torch_engine import TorchEngine

    cfg = preset("tiny")
    models = random_models(cfg)
    plan = plan_steps(np.linspace(0.999, 0.3666, 1000), "ddim", 20, 0.0)
    feeds = step_feeds(lr_tiles(astronaut, 2, 8, cfg.scale), cfg.scale, plan)

    def step(variant: str) -> np.ndarray:
        engine = TorchEngine(*copy.deepcopy(models), device="cpu")
        with applied(variant, engine):
            args = [engine.upload(feeds[k]) for k in ("x_t", "cond", "t", "coefs", "noise")]
            out = engine.download(engine.step(*args))
        blocks = [m for m in engine._step.unet.modules() if hasattr(m, "time_proj")]
        assert all(hasattr(b, "hoisted_time") for b in blocks) == ("hoisted_time_embedding" in variant)
        return out

    want = step("baseline")
    variants = ["cudnn_benchmark", "channels_last", "groupnorm_fp16", "hoisted_time_embedding"]
    for variant in [*variants, "+".join(variants)]:  # each, and all of them together
        np.testing.assert_allclose(step(variant), want, rtol=0, atol=1e-5, err_msg=variant)
    unet = copy.deepcopy(models[1])
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in unet.modules())
    assert half_group_norms(unet) == norms > 0 and hoist_time_projections(unet) > 0
    with pytest.raises(ValueError, match="unknown variant"):
        with applied("fp8", TorchEngine(*copy.deepcopy(models))):
            pass


def test_gpu_only_time_is_of_the_same_work_as_the_upscaler_request(base: Path, astronaut: np.ndarray):
    """The GPU-only figure replays a graph of the request's own tiles, plan and seed: run as stream
    execution on the CPU, that sampler's HR tiles are the Upscaler's image before clipping and uint8."""
    from esrdf.bench.upscaler_requests import bundle_dir, request_image, same_request_sampler
    from esrdf.runtime.upscaler import Upscaler

    directory = bundle_dir(checkpoint_bundle(tiny_checkpoint(base)))
    upscaler = Upscaler(directory, backend="torch", device="cpu", tile=8, overlap=0, batch=3)
    image = request_image(astronaut, 3, 8)
    assert image.shape == (8, 24, 3) and image.dtype == np.uint8
    _graphs, tiles, _plan, hr = same_request_sampler(upscaler, image)
    want = upscaler.upscale_array(tiles.transpose(1, 2, 0, 3).reshape(3, 8, 24))  # the same LR image
    got = np.clip(np.concatenate(list(hr), axis=2), -1.0, 1.0)
    assert np.array_equal(got, want)
