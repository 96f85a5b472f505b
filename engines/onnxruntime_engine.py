"""The onnxruntime engine: runs a bundle's predictor and step graphs (``esrdf.runtime.engine.Engine``).

CPU execution provider by default; the CUDA EP when ``device="cuda"`` and the installed onnxruntime has
it (onnxruntime-gpu). Calls go through IOBinding with ``OrtValue`` arrays, so on CUDA the sampler state
stays on the device between steps and only the noise crosses each step.

Thread safety: ``InferenceSession`` runs concurrently from several threads, and every call here builds
its own ``IOBinding``, so one engine may serve several requests at once. No torch is imported here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from esrdf.runtime.engine import EngineError, loading_engine_file
from esrdf.runtime.graph_spec import PREDICTOR, STEP, graph_spec

if TYPE_CHECKING:
    import onnxruntime as ort

    from esrdf.runtime.bundle import Bundle

DEVICES = ("cpu", "cuda")


def _providers(device: str) -> list[Any]:
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise EngineError(
                "device 'cuda' needs onnxruntime's CUDA execution provider, which this onnxruntime "
                f"({ort.__version__}) lacks: install onnxruntime-gpu, or use --device cpu or --backend torch"
            )
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    raise EngineError(f"unknown device {device!r}; expected one of {DEVICES}")


def _session(
    path: Path, role: str, providers: list[Any], threads: int | None, spinning: bool = True
) -> ort.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not spinning:
        # Idle intra-op threads sleep instead of spinning: the predictor runs once per batch between N step
        # calls, and its spinning pool stole cores from the step (1-step requests 92.6 -> 57.5 ms on the
        # 2-core VM, quiet; outputs bit-identical: spinning changes scheduling, not arithmetic).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        if threads < 1:
            raise EngineError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1  # the graphs are one chain; parallelism is inside ops
    options.log_severity_level = 3  # errors only: initializer-folding notices are not for users
    with loading_engine_file(path):
        session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
    spec = graph_spec(role)
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != (list(spec.input_names), list(spec.output_names)):
        raise EngineError(f"{path}: I/O names {names} are not the {role} graph contract {spec}")
    wrong = [i.name for i in session.get_inputs() if i.type != "tensor(float)"]
    if wrong:
        raise EngineError(f"{path}: inputs {wrong} are not float32 (the graph contract keeps fp32 I/O)")
    return session


class OnnxRuntimeEngine:
    """Predictor and step graphs in two onnxruntime sessions; arrays are ``OrtValue`` on ``device``."""

    name = "onnxruntime"

    def __init__(
        self,
        predictor_path: str | os.PathLike[str],
        step_path: str | os.PathLike[str],
        threads: int | None = None,
        device: str = "cpu",
    ) -> None:
        providers = _providers(device)
        self.device = device
        self._predictor = _session(Path(predictor_path), PREDICTOR, providers, threads, spinning=False)
        self._step = _session(Path(step_path), STEP, providers, threads)

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, precision: str = "fp32", device: str = "cpu", threads: int | None = None
    ) -> OnnxRuntimeEngine:
        return cls(
            bundle.graph_path(PREDICTOR, precision), bundle.graph_path(STEP, precision), threads, device
        )

    @property
    def providers(self) -> list[str]:
        return list(self._step.get_providers())

    def upload(self, array: np.ndarray) -> ort.OrtValue:
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=np.float32), self.device, 0)

    def download(self, array: ort.OrtValue) -> np.ndarray:
        return np.asarray(array.numpy(), dtype=np.float32)

    def _run(self, session: ort.InferenceSession, inputs: dict[str, ort.OrtValue]) -> ort.OrtValue:
        binding = session.io_binding()  # per call: concurrent requests never share a binding
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(session.get_outputs()[0].name, self.device, 0)
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def predictor(self, lr: ort.OrtValue) -> ort.OrtValue:
        return self._run(self._predictor, {"lr": lr})

    def step(
        self, x_t: ort.OrtValue, cond: ort.OrtValue, t: ort.OrtValue, coefs: ort.OrtValue, noise: ort.OrtValue
    ) -> ort.OrtValue:
        return self._run(self._step, {"x_t": x_t, "cond": cond, "t": t, "coefs": coefs, "noise": noise})
