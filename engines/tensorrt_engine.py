"""The TensorRT engine: deserialised plans of a bundle behind ``esrdf.runtime.engine.Engine``.

Runs the predictor and the step graph (paper Eq. 5-7 with the sampler update folded in) as plans built by
``esrdf.engines.tensorrt_build``. Arrays are torch CUDA tensors (float32, NCHW).

- Every plan's ``EngineKey`` is checked against the running machine (TensorRT version, GPU name, SM) and
  the bundle's ONNX sha256 before it is deserialised; a mismatch raises ``EngineKeyMismatch`` naming the
  one command that rebuilds it. (A plan is executable code: only run bundles you built or trust.)
- I/O buffers are allocated once per plan, at the profile's largest shape, as torch CUDA tensors; a
  call's inputs are copied into them. Each plan has one execution context per bound shape (a static plan:
  one; a dynamic plan: one per batch/tile it has run), whose ``set_input_shape`` and
  ``set_tensor_address`` run once, when it is made. A context is never re-shaped, so a CUDA graph captured
  over one (TensorRT documents replaying a graph after the shapes changed as undefined) stays valid, and
  a captured call sees no TensorRT API call but ``execute_async_v3``. Should this TensorRT refuse a second
  context on the plan's one profile, the plan falls back to re-shaping its one context and bumps
  ``buffers_generation`` on every re-shape, so graphs are recaptured, never replayed on another shape.
- ``execute_async_v3`` runs on torch's current CUDA stream when that is a stream of its own (a graph
  capture's, a caller's), so work is ordered with the torch copies around it and a capture records it.
  On the legacy default stream, where TensorRT would add synchronisations of its own, it runs on a stream
  the engine owns, ordered after and before the caller's work with stream waits.
- A static profile serves smaller batches too: the batch is padded into the buffer and the extra rows
  dropped (rows never mix: every op of both graphs is per sample).
- With ``share_activations`` (default) all execution contexts of both graphs use one device block sized
  for the largest: they never run at the same time (one lock, one stream).

Thread safety: one engine serves one worker. Calls are serialised by a lock, because the I/O buffers
and the activation block are shared by all calls; a service with several GPU workers opens one engine each.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from esrdf.engines.tensorrt_build import (
    MachineIdentity,
    machine_identity,
    profile_from_key,
    rebuild_command,
    require_tensorrt,
    trt_logger,
    version_key,
)
from esrdf.runtime.bundle import Bundle, BundleError, EngineEntry, EngineKey
from esrdf.runtime.engine import BatchSamplerFactory, loading_engine_file
from esrdf.runtime.graph_spec import GRAPH_ROLES, PREDICTOR, STEP, ShapeProfile, graph_spec

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

log = logging.getLogger(__name__)


class EngineKeyMismatch(BundleError):
    """A plan built for another TensorRT version, GPU model or ONNX graph than the one here."""


def key_mismatches(key: EngineKey, identity: MachineIdentity, onnx_sha256: str | None) -> list[str]:
    """What differs between a plan's key and this machine + bundle, one phrase per field (empty: usable)."""
    found = []
    if not _same_version(key.tensorrt_version, identity.tensorrt_version):
        found.append(f"TensorRT {key.tensorrt_version} (here {identity.tensorrt_version})")
    if key.gpu_name != identity.gpu_name:
        found.append(f"GPU {key.gpu_name!r} (here {identity.gpu_name!r})")
    if key.compute_capability != identity.compute_capability:
        found.append(f"SM {key.compute_capability} (here {identity.compute_capability})")
    if onnx_sha256 is None:
        found.append(f"a {key.precision} ONNX graph the bundle no longer has")
    elif key.onnx_sha256 != onnx_sha256:
        found.append(f"ONNX sha256 {key.onnx_sha256[:12]}… (bundle's graph {onnx_sha256[:12]}…)")
    return found


def _same_version(a: str, b: str) -> bool:
    """Equal as plan keys (MAJOR.MINOR.PATCH; ``version_key``); unparsable strings compare as they are."""
    try:
        return version_key(a) == version_key(b)
    except ValueError:
        return a == b


def usable_entries(bundle: Bundle, role: str, precision: str, identity: MachineIdentity) -> list[EngineEntry]:
    """The role's plans whose key matches this machine; raise with the rebuild command when none does."""
    entries = [e for e in bundle.manifest.engines if e.role == role and e.precision == precision]
    graph = bundle.manifest.graph(role, precision)
    onnx_sha = None if graph is None else graph.sha256
    usable = [e for e in entries if not key_mismatches(e.key, identity, onnx_sha)]
    if usable:
        return usable
    if not entries:
        exported = bundle.manifest.export
        profile = ShapeProfile.static(exported.batch, exported.tile, bundle.manifest.scale)
        raise BundleError(
            f"{bundle.root}: no {precision} TensorRT engine for the {role} graph; "
            f"build one with: {rebuild_command(bundle.root, profile)}"
        )
    stale = entries[0]
    raise EngineKeyMismatch(
        f"{bundle.root / stale.file}: this {role} engine was built for "
        f"{'; '.join(key_mismatches(stale.key, identity, onnx_sha))}; rebuild it with: "
        f"{rebuild_command(bundle.root, profile_from_key(stale.key))}"
    )


def _covers(profile: ShapeProfile, sizes: dict[str, int], static: bool) -> bool:
    """Does the profile take these axis sizes? A static profile takes any batch up to its own (padding)."""
    for axis, size in sizes.items():
        low = 1 if (static and axis == "batch") else profile.min[axis]
        if not low <= size <= profile.max[axis]:
            return False
    return True


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt
    import torch

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bfloat16: torch.bfloat16,
    }
    if dtype not in table:
        raise BundleError(f"TensorRT I/O dtype {dtype} is not one the graph contract uses")
    return table[dtype]


@dataclass
class _SharedActivations:
    """One device block for the activations of every execution context of an engine (one stream)."""

    device: torch.device
    on_realloc: Callable[[], None]
    block: Any = None
    contexts: list[Any] = field(default_factory=list)

    def attach(self, context: trt.IExecutionContext, size: int) -> None:
        import torch

        self.contexts.append(context)
        if self.block is None or self.block.numel() < size:
            # Grow and re-point every context; graphs captured on the old block are now invalid.
            self.block = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            self.on_realloc()
        for ctx in self.contexts:
            ctx.set_device_memory(self.block.data_ptr(), self.block.numel())


def _user_managed() -> Any:
    """The allocation strategy of contexts whose activation memory we provide (``_SharedActivations``)."""
    import tensorrt as trt

    return trt.ExecutionContextAllocationStrategy.USER_MANAGED


def load_plan(bundle: Bundle, entry: EngineEntry, runtime: trt.Runtime) -> trt.ICudaEngine:
    """The plan file of ``entry``, sha256-checked against the manifest, deserialised."""
    data = (bundle.root / entry.file).read_bytes()
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise BundleError(f"{bundle.root / entry.file}: sha256 does not match the manifest (modified?)")
    with loading_engine_file(bundle.root / entry.file):  # TensorRT 10 may raise, not return None
        engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        command = rebuild_command(bundle.root, profile_from_key(entry.key))
        raise EngineKeyMismatch(
            f"{bundle.root / entry.file}: TensorRT could not deserialise this plan; "
            f"rebuild it with: {command}"
        )
    return engine


@dataclass
class _Binding:
    """One execution context of a plan, bound to one shape: views of the plan's flat I/O buffers."""

    context: Any
    sizes: dict[str, int]
    views: dict[str, torch.Tensor]


class _PlanRunner:
    """One deserialised plan: its I/O buffers and one execution context per bound shape."""

    def __init__(
        self,
        engine: trt.ICudaEngine,
        profile: ShapeProfile,
        role: str,
        channels: int,
        device: torch.device,
        activations: _SharedActivations | None,
        on_reshape: Callable[[], None] = lambda: None,
        dtypes: dict[str, torch.dtype] | None = None,
    ) -> None:
        import torch

        self.engine = engine
        self.profile = profile
        self.static = self.profile.min == self.profile.max
        self.spec = graph_spec(role, channels)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted([*self.spec.input_names, *self.spec.output_names]):
            raise BundleError(f"I/O tensors {names} of this {role} plan are not the {role} graph contract")
        if activations is not None and not hasattr(engine, "device_memory_size_v2"):
            log.info("this TensorRT has no device_memory_size_v2; contexts keep their own activation memory")
            activations = None
        self.activations = activations
        self.on_reshape = on_reshape
        # Flat buffers at the profile's largest shape; a smaller shape is a view of their first elements.
        self.flat: dict[str, torch.Tensor] = {}
        for spec in (*self.spec.inputs, *self.spec.outputs):
            numel = int(np.prod(spec.shape(self.profile.max)))
            dtype = (dtypes or {}).get(spec.name) or _torch_dtype(engine.get_tensor_dtype(spec.name))
            self.flat[spec.name] = torch.zeros(numel, dtype=dtype, device=device)
        self.device = device
        self.bindings: dict[tuple[tuple[str, int], ...], _Binding] = {}
        self.reshaping = False  # True: TensorRT refused a second context; one context, re-shaped per call

    def _new_context(self) -> Any:
        if self.activations is None:
            return self.engine.create_execution_context()
        context = self.engine.create_execution_context(_user_managed())
        self.activations.attach(context, self.engine.device_memory_size_v2)
        return context

    def _bind(self, context: Any, sizes: dict[str, int]) -> _Binding | None:
        """set_input_shape + set_tensor_address on ``context``; None when TensorRT refuses the shape."""
        views = {}
        for spec in (*self.spec.inputs, *self.spec.outputs):
            shape = spec.shape(sizes)
            view = self.flat[spec.name][: int(np.prod(shape))].view(shape)
            if spec in self.spec.inputs and not context.set_input_shape(spec.name, shape):
                return None
            context.set_tensor_address(spec.name, view.data_ptr())
            views[spec.name] = view
        return _Binding(context, dict(sizes), views)

    def binding(self, sizes: dict[str, int]) -> _Binding:
        """The context bound to ``sizes``: made and bound on first use, never re-shaped afterwards."""
        key = tuple(sorted(sizes.items()))
        if key in self.bindings:
            return self.bindings[key]
        if self.reshaping:
            return self._reshape(sizes)
        bound = self._bind(self._new_context(), sizes)
        if bound is None and self.bindings:
            # E.g. a TensorRT that lets only one context use a profile: a fresh context there has no profile.
            log.warning(
                "TensorRT refused a second execution context for the %s plan; re-shaping one context "
                "instead (CUDA graphs are recaptured on every shape change)",
                self.spec.role,
            )
            self.reshaping = True
            return self._reshape(sizes)
        if bound is None:
            raise ValueError(f"TensorRT refused shape {sizes} for the {self.spec.role} plan")
        self.bindings[key] = bound
        return bound

    def _reshape(self, sizes: dict[str, int]) -> _Binding:
        """The fallback: re-bind the plan's first context to ``sizes``; graphs over it become stale."""
        first = next(iter(self.bindings.values()))
        bound = self._bind(first.context, sizes)
        if bound is None:
            raise ValueError(f"TensorRT refused shape {sizes} for the {self.spec.role} plan")
        self.bindings = {tuple(sorted(sizes.items())): bound}
        self.on_reshape()
        return bound

    def run(self, sizes: dict[str, int], inputs: dict[str, torch.Tensor], stream: Any) -> torch.Tensor:
        """Inputs into the bound views, one ``execute_async_v3`` on ``stream``, a copy of the output."""
        batch = sizes["batch"]
        bound = self.binding(dict(self.profile.max) if self.static else dict(sizes))
        for name, value in inputs.items():
            bound.views[name][:batch].copy_(value)
        if not bound.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for the {self.spec.role} graph")
        # A copy: the output buffer is overwritten by the next call, the caller may keep the result.
        return bound.views[self.spec.output_names[0]][:batch].clone()


class TensorRTEngine:
    """Predictor and step plans of a bundle on one CUDA device; arrays are torch CUDA float32 tensors."""

    name = "tensorrt"

    def __init__(
        self, bundle: Bundle, device: str = "cuda", precision: str = "fp16", share_activations: bool = True
    ) -> None:
        require_tensorrt()
        import tensorrt as trt
        import torch

        self.bundle = bundle
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"the tensorrt backend runs on CUDA devices only, got device {device!r}")
        self.identity = machine_identity(self.device.index)
        self.entries = {r: usable_entries(bundle, r, precision, self.identity) for r in GRAPH_ROLES}
        self._runtime = trt.Runtime(trt_logger())
        self._runners: dict[str, _PlanRunner] = {}
        self.last_plans: dict[str, str] = {}  # role -> plan file of the latest call (tests, reports)
        self._stream = torch.cuda.Stream(self.device)  # never the legacy default stream (module docstring)
        self._generation = 0
        self._activations = (
            _SharedActivations(self.device, self._bump_generation) if share_activations else None
        )
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: str = "cuda", precision: str = "fp16") -> TensorRTEngine:
        return cls(bundle, device=device, precision=precision)

    @property
    def buffers_generation(self) -> int:
        """Bumped whenever device memory a captured CUDA graph may point at is reallocated."""
        return self._generation

    def _bump_generation(self) -> None:
        self._generation += 1

    def _runner(self, role: str, sizes: dict[str, int]) -> _PlanRunner:
        """The plan of ``role`` that takes ``sizes``: exact static first, then dynamic, then padded static."""

        def rank(e: EngineEntry) -> tuple[int, int]:
            p = profile_from_key(e.key)
            if p.min != p.max:
                return (1, p.max["batch"])
            exact = all(p.max[axis] == size for axis, size in sizes.items())
            return (0 if exact else 2, p.max["batch"])

        for entry in sorted(self.entries[role], key=rank):
            p = profile_from_key(entry.key)
            if _covers(p, sizes, p.min == p.max):
                if entry.file not in self._runners:
                    with _cuda_device(self.device):
                        self._runners[entry.file] = _PlanRunner(
                            load_plan(self.bundle, entry, self._runtime),
                            p,
                            role,
                            self.bundle.manifest.channels,
                            self.device,
                            self._activations,
                            self._bump_generation,
                        )
                self.last_plans[role] = entry.file
                return self._runners[entry.file]
        have = [profile_from_key(e.key).max for e in self.entries[role]]
        wanted = ShapeProfile.static(
            sizes["batch"], sizes.get("lr_height", sizes["height"] // self.scale), self.scale
        )
        raise ValueError(
            f"no {role} engine takes {sizes} (engines here take up to {have}); "
            f"build one with: {rebuild_command(self.bundle.root, wanted)}"
        )

    @property
    def scale(self) -> int:
        return self.bundle.manifest.scale

    def upload(self, array: np.ndarray) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    def download(self, array: torch.Tensor) -> np.ndarray:
        return array.detach().float().cpu().numpy()

    def predictor(self, lr: torch.Tensor) -> torch.Tensor:
        b, _c, h, w = lr.shape
        sizes = {"batch": b, "lr_height": h, "lr_width": w, "height": h * self.scale, "width": w * self.scale}
        with self._lock, self._call_stream() as stream:
            return self._runner(PREDICTOR, sizes).run(sizes, {"lr": lr}, stream)

    def step(
        self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, coefs: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        b, _c, h, w = x_t.shape
        sizes = {"batch": b, "height": h, "width": w}
        inputs = {
            "x_t": x_t,
            "cond": cond,
            "t": t.reshape(-1).expand(b),
            "coefs": coefs.expand(b, -1),
            "noise": noise,
        }
        with self._lock, self._call_stream() as stream:
            return self._runner(STEP, sizes).run(sizes, inputs, stream)

    @contextlib.contextmanager
    def _call_stream(self) -> Iterator[Any]:
        """The stream a call runs on: the current one unless it is the legacy default stream, else the
        engine's own, ordered after the caller's work and before whatever the caller does next."""
        import torch

        current = torch.cuda.current_stream(self.device)
        if current != torch.cuda.default_stream(self.device):
            yield current
            return
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            yield self._stream
        current.wait_stream(self._stream)

    def batch_sampler_factory(
        self, channels: int, scale: int, batch: int, use_graphs: bool = True
    ) -> BatchSamplerFactory:
        """The whole sampler loop of a batch as one CUDA-graph replay over these plans
        (``esrdf.engines.cuda_graph``); ``use_graphs=False`` runs the same loop as stream execution."""
        from esrdf.engines.cuda_graph import graph_batch_sampler_factory

        return graph_batch_sampler_factory(self, channels, scale, self.device, batch, use_graphs)


def _cuda_device(device: torch.device) -> Any:
    """TensorRT deserialises onto the current CUDA device."""
    import torch

    return torch.cuda.device(device)


def open_tensorrt_engine(bundle: Bundle, device: str = "cuda", precision: str = "fp16") -> TensorRTEngine:
    """The registry's ``tensorrt`` branch: only fp16 and fp32 plans exist; the default build is fp16."""
    return TensorRTEngine.from_bundle(bundle, device=device, precision=precision)
