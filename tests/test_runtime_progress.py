"""Progress a person can read: plain lines off a terminal (per image, every ~10 s); units and ETA on one."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image
from rich.console import Console

from esrdf.runtime.cli import main
from esrdf.runtime.progress import BarProgress, ImageCount, LineProgress, tiles_done


class Clock:
    """A clock the test moves by hand (the lines' timing is what is tested, not the machine's speed)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def recording_console(terminal: bool) -> tuple[Console, io.StringIO]:
    stream = io.StringIO()
    console = Console(file=stream, force_terminal=terminal, width=120, soft_wrap=True, highlight=False)
    return console, stream


def test_calls_become_tiles_in_proportion() -> None:
    assert [tiles_done(done, 84, 40) for done in (0, 21, 42, 84)] == [0, 10, 20, 40]


def test_plain_lines_every_ten_seconds_and_per_image() -> None:
    console, stream = recording_console(terminal=False)
    clock = Clock()
    lines = LineProgress(console, every=10.0, clock=clock)
    lines.start_run()
    with lines.image(ImageCount(2, 3, "face.png", tiles=40)) as update:
        for done in range(1, 85):  # 84 engine calls, 0.5 s each
            clock.now += 0.5
            update(done, 84)
    out = stream.getvalue().splitlines()
    during, after = out[:-1], out[-1]
    assert len(during) == 4  # at 10, 20, 30 and 40 s of a 42 s image
    assert during[0] == "[2/3] face.png: 9/40 tiles, 0.95 tiles/s, ETA 32 s"
    assert after == "[2/3] face.png: 40/40 tiles in 42 s (0.95 tiles/s); 1 image left, ETA 42 s"


def test_a_terminal_gets_bars_with_units_and_eta() -> None:
    console, stream = recording_console(terminal=True)
    bar = BarProgress(console, images=3)
    bar.start_run()
    with bar.image(ImageCount(1, 3, "face.png", tiles=40)) as update:
        update(42, 84)
        bar._progress.refresh()  # draw now, not at the next tick of rich's refresh thread
    bar.stop()
    drawn = stream.getvalue()
    assert "[1/3] face.png" in drawn and "20/40 tiles" in drawn and "0/3 images" in drawn and "ETA" in drawn


def test_a_piped_run_prints_a_line_per_image(tmp_path: Path, eval_photos: dict[str, np.ndarray]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(eval_photos["astronaut"][100:116, 180:200]).save(folder / "a.png")
    Image.fromarray(eval_photos["coffee"][100:113, 200:217]).save(folder / "b.png")
    result = CliRunner().invoke(main, ["-i", str(folder), "-o", str(tmp_path / "out"), "--steps", "1"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].startswith("[1/2] a.png: 1/1 tiles in ") and "1 image left, ETA" in lines[0]
    assert lines[1] == f"wrote {tmp_path / 'out' / 'a.png'}"
    assert lines[2].startswith("[2/2] b.png: 1/1 tiles in ") and "0 images left, ETA 0 s" in lines[2]
