"""One check shared by the engine tests: concurrent calls on one ``Upscaler`` equal its serial calls."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from esrdf.config import SamplingOptions


def assert_threads_match_serial(upscaler: Any, images: list[np.ndarray]) -> None:
    """One thread per image on ``upscaler`` at once; each result bit-identical to its serial call."""
    expected = [upscaler(img, SamplingOptions(steps=2, seed=i)) for i, img in enumerate(images)]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        results[i] = upscaler(images[i], SamplingOptions(steps=2, seed=i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(images)):
        np.testing.assert_array_equal(results[i], expected[i])
