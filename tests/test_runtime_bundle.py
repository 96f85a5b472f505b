"""The bundle format: strict manifest round trip, hash/format validation, and atomic writing.

These bundles hold stand-in graph files (bytes of a real photo), since hashing and refusal do not care what
a file contains; bundles with real exported graphs are exercised in test_runtime_cli.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from esrdf.config import SamplingOptions
from esrdf.runtime.bundle import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Bundle,
    BundleError,
    EngineEntry,
    EngineKey,
    ExportSettings,
    GraphEntry,
    Manifest,
    SamplingEntry,
    ScheduleEntry,
    TensorEntry,
    load_bundle,
    sampling_entry,
    sha256_file,
    write_bundle_atomically,
    write_manifest,
)
from esrdf.runtime.graph_spec import graph_spec


def _entries(role: str) -> tuple[list[TensorEntry], list[TensorEntry]]:
    spec = graph_spec(role)
    return (
        [TensorEntry(t.name, t.dims, t.dtype) for t in spec.inputs],
        [TensorEntry(t.name, t.dims, t.dtype) for t in spec.outputs],
    )


FAKE_SAMPLING = SamplingOptions("ddim", 20, 1.0, prior="matched")


def build_fake_bundle(root: Path, photo: np.ndarray) -> Manifest:
    """Write stand-in graph files and a manifest that lists them with their sha256."""
    graphs = []
    for i, (role, precision) in enumerate([("predictor", "fp32"), ("step", "fp32"), ("step", "fp16")]):
        buf = io.BytesIO()
        Image.fromarray(photo[i * 16 : i * 16 + 48, :48]).save(buf, format="PNG")
        file = f"{role}.{precision}.onnx"
        (root / file).write_bytes(buf.getvalue())
        inputs, outputs = _entries(role)
        graphs.append(GraphEntry(role, precision, file, sha256_file(root / file), inputs, outputs, 18))
    alphas_cumprod = np.cumprod(1.0 - np.linspace(1e-6, 1e-2, 200))
    schedule = ScheduleEntry("linear", 200, alphas_cumprod.tolist())
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model_name="tiny",
        scale=4,
        channels=3,
        hr_multiple_of=4,
        value_range=[-1.0, 1.0],
        schedule=schedule,
        graphs=graphs,
        export=ExportSettings(checkpoint="/ckpts/tiny", tile=32, batch=2),
        engines=[],
        parity={"step_fp32": {"max_abs_rel": 3.2e-6}},
        model_config={},
        sampling=sampling_entry(schedule, FAKE_SAMPLING),
    )
    write_manifest(root, manifest)
    return manifest


@pytest.fixture
def bundle_dir(tmp_path: Path, astronaut: np.ndarray) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    build_fake_bundle(root, astronaut)
    return root


def test_manifest_round_trip_is_exact(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    text = (bundle_dir / MANIFEST_NAME).read_text()
    again = Manifest.from_json(text)
    assert again == bundle.manifest and again.to_json() == text
    # float64 alphas_cumprod survive JSON bit for bit
    expected = np.cumprod(1.0 - np.linspace(1e-6, 1e-2, 200))
    assert np.array_equal(bundle.manifest.schedule.array(), expected)
    assert bundle.manifest.graphs[0].inputs[0].dims == ["batch", 3, "lr_height", "lr_width"]


def test_engine_entries_round_trip(bundle_dir: Path) -> None:
    manifest = load_bundle(bundle_dir).manifest
    key = EngineKey(
        "10.9.0",
        "NVIDIA H100",
        "9.0",
        "fp16",
        {"min": {"batch": 1}, "opt": {"batch": 2}, "max": {"batch": 2}},
        "ab" * 32,
    )
    with_engine = dataclasses.replace(
        manifest, engines=[EngineEntry("step", "fp16", "step.plan", "cd" * 32, key)]
    )
    assert Manifest.from_json(with_engine.to_json()) == with_engine


def test_graph_path_and_precisions(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.graph_path("step", "fp16") == bundle_dir / "step.fp16.onnx"
    assert bundle.precisions() == ["fp32"]  # fp16 has a step graph but no predictor
    with pytest.raises(BundleError, match="no fp16 predictor graph.*--precision fp16 --force"):
        bundle.graph_path("predictor", "fp16")


def test_tampered_graph_is_refused_naming_the_file(bundle_dir: Path) -> None:
    target = bundle_dir / "step.fp32.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)
    message = str(info.value)
    assert "step.fp32.onnx" in message and "sha256" in message
    # The manifest's checkpoint is not on this machine: the hint says so instead of naming it as a command.
    assert "the manifest names /ckpts/tiny, which is not here" in message
    assert "esrdf-export --ckpt CKPT_DIR --out" in message and "--force" in message
    assert "\n" not in message
    assert isinstance(load_bundle(bundle_dir, verify=False), Bundle)  # explicit opt-out still loads


def test_missing_graph_file_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "predictor.fp32.onnx").unlink()
    with pytest.raises(BundleError, match="predictor.fp32.onnx: listed in the manifest but missing"):
        load_bundle(bundle_dir, verify=False)


def _edit_manifest(bundle_dir: Path, edit) -> None:
    path = bundle_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.update(format_version=3), "format version 3; this runtime reads version 2"),
        (lambda d: d.update(tile_size=64), r"unknown key\(s\) \['tile_size'\]"),
        (lambda d: d.pop("scale"), r"missing key 'scale'"),
        (lambda d: d["graphs"][0].update(precision="int8"), "'int8' is not one of"),
        (lambda d: d["graphs"][0]["inputs"][0].update(dims=["batch", 3.5, "h", "w"]), "matches none of"),
        (lambda d: d["schedule"]["alphas_cumprod"].pop(), "199 alphas_cumprod values for 200 timesteps"),
        (lambda d: d["graphs"][1]["inputs"][0].update(name="x"), "differ from the step graph contract"),
    ],
)
def test_bad_manifest_is_refused(bundle_dir: Path, edit, match: str) -> None:
    _edit_manifest(bundle_dir, edit)
    with pytest.raises(BundleError, match=match):
        load_bundle(bundle_dir)


def test_a_version_1_bundle_gets_one_line_naming_its_re_export_command(
    bundle_dir: Path, tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpts" / "v1"
    ckpt.mkdir(parents=True)  # the checkpoint is named only where it exists

    def as_version_1(d: dict) -> None:  # version 1 kept tile, batch and checkpoint in a free export_info
        d.update(format_version=1, export_info={**d.pop("export"), "checkpoint": str(ckpt)})
        for key in ("torch_weights", "provenance"):
            d.pop(key)

    _edit_manifest(bundle_dir, as_version_1)
    with pytest.raises(BundleError) as info:
        load_bundle(bundle_dir)
    message = str(info.value)
    assert "\n" not in message and "format version 1; this runtime reads version 2" in message
    assert message.endswith(
        f"re-export with: esrdf-export --ckpt {ckpt} --out {bundle_dir} --precision both --force"
    )


def test_the_shipped_bundle_is_restored_by_reinstalling_never_by_force() -> None:
    from esrdf.default_model import default_bundle_dir

    shipped = load_bundle(default_bundle_dir(), verify=False)
    with pytest.raises(BundleError) as info:
        shipped.graph_path("step", "fp16")  # it ships fp32 graphs only
    message = str(info.value)
    assert "reinstall the package" in message and "pip install --force-reinstall" in message
    assert "esrdf-export" not in message and " --force " not in message and "\n" not in message


def test_a_missing_bundle_path_says_it_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as info:
        load_bundle(tmp_path / "nowhere")
    assert (
        str(info.value)
        == f"{tmp_path / 'nowhere'}: does not exist (expected a bundle folder written by esrdf-export)"
    )


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not an ESRDF bundle"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


# ---------------------------------------------------------------- atomic writing


def test_write_bundle_atomically_creates_and_refuses_existing(tmp_path: Path, astronaut: np.ndarray) -> None:
    target = tmp_path / "out" / "bundle"
    result = write_bundle_atomically(target, lambda root: build_fake_bundle(root, astronaut))
    assert load_bundle(target).manifest == result
    with pytest.raises(BundleError, match="already exists; pass --force"):
        write_bundle_atomically(target, lambda root: build_fake_bundle(root, astronaut[::-1]))
    assert load_bundle(target).manifest == result  # untouched
    replaced = write_bundle_atomically(
        target, lambda root: build_fake_bundle(root, astronaut[::-1]), force=True
    )
    assert load_bundle(target).manifest == replaced != result
    assert sorted(p.name for p in target.parent.iterdir()) == ["bundle"]  # no temp or old dirs left


@pytest.mark.parametrize("error", [RuntimeError("export failed"), KeyboardInterrupt()])
def test_failed_build_leaves_nothing(tmp_path: Path, astronaut: np.ndarray, error: BaseException) -> None:
    def build(root: Path) -> None:
        build_fake_bundle(root, astronaut)
        raise error

    target = tmp_path / "bundle"
    with pytest.raises(type(error)):
        write_bundle_atomically(target, build)
    assert list(tmp_path.iterdir()) == []


def test_failed_rebuild_keeps_the_old_bundle(tmp_path: Path, astronaut: np.ndarray) -> None:
    target = tmp_path / "bundle"
    old = write_bundle_atomically(target, lambda root: build_fake_bundle(root, astronaut))

    def inconsistent(root: Path) -> None:  # a manifest whose hash does not match its file
        build_fake_bundle(root, astronaut[::-1])
        (root / "step.fp16.onnx").write_bytes(b"truncated")

    with pytest.raises(BundleError, match="step.fp16.onnx: sha256 does not match"):
        write_bundle_atomically(target, inconsistent, force=True)
    assert load_bundle(target).manifest == old
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_force_never_deletes_an_unrelated_folder(tmp_path: Path, astronaut: np.ndarray) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(astronaut[:32, :32]).save(photos / "a.png")
    with pytest.raises(BundleError, match="not an ESRDF bundle; refusing"):
        write_bundle_atomically(photos, lambda root: build_fake_bundle(root, astronaut), force=True)
    assert [p.name for p in photos.iterdir()] == ["a.png"]


# ---- the sampling section ---------------------------------------------------------------------------------


def test_sampling_section_round_trips_with_its_prior_std(bundle_dir: Path) -> None:
    manifest = load_bundle(bundle_dir).manifest
    ab = manifest.schedule.array()
    assert manifest.sampling == SamplingEntry("ddim", 20, 1.0, "matched", float(np.sqrt(1.0 - ab[-1])))
    assert 0.79 < manifest.sampling.init_noise_std < 0.80  # the paper's schedule ends at alpha_bar ~= 0.367
    assert manifest.sampling_defaults() == FAKE_SAMPLING
    data = json.loads((bundle_dir / MANIFEST_NAME).read_text())
    assert set(data["sampling"]) == {"sampler", "steps", "eta", "prior", "init_noise_std"}
    paper = sampling_entry(manifest.schedule, SamplingOptions(prior="paper"))
    assert (paper.sampler, paper.steps, paper.eta, paper.init_noise_std) == ("ddim", 50, 0.0, 1.0)
    again = dataclasses.replace(manifest, sampling=paper)
    assert Manifest.from_json(again.to_json()) == again


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update(init_noise_std=1.0), "is not the matched prior's"),
        (lambda s: s.update(prior="uniform"), "'uniform' is not one of"),
        (lambda s: s.update(sampler="ddpm"), "ddpm runs all T=200 steps"),
        (lambda s: s.update(steps=201), r"steps must be in 1\.\.200"),
        (lambda s: s.update(eta=1.5), r"eta must be in \[0, 1\]"),
        (lambda s: s.update(seed=3), r"unknown key\(s\) \['seed'\]"),
        (lambda s: s.pop("eta"), "missing key 'eta'"),
    ],
)
def test_bad_sampling_section_is_refused(bundle_dir: Path, edit, match: str) -> None:
    _edit_manifest(bundle_dir, lambda d: edit(d["sampling"]))
    with pytest.raises(BundleError, match=match) as info:
        load_bundle(bundle_dir)
    assert "esrdf-export --ckpt" in str(info.value)  # the re-export hint


def test_a_bundle_without_sampling_defaults_loads_with_one_notice_per_load(
    bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bundles exported before the section existed run the built-in defaults, and say so once per load."""
    _edit_manifest(bundle_dir, lambda d: d.pop("sampling"))
    with caplog.at_level("WARNING", logger="esrdf.runtime.bundle"):
        manifest = load_bundle(bundle_dir).manifest
        notices = [r.getMessage() for r in caplog.records]
        assert manifest.sampling is None and manifest.sampling_defaults() == SamplingOptions()
        assert len(notices) == 1 and "\n" not in notices[0], notices
        assert "built-in ones: ddim, 50 steps, eta 0, matched prior (x_T std 0.7959)" in notices[0]
        # /ckpts/tiny (the manifest's checkpoint) is not on this machine, so the hint says so
        assert "the manifest names /ckpts/tiny, which is not here" in notices[0]
        assert notices[0].endswith(f"--ckpt CKPT_DIR --out {bundle_dir} --precision both --force")
        load_bundle(bundle_dir)
        assert len(caplog.records) == 2  # once per load
        caplog.clear()
        _edit_manifest(bundle_dir, lambda d: d.update(sampling=_section(d)))
        assert load_bundle(bundle_dir).manifest.sampling is not None and not caplog.records


def _section(d: dict) -> dict:
    """FAKE_SAMPLING as the export writes it into the manifest ``d``."""
    schedule = ScheduleEntry(**d["schedule"])
    return dataclasses.asdict(sampling_entry(schedule, FAKE_SAMPLING))
