"""The OpenVINO engine on the shipped default model and real photos: fp32 parity with onnxruntime, bf16
parity measured per graph, per-graph precision, the compiled-model cache and its key, threads, and
``--backend auto``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from concurrency import assert_threads_match_serial

from esrdf.runtime.backend_choice import _cpu_choice, resolve_backend
from esrdf.runtime.bundle import load_bundle
from esrdf.runtime.cpu_info import bf16_support
from esrdf.runtime.engine import EngineError
from esrdf.runtime.graph_spec import PREDICTOR, STEP
from esrdf.runtime.images import to_model_range
from esrdf.runtime.tolerances import BF16_GRAPH, END_TO_END_BF16, FP32_GRAPH, ParityBar

ov = pytest.importorskip("openvino", reason="needs the openvino extra (pip install 'esrdf[openvino]')")

from esrdf.engines import openvino_parity  # noqa: E402
from esrdf.engines.openvino_engine import OpenVinoEngine, OpenVinoGraph  # noqa: E402

NATIVE_BF16, BF16_EVIDENCE = bf16_support()
needs_bf16 = pytest.mark.skipif(not NATIVE_BF16, reason=f"no native bf16 here ({BF16_EVIDENCE})")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """One user cache for this module's tests, not the user's own."""
    path = tmp_path_factory.getbasetemp() / "esrdf-cache"
    monkeypatch.setenv("ESRDF_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def bundle():
    from esrdf.default_model import default_bundle_dir

    return load_bundle(default_bundle_dir())


@pytest.fixture(scope="module")
def lr_tiles(astronaut: np.ndarray) -> np.ndarray:
    """Two 16 x 16 LR tiles of a real photo, (2, 3, 16, 16) in [-1, 1]."""
    crops = [astronaut[100:116, 200:216], astronaut[300:316, 120:136]]
    return np.stack([to_model_range(np.ascontiguousarray(c)) for c in crops])


def _paths(bundle) -> tuple[Path, Path]:
    return bundle.graph_path(PREDICTOR, "fp32"), bundle.graph_path(STEP, "fp32")


def _max_abs_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_fp32_graphs_match_onnxruntime(bundle, lr_tiles) -> None:
    """OpenVINO f32 against onnxruntime fp32 on the same ONNX files, at the FP32_GRAPH bar."""
    from esrdf.engines.onnxruntime_engine import OnnxRuntimeEngine

    ort = OnnxRuntimeEngine(*_paths(bundle), threads=1)
    ovf = OpenVinoEngine(*_paths(bundle), threads=1)
    coarse = ort.download(ort.predictor(ort.upload(lr_tiles)))
    assert _max_abs_rel(ovf.predictor(lr_tiles), coarse) <= FP32_GRAPH.max_abs_rel
    rng = np.random.default_rng(0)
    x_t = rng.standard_normal(coarse.shape, dtype=np.float32)
    noise = rng.standard_normal(coarse.shape, dtype=np.float32)
    t = np.array([900.0, 40.0], dtype=np.float32)
    coefs = np.array([[1.01, -0.3, 0.2], [0.99, -0.05, 0.01]], dtype=np.float32)
    ref = ort.download(ort.step(*(ort.upload(a) for a in (x_t, coarse, t, coefs, noise))))
    assert _max_abs_rel(ovf.step(x_t, coarse, t, coefs, noise), ref) <= FP32_GRAPH.max_abs_rel


@needs_bf16
def test_bf16_meets_the_per_graph_and_end_to_end_bars_on_the_default_model(bundle) -> None:
    """The measurement behind ``precision="bf16"``: both graphs of the shipped model pass on this CPU."""
    record = openvino_parity.bf16_precisions(bundle, threads=1)
    for role in (PREDICTOR, STEP):
        fig = record["graph_figures"][role]
        assert fig["nonfinite"] == 0 and fig["median_abs"] <= BF16_GRAPH.median_abs, (role, fig)
        assert fig["median_abs"] > 0.0  # bf16 really ran: it is not bit-identical to f32
    assert record["precisions"] == {PREDICTOR: "bf16", STEP: "bf16"}
    assert record["end_to_end"]["psnr_db"] >= END_TO_END_BF16.min_psnr_db
    again = openvino_parity.bf16_precisions(bundle, threads=1)
    assert again["cached"] and again["graph_figures"] == record["graph_figures"]


@needs_bf16
def test_a_graph_that_misses_its_bar_runs_fp32_and_the_other_bf16(bundle) -> None:
    """With a bar between the two graphs' measured medians, only the better graph keeps bf16."""
    measured = openvino_parity.bf16_precisions(bundle, threads=1)["graph_figures"]
    medians = sorted((measured[r]["median_abs"], r) for r in (PREDICTOR, STEP))
    (low, better), (high, worse) = medians
    assert low < high
    record = openvino_parity.measure(bundle, threads=1, graph_bar=ParityBar(median_abs=(low + high) / 2))
    assert record["precisions"] == {better: "bf16", worse: "fp32"}
    assert "misses" in record["reasons"][worse]
    engine = OpenVinoEngine(*_paths(bundle), record["precisions"], threads=1)
    key = engine.key()
    assert key[better]["precision"] == "bf16" and key[worse]["precision"] == "fp32"


def test_compiled_models_are_cached_per_key_and_never_shared_across_cpus(
    bundle, lr_tiles, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import esrdf.engines.openvino_engine as engine_module

    graph = OpenVinoGraph(_paths(bundle)[0], PREDICTOR, "fp32", threads=1)
    out = graph(lr_tiles)
    (key,) = graph.keys.values()
    assert key.shape == {"lr": [2, 3, 16, 16]} and key.precision == "fp32"
    assert key.onnx_sha256 == bundle.manifest.graph(PREDICTOR, "fp32").sha256
    folder = cache_dir / "openvino" / key.digest()
    assert (folder / "key.json").is_file() and any(p.suffix == ".blob" for p in folder.iterdir())
    # Another CPU (same everything else) gets another folder: it never reads this machine's blobs.
    monkeypatch.setattr(
        engine_module, "cpu_identity", lambda: {"cpu_model": "Other CPU", "cpu_flags_sha256": "0" * 64}
    )
    other = OpenVinoGraph(_paths(bundle)[0], PREDICTOR, "fp32", threads=1)
    np.testing.assert_array_equal(other(lr_tiles), out)
    (other_key,) = other.keys.values()
    assert other_key.digest() != key.digest() and (cache_dir / "openvino" / other_key.digest()).is_dir()


def test_one_engine_is_safe_across_threads(bundle, astronaut: np.ndarray) -> None:
    """Four threads on one OpenVINO engine: each result bit-identical to its serial call."""
    from esrdf.runtime import Upscaler

    upscaler = Upscaler(bundle.root, backend="openvino", precision="fp32", threads=1, tile=16, batch=2)
    images = [np.ascontiguousarray(astronaut[40 * i : 40 * i + 24, 100:130]) for i in range(4)]
    assert_threads_match_serial(upscaler, images)


def test_bad_precisions_and_devices_are_clear(bundle) -> None:
    with pytest.raises(EngineError, match="fp32 or bf16"):
        OpenVinoEngine.from_bundle(bundle, precision="fp16")
    with pytest.raises(EngineError, match="CPU"):
        OpenVinoEngine.from_bundle(bundle, precision="fp32", device="cuda")


def _pick(precision: str | None, native_bf16: tuple[bool, str], openvino: bool) -> tuple[str, str]:
    choice = _cpu_choice(precision, native_bf16, openvino)
    return choice.backend, choice.precision


def test_auto_rule() -> None:
    """The documented rule, for CPUs with and without native bf16 and with and without openvino."""
    amx, plain = (True, "CPU has amx_bf16"), (False, "CPU has none of avx512_bf16, amx_bf16")
    assert _pick(None, amx, openvino=True) == ("openvino", "bf16")
    assert _pick(None, plain, openvino=True) == ("onnxruntime", "fp32")
    assert _pick(None, amx, openvino=False) == ("onnxruntime", "fp32")
    assert _pick("fp16", amx, openvino=True) == ("onnxruntime", "fp16")
    with pytest.raises(EngineError, match="native bf16"):
        _cpu_choice("bf16", plain, openvino=True)
    with pytest.raises(EngineError, match="not installed"):
        _cpu_choice("bf16", amx, openvino=False)
    explicit = resolve_backend("onnxruntime", "cpu", None)
    assert (explicit.backend, explicit.precision) == ("onnxruntime", "fp32")
    assert "given" in explicit.reason


@needs_bf16
def test_esrdf_run_verbose_says_what_auto_picked_and_an_explicit_backend_wins(
    tmp_path: Path, astronaut: np.ndarray
) -> None:
    from click.testing import CliRunner
    from PIL import Image

    from esrdf.runtime.cli import main

    photo = tmp_path / "in.png"
    Image.fromarray(np.ascontiguousarray(astronaut[200:210, 200:212])).save(photo)
    args = ["-i", str(photo), "--steps", "1", "--tile", "8", "-v"]
    auto = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a.png")])
    assert auto.exit_code == 0, auto.output
    assert "backend: openvino" in auto.output and "step: bf16" in auto.output
    explicit = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b.png"), "--backend", "onnxruntime"])
    assert explicit.exit_code == 0, explicit.output
    assert "backend: onnxruntime (--backend onnxruntime given)" in explicit.output
