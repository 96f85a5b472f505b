"""Atomic writes of files and directories: a reader finds at a path the old thing or the whole new one.

Everything is built beside its target (same directory, so the final rename stays on one filesystem, where
POSIX makes it atomic) under a hidden temp name, and renamed into place only when complete. Any exception,
KeyboardInterrupt included, removes the temp file or folder, so a failed or interrupted write leaves
nothing behind. Used by checkpoints, bundles, AOTInductor packages, Triton repositories, the VGG weight
cache, TensorRT timing caches and output images.

Replacing a folder is gapless where the kernel can swap two paths in one step (Linux renameat2 with
RENAME_EXCHANGE, called through ctypes: the standard library has no binding); elsewhere it falls back to two
renames with a moment in between where the target is missing. ``file_lock`` serialises read-modify-write
updates of one target between processes (and threads: each holds its own open file).

Standard library only: the runtime and the model package both use it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
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


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """glibc's renameat2 (2.28+), or None where the platform has none."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    func = getattr(libc, "renameat2", None)
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def exchange_paths(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two existing paths in one atomic step; False where this system cannot (then nothing changed)."""
    func = _renameat2()
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_dir(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename the finished folder ``tmp`` to ``target``; a reader always finds the old or the new folder.

    An existing ``target`` is swapped with ``tmp`` in one step (``exchange_paths``), then the old folder,
    now at ``tmp``, is deleted. Where the swap is unavailable: ``target`` is renamed aside to
    ``.<name>.old-XXXX``, ``tmp`` renamed in, the old folder deleted; between those two renames ``target``
    is missing for a moment (a reader then fails to open it, never sees a partial one), and a process
    killed there leaves the previous folder complete under its ``.old-`` name.
    """
    tmp, target = Path(tmp), Path(target)
    if not target.exists():
        tmp.rename(target)
        return
    if exchange_paths(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = target.parent / f".{target.name}{OLD_TAG}{uuid.uuid4().hex[:8]}"
    target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def file_lock(target: str | os.PathLike[str]) -> Iterator[None]:
    """Exclusive lock for updating ``target`` (a file or folder), held on ``.<name>.lock`` beside it.

    flock: released by the kernel when the holder dies, so a crashed update never blocks the next one.
    The lock file stays (removing it would race with a waiter that has opened it).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


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
