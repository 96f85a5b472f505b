"""Atomic writes of files and directories: a reader finds at a path the old thing or the whole new one.

Everything is built beside its target (same directory, so the final rename stays on one filesystem, where
POSIX makes it atomic) under a hidden temp name, and renamed into place only when complete. Any exception,
KeyboardInterrupt included, removes the temp file or folder, so a failed or interrupted write leaves
nothing behind. Used by checkpoints, bundles, AOTInductor packages, Triton repositories, the VGG weight
cache, TensorRT timing caches and output images.

Standard library only: the runtime and the model package both use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_TAG = ".partial-"  # a folder being built: ``.<name>.partial-XXXX``
OLD_TAG = ".old-"  # a folder being replaced, between the two renames: ``.<name>.old-XXXX``


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(
    target: str | os.PathLike[str], suffix: str = ".partial", mode: int = 0o644, fsync: bool = False
) -> Iterator[Path]:
    """A temp file beside ``target`` (``.<name>.XXXX<suffix>``) to write; renamed over ``target`` on success.

    The caller writes the file by its path (libraries such as safetensors and PIL take paths). ``mode``
    replaces mkstemp's 0600 (an output file is an ordinary, readable file); ``fsync`` flushes the data to
    disk before the rename, for files that must survive a power loss.
    """
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        if fsync:
            _fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def staging_dir(target: str | os.PathLike[str]) -> Path:
    """A fresh folder beside ``target`` to build into (``.<name>.partial-XXXX``, mode 0755)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{STAGING_TAG}", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; bundles and checkpoints are read by a service's user too
    return tmp


def publish_dir(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename the finished folder ``tmp`` to ``target``.

    An existing ``target`` is first renamed aside to ``.<name>.old-XXXX``, then ``tmp`` is renamed in, then
    the old folder is deleted. Between those two renames ``target`` does not exist for a moment: a reader
    then finds no folder (and fails to open it), never a partial one. A process killed in that moment
    leaves the previous folder complete under its ``.old-`` name, from where it can be renamed back.
    """
    tmp, target = Path(tmp), Path(target)
    if not target.exists():
        tmp.rename(target)
        return
    old = target.parent / f".{target.name}{OLD_TAG}{uuid.uuid4().hex[:8]}"
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(target: str | os.PathLike[str], fsync: bool = False) -> Iterator[Path]:
    """A staging folder to build ``target`` in; published (``publish_dir``) when the block ends normally.

    Checks that must hold at the moment of publishing (the target is still replaceable, the new folder
    verifies) go at the end of the block: raising there removes the staging folder and keeps ``target``.
    ``fsync`` flushes every file of the folder to disk before it is published.
    """
    target = Path(target)
    tmp = staging_dir(target)
    try:
        yield tmp
        if fsync:
            for file in (p for p in tmp.rglob("*") if p.is_file()):
                _fsync(file)
        publish_dir(tmp, target)
        if fsync:
            _fsync(target.parent)  # the renames themselves
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def link_or_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Put ``src`` at ``dst`` (parents created): a hard link, since graphs and plans are hundreds of MB and
    never modified in place, or a copy where a link cannot be made (another filesystem)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
