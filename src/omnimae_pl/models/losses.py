"""OmniMAE's reconstruction loss: per-patch, per-channel normalised pixels, MSE over masked tokens only.

The pixel patches and their statistics are also what :mod:`omnimae_pl.viz` uses to turn a prediction back into
pixels, so the pictures and the loss agree by construction.
"""

from __future__ import annotations

import torch

from omnimae_pl.constants import IMAGENET_MEAN, IMAGENET_STD
from omnimae_pl.models.patch import PatchSize, patchify

NORM_EPS = 1e-6


def to_pixels(
    x: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD
) -> torch.Tensor:
    """ImageNet-normalised (B, C, ...) -> un-clamped fp32 pixels."""
    x = x.float()
    # Python scalars per channel: no host-to-device copy (and so no sync) in the training step.
    return torch.stack([x[:, c] * s + m for c, (m, s) in enumerate(zip(mean, std))], dim=1)


def patch_pixels(
    x: torch.Tensor,
    patch_size: PatchSize,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """Normalised image (repeated to pt frames) or clip -> pixel patches (B, N, pt*ph*pw, C): tokens in raster
    order, voxels in (t, h, w) order, channel last (the order of :func:`~omnimae_pl.models.patch.patchify`)."""
    pixels = to_pixels(x, mean, std)
    return patchify(pixels, patch_size).unflatten(-1, (-1, pixels.shape[1]))


def patch_stats(patches: torch.Tensor, eps: float = NORM_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch, per-channel (mean, sqrt(unbiased var + eps)) of (B, N, P, C) patches, each (B, N, 1, C)."""
    mean = patches.mean(dim=2, keepdim=True)
    var = patches.var(dim=2, keepdim=True, unbiased=True)
    return mean, torch.sqrt(var + eps)


def norm_pix_targets(
    x: torch.Tensor,
    patch_size: PatchSize,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    eps: float = NORM_EPS,
) -> torch.Tensor:
    """(B, N, pt*ph*pw*C) targets in (t, h, w, c) order, from a normalised image (repeated to pt frames) or clip.

    Each channel of each patch is normalised over its pt*ph*pw voxels with the unbiased variance and eps
    inside the square root. Computed in fp32 whatever the autocast state.
    """
    patches = patch_pixels(x, patch_size, mean, std)
    mu, sigma = patch_stats(patches, eps)
    return ((patches - mu) / sigma).flatten(2)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over each token's values, summed over masked tokens, divided by their count
    in the whole batch (not a per-sample mean). ``mask`` (B, N) bool; visible tokens contribute nothing."""
    per_token = (pred.float() - target).pow(2).mean(dim=-1)
    weight = mask.to(per_token.dtype)
    return (per_token * weight).sum() / weight.sum().clamp(min=1.0)


def copy_nearest_visible(target: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """A reference prediction for video: every hidden token copies the target of the visible token at the same
    spatial position and the nearest time step (ties to the earlier one); a position visible at no time step
    gets zero, the patch mean (the validation baseline). Visible tokens keep their own target.

    ``target`` (B, N, D) in raster order over ``grid`` (T', H', W'), ``mask`` (B, N) or (B, T', H', W'), True =
    masked. A still scene is copied exactly; a moving digit is not, so a model must beat this to show it uses
    motion rather than only copying in time.
    """
    b, n, d = target.shape
    t, h, w = grid
    if n != t * h * w:
        raise ValueError(f"target has {n} tokens but the grid {tuple(grid)} holds {t * h * w}")
    visible = ~mask.reshape(b, t, h * w).bool()
    steps = torch.arange(t, device=target.device)
    distance = (steps.view(t, 1) - steps.view(1, t)).abs().float()  # (T' hidden, T' source)
    # (B, T' hidden, T' source, H'W'): inf where the source token is hidden
    distance = distance.view(1, t, t, 1).expand(b, t, t, h * w).masked_fill(~visible.unsqueeze(1), float("inf"))
    source = distance.argmin(dim=2)  # the first minimum: the earlier of two equally near steps
    copied = torch.gather(target.reshape(b, t, h * w, d), 1, source.unsqueeze(-1).expand(-1, -1, -1, d))
    copied = copied * visible.any(dim=1).view(b, 1, h * w, 1)
    return copied.reshape(b, n, d)
