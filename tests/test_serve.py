"""esrdf-serve on loopback: standard Triton clients, real photos, results equal to the in-process runtime.

The server is a subprocess (``python -m esrdf.runtime.serving.serve``) on free 127.0.0.1 ports, stopped in a
finally by SIGINT (then SIGKILL to its process group, so no tritonserver outlives the test).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from tiny_bundle import tiny_bundle

from esrdf.config import SamplingOptions
from esrdf.runtime import Upscaler

pytest.importorskip("pytriton", reason="esrdf-serve needs the serve extra: pip install 'esrdf[serve]'")
http = pytest.importorskip("tritonclient.http", reason="needs tritonclient[http,grpc] (the serve extra)")
grpc = pytest.importorskip("tritonclient.grpc", reason="needs tritonclient[http,grpc] (the serve extra)")

# A tritonserver subprocess per module: ~15 s of start-up and shutdown on 2 cores.
pytestmark = pytest.mark.slow

STEPS = 3
START_TIMEOUT_S = 120.0


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # tritonserver and the Python-backend stubs, if any are left
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    bundle = tiny_bundle(tmp_path_factory.getbasetemp())
    http_port, grpc_port, metrics_port = _free_ports(3)
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "esrdf.runtime.serving.serve", "--engine", str(bundle),
           "--host", "127.0.0.1",
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--workers", "2", "--threads", "1", "--max-batch", "8", "--exit-timeout", "5"]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = http.InferenceServerClient(f"127.0.0.1:{http_port}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"esrdf-serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if client.is_model_ready("esrdf") and client.is_model_ready("esrdf_tiles"):
                    break
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"esrdf-serve not ready after {START_TIMEOUT_S} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        client.close()
        yield {"bundle": bundle, "http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}",
               "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "log": log_path}  # fmt: skip
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def crops(eval_photos: dict[str, np.ndarray]) -> list[np.ndarray]:
    boxes = [("astronaut", 60, 180, 12, 16), ("coffee", 100, 200, 9, 13), ("chelsea", 120, 150, 16, 16),
             ("china", 150, 300, 14, 10), ("flower", 200, 250, 11, 18),
             ("rocket", 200, 100, 7, 11)]  # fmt: skip
    return [np.ascontiguousarray(eval_photos[n][y : y + h, x : x + w]) for n, y, x, h, w in boxes]


@pytest.fixture(scope="module")
def reference(server: dict[str, Any]) -> Upscaler:
    # esrdf-serve's workers run onnxruntime (its default backend) with 1 intra-op thread
    return Upscaler(server["bundle"], "onnxruntime", threads=1)


def _infer(module: Any, client: Any, rgb: np.ndarray, seed: int, steps: int = STEPS) -> np.ndarray:
    arrays = {"image": (rgb, "UINT8"), "seed": (np.array([seed], np.uint64), "UINT64"),
              "steps": (np.array([steps], np.int32), "INT32"),
              "sampler": (np.array([b"ddim"], object), "BYTES")}  # fmt: skip
    inputs = []
    for name, (value, dtype) in arrays.items():
        tensor = module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return client.infer("esrdf", inputs).as_numpy("image")


def test_one_client_gets_the_in_process_runtime_bytes(
    server: dict[str, Any], reference: Upscaler, crops: list[np.ndarray]
) -> None:
    """One request at a time, the tile model sees the batches the driver makes in-process: same bytes."""
    client = http.InferenceServerClient(server["http"])
    try:
        for i, crop in enumerate(crops[:3]):
            out = _infer(http, client, crop, seed=i)
            assert out.shape == (crop.shape[0] * 4, crop.shape[1] * 4, 3) and out.dtype == np.uint8
            np.testing.assert_array_equal(out, reference(crop, SamplingOptions(steps=STEPS, seed=i)))
    finally:
        client.close()


def test_concurrent_http_and_grpc_clients_match_the_runtime(
    server: dict[str, Any], reference: Upscaler, crops: list[np.ndarray]
) -> None:
    """Several threads at once: Triton merges tiles of different requests into one engine batch. Batched
    float kernels may round a row differently from a smaller batch (the tiny predictor by ~1e-7 here), so a
    uint8 value may flip by one level; anything more is a wrong tile, seed or blend."""
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []

    def client_thread(module: Any, url: str, seed: int) -> None:
        client = module.InferenceServerClient(url)
        try:
            for i, crop in enumerate(crops):
                results[(i, seed)] = _infer(module, client, crop, seed)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            client.close()

    plan = [
        (http, server["http"], 10),
        (grpc, server["grpc"], 11),
        (http, server["http"], 12),
        (grpc, server["grpc"], 13),
    ]
    threads = [threading.Thread(target=client_thread, args=args) for args in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    assert len(results) == len(crops) * len(plan)
    for (i, seed), out in results.items():
        want = reference(crops[i], SamplingOptions(steps=STEPS, seed=seed))
        diff = np.abs(out.astype(np.int16) - want.astype(np.int16))
        assert diff.max() <= 1 and np.mean(diff == 0) >= 0.99, f"crop {i} seed {seed}: max {diff.max()}"
    assert np.mean(results[(0, 10)] != results[(0, 11)]) > 0.5  # each request's own seed reached its tiles


def test_a_bad_request_gets_its_own_error(server: dict[str, Any], crops: list[np.ndarray]) -> None:
    client = http.InferenceServerClient(server["http"])
    try:
        with pytest.raises(Exception, match=r"steps must be in 1\.\.200"):
            _infer(http, client, crops[0], seed=0, steps=500)
        assert _infer(http, client, crops[1], seed=0).shape == (36, 52, 3)  # the server goes on
    finally:
        client.close()


def test_health_and_metrics_are_tritons_own(server: dict[str, Any]) -> None:
    with urllib.request.urlopen(f"http://{server['http']}/v2/health/ready", timeout=10) as response:
        assert response.status == 200
    with urllib.request.urlopen(server["metrics"], timeout=10) as response:
        metrics = response.read().decode()
    success = [
        line for line in metrics.splitlines() if line.startswith('nv_inference_request_success{model="esrdf"')
    ]
    assert success and float(success[0].rsplit(" ", 1)[1]) >= 3, metrics[:2000]
    assert 'nv_inference_exec_count{model="esrdf_tiles"' in metrics
