"""torch -> ONNX for the two graphs, with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``).

Names and axes come from ``esrdf.runtime.graph_spec`` (the one I/O contract per graph); this module adds
what only export needs: example inputs and ``torch.export.Dim`` objects for the named axes.

- ``batch`` is free (examples use batch 2, so it is never specialised to 1);
- the predictor's ``lr_height``/``lr_width`` are free: every conv keeps the size, and the bicubic skip path
  (ONNX ``Resize``, cubic, a = -0.75, half-pixel) and ``PixelShuffle`` (``DepthToSpace``) export with symbolic
  sizes, so the coarse image is ``scale`` x any input;
- the step graph's ``height``/``width`` are ``k * multiple_of`` (``UNetConfig.multiple_of``), the U-Net's
  downsampling requirement, expressed as ``Dim("height_div<m>") * m``.
Example sizes are distinct per axis (non-square, batch unequal to any fixed size) because torch.export
unifies axes whose example sizes coincide ("duck sizing") and would then refuse the declared dims.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Iterator

import onnx
import torch
from torch import nn
from torch.export import Dim
from torch.onnx import _constants as _torch_onnx_constants

from esrdf.config import ModelConfig
from esrdf.runtime.graph_spec import PREDICTOR, STEP, graph_spec

DEFAULT_OPSET = 18
MIN_OPSET = 18  # the dynamo exporter's floor
# torch.onnx's ceiling (a private constant, hence the fallback), and never past what this onnx knows.
MAX_OPSET = min(getattr(_torch_onnx_constants, "ONNX_MAX_OPSET", 23), onnx.defs.onnx_opset_version())
EXAMPLE_BATCH = 2
MAX_BATCH = 4096
MAX_LR_SIDE = 4096
MAX_HR_SIDE = 16384


def lr_multiple_of(cfg: ModelConfig) -> int:
    """LR sides that make ``scale * side`` a multiple of the U-Net's ``multiple_of``."""
    m = cfg.unet.multiple_of
    return m // math.gcd(m, cfg.scale)


def example_lr_size(cfg: ModelConfig) -> tuple[int, int]:
    """A small non-square LR example whose HR size suits the U-Net: (2k, 3k) multiples of lr_multiple_of."""
    k = max(lr_multiple_of(cfg), 4)
    return 2 * k, 3 * k


def example_inputs(
    role: str, cfg: ModelConfig, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, ...]:
    """Tracing inputs for ``role``; the exporter only needs their shapes and dtypes to be representative."""
    g = generator or torch.Generator().manual_seed(0)
    channels = cfg.predictor.in_channels
    h, w = example_lr_size(cfg)
    if role == PREDICTOR:
        return (torch.rand(EXAMPLE_BATCH, channels, h, w, generator=g) * 2 - 1,)
    if role == STEP:
        image = (EXAMPLE_BATCH, channels, h * cfg.scale, w * cfg.scale)
        t = torch.tensor([cfg.schedule.timesteps - 1, 0], dtype=torch.float32)
        coefs = torch.tensor([[1.01, -0.05, 0.02], [1.0, -0.001, 0.0]], dtype=torch.float32)
        return (
            torch.randn(*image, generator=g),
            torch.rand(*image, generator=g) * 2 - 1,
            t,
            coefs,
            torch.randn(*image, generator=g),
        )
    raise ValueError(f"unknown graph role {role!r}")


def dynamic_shapes(role: str, cfg: ModelConfig) -> dict[str, dict[int, Dim]]:
    """``torch.export`` dims for every named axis of ``role``'s spec inputs (keyed by input name)."""
    m = cfg.unet.multiple_of
    dims: dict[str, Dim] = {
        "batch": Dim("batch", min=1, max=MAX_BATCH),
        "lr_height": Dim("lr_height", min=1, max=MAX_LR_SIDE),
        "lr_width": Dim("lr_width", min=1, max=MAX_LR_SIDE),
        "height": Dim(f"height_div{m}", min=1, max=MAX_HR_SIDE // m) * m,
        "width": Dim(f"width_div{m}", min=1, max=MAX_HR_SIDE // m) * m,
    }
    spec = graph_spec(role, cfg.predictor.in_channels)
    return {t.name: {axis: dims[name] for axis, name in t.dynamic_axes().items()} for t in spec.inputs}


@contextlib.contextmanager
def _quiet_exporter(verbose: bool) -> Iterator[None]:
    """The exporter narrates each stage on stdout and logs warnings (missing torchvision ops, axis renames)
    that say nothing about this model; the CLI shows its own progress instead."""
    if verbose:
        yield
        return
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_graph(
    module: nn.Module, role: str, cfg: ModelConfig, opset: int = DEFAULT_OPSET, verbose: bool = False
) -> onnx.ModelProto:
    """Export ``module`` (``PredictorModule`` or ``StepModule``, eval mode, fp32) as ``role``'s graph.

    Returns the exporter's model with its per-node metadata intact (``esrdf.export.fp16`` and
    ``esrdf.export.cleanup`` read the name scopes); names and axes are checked against the spec.
    """
    spec = graph_spec(role, cfg.predictor.in_channels)
    module = module.eval()
    with _quiet_exporter(verbose), torch.no_grad():
        program = torch.onnx.export(
            module,
            example_inputs(role, cfg),
            dynamo=True,
            opset_version=opset,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            dynamic_shapes=dynamic_shapes(role, cfg),
            optimize=True,
            verbose=verbose,
        )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError(f"torch.onnx.export returned no program for the {role} graph")
    model = program.model_proto
    names = ([i.name for i in model.graph.input], [o.name for o in model.graph.output])
    if names != (list(spec.input_names), list(spec.output_names)):
        raise RuntimeError(f"exported {role} graph has I/O {names}, the spec says {spec}")
    return model
