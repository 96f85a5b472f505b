"""Load test of esrdf-serve on loopback: N concurrent Triton clients, throughput and latency percentiles.

    python -m esrdf.bench.load_test                        # starts esrdf-serve (default model) on free ports
    python -m esrdf.bench.load_test --engine bundle/ --clients 8 --requests 200 --duration 120
    python -m esrdf.bench.load_test --url 127.0.0.1:8000   # an already running server (loopback only)

Bounded twice: it stops after ``--requests`` requests or ``--duration`` seconds, whichever comes first,
and every request has a client timeout. It only ever talks to loopback addresses (refuses others). Each
client thread sends real photo crops (scikit-image's held-out photos) with its own seeds; a warm-up
request per client is not counted. The JSON (default ``out/load_test.json``, git-ignored) holds
throughput (requests/s, output megapixels/s), latency p50/p95/p99/mean/max in ms, errors, the tile
model's mean executed batch (Triton's metrics: how much the dynamic batcher merged), settings, and the
machine (``esrdf.bench.machine.describe_machine``, as every benchmark report has it).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from esrdf.bench.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]


def loopback_only(url: str) -> str:
    host = url.rsplit(":", 1)[0].strip("[]")
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing {url}: the load test only targets loopback addresses")
    return url


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_server(args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    http_port, grpc_port, metrics_port = free_ports(3)
    cmd = [sys.executable, "-m", "esrdf.runtime.serving.serve", "--host", "127.0.0.1",
           "--http-port", str(http_port),
           "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port), "--workers", str(args.workers),
           "--max-batch", str(args.max_batch)]  # fmt: skip
    cmd += ["--engine", args.engine] if args.engine else []
    cmd += ["--tile", str(args.tile)] if args.tile else []
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    urls = {"http": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{grpc_port}"}
    return proc, {**urls, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def wait_ready(client: Any, proc: subprocess.Popen[bytes] | None, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"esrdf-serve exited ({proc.returncode}); see {log_path}")
        try:
            if client.is_model_ready("esrdf"):
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"server not ready after {timeout_s} s; see {log_path}")


def photo_crops(size: int, count: int = 8) -> list[np.ndarray]:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(0)
    crops = []
    for i in range(count):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        crops.append(np.ascontiguousarray(p[y : y + size, x : x + size, :3]))
    return crops


def make_inputs(module: Any, rgb: np.ndarray, seed: int, steps: int) -> list[Any]:
    arrays = [("image", rgb, "UINT8"), ("seed", np.array([seed], np.uint64), "UINT64"),
              ("steps", np.array([steps], np.int32), "INT32")]  # fmt: skip
    inputs = []
    for name, value, dtype in arrays:
        tensor = module.InferInput(name, list(value.shape), dtype)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def run_clients(args: argparse.Namespace, url: str, crops: list[np.ndarray]) -> dict[str, Any]:
    import tritonclient.grpc as grpc_client
    import tritonclient.http as http_client

    module: Any = http_client if args.protocol == "http" else grpc_client
    lock = threading.Lock()
    issued = [0]
    latencies: list[float] = []
    errors: list[str] = []
    pixels = [0]
    start = [0.0]
    barrier = threading.Barrier(args.clients + 1)

    def take() -> int | None:
        with lock:
            if issued[0] >= args.requests or time.monotonic() - start[0] > args.duration:
                return None
            issued[0] += 1
            return issued[0]

    def client(index: int) -> None:
        c = module.InferenceServerClient(url, network_timeout=args.timeout) if args.protocol == "http" else (
            module.InferenceServerClient(url))  # fmt: skip
        try:
            c.infer(
                "esrdf", make_inputs(module, crops[index % len(crops)], 10_000 + index, args.steps)
            )  # warm-up
            barrier.wait()
            while (n := take()) is not None:
                rgb = crops[n % len(crops)]
                t0 = time.perf_counter()
                try:
                    kw = {} if args.protocol == "http" else {"client_timeout": args.timeout}
                    out = c.infer("esrdf", make_inputs(module, rgb, n, args.steps), **kw).as_numpy("image")
                    with lock:
                        latencies.append(time.perf_counter() - t0)
                        pixels[0] += int(out.shape[0] * out.shape[1])
                except Exception as exc:  # noqa: BLE001 - counted, the run goes on
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}"[:300])
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    barrier.wait(timeout=600)
    start[0] = time.monotonic()
    for t in threads:
        t.join(timeout=args.duration + args.timeout + 30)
    wall = time.monotonic() - start[0]
    lat_ms = np.array(latencies) * 1000.0
    pct = {f"p{q}": float(np.percentile(lat_ms, q)) for q in (50, 95, 99)} if len(lat_ms) else {}
    return {
        "completed": len(latencies), "errors": len(errors), "error_samples": errors[:5], "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall else 0.0, "output_mpix_per_s": pixels[0] / wall / 1e6,
        "latency_ms": {**pct, "mean": float(lat_ms.mean()) if len(lat_ms) else None,
                       "max": float(lat_ms.max()) if len(lat_ms) else None},
    }  # fmt: skip


def tile_batching(metrics_url: str) -> dict[str, float]:
    """Tiles per executed batch of esrdf_tiles, from Triton's Prometheus counters (merged requests)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("nv_inference_count", "nv_inference_exec_count"):
            if line.startswith(f'{name}{{model="esrdf_tiles"'):
                values[name] = float(line.rsplit(" ", 1)[1])
    count, execs = values.get("nv_inference_count", 0.0), values.get("nv_inference_exec_count", 0.0)
    return {"tiles": count, "executions": execs, "mean_tiles_per_execution": count / execs if execs else 0.0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="host:port of a running server's HTTP endpoint (loopback)")
    p.add_argument("--grpc-url", default=None, help="its gRPC host:port (with --url and --protocol grpc)")
    p.add_argument("--metrics", default=None, help="its metrics URL (with --url)")
    p.add_argument(
        "--engine", default=None, help="bundle for the started server (default: the shipped model)"
    )
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--requests", type=int, default=40, help="stop after this many requests")
    p.add_argument("--duration", type=float, default=120.0, help="... or after this many seconds")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request client timeout, seconds")
    p.add_argument("--size", type=int, default=32, help="LR crop size (pixels)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tile", type=int, default=32, help="LR tile of the started server")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "load_test.json")
    args = p.parse_args(argv)

    import tritonclient.http as http_client

    log_path = args.out.with_suffix(".server.log")
    proc = None
    if args.url:
        urls = {"http": loopback_only(args.url), "grpc": loopback_only(args.grpc_url or args.url)}
        metrics = args.metrics and loopback_only(args.metrics.split("//", 1)[-1].split("/", 1)[0])
        metrics = metrics and args.metrics
    else:
        proc, urls = start_server(args, log_path)
        metrics = urls["metrics"]
    try:
        probe = http_client.InferenceServerClient(urls["http"])
        wait_ready(probe, proc, 180.0, log_path)
        probe.close()
        result = run_clients(args, urls[args.protocol], photo_crops(args.size))
        batching = tile_batching(metrics) if metrics else {}
    finally:
        if proc is not None:
            stop_server(proc)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    report = {
        "load": result,
        "tile_batching": batching,
        "settings": settings,
        "machine": describe_machine(with_torch=False),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
