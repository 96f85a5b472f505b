"""Export: graph contracts, cleanup, the fp16 conversion's fp32 islands, the bundle and esrdf-export."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from tiny_bundle import BATCH, TILE, eager_io_dir, make_tiny_checkpoint, tiny_bundle, tiny_checkpoint

from esrdf.runtime.bundle import FORMAT_VERSION, BundleError, load_bundle, sha256_file
from esrdf.runtime.graph_spec import GRAPH_ROLES, graph_spec
from esrdf.runtime.tolerances import FP16_GRAPH, FP32_GRAPH

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


@pytest.fixture(scope="session")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp()


@pytest.fixture(scope="session")
def bundle_dir(base: Path) -> Path:
    return tiny_bundle(base)


def _types(model: onnx.ModelProto) -> dict[str, int]:
    from esrdf.export.fp16 import tensor_elem_types

    return tensor_elem_types(model)


def test_graphs_declare_the_spec_contract(bundle_dir: Path) -> None:
    """Every graph file has the spec's I/O names, named dynamic axes and fp32 dtypes (fp16 graphs too)."""
    for file in ("predictor.onnx", "step.onnx", "predictor.fp16.onnx", "step.fp16.onnx"):
        model = onnx.load(str(bundle_dir / file))
        spec = graph_spec(file.split(".")[0])
        for value, declared in zip(
            (*model.graph.input, *model.graph.output), (*spec.inputs, *spec.outputs), strict=True
        ):
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            assert (value.name, dims) == (declared.name, list(declared.dims)), file
            assert value.type.tensor_type.elem_type == FLOAT, f"{file}: {value.name} is not float32"


def test_graphs_pass_full_check_with_weights_inside(bundle_dir: Path) -> None:
    for file in ("predictor.onnx", "step.onnx", "predictor.fp16.onnx", "step.fp16.onnx"):
        onnx.checker.check_model(str(bundle_dir / file), full_check=True)
        model = onnx.load(str(bundle_dir / file), load_external_data=False)
        assert model.opset_import[0].version == 18
        external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert not external, f"{file}: weights stored outside the file: {external[:3]}"
    assert not list(bundle_dir.glob("*.data"))


def test_fp16_step_graph_keeps_norms_softmax_and_update_in_fp32(bundle_dir: Path) -> None:
    model = onnx.load(str(bundle_dir / "step.fp16.onnx"))
    types = _types(model)
    nodes = list(model.graph.node)

    def io_types(node: onnx.NodeProto) -> set[int]:
        return {types[n] for n in (*node.input, *node.output) if n and types.get(n) in (FLOAT, FLOAT16)}

    pinned = [n for n in nodes if n.op_type in ("InstanceNormalization", "Softmax", "Sin", "Cos")]
    assert {n.op_type for n in pinned} == {"InstanceNormalization", "Softmax", "Sin", "Cos"}
    for node in pinned:
        assert io_types(node) == {FLOAT}, f"{node.name} ({node.op_type}) is not fp32"
    # The bulk really is fp16: every conv computes in half precision.
    convs = [n for n in nodes if n.op_type == "Conv"]
    assert convs and all(io_types(n) == {FLOAT16} for n in convs)

    update = [n for n in nodes if n.name.startswith("/sampler_update/")]
    assert sum(n.op_type in ("Mul", "Add") for n in update) == 5  # 3 products, 2 sums
    assert all(io_types(n) <= {FLOAT} for n in update)
    # x_t, noise and coefs reach the update as the fp32 graph inputs; only eps crosses from the fp16 U-Net,
    # through exactly one Cast, and x_prev leaves without a cast down.
    producer = {o: n for n in nodes for o in n.output}
    names = {n.name for n in update}
    feeds = {i for n in update for i in n.input if i in producer and producer[i].name not in names}
    casts = [producer[i] for i in feeds if producer[i].op_type == "Cast"]
    assert len(casts) == 1 and types[casts[0].input[0]] == FLOAT16
    assert {"x_t", "noise", "coefs"} <= {i for n in update for i in n.input}
    assert producer["x_prev"].name in names


def test_fp16_predictor_keeps_bicubic_path_and_reductions_fp32(bundle_dir: Path) -> None:
    model = onnx.load(str(bundle_dir / "predictor.fp16.onnx"))
    types = _types(model)
    for node in model.graph.node:
        if node.op_type in ("Resize", "ReduceMean"):
            assert types[node.input[0]] == FLOAT and types[node.output[0]] == FLOAT, node.name
    # Conv weights are fp16, except the stem's: the exporter folds BatchNorm into that conv, and nodes of a
    # norm module stay fp32.
    inits = {t.name: t for t in model.graph.initializer}
    convs = {n.name: inits[n.input[1]].data_type for n in model.graph.node if n.op_type == "Conv"}
    assert {name for name, dtype in convs.items() if dtype != FLOAT16} == {
        "/predictor.bsconv.bn/node_Conv_288"
    }


def test_manifest_describes_the_bundle(bundle_dir: Path, base: Path) -> None:
    from esrdf.checkpoint import read_config, read_model_tensors
    from esrdf.diffusion.schedule import make_schedule

    manifest = load_bundle(bundle_dir).manifest
    cfg = read_config(tiny_checkpoint(base))
    assert manifest.format_version == FORMAT_VERSION
    assert (manifest.scale, manifest.channels, manifest.hr_multiple_of) == (4, 3, cfg.unet.multiple_of)
    assert manifest.value_range == [-1.0, 1.0]
    assert manifest.model() == cfg
    # float64 schedule values survive the JSON round trip bit for bit
    assert np.array_equal(manifest.schedule.array(), make_schedule(cfg.schedule).alphas_cumprod)
    assert {(g.role, g.precision) for g in manifest.graphs} == {
        (r, p) for r in GRAPH_ROLES for p in ("fp32", "fp16")
    }
    for g in manifest.graphs:
        assert g.sha256 == sha256_file(bundle_dir / g.file) and g.opset == 18
    assert (manifest.export.tile, manifest.export.batch) == (TILE, BATCH)
    assert Path(manifest.export.checkpoint) == tiny_checkpoint(base)
    info = manifest.provenance
    assert info["opset"] == 18
    assert info["parity_image"] == "skimage.data.astronaut" and info["unet_weights"] == "ema"
    for role in GRAPH_ROLES:
        assert manifest.parity[f"{role}_fp32"]["max_abs_rel"] <= FP32_GRAPH.max_abs_rel
        fp16 = manifest.parity[f"{role}_fp16"]
        assert fp16["median_abs"] <= FP16_GRAPH.median_abs and fp16["psnr_db"] >= FP16_GRAPH.min_psnr_db
        assert fp16["nonfinite"] == 0.0
    # The torch weights are the EMA U-Net the checkpoint holds, stored as the bundle's own checkpoint.
    stored = read_model_tensors(bundle_dir / "torch")
    source = read_model_tensors(tiny_checkpoint(base))
    key = "unet.output_conv.weight"
    assert np.array_equal(stored[key].numpy(), source["unet_ema." + key[5:]].numpy())
    assert manifest.torch_weights is not None and manifest.torch_weights.file == "torch/model.safetensors"
    assert manifest.torch_weights.sha256 == sha256_file(bundle_dir / manifest.torch_weights.file)


def test_tampered_bundle_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    from esrdf.engines.torch_engine import TorchEngine

    copy = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    step = copy / "step.fp16.onnx"
    data = bytearray(step.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the weights
    step.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"step\.fp16\.onnx.*sha256.*esrdf-export"):
        load_bundle(copy)

    copy2 = Path(shutil.copytree(bundle_dir, tmp_path / "bundle2"))
    weights = copy2 / "torch" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    # The torch weights are hash-checked like the graphs, by load_bundle, which the torch engine opens.
    with pytest.raises(BundleError, match=r"torch/model\.safetensors.*sha256.*esrdf-export"):
        load_bundle(copy2)
    with pytest.raises(BundleError, match=r"torch/model\.safetensors.*sha256"):
        TorchEngine.from_bundle(copy2)


def test_existing_target_is_refused_without_force(bundle_dir: Path, base: Path) -> None:
    from esrdf.export.bundle_writer import ExportError, export_bundle

    before = sha256_file(bundle_dir / "manifest.json")
    with pytest.raises(ExportError, match="already exists; pass --force"):
        export_bundle(tiny_checkpoint(base), bundle_dir, progress=False)
    assert sha256_file(bundle_dir / "manifest.json") == before


def test_interrupted_export_leaves_nothing_behind(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C mid-export removes the temp bundle and never creates the target."""
    from esrdf.export import onnx_export
    from esrdf.export.bundle_writer import export_bundle

    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt  # fault injection: the exporter is stopped as a user would stop it

    monkeypatch.setattr(onnx_export, "export_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_checkpoint(base), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_predictor_only_checkpoint_is_refused(tmp_path: Path) -> None:
    from esrdf.export.bundle_writer import ExportError, export_bundle

    ckpt = make_tiny_checkpoint(tmp_path / "predictor-only", with_unet=False)
    with pytest.raises(ExportError, match="predictor-only checkpoint"):
        export_bundle(ckpt, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt", "{tmp}/missing", "--out", "{tmp}/b"], "does not exist"),
        (["--ckpt", "{ckpt}", "--out", "{bundle}"], "already exists; pass --force"),
        (["--ckpt", "{ckpt}", "--out", "{tmp}/b", "--tile", "0"], "tile must be a positive multiple"),
        (["--ckpt", "{ckpt}", "--out", "{tmp}/b", "--opset", "13"], "opset must be in 18.."),
        (["--ckpt", "{ckpt}", "--out", "{tmp}/b", "--precision", "int8"], "Invalid value for '--precision'"),
        (["--out", "{tmp}/b"], "Missing option '--ckpt'"),
        (["--ckpt", "{ckpt}", "--out", "{tmp}/b", "--trt", "--precision", "fp32"], "mixed fp16 graphs"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(
    args: list[str], message: str, base: Path, bundle_dir: Path, tmp_path: Path
) -> None:
    from esrdf.export.cli import main

    values = {"tmp": str(tmp_path), "ckpt": str(tiny_checkpoint(base)), "bundle": str(bundle_dir)}
    result = CliRunner().invoke(main, [a.format(**values) for a in args])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], result.output
    assert not (tmp_path / "b").exists()


def test_trt_request_without_tensorrt_says_why_before_any_work(base: Path, tmp_path: Path) -> None:
    from esrdf.engines.tensorrt_build import tensorrt_unavailable_reason
    from esrdf.export.cli import main

    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("tensorrt is usable here; the refusal path cannot be exercised")
    args = ["--ckpt", str(tiny_checkpoint(base)), "--out", str(tmp_path / "b"), "--trt"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert result.output.strip() == f"Error: --trt: cannot build TensorRT engines on this machine: {reason}"
    assert not (tmp_path / "b").exists()


def test_polygraphy_compares_a_graph_with_saved_eager_outputs(bundle_dir: Path, base: Path) -> None:
    """The README's polygraphy command, on the files ``--save-eager-io`` wrote at export."""
    io = eager_io_dir(base)
    polygraphy = Path(sys.executable).with_name("polygraphy")
    command = [
        str(polygraphy),
        "run",
        str(bundle_dir / "predictor.onnx"),
        "--onnxrt",
        "--load-inputs",
        str(io / "predictor.inputs.json"),
        "--load-outputs",
        str(io / "predictor.eager_outputs.json"),
        "--atol",
        "1e-4",
        "--rtol",
        "1e-4",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "PASSED | Output: 'coarse'" in done.stdout + done.stderr
    inputs = json.loads((io / "predictor.inputs.json").read_text())
    assert isinstance(inputs, list) and len(inputs) == 1  # one iteration of feeds, polygraphy's format


@pytest.mark.slow
def test_cli_force_replaces_a_bundle_atomically(bundle_dir: Path, base: Path, tmp_path: Path) -> None:
    """``esrdf-export --force`` over a bundle: the new one stands complete, the old files are gone."""
    from esrdf.export.cli import main

    target = Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))
    args = [
        "--ckpt",
        str(tiny_checkpoint(base)),
        "--out",
        str(target),
        "--precision",
        "fp32",
        "--tile",
        "8",
        "--batch",
        "1",
        "--no-torch-weights",
        "--force",
        "--quiet",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"wrote bundle {target}"
    manifest = load_bundle(target).manifest
    assert sorted(g.file for g in manifest.graphs) == ["predictor.onnx", "step.onnx"]
    assert manifest.export.batch == 1 and manifest.torch_weights is None
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "predictor.onnx", "step.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]  # no temp or old directories left behind
