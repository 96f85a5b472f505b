"""UpscalerService: concurrent requests through a worker pool, back-pressure, per-request errors, memory."""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_bundle import tiny_bundle

from esrdf.config import SamplingOptions
from esrdf.runtime import Upscaler
from esrdf.runtime.serving.service import (
    InvalidRequest,
    QueueFull,
    RequestFailed,
    ServiceClosed,
    ServiceConfig,
    UpscalerService,
)

STEPS = 3
THREADS = 1  # intra-op threads per worker, and of the in-process reference (same kernels, same bytes)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_bundle(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def crops(eval_photos: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Small real crops of different sizes (odd, non-square, smaller than a tile)."""
    boxes = [("astronaut", 60, 180, 12, 16), ("coffee", 100, 200, 9, 13), ("chelsea", 120, 150, 16, 16),
             ("rocket", 200, 100, 7, 11), ("china", 150, 300, 14, 10),
             ("flower", 200, 250, 11, 18)]  # fmt: skip
    return [np.ascontiguousarray(eval_photos[n][y : y + h, x : x + w]) for n, y, x, h, w in boxes]


def _config(**kw: object) -> ServiceConfig:
    return ServiceConfig(**{"workers": 2, "threads_per_worker": THREADS, **kw})  # type: ignore[arg-type]


def _truncated_png(rgb: np.ndarray) -> Image.Image:
    """A PNG cut short: PIL opens it lazily, and decoding fails later, in the worker."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) // 2]))


def test_concurrent_requests_equal_the_in_process_runtime(bundle: Path, crops: list[np.ndarray]) -> None:
    reference = Upscaler(bundle, threads=THREADS)
    expected = {
        (i, seed): reference(c, SamplingOptions(steps=STEPS, seed=seed))
        for i, c in enumerate(crops)
        for seed in (0, 9)
    }
    results: dict[tuple[int, int], np.ndarray] = {}
    with UpscalerService(bundle, _config(queue_size=64)) as service:

        def client(seed: int) -> None:
            futures = {
                (i, seed): service.submit(c, SamplingOptions(steps=STEPS, seed=seed))
                for i, c in enumerate(crops)
            }
            results.update({k: f.result(timeout=120) for k, f in futures.items()})

        threads = [threading.Thread(target=client, args=(seed,)) for seed in (0, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = service.stats()
    assert results.keys() == expected.keys()
    for key, want in expected.items():
        assert results[key].shape == (crops[key[0]].shape[0] * 4, crops[key[0]].shape[1] * 4, 3)
        np.testing.assert_array_equal(results[key], want, err_msg=f"crop {key[0]} seed {key[1]}")
    assert not np.array_equal(results[(0, 0)], results[(0, 9)])  # the seed reaches each request
    assert (stats.submitted, stats.completed, stats.failed, stats.queued) == (
        len(expected),
        len(expected),
        0,
        0,
    )


def test_full_queue_rejects_or_times_out_with_queue_full(bundle: Path, crops: list[np.ndarray]) -> None:
    service = UpscalerService(bundle, _config(workers=1, queue_size=2), start=False)
    try:
        queued = [service.submit(crops[0], SamplingOptions(steps=STEPS, seed=s)) for s in range(2)]
        with pytest.raises(QueueFull, match="queue full"):
            service.submit(crops[0], SamplingOptions(steps=STEPS))
        assert service.stats().rejected == 1 and service.stats().queued == 2
        service.start()
        assert all(f.result(timeout=60).shape == (48, 64, 3) for f in queued)
    finally:
        service.close()

    blocking = UpscalerService(
        bundle, _config(workers=1, queue_size=1, on_full="block", block_timeout_s=0.05), False
    )
    try:
        blocking.submit(crops[1], SamplingOptions(steps=STEPS))
        with pytest.raises(QueueFull, match="after waiting 0.05 s"):
            blocking.submit(crops[1], SamplingOptions(steps=STEPS))
    finally:
        blocking.close(cancel_pending=True)


def test_bad_requests_fail_alone_and_the_worker_goes_on(bundle: Path, crops: list[np.ndarray]) -> None:
    reference = Upscaler(bundle, threads=THREADS)
    with UpscalerService(bundle, _config(workers=1)) as service:
        for bad, match in [
            (crops[0].astype(np.float32), "uint8"),
            (crops[0][..., :2], "HxWx3"),
            (crops[0][:0], "HxWx3"),
            ("photo.png", "got str"),
        ]:
            with pytest.raises(InvalidRequest, match=match):
                service.submit(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="steps must be in 1..200"):
            service.submit(crops[0], SamplingOptions(steps=500))
        with pytest.raises(InvalidRequest, match="unknown sampler"):
            service.submit(crops[0], SamplingOptions(sampler="euler"))
        # A truncated PNG passes submit (PIL decodes lazily) and fails in the worker, between good requests.
        before = service.submit(crops[2], SamplingOptions(steps=STEPS, seed=1))
        broken = service.submit(_truncated_png(crops[3]), SamplingOptions(steps=STEPS))
        after = service.submit(crops[4], SamplingOptions(steps=STEPS, seed=2))
        with pytest.raises(RequestFailed, match="truncated") as info:
            broken.result(timeout=60)
        assert isinstance(info.value.__cause__, OSError)
        np.testing.assert_array_equal(
            before.result(timeout=60), reference(crops[2], SamplingOptions(steps=STEPS, seed=1))
        )
        np.testing.assert_array_equal(
            after.result(timeout=60), reference(crops[4], SamplingOptions(steps=STEPS, seed=2))
        )
        assert service.stats().failed == 1 and service.stats().completed == 2


def test_closed_service_refuses_and_cancels_what_is_queued(bundle: Path, crops: list[np.ndarray]) -> None:
    service = UpscalerService(bundle, _config(workers=1, queue_size=4), start=False)
    queued = service.submit(crops[0], SamplingOptions(steps=STEPS))
    service.close(cancel_pending=True)
    with pytest.raises(CancelledError):
        queued.result(timeout=10)
    with pytest.raises(ServiceClosed):
        service.submit(crops[0], SamplingOptions(steps=STEPS))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS is read from Linux /proc")
@pytest.mark.slow
def test_memory_stays_flat_over_hundreds_of_requests(
    bundle: Path, eval_photos: dict[str, np.ndarray]
) -> None:
    """300 requests after warm-up grow RSS by under 8 MiB. A leak of each request's output canvas alone
    (3 x 96 x 96 float32 = 108 KiB per 24 x 24 request) would add about 32 MiB."""
    photo = eval_photos["astronaut"]
    crops = [
        np.ascontiguousarray(photo[y : y + 24, x : x + 24]) for y, x in [(40, 180), (200, 220), (300, 60)]
    ]
    with UpscalerService(
        bundle, _config(tile=0, queue_size=64, on_full="block", block_timeout_s=60)
    ) as service:
        for i in range(30):  # warm-up: allocator pools, onnxruntime arenas, thread stacks
            service.upscale(crops[i % 3], SamplingOptions(steps=1, seed=i), timeout=60)
        before = _rss_bytes()
        for start in range(0, 300, 50):
            futures = [
                service.submit(crops[i % 3], SamplingOptions(steps=1, seed=i))
                for i in range(start, start + 50)
            ]
            for f in futures:
                assert f.result(timeout=60).shape == (96, 96, 3)
        growth = _rss_bytes() - before
        assert service.stats().completed == 330
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 300 requests"
