"""esrdf.atomic: a target holds the old content or the whole new one; an interrupted write leaves nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from esrdf.atomic import atomic_dir, atomic_path, link_or_copy


def test_atomic_path_replaces_the_target_only_when_complete(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt), atomic_path(target, suffix=".tmp") as tmp:
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".weights.bin.")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and target.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.bin"]


def test_atomic_dir_publishes_a_whole_folder_or_keeps_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    with atomic_dir(target, fsync=True) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not target.exists()  # nothing at the target while it is being built
    assert (target / "a.txt").read_text() == "1" and target.stat().st_mode & 0o777 == 0o755
    with pytest.raises(ValueError, match="refused"), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("2")
        raise ValueError("refused at the last check")
    assert (target / "a.txt").read_text() == "1"
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging or old folder left


def test_link_or_copy_links_within_a_filesystem(tmp_path: Path) -> None:
    src = tmp_path / "graph.onnx"
    src.write_bytes(b"graph")
    link_or_copy(src, tmp_path / "repo" / "1" / "model.onnx")
    dst = tmp_path / "repo" / "1" / "model.onnx"
    assert dst.read_bytes() == b"graph" and os.path.samefile(src, dst)


def test_replacing_a_folder_never_leaves_the_target_missing(tmp_path: Path) -> None:
    """A reader polling the target while it is replaced over and over always finds a whole folder."""
    import threading

    from esrdf.atomic import exchange_paths

    target = tmp_path / "bundle"
    with atomic_dir(target) as tmp:
        (tmp / "manifest.json").write_text("0")
    if not exchange_paths(tmp_path / "bundle", tmp_path / "bundle"):
        pytest.skip("this system has no renameat2(RENAME_EXCHANGE); publish_dir falls back to two renames")
    missing, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                (target / "manifest.json").read_text()
            except FileNotFoundError:
                missing.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for k in range(1, 200):
            with atomic_dir(target) as tmp:
                (tmp / "manifest.json").write_text(str(k))
    finally:
        stop.set()
        reader.join()
    assert not missing and (target / "manifest.json").read_text() == "199"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # the old folders are gone


def test_file_lock_serialises_read_modify_write_between_threads(tmp_path: Path) -> None:
    import threading
    import time

    from esrdf.atomic import file_lock

    counter = tmp_path / "rows.txt"
    counter.write_text("")

    def add(row: str) -> None:
        with file_lock(counter):
            rows = counter.read_text()
            time.sleep(0.01)  # widen the window a lost update needs
            with atomic_path(counter) as tmp:
                tmp.write_text(rows + row + "\n")

    threads = [threading.Thread(target=add, args=(f"row{k}",)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(counter.read_text().split()) == [f"row{k}" for k in range(8)]
