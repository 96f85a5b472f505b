"""Entropy-matching loss L_Em (paper Section 4.3, Eq. 10-15).

Each image is cut into patches; each patch and channel gets a differentiable soft histogram H over
``bins`` centres ``i/(bins-1)`` on [0, 1] (Gaussian kernel of width ``sigma``, normalised to sum 1), and
the loss is KL(H(y) || H(y_hat)) with the ground truth y as the reference distribution, with eps terms
inside the logs, averaged over patches, channels and the batch.

Why patch-wise (paper) and not global (authors' code): one histogram per image only constrains the
image's overall intensity distribution, which a prediction can match while putting the intensities in
the wrong places (a histogram is blind to any permutation of pixels). Per-patch histograms constrain it
region by region, the "regional consistency" the paper asks of the predictor, so that what is left for
the diffusion branch is a low-entropy residual r = y - y_hat.

The authors' public code (Train-CNN/loss.py, ``histogram_loss``) differs in four ways, each available
here as an option for ablations, and all four together as ``EntropyLossConfig.authors_code()``:

- ``mode="global"``: one histogram per image and channel, no patches.
- ``input_map="clamp"``: it calls ``x.clamp(0, 1)`` on [-1, 1] tensors, without the (x+1)/2 map. Every
  value below 0 (the darker half of the range) collapses onto bin 0 and its gradient is exactly zero, so
  dark pixels are starved. The paper's map is (x+1)/2, unclamped.
- ``kl_direction="reversed"``: the train scripts call ``criterion(hr, output)``, which becomes
  ``histogram_loss(input=hr, target=output)``, and the KL there is ``target * (log target - log input)``,
  i.e. KL(H(y_hat) || H(y)): the *prediction* is the reference distribution.
- It also reduces by summing over channels and averaging over bins (``kl.sum(dim=1).mean()``), i.e. the
  KL divided by ``bins`` and multiplied by the channel count: ``reduction="authors_code"``.

Memory: a soft histogram materialises [pixels, bins] kernel weights. Here they are built in blocks of at
most ``chunk_elements`` (pixel x bin) entries, each under activation checkpointing, so the peak is a few
blocks, not [B, C, H*W, bins] (4.8 GB per tensor for batch 96 at 128x128x3 with 256 bins, and autograd
would keep several). See ``EntropyLossConfig.chunk_elements`` for the measured peak.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.checkpoint import checkpoint

from esrdf.config import ConfigError, strict_from_dict, to_jsonable

EntropyMode = Literal["patch", "global"]
InputMap = Literal["affine", "clamp"]
KLDirection = Literal["gt_reference", "reversed"]
EntropyReduction = Literal["mean", "authors_code"]


@dataclass(frozen=True)
class EntropyLossConfig:
    """Settings of L_Em. The defaults are the paper's formulation (``paper()``).

    - ``patch_size``: side of the square patches in ``mode="patch"``; patches tile the image, the last row
      and column are aligned to the edge (overlapping a little) so every pixel counts. 16 is this toolkit's
      default; the authors' code has no patches.
    - ``bins``, ``sigma``, ``eps``: 256 centres on [0, 1], kernel width 0.01 (2.55 bin widths) and 1e-10, as
      in the authors' code.
    - ``chunk_elements``: most (pixel x bin) kernel weights built at once; only memory and speed depend
      on it, never the value. The default, 2**24, makes each float32 temporary 64 MiB: above glibc's 32 MiB
      ceiling for its dynamic mmap threshold, so on the CPU every block is returned to the OS when freed.
      With 16 MiB blocks (2**22) the heap fragmented and a batch of 96 at 128x128 reached 16 GB of RSS;
      with 2**24 it peaked 662 MiB above the inputs, forward and backward (measured on the 2-core CPU dev
      machine, one thread, 165 s). Unchunked, one [96, 3, 16384, 256] float32 tensor alone is 4.8 GB.
    """

    patch_size: int = 16
    bins: int = 256
    sigma: float = 0.01
    eps: float = 1e-10
    mode: EntropyMode = "patch"
    input_map: InputMap = "affine"
    kl_direction: KLDirection = "gt_reference"
    reduction: EntropyReduction = "mean"
    chunk_elements: int = 2**24

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.bins < 2 or self.sigma <= 0 or self.eps < 0:
            raise ConfigError(f"invalid entropy loss settings: {self}")
        if self.chunk_elements < self.bins:
            raise ConfigError(f"chunk_elements ({self.chunk_elements}) must be >= bins ({self.bins})")

    @classmethod
    def paper(cls) -> EntropyLossConfig:
        """Patch-wise, (x+1)/2 map, KL(H(y) || H(y_hat)) with the ground truth as reference."""
        return cls()

    @classmethod
    def authors_code(cls) -> EntropyLossConfig:
        """The authors' Train-CNN/loss.py: global histogram, clamp(0, 1), reversed KL, their reduction."""
        return cls(
            mode="global",
            input_map="clamp",
            kl_direction="reversed",
            reduction="authors_code",
            bins=256,
            sigma=0.01,
            eps=1e-10,
        )

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntropyLossConfig:
        return strict_from_dict(cls, data, "entropy")


def map_to_unit_interval(x: torch.Tensor, input_map: InputMap) -> torch.Tensor:
    """[-1, 1] image -> histogram domain. "affine": (x+1)/2 (paper); "clamp": x.clamp(0, 1) (authors)."""
    if input_map == "affine":
        return (x + 1.0) * 0.5
    if input_map == "clamp":
        return x.clamp(0.0, 1.0)
    raise ValueError(f"input_map must be 'affine' or 'clamp', got {input_map!r}")


def _patch_starts(size: int, patch: int) -> list[int]:
    """Top-left offsets of patches tiling ``size``; the last one is aligned to the edge."""
    starts = list(range(0, size - patch + 1, patch))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def histogram_groups(x: torch.Tensor, cfg: EntropyLossConfig) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, G, n]: the G pixel groups (patches, or the whole image) of n pixels each."""
    b, c, h, w = x.shape
    if cfg.mode == "global":
        return x.reshape(b, c, 1, h * w)
    if cfg.mode != "patch":
        raise ValueError(f"mode must be 'patch' or 'global', got {cfg.mode!r}")
    ph, pw = min(cfg.patch_size, h), min(cfg.patch_size, w)
    rows = torch.tensor(_patch_starts(h, ph), device=x.device)[:, None] + torch.arange(ph, device=x.device)
    cols = torch.tensor(_patch_starts(w, pw), device=x.device)[:, None] + torch.arange(pw, device=x.device)
    # Advanced indexing gathers every patch at once: [B, C, Py, Px, ph, pw].
    patches = x[:, :, rows[:, None, :, None], cols[None, :, None, :]]
    return patches.reshape(b, c, rows.shape[0] * cols.shape[0], ph * pw)


def _kernel_mass(values: torch.Tensor, centers: torch.Tensor, inv_sigma: float) -> torch.Tensor:
    """[g, m] pixel values -> [g, bins] summed Gaussian weights. Materialises [g, m, bins].

    The kernel's 1/(sigma*sqrt(2*pi)) factor is left out: it cancels in the normalisation.
    """
    z = (values.unsqueeze(-1) - centers) * inv_sigma
    return torch.exp(-0.5 * z * z).sum(dim=1)


def _blockwise(
    fn: Callable[[torch.Tensor], torch.Tensor], block: torch.Tensor, only_block: bool
) -> torch.Tensor:
    # Checkpointing keeps only ``block`` (a view) for backward and rebuilds the [g, m, bins] weights
    # there, one block at a time, instead of holding every block's weights until backward. A lone block
    # is held anyway (at most chunk_elements weights), so it skips the rebuild: 15% faster forward and
    # backward, the same gradient bit for bit (batch 16 of 96 px, 32 bins; 2-core CPU dev machine).
    if block.requires_grad and torch.is_grad_enabled() and not only_block:
        out = checkpoint(fn, block, use_reentrant=False)
        assert isinstance(out, torch.Tensor)
        return out
    return fn(block)


def soft_histogram(values: torch.Tensor, cfg: EntropyLossConfig) -> torch.Tensor:
    """Differentiable normalised soft histograms (Section 4.3) of each row of ``values`` [G, n] -> [G, bins].

    Rows are processed in blocks of at most ``cfg.chunk_elements`` (pixel x bin) weights; a row longer
    than that is split along its pixels and the partial histograms are summed.
    """
    g, n = values.shape
    centers = torch.linspace(0.0, 1.0, cfg.bins, device=values.device, dtype=values.dtype)
    inv_sigma = 1.0 / cfg.sigma

    def kernel_mass(block: torch.Tensor) -> torch.Tensor:
        return _kernel_mass(block, centers, inv_sigma)

    pixels_per_block = max(1, cfg.chunk_elements // cfg.bins)
    cols = min(n, pixels_per_block)
    rows = max(1, pixels_per_block // cols)
    row_blocks: list[torch.Tensor] = []
    only_block = rows >= g and cols >= n
    for r0 in range(0, g, rows):
        partials = [
            _blockwise(kernel_mass, values[r0 : r0 + rows, c0 : c0 + cols], only_block)
            for c0 in range(0, n, cols)
        ]
        row_blocks.append(partials[0] if len(partials) == 1 else torch.stack(partials).sum(dim=0))
    mass = row_blocks[0] if len(row_blocks) == 1 else torch.cat(row_blocks)
    # eps keeps a patch whose pixels all lie far outside [0, 1] (possible with the affine map) from 0/0.
    return mass / (mass.sum(dim=1, keepdim=True) + cfg.eps)


def kl_divergence(reference: torch.Tensor, other: torch.Tensor, eps: float) -> torch.Tensor:
    """KL(reference || other) over the last axis, eps inside both logs: [..., bins] -> [...]."""
    return (reference * (torch.log(reference + eps) - torch.log(other + eps))).sum(dim=-1)


def entropy_matching_loss(
    pred: torch.Tensor, target: torch.Tensor, cfg: EntropyLossConfig | None = None
) -> torch.Tensor:
    """L_Em (Section 4.3): mean over batch, channels and patches of KL(H(target) || H(pred)).

    ``pred`` (y_hat) and ``target`` (y) are [B, C, H, W] images in [-1, 1]; returns a scalar. It is
    computed in float32 even under autocast: the kernel weights underflow in half precision.
    """
    cfg = cfg or EntropyLossConfig()
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(
            f"expected two [B, C, H, W] tensors of one shape, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    with torch.autocast(device_type=pred.device.type, enabled=False):
        groups = [
            histogram_groups(map_to_unit_interval(t.float(), cfg.input_map), cfg) for t in (pred, target)
        ]
        b, c, g, n = groups[0].shape
        hist_pred, hist_target = (soft_histogram(t.reshape(b * c * g, n), cfg) for t in groups)
        if cfg.kl_direction == "gt_reference":
            kl = kl_divergence(hist_target, hist_pred, cfg.eps)
        elif cfg.kl_direction == "reversed":
            kl = kl_divergence(hist_pred, hist_target, cfg.eps)
        else:
            raise ValueError(f"kl_direction must be 'gt_reference' or 'reversed', got {cfg.kl_direction!r}")
        loss = kl.mean()
        if cfg.reduction == "authors_code":
            # kl.sum(dim=channels).mean(over batch and bins) == mean KL * C / bins.
            loss = loss * (c / cfg.bins)
        return loss
