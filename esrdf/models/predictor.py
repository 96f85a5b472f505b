"""The main-path CNN predictor c = P(lr) of ESRDF (Huang et al., Symmetry 2026, Section 4.2, Fig. 5).

    lr --BSConv--> f0 --ARFU1--> f1 --ARFU2--> f2 --ARFU3--> f3
    concat[f1, f2, f3] (3*C ch) --ARFM--> g (C ch) --conv--> 3*s^2 ch --PixelShuffle(s)--> + bicubic(lr) = c

Every ARFU carries CBAM (channel then spatial attention). The diffusion model then only has to model the
residual r = hr - c (paper Eq. 8-9), whose entropy a good predictor keeps low.

Module attribute names follow the authors' ``Train-CNN/PixelPredictor.py`` (``bsconv.conv``, ``arfu1``,
``arfm.arfu1.cbam.ca.fc.0``, ``final_conv``, ...) so their state dicts load 1:1. At 64 base channels and
scale 4 the network has 2,381,948 parameters; ``authors_unused_conv`` adds their never-called
``bicubic_conv`` (1,731 more, 2,383,679 in all).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from esrdf.config import PredictorConfig

LEAKY_SLOPE = 0.1  # every activation in the predictor is LeakyReLU(0.1), as in the authors' code
CBAM_REDUCTION = 16
CBAM_SPATIAL_KERNEL = 7


class ChannelAttention(nn.Module):
    """CBAM channel gate: sigmoid(MLP(avgpool(x)) + MLP(maxpool(x))), one weight per channel."""

    def __init__(self, channels: int, reduction: int = CBAM_REDUCTION) -> None:
        super().__init__()
        # The authors use channels // 16; clamp at 1 so narrow test presets (< 16 ch) still build.
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # amax/mean over the spatial axes rather than Adaptive*Pool2d(1): same values, and plain reductions
        # export with dynamic H and W.
        avg = self.fc(x.mean(dim=(2, 3), keepdim=True))
        peak = self.fc(x.amax(dim=(2, 3), keepdim=True))
        return torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """CBAM spatial gate: sigmoid(conv7x7([mean_c(x), max_c(x)])), one weight per pixel."""

    def __init__(self, kernel_size: int = CBAM_SPATIAL_KERNEL) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # (B, 2, H, W)
        return torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    """Convolutional block attention (Woo et al. 2018): channel gate, then spatial gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.ca = ChannelAttention(channels)
        self.sa = SpatialAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.ca(x)
        return x * self.sa(x)


class BSConv(nn.Module):
    """The stem: conv3x3 -> BatchNorm -> LeakyReLU(0.1) (the authors' name; not blueprint-separable)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ARFUWithCBAM(nn.Module):
    """Attention residual feature unit: LeakyReLU(x + CBAM(conv(LeakyReLU(conv(x)))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1 = nn.LeakyReLU(LEAKY_SLOPE)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.cbam = CBAM(channels)
        self.relu2 = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.relu1(self.conv1(x)))
        return self.relu2(x + self.cbam(h))


class ARFM(nn.Module):
    """Attention residual fusion module: three ARFUs at the concatenated width, then a conv back to C,
    with a 1x1-conv projection of the input as the residual path."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.arfu1 = ARFUWithCBAM(in_channels)
        self.arfu2 = ARFUWithCBAM(in_channels)
        self.arfu3 = ARFUWithCBAM(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.residual_conv = nn.Conv2d(in_channels, out_channels, 1)
        self.relu1 = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.arfu3(self.arfu2(self.arfu1(x))))
        return self.relu1(h + self.residual_conv(x))


class Predictor(nn.Module):
    """ESRDF's pixel predictor P: lr (B, 3, h, w) in [-1, 1] -> coarse c (B, 3, s*h, s*w) (paper Fig. 5).

    Any h and w work (odd too): every conv keeps the size and the upsampling is an exact factor s.

    ``zero_init_head`` zeroes ``final_conv`` so that, before training, c is exactly the bicubic
    upsampling of lr; the learned branch then grows from zero. The authors keep PyTorch's default
    init, which starts c at bicubic plus a random texture; pass False for that. The architecture and
    parameter count are the same either way.
    """

    def __init__(self, cfg: PredictorConfig, zero_init_head: bool = True) -> None:
        super().__init__()
        c, ch = cfg.base_channels, cfg.in_channels
        self.upscale_factor = cfg.scale
        self.bsconv = BSConv(ch, c)
        self.arfu1 = ARFUWithCBAM(c)
        self.arfu2 = ARFUWithCBAM(c)
        self.arfu3 = ARFUWithCBAM(c)
        self.arfm = ARFM(3 * c, c)
        self.final_conv = nn.Conv2d(c, ch * cfg.scale**2, 3, padding=1)
        self.pixel_shuffle = nn.PixelShuffle(cfg.scale)
        if cfg.authors_unused_conv:
            # Never called; the authors' module defines it, so their checkpoints carry its weights.
            self.bicubic_conv = nn.Conv2d(c, ch, 3, padding=1)
        if zero_init_head:
            nn.init.zeros_(self.final_conv.weight)
            if self.final_conv.bias is not None:
                nn.init.zeros_(self.final_conv.bias)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        f1 = self.arfu1(self.bsconv(lr))
        f2 = self.arfu2(f1)
        f3 = self.arfu3(f2)
        fused = self.arfm(torch.cat([f1, f2, f3], dim=1))  # (B, 3C, h, w) -> (B, C, h, w)
        detail = self.pixel_shuffle(self.final_conv(fused))  # (B, 3*s^2, h, w) -> (B, 3, s*h, s*w)
        return detail + bicubic_upsample(lr, self.upscale_factor)


def bicubic_upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """PyTorch bicubic (a = -0.75, half-pixel centres, no antialias): the predictor's skip path.

    An explicit integer ``size`` rather than ``scale_factor``: the same sampling grid for integer scales, and
    torch.export can then prove the output is exactly s*h x s*w for every dynamic h, w.
    """
    size = (x.shape[-2] * scale, x.shape[-1] * scale)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)
