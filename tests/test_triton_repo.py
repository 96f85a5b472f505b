"""The Triton model repository: configs valid against Triton's model_config.proto, I/O matching the graphs,
and the BLS model's request path equal to the in-process runtime."""

from __future__ import annotations

import dataclasses
import hashlib
import py_compile
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from tiny_bundle import tiny_bundle

from esrdf.config import SamplingOptions
from esrdf.engines.onnxruntime_engine import OnnxRuntimeEngine
from esrdf.export.triton_repo import (
    BLS_MODEL,
    PREDICTOR_MODEL,
    STEP_MODEL,
    TritonRepoOptions,
    write_triton_repo,
)
from esrdf.runtime import Upscaler
from esrdf.runtime.bundle import EngineEntry, EngineKey, load_bundle, write_manifest
from esrdf.runtime.serving.triton_bls.model import BlsSettings, upscale_request

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="parsing configs needs tritonclient[grpc] (the serve extra)"
)
text_format = pytest.importorskip("google.protobuf.text_format")

STEPS = 3


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp())


def _config(repo: Path, model: str) -> Any:
    """Parse with the real proto: unknown fields, wrong types and bad enum names all raise ParseError."""
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _params(config: Any) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def _onnx_io(path: Path) -> dict[str, list[int | str]]:
    graph = onnx.load(path).graph
    io = {}
    for v in [*graph.input, *graph.output]:
        assert v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, v.name
        dims = v.type.tensor_type.shape.dim
        io[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    return io


def test_onnx_repository_matches_the_graphs(bundle: Path) -> None:
    repo = write_triton_repo(bundle, bundle.parent / "repo-onnx", TritonRepoOptions(bls_instances=3))
    assert repo.platform == "onnxruntime_onnx" and "no TensorRT plans" in repo.notes[0]
    for model in (PREDICTOR_MODEL, STEP_MODEL):
        config = _config(repo.path, model)
        assert config.name == model and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 2 * 3  # the export batch, once per BLS instance
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert config.dynamic_batching.max_queue_delay_microseconds == 500
        graph_io = _onnx_io(repo.path / model / "1" / config.default_model_filename)
        declared = [*config.input, *config.output]
        assert [t.name for t in declared] == list(graph_io)
        for t in declared:
            assert t.data_type == model_config_pb2.TYPE_FP32
            full = [-1, *(t.reshape.shape if t.HasField("reshape") else t.dims)]  # batch axis first
            want = [d if isinstance(d, int) else -1 for d in graph_io[t.name]]
            assert full == want, t.name


def test_bls_model_compiles_and_serves_like_the_runtime(
    bundle: Path, eval_photos: dict[str, np.ndarray]
) -> None:
    repo = write_triton_repo(bundle, bundle.parent / "repo-bls")
    config = _config(repo.path, BLS_MODEL)
    assert config.backend == "python" and config.max_batch_size == 0
    assert [t.name for t in config.input] == ["image", "seed", "steps", "sampler", "eta", "prior"]
    assert [t.optional for t in config.input] == [False, True, True, True, True, True]
    py_compile.compile(str(repo.path / BLS_MODEL / "1" / "model.py"), doraise=True)
    settings = BlsSettings.from_parameters(_params(config))
    assert (settings.tile, settings.overlap, settings.batch, settings.batched) == (8, 1, 2, True)

    # The BLS request path with a real engine in place of the BLS calls: the runtime's own output.
    manifest = load_bundle(bundle).manifest
    engine = OnnxRuntimeEngine.from_bundle(load_bundle(bundle), threads=1)
    s = settings
    reference = Upscaler(bundle, "onnxruntime", threads=1, tile=s.tile, overlap=s.overlap, batch=s.batch)
    rgb = np.ascontiguousarray(eval_photos["coffee"][100:114, 200:217])
    request = {"image": rgb, "seed": np.array([4], np.uint64), "steps": np.array([STEPS], np.int32),
               "sampler": np.array([b"ddim"], object), "eta": np.array([0.5], np.float32),
               "prior": np.array([b"paper"], object)}  # fmt: skip
    out = upscale_request(engine, manifest, settings, request)
    np.testing.assert_array_equal(
        out, reference(rgb, SamplingOptions(steps=STEPS, seed=4, eta=0.5, prior="paper"))
    )
    # Nothing given: seed 0 and the bundle's sampling section, as Upscaler's defaults
    default = upscale_request(engine, manifest, settings, {"image": rgb})
    np.testing.assert_array_equal(default, reference(rgb))
    assert manifest.sampling is not None
    s = manifest.sampling
    assert reference.sampling() == SamplingOptions(s.sampler, s.steps, s.eta, 0, s.prior).resolve(200)
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.200"):
        upscale_request(engine, manifest, settings, {**request, "steps": np.array([500], np.int32)})


def _with_placeholder_plans(bundle: Path, out: Path, profiles: dict[str, dict[str, dict[str, int]]]) -> Path:
    """A copy of the bundle whose manifest lists fp16 plans for two GPU models. The plan bytes are
    placeholders (TensorRT cannot build here): the writer copies plans and reads their keys, never
    parses them."""
    shutil.copytree(bundle, out)
    manifest = load_bundle(out).manifest
    engines = []
    for role, profile in profiles.items():
        graph = manifest.graph(role, "fp16")
        assert graph is not None
        for gpu, cc in (("NVIDIA H100", "9.0"), ("NVIDIA L4", "8.9")):
            data = f"placeholder plan: {role} {gpu}".encode()
            file = f"{role}.fp16.{cc}.plan"
            (out / file).write_bytes(data)
            key = EngineKey("10.13.0", gpu, cc, "fp16", profile, graph.sha256)
            engines.append(EngineEntry(role, "fp16", file, hashlib.sha256(data).hexdigest(), key))
    write_manifest(out, dataclasses.replace(manifest, engines=engines))
    return out


def _profile(batch: tuple[int, int], tile: tuple[int, int]) -> dict[str, dict[str, int]]:
    def sizes(b: int, t: int) -> dict[str, int]:
        return {"batch": b, "lr_height": t, "lr_width": t, "height": 4 * t, "width": 4 * t}

    return {"min": sizes(batch[0], tile[0]), "opt": sizes(batch[1], tile[1]), "max": sizes(batch[1], tile[1])}


def test_tensorrt_repository_with_a_dynamic_profile(bundle: Path, tmp_path: Path) -> None:
    dynamic = _profile((1, 8), (4, 8))
    src = _with_placeholder_plans(bundle, tmp_path / "bundle", {"predictor": dynamic, "step": dynamic})
    repo = write_triton_repo(src, tmp_path / "repo", TritonRepoOptions(batch=4))
    assert repo.platform == "tensorrt_plan" and repo.notes == []
    step = _config(repo.path, STEP_MODEL)
    assert step.platform == "tensorrt_plan" and step.max_batch_size == 8
    assert step.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert dict(step.cc_model_filenames) == {"9.0": "model.sm90.plan", "8.9": "model.sm89.plan"}
    copied = repo.path / STEP_MODEL / "1" / "model.sm89.plan"
    assert copied.read_bytes() == b"placeholder plan: step NVIDIA L4"
    dims = {t.name: (list(t.dims), t.HasField("reshape")) for t in step.input}
    assert dims == {"x_t": ([3, -1, -1], False), "cond": ([3, -1, -1], False), "t": ([1], True),
                    "coefs": ([3], False), "noise": ([3, -1, -1], False)}  # fmt: skip
    settings = BlsSettings.from_parameters(_params(_config(repo.path, BLS_MODEL)))
    assert (settings.tile, settings.batch, settings.pad_batch, settings.batched) == (8, 4, False, True)


def test_tensorrt_repository_with_a_static_profile(bundle: Path, tmp_path: Path) -> None:
    static = _profile((2, 2), (8, 8))
    src = _with_placeholder_plans(bundle, tmp_path / "bundle", {"predictor": static, "step": static})
    repo = write_triton_repo(src, tmp_path / "repo")
    predictor = _config(repo.path, PREDICTOR_MODEL)
    assert predictor.max_batch_size == 0 and not predictor.HasField("dynamic_batching")
    assert [list(t.dims) for t in predictor.input] == [[2, 3, 8, 8]]
    assert [list(t.dims) for t in predictor.output] == [[2, 3, 32, 32]]
    t_input = next(t for t in _config(repo.path, STEP_MODEL).input if t.name == "t")
    assert list(t_input.dims) == [2] and not t_input.HasField("reshape")
    settings = BlsSettings.from_parameters(_params(_config(repo.path, BLS_MODEL)))
    assert (settings.tile, settings.batch, settings.pad_batch, settings.batched) == (8, 2, True, False)


def test_existing_directories_need_force_and_must_be_ours(bundle: Path, tmp_path: Path) -> None:
    from esrdf.runtime.bundle import BundleError

    target = tmp_path / "repo"
    write_triton_repo(bundle, target)
    with pytest.raises(BundleError, match="--force"):
        write_triton_repo(bundle, target)
    write_triton_repo(bundle, target, TritonRepoOptions(bls_instances=2), force=True)
    assert _config(target, BLS_MODEL).instance_group[0].count == 2
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a repository")
    with pytest.raises(BundleError, match="not an ESRDF Triton repository"):
        write_triton_repo(bundle, foreign, force=True)
    assert (foreign / "keep.txt").exists()
