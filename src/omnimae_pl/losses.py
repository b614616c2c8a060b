"""OmniMAE's reconstruction loss: per-patch, per-channel normalised pixels, MSE over masked tokens only."""

from __future__ import annotations

import torch
from einops import rearrange

from omnimae_pl.constants import IMAGENET_MEAN, IMAGENET_STD


def norm_pix_targets(
    x: torch.Tensor,
    patch_size: tuple[int, int, int],
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    eps: float = 1e-6,
) -> torch.Tensor:
    """(B, N, pt*ph*pw*C) targets in (t, h, w, c) order, from a normalised image (repeated to pt frames) or clip.

    Each channel of each patch is normalised over its pt*ph*pw voxels with the unbiased variance and eps
    inside the square root. Computed in fp32 whatever the autocast state.
    """
    pt, ph, pw = patch_size
    x = x.float()
    if x.ndim == 4:
        x = x.unsqueeze(2).expand(-1, -1, pt, -1, -1)
    # Python scalars per channel: no host-to-device copy (and so no sync) in the training step.
    pixels = torch.stack([x[:, c] * s + m for c, (m, s) in enumerate(zip(mean, std))], dim=1)
    patches = rearrange(pixels, "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw) c", pt=pt, ph=ph, pw=pw)
    mu = patches.mean(dim=2, keepdim=True)
    var = patches.var(dim=2, keepdim=True, unbiased=True)
    return ((patches - mu) / torch.sqrt(var + eps)).flatten(2)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over each token's values, summed over masked tokens, divided by their count
    in the whole batch (not a per-sample mean). ``mask`` (B, N) bool; visible tokens contribute nothing."""
    per_token = (pred.float() - target).pow(2).mean(dim=-1)
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)
