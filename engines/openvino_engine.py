"""The OpenVINO engine: a bundle's fp32 ONNX graphs on the CPU, each run fp32 or bf16 (an ``Engine``).

OpenVINO reads the same ONNX files as onnxruntime; what it adds on the CPU is bf16 inference
(``INFERENCE_PRECISION_HINT``), which runs convolutions and matmuls in bf16 on CPUs with AVX512_BF16 or
AMX and is emulated in fp32 elsewhere. Precision is chosen per graph ("fp32" or "bf16", the bundle's
precision names): the predictor may miss the bf16 bar where the step meets it, and then it runs fp32
(``esrdf.engines.openvino_parity`` measures that; ``OpenVinoEngine.from_bundle`` applies it).

- **Static shapes.** The bundle's graphs have dynamic axes; each (batch, tile) shape a call brings is
  compiled once as a static model (OpenVINO's CPU plugin is fastest on static shapes) and kept.
- **Compiled-model cache.** Compiles go through OpenVINO's model cache (``CACHE_DIR``), under the user
  cache dir (``esrdf.user_cache``) in one folder per ``OpenVinoKey``: OpenVINO version, CPU model and a
  digest of its flags, precision, ONNX sha256 and shape. Another machine's (or version's) compiled model
  lands in another folder and is never read.
- **Threads.** ``threads`` is ``INFERENCE_NUM_THREADS`` (None: OpenVINO's default, every core). Calls from
  several threads are safe: each call takes an infer request from its shape's pool (creating one when
  all are busy) and returns it afterwards, so the pool grows to the concurrency and no further, and
  outputs are copied out before the request is reused.
- **One ``ov.Core`` per process** (``shared_core``): several Core objects in one process crashed
  (a segfault in the CPU plugin) when an earlier version of this engine made one per graph.

Arrays are host numpy float32 (``upload``/``download`` are no-ops, as for onnxruntime on the CPU).
"""

from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esrdf.atomic import atomic_path
from esrdf.runtime.bundle import sha256_file
from esrdf.runtime.cpu_info import cpu_identity
from esrdf.runtime.engine import EngineError, loading_engine_file
from esrdf.runtime.graph_spec import GRAPH_ROLES, PREDICTOR, STEP, graph_spec
from esrdf.user_cache import user_cache_dir

if TYPE_CHECKING:
    import openvino as ov

    from esrdf.runtime.bundle import Bundle

PRECISIONS = ("fp32", "bf16")
# Tiles per call where the caller leaves it (``Upscaler``): batching gains nothing on the CPU, which is
# compute-bound at these tile sizes, and each extra batch size is another compiled shape. esrdf-bench on the
# default model, 32 px LR tiles, bf16 per graph, 2-core VM under load 13-16: step 244, 266 and 305 ms per
# tile at batch 1, 2 and 4 (p50; benchmarks/results/cpu_default.json).
PREFERRED_BATCH = 1
HINTS = {"fp32": "f32", "bf16": "bf16"}  # the bundle's precision names -> OpenVINO element types
Shapes = tuple[tuple[int, ...], ...]  # one static shape per graph input, in the graph contract's order

_core: ov.Core | None = None
_core_lock = threading.Lock()


def shared_core() -> ov.Core:
    """The process's one ``ov.Core`` (created on first use): never more than one per process."""
    global _core
    with _core_lock:
        if _core is None:
            try:
                import openvino as ov
            except ImportError as exc:
                raise EngineError(
                    f"backend 'openvino' needs the openvino package ({exc}): pip install 'esrdf[openvino]', "
                    "or use --backend onnxruntime"
                ) from exc
            _core = ov.Core()
        return _core


def openvino_version() -> str:
    import openvino as ov

    return str(ov.get_version())


@dataclass(frozen=True)
class OpenVinoKey:
    """What a compiled model depends on; the cache folder is named by its digest."""

    openvino_version: str
    cpu_model: str
    cpu_flags_sha256: str
    precision: str  # "fp32" | "bf16"
    onnx_sha256: str
    shape: dict[str, list[int]]  # input name -> static shape

    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


class OpenVinoGraph:
    """One ONNX graph at one precision: compiled per static shape, with a pool of infer requests each."""

    def __init__(self, path: Path, role: str, precision: str, threads: int | None) -> None:
        if precision not in PRECISIONS:
            raise EngineError(f"openvino precision must be one of {PRECISIONS}, got {precision!r}")
        if threads is not None and threads < 1:
            raise EngineError(f"threads must be >= 1, got {threads}")
        self.path, self.role, self.precision, self.threads = path, role, precision, threads
        self.sha256 = sha256_file(path)
        with loading_engine_file(path):  # a corrupt graph: one line naming the file, as for every engine
            self._model = shared_core().read_model(os.fspath(path))
        self._check_contract()
        self._lock = threading.Lock()
        self._compiled: dict[Shapes, tuple[Any, queue.SimpleQueue[Any]]] = {}
        self.keys: dict[Shapes, OpenVinoKey] = {}

    def _check_contract(self) -> None:
        spec = graph_spec(self.role)
        names = (
            [i.get_any_name() for i in self._model.inputs],
            [o.get_any_name() for o in self._model.outputs],
        )
        if names != (list(spec.input_names), list(spec.output_names)):
            raise EngineError(f"{self.path}: I/O names {names} are not the {self.role} graph contract {spec}")
        wrong = [
            i.get_any_name() for i in self._model.inputs if i.get_element_type().get_type_name() != "f32"
        ]
        if wrong:
            raise EngineError(
                f"{self.path}: inputs {wrong} are not float32 (the graph contract keeps fp32 I/O)"
            )

    def key(self, shapes: Shapes) -> OpenVinoKey:
        names = graph_spec(self.role).input_names
        return OpenVinoKey(
            openvino_version=openvino_version(),
            **cpu_identity(),
            precision=self.precision,
            onnx_sha256=self.sha256,
            shape={n: list(s) for n, s in zip(names, shapes, strict=True)},
        )

    def _compile(self, shapes: Shapes) -> tuple[Any, queue.SimpleQueue[Any]]:
        with self._lock:  # one compile per shape, even when several threads bring it at once
            if shapes not in self._compiled:
                key = self.key(shapes)
                cache = user_cache_dir("openvino", key.digest())
                if not (cache / "key.json").is_file():  # for a reader of the cache; nothing loads it
                    with atomic_path(cache / "key.json") as tmp:
                        tmp.write_text(json.dumps(asdict(key), indent=2) + "\n")
                model = self._model.clone()
                names = graph_spec(self.role).input_names
                model.reshape({n: list(s) for n, s in zip(names, shapes, strict=True)})
                config: dict[str, Any] = {
                    "INFERENCE_PRECISION_HINT": HINTS[self.precision],
                    "PERFORMANCE_HINT": "LATENCY",
                    "CACHE_DIR": os.fspath(cache),
                }
                if self.threads is not None:
                    config["INFERENCE_NUM_THREADS"] = self.threads
                compiled = shared_core().compile_model(model, "CPU", config)
                self._compiled[shapes] = (compiled, queue.SimpleQueue())
                self.keys[shapes] = key
            return self._compiled[shapes]

    def __call__(self, *inputs: np.ndarray) -> np.ndarray:
        shapes = tuple(tuple(int(d) for d in a.shape) for a in inputs)
        compiled, pool = self._compiled.get(shapes) or self._compile(shapes)
        try:
            request = pool.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            # share_outputs=False: the result is a copy, not a view of the request's buffer, so the request
            # can go back to the pool (and serve another thread) while the caller holds the output.
            result = request.infer(list(inputs), share_inputs=False, share_outputs=False)
            return np.asarray(result[0], dtype=np.float32)
        finally:
            pool.put(request)


class OpenVinoEngine:
    """Predictor and step graphs on OpenVINO's CPU plugin, each at its own precision; numpy arrays."""

    name = "openvino"
    preferred_batch = PREFERRED_BATCH

    def __init__(
        self,
        predictor_path: str | os.PathLike[str],
        step_path: str | os.PathLike[str],
        precisions: dict[str, str] | None = None,
        threads: int | None = None,
        parity: dict[str, Any] | None = None,
    ) -> None:
        chosen = {role: "fp32" for role in GRAPH_ROLES} | (precisions or {})
        self.precisions = chosen
        self.threads = threads
        self.parity = parity or {}  # what decided the precisions (esrdf.engines.openvino_parity), if measured
        self._predictor = OpenVinoGraph(Path(predictor_path), PREDICTOR, chosen[PREDICTOR], threads)
        self._step = OpenVinoGraph(Path(step_path), STEP, chosen[STEP], threads)

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, precision: str = "bf16", device: str = "cpu", threads: int | None = None
    ) -> OpenVinoEngine:
        """``precision="fp32"``: both graphs f32. ``"bf16"``: bf16 for each graph that meets the bf16 bars
        on this machine (measured on first use and cached, ``esrdf.engines.openvino_parity``), f32 for the
        others. The graphs are the bundle's fp32 ONNX files either way."""
        if device != "cpu":
            raise EngineError(f"backend 'openvino' runs on the CPU here, got device {device!r}")
        if precision not in PRECISIONS:
            raise EngineError(f"backend 'openvino' takes precision fp32 or bf16, got {precision!r}")
        paths = (bundle.graph_path(PREDICTOR, "fp32"), bundle.graph_path(STEP, "fp32"))
        if precision == "fp32":
            return cls(*paths, threads=threads)
        from esrdf.engines.openvino_parity import bf16_precisions

        record = bf16_precisions(bundle, threads)
        return cls(*paths, precisions=record["precisions"], threads=threads, parity=record)

    def key(self) -> dict[str, Any]:
        """The engine key: per graph, its precision and every compiled shape's ``OpenVinoKey``."""
        return {
            g.role: {
                "precision": g.precision,
                "onnx_sha256": g.sha256,
                "compiled": [asdict(k) for k in g.keys.values()],
            }
            for g in (self._predictor, self._step)
        }

    def describe(self) -> str:
        """One line: the precision of each graph (what ``esrdf-run -v`` prints)."""
        return f"openvino {openvino_version()}: " + ", ".join(
            f"{g.role} {g.precision}" for g in (self._predictor, self._step)
        )

    def upload(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array, dtype=np.float32)

    def download(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(array, dtype=np.float32)

    def predictor(self, lr: np.ndarray) -> np.ndarray:
        return self._predictor(lr)

    def step(
        self, x_t: np.ndarray, cond: np.ndarray, t: np.ndarray, coefs: np.ndarray, noise: np.ndarray
    ) -> np.ndarray:
        return self._step(x_t, cond, t, coefs, noise)
