"""``esrdf-serve``: the runtime behind Triton Inference Server, through PyTriton (``esrdf[serve]`` extra).

    esrdf-serve --engine bundle/ --host 0.0.0.0 --http-port 8000 --grpc-port 8001 --metrics-port 8002 \\
                --workers 2 --max-batch 8

PyTriton starts the ``tritonserver`` it bundles and binds two models
(``esrdf.runtime.serving.triton_models``): ``esrdf`` takes whole images, ``esrdf_tiles`` dynamically batches
the tiles of all in-flight images. Any Triton client (``tritonclient.http`` / ``tritonclient.grpc``,
perf_analyzer, curl) talks to it; health (``/v2/health/live``, ``/v2/health/ready``) and Prometheus metrics
(``:metrics-port/metrics``) are Triton's own. Without ``--engine`` it serves the shipped default model.
SIGINT or SIGTERM stops it cleanly (in-flight requests finish, up to ``--exit-timeout`` seconds).

The host defaults to loopback; pass ``--host 0.0.0.0`` to serve other machines.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from esrdf.runtime.serving.service import ServiceConfig, open_upscalers
from esrdf.runtime.serving.triton_models import IMAGE_MODEL, TILE_MODEL, ImageModel, TileModel
from esrdf.runtime.upscaler import Upscaler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeConfig:
    """Where the server listens and how it batches; ``engine`` says how each worker opens the bundle."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int = 8  # tiles per esrdf_tiles execution
    queue_delay_us: int = 2000  # how long the dynamic batcher waits for more tiles
    image_instances: int | None = None  # concurrent images in flight; default 2 x workers
    exit_timeout_s: int = 10
    engine: ServiceConfig = field(default_factory=ServiceConfig)

    def images_in_flight(self) -> int:
        return self.image_instances or 2 * self.engine.workers


def use_interpreter_libpython() -> None:
    """Make Triton's Python-backend stub load this interpreter's libpython, not whichever one ld finds.

    PyTriton's ``triton_python_backend_stub`` links ``libpython3.X.so.1.0`` by name. On a machine where the
    interpreter is not the system one (pyenv, a custom build) the loader finds the system library first, and
    the stub runs another patch release's C core against this interpreter's standard library; models then
    fail to load with errors like "'_thread.RLock' object has no attribute '_recursion_count'" (seen with
    pyenv 3.11.7 over Debian's libpython 3.11.2). Prepending the interpreter's LIBDIR to LD_LIBRARY_PATH,
    which PyTriton passes on to tritonserver, fixes that. Statically linked interpreters have no such
    library; then this does nothing and the stub needs a matching system libpython.
    """
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not libdir or not soname or not (Path(libdir) / soname).is_file():
        return
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if libdir not in paths:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])


def _tile_tensors(reference: Upscaler) -> tuple[list[Any], list[Any]]:
    from pytriton.model_config import Tensor

    c, t, s = reference.manifest.channels, reference.tile, reference.scale
    inputs = [
        Tensor(name="lr", dtype=np.float32, shape=(c, t, t)),
        Tensor(name="corner", dtype=np.int64, shape=(2,)),
        Tensor(name="seed", dtype=np.uint64, shape=(1,)),
        Tensor(name="steps", dtype=np.int32, shape=(1,)),
        Tensor(name="sampler", dtype=np.bytes_, shape=(1,)),
        Tensor(name="eta", dtype=np.float32, shape=(1,)),
        Tensor(name="prior", dtype=np.bytes_, shape=(1,)),
    ]
    return inputs, [Tensor(name="hr", dtype=np.float32, shape=(c, s * t, s * t))]


def _image_tensors() -> tuple[list[Any], list[Any]]:
    from pytriton.model_config import Tensor

    inputs = [
        Tensor(name="image", dtype=np.uint8, shape=(-1, -1, 3)),
        Tensor(name="seed", dtype=np.uint64, shape=(1,), optional=True),
        Tensor(name="steps", dtype=np.int32, shape=(1,), optional=True),
        Tensor(name="sampler", dtype=np.bytes_, shape=(1,), optional=True),
        Tensor(name="eta", dtype=np.float32, shape=(1,), optional=True),
        Tensor(name="prior", dtype=np.bytes_, shape=(1,), optional=True),
    ]
    return inputs, [Tensor(name="image", dtype=np.uint8, shape=(-1, -1, 3))]


def bind_models(triton: Any, upscalers: list[Upscaler], config: ServeConfig) -> list[ImageModel]:
    """Bind ``esrdf_tiles`` (one instance per worker) and ``esrdf`` (``images_in_flight`` instances)."""
    from pytriton.client import ModelClient
    from pytriton.model_config import DynamicBatcher, ModelConfig

    reference, e = upscalers[0], config.engine
    if reference.tile == 0:
        raise click.UsageError("esrdf-serve batches fixed-size tiles: --tile must be > 0")
    inputs, outputs = _tile_tensors(reference)
    batcher = DynamicBatcher(max_queue_delay_microseconds=config.queue_delay_us)
    triton.bind(
        model_name=TILE_MODEL,
        infer_func=[TileModel(u, config.max_batch, e.cuda_graph) for u in upscalers],
        inputs=inputs, outputs=outputs, config=ModelConfig(max_batch_size=config.max_batch, batcher=batcher),
        strict=True,
    )  # fmt: skip
    loopback = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    url = f"grpc://{loopback}:{config.grpc_port}"
    image_models = [
        ImageModel(
            reference, lambda: ModelClient(url, TILE_MODEL, init_timeout_s=60.0), config.engine.max_pixels
        )
        for _ in range(config.images_in_flight())
    ]
    inputs, outputs = _image_tensors()
    triton.bind(
        model_name=IMAGE_MODEL, infer_func=image_models, inputs=inputs, outputs=outputs,
        config=ModelConfig(batching=False), strict=True,
    )  # fmt: skip
    return image_models


START_ATTEMPTS = 3


def _is_instance_handshake_race(exc: BaseException) -> bool:
    """PyTriton 0.7's model instances start in parallel, and all but the first fetch their config from a
    Unix socket the first one creates. Under CPU contention one of them can find the socket file bound
    but not yet listening, and the whole model fails to load with ConnectionRefusedError in
    ``get_config_from_handshake_server`` (seen here on a loaded 2-core machine). A fresh start succeeds."""
    text = str(exc)
    return "get_config_from_handshake_server" in text and "Connection refused" in text


def start_server(bundle_dir: str | os.PathLike[str], config: ServeConfig) -> tuple[Any, list[ImageModel]]:
    """Open the workers' engines, start Triton and bind the models; returns the running ``Triton``."""
    use_interpreter_libpython()
    from pytriton.triton import Triton, TritonConfig

    upscalers = open_upscalers(bundle_dir, config.engine)
    triton_config = TritonConfig(
        http_address=config.host, http_port=config.http_port, grpc_address=config.host,
        grpc_port=config.grpc_port, metrics_port=config.metrics_port, exit_timeout_secs=config.exit_timeout_s,
    )  # fmt: skip
    for attempt in range(1, START_ATTEMPTS + 1):
        triton = Triton(config=triton_config)
        try:
            image_models = bind_models(triton, upscalers, config)
            triton.run()
            return triton, image_models
        except Exception as exc:
            triton.stop()
            if attempt == START_ATTEMPTS or not _is_instance_handshake_race(exc):
                raise
            log.warning(
                "model instances raced at start-up (attempt %d of %d); restarting", attempt, START_ATTEMPTS
            )
    raise AssertionError("unreachable")


def resolve_bundle(engine_dir: Path | None) -> Path:
    """``--engine``, or the shipped default model (``esrdf.default_model``), or a clear error."""
    if engine_dir is not None:
        return engine_dir
    try:
        from esrdf.default_model import default_bundle_dir

        return default_bundle_dir()
    except (ImportError, FileNotFoundError) as exc:
        raise click.UsageError(
            f"no --engine given and the shipped default model is unavailable ({exc})"
        ) from None


def _stop_on_sigterm() -> None:
    """SIGTERM (docker stop, Kubernetes) stops like Ctrl-C: PyTriton's serve loop then shuts Triton down."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", "engine_dir", default=None, help="Bundle folder (default: the shipped model).",
              type=click.Path(exists=True, file_okay=False, path_type=Path))  # fmt: skip
@click.option("--host", default="127.0.0.1", show_default=True, help="Address for HTTP, gRPC and metrics.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True,
              help="esrdf_tiles instances, each with its own engine (they split the CPU cores).")  # fmt: skip
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Most tiles Triton's dynamic batcher merges into one engine batch.")  # fmt: skip
@click.option("--queue-delay-us", type=click.IntRange(min=0), default=2000, show_default=True,
              help="How long the batcher waits to fill a batch.")  # fmt: skip
@click.option("--image-instances", type=click.IntRange(min=1), default=None,
              help="Images processed at once (default 2 x workers).")  # fmt: skip
@click.option(
    "--tile", type=click.IntRange(min=1), default=None, help="LR tile size (default: the bundle's)."
)
@click.option("--overlap", type=click.IntRange(min=0), default=None, help="LR pixels; default tile / 8.")
@click.option(
    "--batch", type=click.IntRange(min=1), default=None, help="Tiles per request per tile-model call."
)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "torch", "tensorrt"]), default="onnxruntime",
              show_default=True)  # fmt: skip
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads per worker (CPU)."
)
@click.option("--exit-timeout", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--no-cuda-graph", is_flag=True, help="On CUDA, run the sampler loop as stream execution.")
def main(
    engine_dir: Path | None, host: str, http_port: int, grpc_port: int, metrics_port: int, workers: int,
    max_batch: int, queue_delay_us: int, image_instances: int | None, tile: int | None, overlap: int | None,
    batch: int | None, precision: str, backend: str, device: str, threads: int | None, exit_timeout: int,
    no_cuda_graph: bool,
) -> None:  # fmt: skip
    """Serve an ESRDF bundle with Triton Inference Server (models "esrdf" and "esrdf_tiles")."""
    from esrdf.runtime.bundle import BundleError
    from esrdf.runtime.engine import EngineError

    bundle = resolve_bundle(engine_dir)
    engine = ServiceConfig(
        workers=workers, threads_per_worker=threads, backend=backend, device=device, precision=precision,
        tile=tile, overlap=overlap, batch=batch, cuda_graph=not no_cuda_graph,
    )  # fmt: skip
    config = ServeConfig(host, http_port, grpc_port, metrics_port, max_batch, queue_delay_us, image_instances,
                         exit_timeout, engine)  # fmt: skip
    try:
        import pytriton  # noqa: F401
    except ImportError as exc:
        raise click.ClickException(
            f"esrdf-serve needs PyTriton: pip install 'esrdf[serve]' ({exc})"
        ) from None
    _stop_on_sigterm()
    try:
        triton, models = start_server(bundle, config)
    except (BundleError, EngineError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"esrdf-serve: serving {bundle} as '{IMAGE_MODEL}' (tiles: '{TILE_MODEL}') "
        f"on http://{host}:{http_port}, grpc {host}:{grpc_port}, metrics http://{host}:{metrics_port}/metrics",
        err=True,
    )
    sys.stderr.flush()
    serve_until_stopped(triton, models)


def serve_until_stopped(triton: Any, image_models: list[ImageModel], poll_s: float = 1.0) -> None:
    """Block until SIGINT/SIGTERM or a dead server; then close the tile clients and stop Triton.

    The image models' gRPC connections to the tile model are closed first: Triton counts a model with
    open client streams as live and would wait out its whole exit timeout before stopping.
    """
    try:
        while triton.is_alive():
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    finally:
        for model in image_models:
            model.close()
        triton.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
