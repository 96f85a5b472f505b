"""Progress of an ``esrdf-run`` a person can read: images and tiles, with units, rate and ETA.

The driver counts engine calls (``ProgressFn(done, total)``: one predictor call and N step calls per batch
of tiles); people count tiles, so each image's calls are turned into tiles done (in proportion). On a
terminal it is a rich bar per image under one for the run; elsewhere (a pipe, a log file, CI) it is plain
lines: one when an image is done, and one every ``every`` seconds (10) while a long image runs, each with
the image index, tiles done, rate and ETA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from esrdf.runtime.driver import ProgressFn

Clock = Callable[[], float]


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    return f"{minutes} min {sec:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass
class ImageCount:
    """One image's place in the run and its size in tiles."""

    index: int  # 1-based
    count: int
    name: str
    tiles: int

    @property
    def label(self) -> str:
        return f"[{self.index}/{self.count}] {self.name}"


def tiles_done(calls_done: int, calls_total: int, tiles: int) -> int:
    """Engine calls -> whole tiles finished, in proportion (every batch costs the same calls)."""
    return tiles if calls_total <= 0 else min(tiles, calls_done * tiles // calls_total)


@dataclass
class LineProgress:
    """Plain lines for a non-terminal: ``[2/6] face.png: 12/40 tiles, 1.5 tiles/s, ETA 19 s``."""

    console: Console
    every: float = 10.0  # seconds between lines while one image runs
    clock: Clock = time.monotonic
    _run_start: float = field(default=0.0, init=False)
    _images_done: int = field(default=0, init=False)

    def start_run(self) -> None:
        self._run_start = self.clock()

    @contextmanager
    def image(self, image: ImageCount) -> Iterator[ProgressFn]:
        start = last = self.clock()

        def update(done: int, total: int) -> None:
            nonlocal last
            now = self.clock()
            if now - last >= self.every and done < total:
                last = now
                tiles = tiles_done(done, total, image.tiles)
                # From engine calls, not whole tiles: a batch's tiles finish together, minutes apart.
                rate = done * image.tiles / total / (now - start) if now > start else 0.0
                eta = (now - start) * (total - done) / max(done, 1)
                self.console.print(
                    f"{image.label}: {tiles}/{image.tiles} tiles, {rate:.2f} tiles/s, ETA {_duration(eta)}"
                )

        yield update
        now = self.clock()
        self._images_done += 1
        elapsed = now - start
        rate = image.tiles / elapsed if elapsed > 0 else 0.0
        left = image.count - image.index
        run_eta = (now - self._run_start) / self._images_done * left
        self.console.print(
            f"{image.label}: {image.tiles}/{image.tiles} tiles in {_duration(elapsed)} ({rate:.2f} tiles/s); "
            f"{left} image{'s' if left != 1 else ''} left, ETA {_duration(run_eta)}"
        )

    def skipped(self) -> None:
        """An image already done: it counts towards nothing (the ETA follows the images that run)."""


class BarProgress:
    """rich bars on a terminal: the run in images, the current image in tiles, each with its ETA."""

    def __init__(self, console: Console, images: int) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} {task.fields[unit]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._run = self._progress.add_task("run", total=images, unit="images")

    def start_run(self) -> None:
        self._progress.start()

    def stop(self) -> None:
        self._progress.stop()

    @contextmanager
    def image(self, image: ImageCount) -> Iterator[ProgressFn]:
        task = self._progress.add_task(image.label, total=image.tiles, unit="tiles")

        def update(done: int, total: int) -> None:
            self._progress.update(task, completed=tiles_done(done, total, image.tiles))

        try:
            yield update
        finally:
            self._progress.remove_task(task)
        self._progress.advance(self._run)

    def skipped(self) -> None:
        self._progress.advance(self._run)


@contextmanager
def run_progress(console: Console, images: int) -> Iterator[LineProgress | BarProgress]:
    """The bar on a terminal, plain lines elsewhere."""
    if console.is_terminal:
        bar = BarProgress(console, images)
        bar.start_run()
        try:
            yield bar
        finally:
            bar.stop()
        return
    lines = LineProgress(console)
    lines.start_run()
    yield lines
