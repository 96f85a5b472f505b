"""TensorRT engines: build into a bundle, refuse a plan keyed to another machine, fp16 parity, graph replay.

tensorrt-marked tests need tensorrt and a CUDA device; they skip with a reason elsewhere (tensorrt is not
installable from PyPI). The unmarked tests run everywhere: the modules type-check against tensorrt-stubs,
the build says why it cannot run, profiles and engine keys, and the atomic manifest update (with plan
bytes that are not real plans: that code never parses them).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from esrdf.config import preset
from esrdf.engines.tensorrt_build import (
    BuiltPlan,
    MachineIdentity,
    TensorRTUnavailable,
    add_plans_to_bundle,
    build_engines_into_bundle,
    plan_file_name,
    profile_key,
    rebuild_command,
    shape_profile,
    tensorrt_unavailable_reason,
    timing_cache_path,
)
from esrdf.engines.tensorrt_engine import EngineKeyMismatch, key_mismatches, usable_entries
from esrdf.runtime.bundle import (
    FORMAT_VERSION,
    Bundle,
    BundleError,
    EngineEntry,
    EngineKey,
    ExportSettings,
    GraphEntry,
    Manifest,
    ScheduleEntry,
    load_bundle,
    write_bundle_atomically,
    write_manifest,
)
from esrdf.runtime.graph_spec import ShapeProfile
from esrdf.runtime.tolerances import FP16_GRAPH

ROOT = Path(__file__).resolve().parents[1]
CFG = preset("tiny")
HERE = MachineIdentity(
    tensorrt_version="10.13.0.35", gpu_name="NVIDIA H100 80GB HBM3", compute_capability="9.0"
)


def tiny_manifest(
    graphs: list[GraphEntry] | None = None, engines: list[EngineEntry] | None = None
) -> Manifest:
    return Manifest(
        format_version=FORMAT_VERSION,
        model_name="tiny",
        scale=4,
        channels=3,
        hr_multiple_of=4,
        value_range=[-1.0, 1.0],
        schedule=ScheduleEntry(kind="linear", timesteps=3, alphas_cumprod=[0.9, 0.8, 0.7]),
        graphs=graphs or [],
        export=ExportSettings(checkpoint="ckpt/", tile=16, batch=2),
        engines=engines or [],
    )


def engine_entry(role: str, identity: MachineIdentity, profile: ShapeProfile, onnx_sha: str) -> EngineEntry:
    key = EngineKey(
        identity.tensorrt_version,
        identity.gpu_name,
        identity.compute_capability,
        "fp16",
        profile_key(profile),
        onnx_sha,
    )
    return EngineEntry(role, "fp16", plan_file_name(role, "fp16", profile, identity), "0" * 64, key)


# --- CPU -------------------------------------------------------------------------------------------------


def repaired_stubs(dest: Path) -> Path:
    """A copy of tensorrt-stubs that mypy can read: the published .pyi files name parameters ``in`` (a
    keyword) and put defaults before non-defaults, so each such plugin method becomes ``(*args, **kwargs)``;
    ``py.typed`` marks them typed. Nothing this project calls is among them."""
    import tensorrt_stubs

    site = Path(tensorrt_stubs.__file__).resolve().parents[1]
    for pkg in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / pkg, dest / pkg)
        (dest / pkg / "py.typed").write_text("")
    for stub in (dest / "tensorrt_bindings").glob("*.pyi"):
        lines = stub.read_text().splitlines()
        for _ in range(200):
            try:
                ast.parse("\n".join(lines))
                break
            except SyntaxError as exc:
                i = (exc.lineno or 1) - 1
                m = re.match(r"(\s*)def (\w+)\(.*\)( -> .*)?:\s*$", lines[i])
                if m is None:
                    raise
                lines[i] = f"{m[1]}def {m[2]}(self, *args: typing.Any, **kwargs: typing.Any){m[3] or ''}:"
        stub.write_text("\n".join(lines) + "\n")
    return dest


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_stubs") is None, reason="tensorrt-stubs not installed")
def test_tensorrt_modules_type_check_against_tensorrt_stubs(tmp_path):
    from mypy import api

    stubs = repaired_stubs(tmp_path / "stubs")
    config = tmp_path / "mypy.ini"
    # torch is skipped (Any) to keep this fast; the project's own mypy run checks the torch side.
    config.write_text(
        f"[mypy]\npython_version = 3.11\nignore_missing_imports = True\ncheck_untyped_defs = True\n"
        f"mypy_path = {stubs}\n[mypy-torch]\nfollow_imports = skip\n[mypy-torch.*]\nfollow_imports = skip\n"
    )
    files = [str(ROOT / "engines" / f) for f in ("tensorrt_build.py", "tensorrt_engine.py")]
    out, err, _status = api.run(
        ["--config-file", str(config), "--cache-dir", str(tmp_path / "cache"), *files]
    )
    # mypy prints paths relative to the working directory when it can
    ours = [line for line in out.splitlines() if str(Path(line.split(":")[0]).resolve()) in files]
    assert "tensorrt_bindings" in out or "Success" in out, out + err  # the stubs were really read
    assert not ours, "\n".join(ours)


def test_build_says_why_tensorrt_is_unavailable(tmp_path):
    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("tensorrt and a CUDA device are present here")
    assert "tensorrt" in reason.lower() or "cuda" in reason.lower()
    with pytest.raises(TensorRTUnavailable, match=re.escape(reason)):
        build_engines_into_bundle(tmp_path, tile=16, batch=2)


def test_profiles_plan_names_and_the_rebuild_command():
    manifest = tiny_manifest()
    static = shape_profile(manifest, tile=16, batch=2)
    assert (
        static.min == static.max == {"batch": 2, "lr_height": 16, "lr_width": 16, "height": 64, "width": 64}
    )
    dynamic = shape_profile(manifest, tile=32, batch=8, dynamic=True)
    assert dynamic.min["batch"] == 1 and dynamic.max["batch"] == 8 and dynamic.max["height"] == 128
    with pytest.raises(ValueError, match="batch"):
        shape_profile(manifest, tile=16, batch=0)
    odd = dataclasses.replace(manifest, hr_multiple_of=16)  # LR tiles must then be multiples of 4
    with pytest.raises(ValueError, match="multiple of 4"):
        shape_profile(odd, tile=18, batch=1)
    assert rebuild_command("/b", static) == "python -m esrdf.engines.tensorrt_build /b --tile 16 --batch 2"
    assert rebuild_command("/b", dynamic).endswith("--tile 32 --batch 8 --dynamic")
    other_gpu = dataclasses.replace(HERE, gpu_name="NVIDIA A100-SXM4-40GB", compute_capability="8.0")
    names = {
        plan_file_name(r, "fp16", p, i)
        for r in ("predictor", "step")
        for p in (static, dynamic)
        for i in (HERE, other_gpu)
    }
    assert len(names) == 8 and all(n.endswith(".plan") and "/" not in n for n in names)
    caches = {
        timing_cache_path("/c", HERE),
        timing_cache_path("/c", other_gpu),
        timing_cache_path("/c", dataclasses.replace(HERE, tensorrt_version="11.0.0")),
    }
    assert len(caches) == 3  # never shared across GPU models, SMs or TensorRT versions


def test_a_plan_keyed_to_another_machine_is_refused_naming_the_rebuild_command(tmp_path):
    profile = ShapeProfile.static(2, 16, 4)
    graph = GraphEntry("step", "fp16", "step.fp16.onnx", "a" * 64, [], [], 18)
    good = engine_entry("step", HERE, profile, "a" * 64)
    assert key_mismatches(good.key, HERE, "a" * 64) == []
    other = dataclasses.replace(
        HERE, tensorrt_version="10.8.0.43", gpu_name="NVIDIA L4", compute_capability="8.9"
    )
    found = key_mismatches(good.key, other, "b" * 64)
    assert len(found) == 4 and "10.8.0.43" in found[0] and "NVIDIA L4" in found[1] and "8.9" in found[2]

    bundle = Bundle(tmp_path, tiny_manifest([graph], [good]))
    assert usable_entries(bundle, "step", "fp16", HERE) == [good]
    with pytest.raises(EngineKeyMismatch) as info:
        usable_entries(bundle, "step", "fp16", other)
    assert "rebuild it with: python -m esrdf.engines.tensorrt_build" in str(info.value)
    assert "--tile 16 --batch 2" in str(info.value) and "NVIDIA L4" in str(info.value)
    stale_graph = Bundle(tmp_path, tiny_manifest([dataclasses.replace(graph, sha256="c" * 64)], [good]))
    with pytest.raises(EngineKeyMismatch, match="ONNX sha256"):
        usable_entries(stale_graph, "step", "fp16", HERE)
    with pytest.raises(BundleError, match="no fp16 TensorRT engine for the predictor graph; build one with"):
        usable_entries(bundle, "predictor", "fp16", HERE)


def test_adding_plans_rewrites_the_bundle_atomically_and_keeps_other_engines(tmp_path):
    root = tmp_path / "bundle"

    def build(tmp: Path) -> None:
        (tmp / "torch").mkdir()
        (tmp / "torch" / "model.safetensors").write_bytes(b"weights stand-in")
        write_manifest(tmp, tiny_manifest())

    write_bundle_atomically(root, build)
    static, dynamic = ShapeProfile.static(2, 16, 4), ShapeProfile.dynamic(4, 16, 4, 4)

    def built(profile: ShapeProfile, payload: bytes) -> BuiltPlan:
        import hashlib

        entry = dataclasses.replace(
            engine_entry("step", HERE, profile, "a" * 64), sha256=hashlib.sha256(payload).hexdigest()
        )
        return BuiltPlan(entry=entry, plan=payload)

    add_plans_to_bundle(load_bundle(root), [built(static, b"plan one"), built(dynamic, b"plan two")])
    add_plans_to_bundle(load_bundle(root), [built(static, b"plan one, rebuilt")])
    bundle = load_bundle(root, verify=True)
    files = {e.file: (root / e.file).read_bytes() for e in bundle.manifest.engines}
    assert sorted(files.values()) == [b"plan one, rebuilt", b"plan two"]
    assert len(list(root.glob("*.plan"))) == 2  # the superseded plan is gone
    assert (root / "torch" / "model.safetensors").read_bytes() == b"weights stand-in"
    # No staging or old folders left; the lock file stays by design (esrdf.atomic.file_lock).
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bundle")] == [".bundle.lock"]


def test_concurrent_builds_keep_each_others_manifest_rows(tmp_path):
    """Two builds that loaded the bundle before either wrote (two buckets at once) lose no row."""
    import hashlib
    import threading

    root = tmp_path / "bundle"
    write_bundle_atomically(root, lambda tmp: write_manifest(tmp, tiny_manifest()))
    stale = load_bundle(root)  # both builds start from the manifest without engines
    profiles = [ShapeProfile.static(b, 16, 4) for b in (1, 2, 4, 8)]

    def add(profile: ShapeProfile) -> None:
        payload = f"plan b{profile.max['batch']}".encode()
        entry = dataclasses.replace(
            engine_entry("step", HERE, profile, "a" * 64), sha256=hashlib.sha256(payload).hexdigest()
        )
        add_plans_to_bundle(stale, [BuiltPlan(entry=entry, plan=payload)])

    threads = [threading.Thread(target=add, args=(p,)) for p in profiles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bundle = load_bundle(root, verify=True)
    assert sorted(e.key.profile["max"]["batch"] for e in bundle.manifest.engines) == [1, 2, 4, 8]
    assert sorted((root / e.file).read_bytes() for e in bundle.manifest.engines) == [
        b"plan b1",
        b"plan b2",
        b"plan b4",
        b"plan b8",
    ]


def test_plan_version_keys_are_major_minor_patch():
    from esrdf.engines.tensorrt_build import version_key

    # The same cases as runtime/cpp/tests/test_engine_keys.cpp (tensorrt_version_key, version_key).
    assert version_key("10.13.3.9") == version_key("10.13.3") == "10.13.3"
    assert version_key("11.1.0.12") == "11.1.0"
    for bad in ("10.13", "ten.13.3", ""):
        with pytest.raises(ValueError, match="MAJOR.MINOR.PATCH"):
            version_key(bad)
    # Plans keyed by an older manifest's 4-part string still match the 3-part key of this machine ...
    profile = ShapeProfile.static(2, 16, 4)
    old_row = engine_entry(
        "step", dataclasses.replace(HERE, tensorrt_version="10.13.0.35"), profile, "a" * 64
    )
    assert key_mismatches(old_row.key, dataclasses.replace(HERE, tensorrt_version="10.13.0"), "a" * 64) == []
    # ... and another patch release does not.
    found = key_mismatches(old_row.key, dataclasses.replace(HERE, tensorrt_version="10.13.1"), "a" * 64)
    assert found == ["TensorRT 10.13.0.35 (here 10.13.1)"]


class FakeBuilderConfig:
    """The IBuilderConfig calls the build makes around TF32 and the timing cache; it rejects caches whose
    bytes are ``bad``, and returns no cache after the build when TensorRT had none attached."""

    def __init__(self, bad: bytes = b"corrupt") -> None:
        self.bad, self.cleared, self.attached = bad, [], []

    def clear_flag(self, flag: object) -> None:
        self.cleared.append(flag)

    def create_timing_cache(self, blob: bytes) -> bytes:
        return blob

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        if cache == self.bad:
            return False
        self.attached.append(cache)
        return True

    def get_timing_cache(self) -> object:
        if not self.attached:
            return None
        return type("Cache", (), {"serialize": lambda _self: b"fresh timings"})()


def test_a_rejected_timing_cache_is_replaced_by_a_fresh_one_and_said_so(tmp_path, caplog):
    import logging

    from esrdf.engines.tensorrt_build import attach_timing_cache, save_timing_cache

    cache = tmp_path / "esrdf-timing.cache"
    cache.write_bytes(b"corrupt")
    config = FakeBuilderConfig()
    with caplog.at_level(logging.WARNING, logger="esrdf.engines.tensorrt_build"):
        assert attach_timing_cache(config, cache) is False
    assert "rejected the timing cache" in caplog.text and config.attached == [b""]
    assert save_timing_cache(config, cache) and cache.read_bytes() == b"fresh timings"
    cache.write_bytes(b"good timings")
    assert attach_timing_cache(FakeBuilderConfig(), cache) is True
    assert save_timing_cache(FakeBuilderConfig(), cache) is False  # none to give: the file is kept
    assert cache.read_bytes() == b"good timings"


def test_fp32_plans_clear_tf32_and_fp16_plans_leave_the_flags(monkeypatch):
    import sys
    import types

    from esrdf.engines.tensorrt_build import clear_tf32_for_fp32

    fake_trt = types.SimpleNamespace(BuilderFlag=types.SimpleNamespace(TF32="TF32"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt)
    fp32, fp16 = FakeBuilderConfig(), FakeBuilderConfig()
    assert clear_tf32_for_fp32(fp32, "fp32") and fp32.cleared == ["TF32"]
    assert not clear_tf32_for_fp32(fp16, "fp16") and fp16.cleared == []


class FakeContext:
    """An IExecutionContext that records its shapes and runs; ``refuse`` makes set_input_shape fail."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse, self.shapes, self.addresses, self.runs, self.memory = refuse, {}, {}, 0, None

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if self.refuse:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, address: int) -> None:
        self.addresses[name] = address

    def set_device_memory(self, address: int, size: int) -> None:
        self.memory = (address, size)

    def execute_async_v3(self, stream: int) -> bool:
        self.runs += 1
        return True


class FakePlan:
    """An ICudaEngine of the step graph contract; ``one_context_per_profile`` mimics a TensorRT that gives
    a second context no profile."""

    def __init__(self, one_context_per_profile: bool = False) -> None:
        from esrdf.runtime.graph_spec import graph_spec

        spec = graph_spec("step", 3)
        self.names = [*spec.input_names, *spec.output_names]
        self.num_io_tensors = len(self.names)
        self.device_memory_size_v2 = 4096
        self.contexts: list[FakeContext] = []
        self.one_context_per_profile = one_context_per_profile

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def create_execution_context(self, strategy: object = None) -> FakeContext:
        self.contexts.append(FakeContext(refuse=self.one_context_per_profile and bool(self.contexts)))
        return self.contexts[-1]


def step_runner(plan: FakePlan, profile: ShapeProfile, monkeypatch, generation: list[int]):
    import torch

    from esrdf.engines import tensorrt_engine as te

    monkeypatch.setattr(te, "_user_managed", lambda: "USER_MANAGED")
    activations = te._SharedActivations(torch.device("cpu"), lambda: generation.append(1))
    dtypes = dict.fromkeys(plan.names, torch.float32)
    bump = lambda: generation.append(1)  # noqa: E731
    return te._PlanRunner(plan, profile, "step", 3, torch.device("cpu"), activations, bump, dtypes)


def step_inputs(batch: int, size: int):
    import torch

    hr = torch.zeros(batch, 3, size, size)
    return {"x_t": hr, "cond": hr, "t": torch.zeros(batch), "coefs": torch.zeros(batch, 3), "noise": hr}


def test_a_dynamic_plan_gets_one_context_per_shape_never_reshaped(monkeypatch):
    import types

    plan, generation = FakePlan(), []
    runner = step_runner(plan, ShapeProfile.dynamic(8, 16, 4, 4), monkeypatch, generation)
    stream = types.SimpleNamespace(cuda_stream=7)
    for batch in (1, 8, 1, 8, 3):  # b1 captured, then b8, then b1 replayed: each keeps its own context
        out = runner.run({"batch": batch, "height": 64, "width": 64}, step_inputs(batch, 64), stream)
        assert tuple(out.shape) == (batch, 3, 64, 64)
    assert len(plan.contexts) == 3 and [c.runs for c in plan.contexts] == [2, 2, 1]
    assert [c.shapes["x_t"][0] for c in plan.contexts] == [1, 8, 3]  # each bound once, to its own shape
    # All contexts share one activation block, and the I/O buffers: same addresses for every context.
    assert len({c.memory for c in plan.contexts}) == 1 and plan.contexts[0].memory[1] >= 4096
    assert len({c.addresses["x_t"] for c in plan.contexts}) == 1
    assert len(generation) == 1  # the one activation allocation; no re-shape ever invalidated a graph


def test_a_static_plan_pads_smaller_batches_into_its_one_context(monkeypatch):
    import types

    plan, generation = FakePlan(), []
    runner = step_runner(plan, ShapeProfile.static(4, 16, 4), monkeypatch, generation)
    for batch in (4, 1, 3):
        out = runner.run(
            {"batch": batch, "height": 64, "width": 64},
            step_inputs(batch, 64),
            types.SimpleNamespace(cuda_stream=7),
        )
        assert out.shape[0] == batch
    assert len(plan.contexts) == 1 and plan.contexts[0].shapes["x_t"] == (4, 3, 64, 64)


def test_one_context_per_profile_tensorrt_falls_back_to_reshaping_with_a_new_generation(monkeypatch, caplog):
    import logging
    import types

    plan, generation = FakePlan(one_context_per_profile=True), []
    runner = step_runner(plan, ShapeProfile.dynamic(8, 16, 4, 4), monkeypatch, generation)
    stream = types.SimpleNamespace(cuda_stream=7)
    with caplog.at_level(logging.WARNING, logger="esrdf.engines.tensorrt_engine"):
        for batch in (1, 8, 8, 1):
            runner.run({"batch": batch, "height": 64, "width": 64}, step_inputs(batch, 64), stream)
    assert "refused a second execution context" in caplog.text and runner.reshaping
    assert plan.contexts[0].runs == 4 and plan.contexts[0].shapes["x_t"][0] == 1
    assert len(generation) == 1 + 2  # activations once, then each re-shape (b1 -> b8, b8 -> b1)


# --- tensorrt --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trt_bundle(tmp_path_factory) -> Path:
    """A tiny exported bundle (fp32 + fp16 graphs) with static b2/t16 and dynamic b1-4/t<=16 engines."""
    from esrdf.bench.random_model import random_checkpoint
    from esrdf.export.bundle_writer import export_bundle

    root = tmp_path_factory.mktemp("trt")
    random_checkpoint(root / "ckpt", CFG)
    bundle = export_bundle(root / "ckpt", root / "bundle", precision="both", tile=16, batch=2, progress=False)
    build_engines_into_bundle(bundle, tile=16, batch=2, timing_cache_dir=root / "cache")
    build_engines_into_bundle(bundle, tile=16, batch=4, dynamic=True, timing_cache_dir=root / "cache")
    return bundle


def photo_tiles(photo: np.ndarray, batch: int, size: int) -> np.ndarray:
    crops = [photo[40 * b : 40 * b + size, 60 * b : 60 * b + size] for b in range(batch)]
    return np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0


@pytest.mark.tensorrt
def test_engines_are_built_into_the_manifest_with_this_machines_key(trt_bundle):
    from esrdf.engines.tensorrt_build import machine_identity

    bundle = load_bundle(trt_bundle, verify=True)
    here = machine_identity()
    assert len(bundle.manifest.engines) == 4  # 2 roles x (static, dynamic)
    for e in bundle.manifest.engines:
        graph = bundle.manifest.graph(e.role, "fp16")
        assert graph is not None and e.key.onnx_sha256 == graph.sha256
        assert (e.key.gpu_name, e.key.compute_capability) == (here.gpu_name, here.compute_capability)
    assert list((trt_bundle.parent / "cache").glob("esrdf-timing-*.cache"))


@pytest.mark.tensorrt
def test_a_plan_from_another_gpu_is_refused_with_the_rebuild_command(trt_bundle, tmp_path):
    from esrdf.engines.tensorrt_engine import TensorRTEngine

    copy = tmp_path / "bundle"
    shutil.copytree(trt_bundle, copy)
    manifest = load_bundle(copy).manifest
    moved = [
        dataclasses.replace(e, key=dataclasses.replace(e.key, gpu_name="NVIDIA GeForce GTX 1080"))
        for e in manifest.engines
    ]
    write_manifest(copy, dataclasses.replace(manifest, engines=moved))
    with pytest.raises(EngineKeyMismatch, match=r"rebuild it with: python -m esrdf\.engines\.tensorrt_build"):
        TensorRTEngine(load_bundle(copy))


def static_only(bundle_dir: Path, dest: Path) -> Path:
    """A copy of the bundle that keeps only its static (b2) plans: batch 1 and 3 must pad or fail."""
    shutil.copytree(bundle_dir, dest)
    manifest = load_bundle(dest).manifest
    static = [e for e in manifest.engines if e.key.profile["min"] == e.key.profile["max"]]
    write_manifest(dest, dataclasses.replace(manifest, engines=static))
    return dest


@pytest.mark.tensorrt
def test_fp16_engines_meet_the_fp16_bars_against_fp32_eager(trt_bundle, photos, tmp_path):
    import torch

    from esrdf.engines.tensorrt_engine import TensorRTEngine
    from esrdf.engines.torch_engine import TorchEngine
    from esrdf.export.parity import bar_failures, compare

    bundle = load_bundle(trt_bundle)
    padded = TensorRTEngine(load_bundle(static_only(trt_bundle, tmp_path / "static")))
    trt_engine, eager = TensorRTEngine(bundle), TorchEngine.from_bundle(bundle, device="cuda")
    fails = []
    # (engine, batch, the plan kind that must run): exact static, dynamic, and the static plan padded.
    cases = [
        (trt_engine, 2, "b2-t16"),
        (trt_engine, 1, "b1-4-t"),
        (trt_engine, 3, "b1-4-t"),
        (padded, 1, "b2-t16"),
    ]
    for name in ("astronaut", "coffee"):
        for engine, batch, plan_kind in cases:
            lr = eager.upload(photo_tiles(photos[name], batch, 16))
            coarse = eager.predictor(lr)
            fails += bar_failures(
                compare(engine.download(engine.predictor(lr)), eager.download(coarse)),
                FP16_GRAPH,
                f"predictor b{batch} {name} ({plan_kind})",
            )
            x_t = torch.flip(coarse, dims=(-1,)) * 0.5
            t = torch.full((batch,), 120.0, device="cuda")
            coefs = torch.tensor([[0.98, -0.35, 0.12]], device="cuda").expand(batch, 3).contiguous()
            args = (x_t, coarse, t, coefs, torch.roll(coarse, 7, dims=-2))
            fails += bar_failures(
                compare(engine.download(engine.step(*args)), eager.download(eager.step(*args))),
                FP16_GRAPH,
                f"step b{batch} {name} ({plan_kind})",
            )
            assert all(f".{plan_kind}" in engine.last_plans[r] for r in ("predictor", "step")), (
                engine.last_plans
            )
    assert not fails, fails
    hr3 = torch.zeros(3, 3, 64, 64, device="cuda")
    step3 = (hr3, hr3, torch.zeros(3, device="cuda"), torch.zeros(3, 3, device="cuda"), hr3)
    with pytest.raises(ValueError, match="no step engine takes"):  # batch 3 exceeds the static b2 plan
        padded.step(*step3)


@pytest.mark.tensorrt
def test_tensorrt_graph_replay_is_bit_exact_with_stream_execution(trt_bundle, photos):
    from esrdf.engines.cuda_graph import CudaGraphSampler
    from esrdf.engines.tensorrt_engine import TensorRTEngine
    from esrdf.runtime.noise import noise_field
    from esrdf.runtime.sampling import plan_steps

    bundle = load_bundle(trt_bundle)
    engine = TensorRTEngine(bundle)
    plan = plan_steps(bundle.manifest.schedule.array(), "ddim", 6, 0.5)
    lr = photo_tiles(photos["astronaut"], 2, 16)
    noises = np.stack([np.stack([noise_field(3, k, 0, 64 * b, 64, 64) for b in range(2)]) for k in range(7)])
    graphed = CudaGraphSampler(engine, 3, 4)
    replays = [graphed.sample(lr, noises, plan) for _ in range(2)]
    stream = CudaGraphSampler(engine, 3, 4, use_graphs=False).sample(lr, noises, plan)
    assert graphed.captures == 1
    assert np.array_equal(replays[0], stream) and np.array_equal(replays[1], stream)


@pytest.mark.tensorrt
def test_graphs_at_two_batches_of_one_dynamic_plan_replay_on_their_own_contexts(trt_bundle, photos):
    """A graph captured at batch 1, then one at batch 3 on the same dynamic plan, then batch 1 replayed
    again: each batch has its own execution context, so the first graph still equals stream execution."""
    from esrdf.engines.cuda_graph import CudaGraphSampler
    from esrdf.engines.tensorrt_engine import TensorRTEngine
    from esrdf.runtime.noise import noise_field
    from esrdf.runtime.sampling import plan_steps

    bundle = load_bundle(trt_bundle)
    engine = TensorRTEngine(bundle)
    plan = plan_steps(bundle.manifest.schedule.array(), "ddim", 4, 0.0)

    def inputs(batch: int) -> tuple[np.ndarray, np.ndarray]:
        lr = photo_tiles(photos["coffee"], batch, 16)
        fields = [[noise_field(5, k, 0, 64 * b, 64, 64) for b in range(batch)] for k in range(5)]
        return lr, np.asarray(fields)

    graphed, stream = CudaGraphSampler(engine, 3, 4), CudaGraphSampler(engine, 3, 4, use_graphs=False)
    first = graphed.sample(*inputs(1), plan)
    generation = engine.buffers_generation
    graphed.sample(*inputs(3), plan)
    again = graphed.sample(*inputs(1), plan)
    assert ".b1-4-t" in engine.last_plans["step"] and graphed.captures == 2
    assert engine.buffers_generation == generation  # no re-shape invalidated the batch-1 graph
    want = stream.sample(*inputs(1), plan)
    assert np.array_equal(first, want) and np.array_equal(again, want)
