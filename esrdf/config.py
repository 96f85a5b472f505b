"""Typed model configuration with named presets that round-trip strictly through JSON.

A checkpoint's ``config.json`` is ``ModelConfig.to_dict()``; loading it back with ``ModelConfig.from_dict``
rejects unknown or missing keys, so a typo never silently falls back to a default.

This module imports only the standard library: the export and runtime side read configs too. That is why
``SamplingOptions``, the one value every sampling entry point takes (``Upscaler``, ``UpscalerService``,
``esrdf-run``, ``esrdf-serve``, the tile model, ``esrdf-eval``), lives here.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")

ScheduleKind = Literal["linear", "cosine"]
# What the U-Net outputs (esrdf.diffusion.parameterisation): the paper's eps, v = sqrt(ab) eps -
# sqrt(1-ab) r_0 (Salimans & Ho 2022), or r_0 itself. Every consumer converts the output to eps, so the
# samplers and the exported step graph's (x_t, eps, noise) update are the same for all three.
Prediction = Literal["eps", "v", "x0"]
# Field metadata: a key added after checkpoints were written without it. A file that lacks it loads with the
# field's default, which reproduces what those files meant; to_dict always writes it.
ADDED_LATER = {"added_later": True}


class ConfigError(ValueError):
    """A config dict that does not match its dataclass: unknown, missing or mistyped keys."""


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a JSON value to ``annotation``: nested dataclasses, lists, dicts, tuples from lists, unions
    (the first member that fits) and checked literals; anything else must already have the right type."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        return strict_from_dict(annotation, value, where)
    if origin is Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(annotation)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(annotation)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {type(value).__name__}")
        _key, item = typing.get_args(annotation)
        return {str(k): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        (item_type, _ellipsis) = typing.get_args(annotation)
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:  # ``X | None``: X's own message says what is wrong inside it
            return _coerce(value, options[0], where)
        for option in options:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {annotation}")
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation in (int, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


def strict_from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown or missing keys are an error naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, spec in fields.items():
        if name not in data and spec.metadata.get("added_later"):
            continue
        if name not in data:
            raise ConfigError(f"{where}: missing key {name!r} for {cls.__name__}")
        kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
    return cls(**kwargs)


def to_jsonable(obj: Any) -> Any:
    """Dataclass -> plain dict with lists for tuples, ready for ``json.dumps``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_jsonable(v) for v in obj]
    return obj


def read_json_object(path: Path) -> dict[str, Any]:
    """A config file's JSON object; invalid JSON or a non-object is a ConfigError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


@dataclass(frozen=True)
class PredictorConfig:
    """The main-path CNN P(lr) -> coarse HR (paper Section 4.2, Fig. 5)."""

    scale: int = 4
    in_channels: int = 3
    base_channels: int = 64
    # The authors' module carries an unused bicubic_conv (1,731 parameters at 64 ch); keep it only to load
    # their state dicts unchanged.
    authors_unused_conv: bool = False

    def __post_init__(self) -> None:
        if self.scale not in (2, 4, 8):
            raise ConfigError(f"predictor.scale must be 2, 4 or 8, got {self.scale}")


@dataclass(frozen=True)
class UNetConfig:
    """The SR3-style conditional denoiser eps_theta(concat[c, x_t], t) (paper Section 3, Eq. 5-7)."""

    in_channels: int = 6
    out_channels: int = 3
    inner_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 4, 8, 8)
    # Attention sits at levels whose resolution, for a ``train_size`` input, is listed here (SR3 convention),
    # plus the middle block. The level is fixed at construction, so any input size exports the same graph.
    attn_resolutions: tuple[int, ...] = (16,)
    res_blocks: int = 2
    dropout: float = 0.0
    norm_groups: int = 32
    train_size: int = 128
    prediction: Prediction = field(default="eps", metadata=ADDED_LATER)  # the paper predicts eps (Eq. 6)

    @property
    def multiple_of(self) -> int:
        """Input H and W must be divisible by this: one 2x downsample per level but the last."""
        return 2 ** (len(self.channel_mults) - 1)


@dataclass(frozen=True)
class ScheduleConfig:
    """Forward-process noise schedule (paper Eq. 1-3). The paper uses linear, T=200, beta 1e-6..1e-2."""

    kind: ScheduleKind = "linear"
    timesteps: int = 200
    beta_start: float = 1e-6
    beta_end: float = 1e-2
    cosine_s: float = 0.008
    # Rescale so that alpha_bar_T == 0 (Lin et al. 2024). The paper's schedule ends at alpha_bar_T ~= 0.367,
    # far from pure noise, yet sampling starts from N(0, I); this option closes that gap.
    zero_terminal_snr: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild both networks and the schedule; stored as a checkpoint's config.json."""

    name: str
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    @property
    def scale(self) -> int:
        return self.predictor.scale

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return strict_from_dict(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json_file(cls, path: Path) -> ModelConfig:
        return cls.from_dict(read_json_object(path))

    def with_scale(self, scale: int) -> ModelConfig:
        return dataclasses.replace(self, predictor=dataclasses.replace(self.predictor, scale=scale))


def _presets() -> dict[str, ModelConfig]:
    paper = ModelConfig(name="paper")
    small = ModelConfig(
        name="small",
        unet=UNetConfig(
            inner_channels=32,
            channel_mults=(1, 2, 2, 4),
            attn_resolutions=(16,),
            res_blocks=1,
            norm_groups=16,
            train_size=128,
        ),
    )
    tiny = ModelConfig(
        name="tiny",
        predictor=PredictorConfig(base_channels=16),
        unet=UNetConfig(
            inner_channels=16,
            channel_mults=(1, 2, 2),
            attn_resolutions=(16,),
            res_blocks=1,
            norm_groups=8,
            train_size=64,
        ),
    )
    return {c.name: c for c in (paper, small, tiny)}


PRESETS: dict[str, ModelConfig] = _presets()


def preset(name: str, scale: int | None = None) -> ModelConfig:
    """Look up a named preset (``paper``, ``small``, ``tiny``), optionally at another scale."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = PRESETS[name]
    return cfg.with_scale(scale) if scale is not None else cfg


Sampler = Literal["ddim", "ddpm"]
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)
DEFAULT_SAMPLER = "ddim"
DEFAULT_STEPS = 50  # DDIM steps when nothing else says, at most the schedule's T (DDPM always runs all T)
DEFAULT_ETA = 0.0
DEFAULT_SEED = 0
# Where x_T starts: "paper" draws N(0, I), as the paper and the authors' code do; "matched" draws
# N(0, (1 - alpha_bar_{T-1}) I), the marginal q(r_T | r_0) that training saw for a zero-mean residual
# (docs/DESIGN.md section 6). Both scale one unit-variance noise field, so with injected noise "matched" is
# "paper" with field 0 multiplied by sqrt(1 - alpha_bar_{T-1}); at zero terminal SNR the two are equal.
Prior = Literal["paper", "matched"]
PRIORS: tuple[str, ...] = typing.get_args(Prior)
DEFAULT_PRIOR = "matched"


@dataclass(frozen=True)
class ResolvedSampling:
    """Sampling options with every field given: what a sampler runs with (see ``SamplingOptions.resolve``)."""

    sampler: str
    steps: int
    eta: float
    seed: int
    prior: str = DEFAULT_PRIOR

    @property
    def plan_key(self) -> tuple[str, int, float, str]:
        """What the step plan depends on: coefficients and x_T's scale (the seed only picks the noise)."""
        return self.sampler, self.steps, self.eta, self.prior


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample one request: sampler ("ddim" | "ddpm"), steps, DDIM eta, seed, x_T prior.

    ``None`` means "not given". ``resolve`` is the one place that fills what is not given: first from
    ``defaults`` (e.g. what a model is known to need), then by the built-in rule (DDIM, ``DEFAULT_STEPS``
    capped at T, eta 0, seed 0, the matched prior; DDPM runs all T). Values are checked where they are used
    (the step plan), so a bad one gets the sampler's own message. Frozen and hashable: requests can be
    grouped by it.
    """

    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    seed: int | None = None
    prior: str | None = None

    def or_defaults(self, defaults: SamplingOptions | None) -> SamplingOptions:
        """These options, with each field not given here taken from ``defaults``.

        A sampler given here that differs from the defaults' does not take their steps: a bundle's "DDIM, 20
        steps" must not turn a request for DDPM (which runs all T) into an invalid "DDPM, 20 steps".
        """
        if defaults is None:
            return self
        if self.sampler is not None and defaults.sampler not in (None, self.sampler):
            defaults = dataclasses.replace(defaults, steps=None)
        mine, theirs = dataclasses.astuple(self), dataclasses.astuple(defaults)
        return SamplingOptions(*(a if a is not None else b for a, b in zip(mine, theirs, strict=True)))

    def resolve(self, timesteps: int, defaults: SamplingOptions | None = None) -> ResolvedSampling:
        """Every field given, for a schedule of ``timesteps`` (T) steps."""
        o = self.or_defaults(defaults)
        sampler = DEFAULT_SAMPLER if o.sampler is None else o.sampler
        steps = o.steps
        if steps is None:
            steps = timesteps if sampler == "ddpm" else min(DEFAULT_STEPS, timesteps)
        eta = DEFAULT_ETA if o.eta is None else float(o.eta)
        seed = DEFAULT_SEED if o.seed is None else o.seed
        return ResolvedSampling(sampler, steps, eta, seed, DEFAULT_PRIOR if o.prior is None else o.prior)
