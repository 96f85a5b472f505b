"""``esrdf-run``'s errors come before compute, as one line, with a non-zero exit and nothing left behind.

Runs the shipped default model (a real bundle, no torch needed) on crops of real photos, at one sampler
step so that the runs which do compute stay short.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from esrdf.default_model import default_bundle_dir
from esrdf.runtime.cli import main
from esrdf.runtime.images import PARTIAL_SUFFIX


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def one_line(output: str) -> str:
    """The single non-empty line of ``output``; fails on tracebacks or several lines."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output and len(lines) == 1, output
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """Temp, partial and probe files a run may have left in ``folder``."""
    if not folder.is_dir():
        return []
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(PARTIAL_SUFFIX)]


@pytest.fixture
def photo_folder(tmp_path: Path, eval_photos: dict[str, np.ndarray]) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(eval_photos["astronaut"][100:116, 180:200]).save(folder / "face.png")
    Image.fromarray(eval_photos["coffee"][100:113, 200:217]).save(folder / "coffee.png")
    return folder


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can write into, root included (``chattr +i``); skipped where chattr is unavailable."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root on a filesystem that supports it)")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# ---------------------------------------------------------------- unwritable outputs


def test_an_unwritable_output_file_fails_before_compute_naming_the_output(photo_folder, immutable) -> None:
    target = immutable / "face_x4.png"
    code, output = run_cli("-i", str(photo_folder / "face.png"), "-o", str(target), "--steps", "1")
    line = one_line(output)
    assert code == 2 and str(immutable) in line and "cannot write outputs into this folder" in line
    assert "wrote" not in output and list(immutable.iterdir()) == []


def test_a_folder_run_into_an_unwritable_folder_is_one_line_not_a_traceback(photo_folder, immutable) -> None:
    target = immutable / "out" / "deeper"
    code, output = run_cli("-i", str(photo_folder), "-o", str(target), "--steps", "1")
    line = one_line(output)
    assert code == 2 and str(immutable / "out") in line and "cannot create the output folder" in line
    assert list(immutable.iterdir()) == []


def test_an_output_folder_that_is_a_file_is_refused_and_created_folders_are_removed(
    photo_folder, tmp_path
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the output folder should go")
    code, output = run_cli(
        "-i", str(photo_folder / "face.png"), "-o", str(blocker / "x4" / "face.png"), "--steps", "1"
    )
    assert code == 2 and str(blocker / "x4") in one_line(output)
    # A run that fails after the pre-flight check made its folders leaves no empty folder behind.
    fresh = tmp_path / "new" / "nested"
    code, output = run_cli(
        "-i", str(photo_folder / "face.png"), "-o", str(fresh / "f.png"), "--tile", "3", "--steps", "1"
    )
    assert code == 2 and not (tmp_path / "new").exists()


# ---------------------------------------------------------------- settings checked once, at start


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tile", "3"], "--tile 3: must be 0 (whole image) or a positive multiple of 2 LR pixels"),
        (["--tile", "1"], "--tile 1: must be 0 (whole image) or a positive multiple of 2 LR pixels"),
        (["--tile", "16", "--overlap", "16"], "--overlap 16: must be in [0, tile=16)"),
        (["--precision", "fp16"], "no fp16 graphs in this bundle (it has fp32); pass --precision fp32"),
        (["--output-bits", "16", "-o", "JPG"], "holds 8 bits; write .png or .tif"),
    ],
)
def test_settings_the_bundle_cannot_take_fail_once_with_exit_2(photo_folder, tmp_path, args, message) -> None:
    out = tmp_path / "out"
    if "JPG" in args:  # a single image into a JPEG: 16 bits cannot be held
        args = [a if a != "JPG" else str(out / "face.jpg") for a in args]
        code, output = run_cli("-i", str(photo_folder / "face.png"), "--steps", "1", *args)
    else:
        code, output = run_cli("-i", str(photo_folder), "-o", str(out), "--steps", "1", *args)
    line = one_line(output)
    assert code == 2 and message in line
    assert not out.exists()


# ---------------------------------------------------------------- bundles and engines


def test_a_missing_bundle_says_it_does_not_exist(photo_folder, tmp_path) -> None:
    code, output = run_cli(
        "--engine", str(tmp_path / "nowhere"), "-i", str(photo_folder), "-o", str(tmp_path / "o")
    )
    assert (
        code == 1
        and one_line(output)
        == f"Error: {tmp_path / 'nowhere'}: does not exist (expected a bundle folder written by esrdf-export)"
    )
    assert not (tmp_path / "o").exists()


def _rehash(bundle: Path, name: str) -> None:
    """Make the manifest's sha256 of ``name`` match the file again, as a careless edit would."""
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for graph in manifest["graphs"]:
        if graph["file"] == name:
            graph["sha256"] = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))


def test_a_corrupt_graph_with_a_matching_sha256_is_one_line_naming_the_file(photo_folder, tmp_path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_dir(), bundle)
    step = bundle / "step.onnx"
    data = step.read_bytes()
    step.write_bytes(data[: len(data) // 3])  # a truncated protobuf
    _rehash(bundle, "step.onnx")
    out = tmp_path / "out"
    code, output = run_cli("--engine", str(bundle), "-i", str(photo_folder), "-o", str(out), "--steps", "1")
    line = one_line(output)
    assert code == 1 and f"{step}: cannot be loaded by this engine" in line and "re-export the bundle" in line
    assert not out.exists()


def test_every_engine_reports_a_load_failure_in_the_same_form(tmp_path) -> None:
    """The one place (``loading_engine_file``) the onnxruntime, torch, TensorRT and OpenVINO engines use."""
    from esrdf.runtime.engine import EngineError, loading_engine_file

    graph = tmp_path / "step.plan"
    with pytest.raises(EngineError) as info, loading_engine_file(graph):
        raise RuntimeError("first line of a library's error\nand a second line\n")
    assert str(info.value) == (
        f"{graph}: cannot be loaded by this engine (RuntimeError: first line of a library's error); "
        "the file is corrupt or was written by an incompatible exporter: re-export the bundle"
    )
    with pytest.raises(EngineError, match="^device"), loading_engine_file(graph):
        raise EngineError("device 'cuda' requested")  # the engines' own one-line errors pass unchanged


# ---------------------------------------------------------------- inputs


def test_an_empty_input_folder_says_no_images_found(tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, output = run_cli("-i", str(empty), "-o", str(tmp_path / "out"))
    assert code == 2 and one_line(output).startswith(f"Error: no images found in {empty}")
    assert not (tmp_path / "out").exists()


def test_a_good_run_leaves_only_its_outputs(photo_folder, tmp_path) -> None:
    out = tmp_path / "out"
    code, output = run_cli("-i", str(photo_folder), "-o", str(out), "--steps", "1")
    assert code == 0 and "Traceback" not in output and "2 upscaled, 0 already done, 0 failed" in output
    assert sorted(p.name for p in out.iterdir()) == ["coffee.png", "face.png"] and leftovers(out) == []
