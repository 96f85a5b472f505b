"""The predictor's training objective (paper Section 4.3, Eq. 15): L = L_Em + L_Feat + L_Pixel.

The paper weights the three terms equally. The authors' train scripts use ``1 * L1 + 100 * hist + content``,
i.e. (w_pixel, w_em, w_feat) = (1, 100, 1), with their variant of the histogram loss and an unnormalised
VGG input (``LossConfig.authors_code()``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from esrdf.config import ConfigError, strict_from_dict, to_jsonable
from esrdf.losses.entropy import EntropyLossConfig, entropy_matching_loss
from esrdf.losses.feature import AUTHORS_FEATURE_LAYERS, FeatureLoss, check_feature_layers
from esrdf.vgg import InputNorm, VGG16Features, load_vgg16


@dataclass(frozen=True)
class LossConfig:
    """Weights and settings of L = w_em * L_Em + w_feat * L_Feat + w_pixel * L_Pixel (L_Pixel = L1).

    ``feat_layers`` are VGG16 taps (relu1_2 ... relu5_3); ``feat_input_norm`` is how [-1, 1] images are
    normalised before VGG16 ("imagenet", or "none" as in the authors' code). A weight of 0 skips its term.
    """

    w_em: float = 1.0
    w_feat: float = 1.0
    w_pixel: float = 1.0
    entropy: EntropyLossConfig = field(default_factory=EntropyLossConfig)
    feat_layers: tuple[str, ...] = AUTHORS_FEATURE_LAYERS
    feat_input_norm: InputNorm = "imagenet"

    def __post_init__(self) -> None:
        if min(self.w_em, self.w_feat, self.w_pixel) < 0:
            raise ConfigError(f"loss weights must be >= 0, got {self.w_em}, {self.w_feat}, {self.w_pixel}")
        try:
            check_feature_layers(self.feat_layers)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    @classmethod
    def paper(cls) -> LossConfig:
        """Equal weights, patch-wise L_Em, relu1_2 features of the ImageNet-normalised input."""
        return cls()

    @classmethod
    def authors_code(cls) -> LossConfig:
        """Train-CNN/train_*.py: 1 * L1 + 100 * histogram_loss + content_mse_loss(deep_num=0), raw input."""
        return cls(
            w_em=100.0,
            w_feat=1.0,
            w_pixel=1.0,
            entropy=EntropyLossConfig.authors_code(),
            feat_layers=AUTHORS_FEATURE_LAYERS,
            feat_input_norm="none",
        )

    @classmethod
    def from_name(cls, name: str) -> LossConfig:
        presets = {"paper": cls.paper, "authors_code": cls.authors_code}
        if name not in presets:
            raise ConfigError(f"unknown loss preset {name!r}; choose one of {sorted(presets)}")
        return presets[name]()

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossConfig:
        return strict_from_dict(cls, data, "loss")


class PredictorLossTerms(NamedTuple):
    """``total`` is the weighted sum to backpropagate; the terms are unweighted, for logging."""

    total: torch.Tensor
    em: torch.Tensor
    feat: torch.Tensor
    pixel: torch.Tensor


class PredictorLoss(nn.Module):
    """L(y_hat, y) for the predictor P: ``loss(pred, target) -> PredictorLossTerms``, images in [-1, 1].

    With ``w_feat > 0`` it needs the VGG16 weights: pass ``vgg`` or have them converted in the cache;
    otherwise it raises ``MissingWeightsError`` naming ``esrdf-train vgg-weights`` (never a silent 0).
    """

    def __init__(self, cfg: LossConfig | None = None, vgg: VGG16Features | None = None) -> None:
        super().__init__()
        self.cfg = cfg or LossConfig.paper()
        self.feature: FeatureLoss | None = None
        if self.cfg.w_feat > 0:
            if vgg is None:
                vgg = load_vgg16(input_norm=self.cfg.feat_input_norm)
            elif vgg.input_norm != self.cfg.feat_input_norm:
                raise ValueError(
                    f"the VGG16 module normalises its input as {vgg.input_norm!r} but the loss "
                    f"config asks for {self.cfg.feat_input_norm!r}"
                )
            self.feature = FeatureLoss(vgg, self.cfg.feat_layers)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> PredictorLossTerms:
        zero = pred.new_zeros(())
        cfg = self.cfg
        pixel = F.l1_loss(pred, target) if cfg.w_pixel > 0 else zero
        em = entropy_matching_loss(pred, target, cfg.entropy) if cfg.w_em > 0 else zero
        feat = self.feature(pred, target) if self.feature is not None else zero
        total = cfg.w_em * em + cfg.w_feat * feat + cfg.w_pixel * pixel
        return PredictorLossTerms(total=total, em=em, feat=feat, pixel=pixel)
