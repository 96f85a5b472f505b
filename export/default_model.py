"""Ship the default model: export its onnxruntime bundle and install checkpoint + bundle into the package.

The model package's recipe (``esrdf.default_model.recipe``) trains the model and evaluates it; writing the
bundle is the export layer's work, so shipping lives here, above the model package, which never imports
export code. Two commands:

    python -m esrdf.export.default_model ship --out out/default_model    # after the recipe's ``train``
    python -m esrdf.export.default_model reexport                         # the installed checkpoint again

``ship`` stores the trained checkpoint for inference (``recipe.ship_checkpoint``: EMA U-Net, fp16 tensors),
exports the bundle from it, and installs both. ``reexport`` exports the installed checkpoint again into the
installed bundle, with the same settings: what a new bundle format version needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from esrdf.atomic import atomic_dir
from esrdf.default_model.recipe import DIFFUSION_DIR, PACKAGE_DIR, SHIP_CKPT_DIR, ship_checkpoint
from esrdf.export.bundle_writer import DEFAULT_BATCH, DEFAULT_OPSET, DEFAULT_TILE, export_bundle

BUNDLE_DIR = "bundle"
CHECKPOINT_DIR = "checkpoint"


def export_default_bundle(ckpt: Path, out: Path) -> Path:
    """The shipped bundle's settings: fp32 graphs only, no torch weights (the package budget), the default
    tile, batch and opset; replaces ``out``."""
    return export_bundle(
        ckpt, out, precision="fp32", opset=DEFAULT_OPSET, tile=DEFAULT_TILE, batch=DEFAULT_BATCH,
        torch_weights=False, force=True,
    )  # fmt: skip


def _relative(path: Path) -> Path:
    """``path`` relative to the working directory when under it: the manifest quotes the checkpoint path
    in re-export hints, and a shipped file should not carry this machine's absolute paths."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return path


def install(sources: dict[str, Path], package_dir: Path) -> dict[str, int]:
    """Copy each source folder into ``package_dir/<name>``, replacing what is there; file sizes."""
    sizes: dict[str, int] = {}
    for name, src in sources.items():
        dst = package_dir / name
        with atomic_dir(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        sizes |= {f"{name}/{f.name}": f.stat().st_size for f in sorted(dst.iterdir()) if f.is_file()}
    return sizes


def ship_default_model(out: Path, package_dir: Path = PACKAGE_DIR) -> dict[str, int]:
    """Store the trained checkpoint for inference, export its bundle, install both; file sizes."""
    ckpt = ship_checkpoint(out / DIFFUSION_DIR, out / SHIP_CKPT_DIR)
    bundle = export_default_bundle(ckpt, out / BUNDLE_DIR)
    return install({CHECKPOINT_DIR: ckpt, BUNDLE_DIR: bundle}, package_dir)


def reexport_default_bundle(out: Path, package_dir: Path = PACKAGE_DIR) -> dict[str, int]:
    """Export the installed checkpoint again (into ``out``) and install the bundle; file sizes."""
    bundle = export_default_bundle(_relative(package_dir / CHECKPOINT_DIR), out / BUNDLE_DIR)
    return install({BUNDLE_DIR: bundle}, package_dir)


@click.group()
def main() -> None:
    """Ship the default model into esrdf/default_model/."""


@main.command("ship")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/default_model"), show_default=True)
@click.option("--package-dir", type=click.Path(path_type=Path), default=PACKAGE_DIR, show_default=True)
def ship_command(out: Path, package_dir: Path) -> None:
    """Export the bundle of the model trained into --out; install checkpoint + bundle."""
    click.echo(json.dumps(ship_default_model(out, package_dir), indent=2))


@main.command("reexport")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/default_model"), show_default=True)
@click.option("--package-dir", type=click.Path(path_type=Path), default=PACKAGE_DIR, show_default=True)
def reexport_command(out: Path, package_dir: Path) -> None:
    """Export the installed checkpoint again and install the bundle (e.g. for a new bundle format)."""
    click.echo(json.dumps(reexport_default_bundle(out, package_dir), indent=2))


if __name__ == "__main__":
    main()
