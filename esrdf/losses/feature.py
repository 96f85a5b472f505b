"""Feature loss L_Feat (paper Section 4.3): squared distance of frozen VGG16 ImageNet features.

The authors' code (Train-CNN/loss.py ``content_mse_loss``, called with its default ``deep_num=0``)
compares only the first tap, relu1_2, with ``nn.MSELoss`` (the mean over all feature elements); that is
the default here. Several taps can be chosen; their mean squared distances are summed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esrdf.vgg import TAP_NAMES, VGG16Features

AUTHORS_FEATURE_LAYERS: tuple[str, ...] = ("relu1_2",)


def check_feature_layers(layers: tuple[str, ...]) -> None:
    unknown = [name for name in layers if name not in TAP_NAMES]
    if not layers or unknown:
        raise ValueError(f"feature layers must be a non-empty subset of {TAP_NAMES}, got {layers}")


class FeatureLoss(nn.Module):
    """L_Feat(y_hat, y) = sum over ``layers`` of mean((phi_l(y_hat) - phi_l(y))**2), inputs in [-1, 1].

    The input normalisation is the VGG module's own (``VGG16Features.input_norm``). Only the layers up to
    the deepest requested one are computed, and the target's features without a graph.
    """

    def __init__(self, vgg: VGG16Features, layers: tuple[str, ...] = AUTHORS_FEATURE_LAYERS) -> None:
        super().__init__()
        check_feature_layers(layers)
        self.vgg = vgg
        self.layer_ids = tuple(TAP_NAMES.index(name) for name in layers)
        self.depth = max(self.layer_ids) + 1

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        feats_pred = self.vgg(pred, depth=self.depth)
        with torch.no_grad():
            feats_target = self.vgg(target, depth=self.depth)
        losses = [F.mse_loss(feats_pred[i], feats_target[i]) for i in self.layer_ids]
        return torch.stack(losses).sum()
