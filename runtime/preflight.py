"""Checks that run before any compute: the run's settings against the bundle, and that outputs can be written.

A setting the bundle's graphs cannot take (a tile that is not a multiple of the graphs' size multiple, an
overlap not below the tile, a batch other than a fixed-batch graph's, a precision the bundle has no graphs
for) is one ``RunSettingsError`` when the ``Upscaler`` is made, not one failure per image. An output that
cannot be written (read-only or immutable folder, a folder where a file should go) is found by creating
its folder and writing a probe file there before the first image is read: one line naming the output, and
nothing left behind (the probe is removed, and folders made for a run that then fails are removed again).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from esrdf.runtime.driver import fixed_shape

if TYPE_CHECKING:
    from esrdf.runtime.bundle import Bundle


class RunSettingsError(ValueError):
    """Tile, overlap, batch or precision that the bundle's graphs cannot run; one line."""


class OutputError(OSError):
    """An output that cannot be created; ``str()`` is one line naming it."""


def resolve_tiling(
    bundle: Bundle, precision: str | None, tile: int | None, overlap: int | None, batch: int | None
) -> tuple[int, int, int]:
    """(tile, overlap, batch) for this bundle: the caller's, else the graphs' fixed size, else the export's.

    ``precision`` names the graphs the engine will read (None: an engine that reads none, the eager torch
    one). Default overlap is 1/8 of the tile (8 LR pixels for 64-pixel tiles): work grows as
    1/(tile - overlap)^2.
    """
    manifest = bundle.manifest
    if precision is not None and precision not in bundle.precisions():
        raise RunSettingsError(
            f"{bundle.root}: no {precision} graphs in this bundle (it has {', '.join(bundle.precisions())}); "
            f"pass --precision {bundle.precisions()[0] if bundle.precisions() else 'fp32'}"
        )
    fixed_batch, fixed_tile = fixed_shape(manifest)
    exported = manifest.export
    tile = next(c for c in (tile, fixed_tile, exported.tile) if c is not None)
    batch = next(c for c in (batch, fixed_batch, exported.batch) if c is not None)
    multiple = manifest.lr_multiple_of
    if fixed_tile is not None and tile != fixed_tile:
        raise RunSettingsError(
            f"this bundle's graphs take {fixed_tile}-pixel LR tiles only; got --tile {tile}"
        )
    if tile < 0 or tile % multiple or (0 < tile < multiple):
        raise RunSettingsError(
            f"--tile {tile}: must be 0 (whole image) or a positive multiple of {multiple} LR pixels "
            f"for this bundle's graphs (the default is {exported.tile})"
        )
    if batch < 1 or (fixed_batch is not None and batch != fixed_batch):
        raise RunSettingsError(
            f"--batch {batch}: this bundle's graphs take {fixed_batch or 'a positive'} tiles"
        )
    if tile == 0:
        return 0, 0, batch
    chosen = tile // 8 if overlap is None else overlap
    if not 0 <= chosen < tile:
        raise RunSettingsError(f"--overlap {chosen}: must be in [0, tile={tile})")
    return tile, chosen, batch


def _missing_ancestors(folder: Path) -> list[Path]:
    """``folder`` and its parents that do not exist yet, deepest first (the folders a run would create)."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def probe_folder(folder: Path) -> None:
    """Create ``folder`` if needed and write (then remove) a probe file in it; else ``OutputError``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{folder}: cannot create the output folder (a file of that name exists)") from None
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".esrdf-probe-", dir=folder)
    except OSError as exc:
        raise OutputError(f"{folder}: cannot write outputs into this folder ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_target(target: Path) -> None:
    """An output path that is an existing folder cannot be replaced by an image."""
    if target.is_dir():
        raise OutputError(f"{target}: the output is an existing folder, not an image file")


@contextmanager
def prepared_outputs(targets: Iterable[Path]) -> Iterator[None]:
    """Probe every output's folder before the work; if the block fails, remove the folders made here that
    are still empty, so a run that fails before writing leaves nothing behind."""
    targets = list(targets)
    folders = sorted({t.parent for t in targets})
    created = [p for folder in folders for p in _missing_ancestors(folder)]
    try:
        for target in targets:
            check_target(target)
        for folder in folders:
            probe_folder(folder)
        yield
    except BaseException:
        for folder in sorted(set(created), key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                pass
        raise
