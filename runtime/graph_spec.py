"""The I/O contract of each exported graph, declared once.

Export builds sample inputs and dynamic axes from these specs, the TensorRT builder derives optimisation
profiles from them, and the runtime checks a bundle's graphs against them. Plain data: no torch here.

Step graph (paper Eq. 5-7 with the sampler update folded in):
    eps    = unet(concat[cond, x_t], t)
    x_prev = coefs[:, 0] * x_t + coefs[:, 1] * eps + coefs[:, 2] * noise      (fp32 arithmetic)
Both DDPM ancestral steps and DDIM steps with any eta are affine in (x_t, eps, noise), so the runtime picks
the sampler and step count by choosing the coefficients (``esrdf.runtime.sampling``), with no re-export.
"""

from __future__ import annotations

from dataclasses import dataclass

Dim = int | str

PREDICTOR = "predictor"
STEP = "step"
GRAPH_ROLES = (PREDICTOR, STEP)
NUM_STEP_COEFS = 3  # (c_xt, c_eps, c_noise)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[Dim, ...]  # ints are fixed, strings are named dynamic axes
    dtype: str = "float32"

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """Concrete shape with the named axes taken from ``sizes``."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.dims)


@dataclass(frozen=True)
class GraphSpec:
    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def input_shapes(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.shape(sizes) for t in self.inputs}


def predictor_spec(channels: int = 3) -> GraphSpec:
    """lr in [-1, 1], (B, C, h, w) -> coarse HR c = P(lr), (B, C, s*h, s*w)."""
    return GraphSpec(
        role=PREDICTOR,
        inputs=(TensorSpec("lr", ("batch", channels, "lr_height", "lr_width")),),
        outputs=(TensorSpec("coarse", ("batch", channels, "height", "width")),),
    )


def step_spec(channels: int = 3) -> GraphSpec:
    """One reverse-diffusion step on the residual r (paper Eq. 6-7), update included."""
    image = ("batch", channels, "height", "width")
    return GraphSpec(
        role=STEP,
        inputs=(
            TensorSpec("x_t", image),
            TensorSpec("cond", image),
            TensorSpec("t", ("batch",)),
            TensorSpec("coefs", ("batch", NUM_STEP_COEFS)),
            TensorSpec("noise", image),
        ),
        outputs=(TensorSpec("x_prev", image),),
    )


def graph_spec(role: str, channels: int = 3) -> GraphSpec:
    if role == PREDICTOR:
        return predictor_spec(channels)
    if role == STEP:
        return step_spec(channels)
    raise ValueError(f"unknown graph role {role!r}; expected one of {GRAPH_ROLES}")


def tile_sizes(batch: int, tile: int, scale: int) -> dict[str, int]:
    """Axis sizes for a batch of ``tile`` x ``tile`` LR tiles (outputs are ``scale * tile`` square)."""
    return {
        "batch": batch,
        "lr_height": tile,
        "lr_width": tile,
        "height": tile * scale,
        "width": tile * scale,
    }


@dataclass(frozen=True)
class ShapeProfile:
    """min/opt/max axis sizes for one engine optimisation profile (static when all three are equal)."""

    min: dict[str, int]
    opt: dict[str, int]
    max: dict[str, int]

    @classmethod
    def static(cls, batch: int, tile: int, scale: int) -> ShapeProfile:
        sizes = tile_sizes(batch, tile, scale)
        return cls(min=sizes, opt=sizes, max=dict(sizes))

    @classmethod
    def dynamic(cls, max_batch: int, tile: int, scale: int, min_tile: int) -> ShapeProfile:
        return cls(
            min=tile_sizes(1, min_tile, scale),
            opt=tile_sizes(max_batch, tile, scale),
            max=tile_sizes(max_batch, tile, scale),
        )
