"""Tubelet patch embedding and the (t, h, w, c) patchify used by the loss targets and visualisation.

An image is a 2-frame static clip: it is repeated (not zero-padded) along a new time axis to fill one tubelet,
so images and videos share one Conv3d and one token order, index = t * H'W' + h * W' + w.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

PatchSize = tuple[int, int, int]


def to_video(x: torch.Tensor, t_patch: int) -> torch.Tensor:
    """(B, C, H, W) image -> (B, C, t_patch, H, W) by repetition; a 5-D clip passes through unchanged."""
    if x.ndim == 4:
        return x.unsqueeze(2).expand(-1, -1, t_patch, -1, -1)
    if x.ndim == 5:
        return x
    raise ValueError(f"expected (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")


def patchify(x: torch.Tensor, patch_size: PatchSize) -> torch.Tensor:
    """(B, C, H, W) or (B, C, T, H, W) -> (B, N, pt*ph*pw*C), tokens in raster order, voxels in (t, h, w, c)."""
    pt, ph, pw = patch_size
    return rearrange(
        to_video(x, pt), "b c (t pt) (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw
    )


def unpatchify(
    tokens: torch.Tensor, patch_size: PatchSize, grid: tuple[int, int, int], channels: int = 3
) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, pt*ph*pw*C) -> (B, C, T'*pt, H'*ph, W'*pw)."""
    pt, ph, pw = patch_size
    t, h, w = grid
    return rearrange(
        tokens,
        "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
        t=t, h=h, w=w, pt=pt, ph=ph, pw=pw, c=channels,
    )


class TubeletEmbed(nn.Module):
    """Conv3d over (t, h, w) tubelets; a 4-D image counts as one tubelet of repeated frames.

    The parameters are a Conv3d's (checkpoint keys ``proj.weight`` / ``proj.bias``), but since kernel = stride
    the forward runs as one matmul over flattened tubelets: cuDNN's bf16 Conv3d picks a slow implicit-GEMM
    kernel for this shape (docs/benchmarks.md).
    """

    def __init__(self, patch_size: PatchSize = (2, 16, 16), in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        weight = self.proj.weight  # (D, C, pt, ph, pw)
        if x.ndim == 4:
            # An image is pt identical frames, so the pt time taps see the same pixels: summing them first is the
            # same conv at 1/pt of the FLOPs, with no repeated copy of the batch.
            x = x.unsqueeze(2)
            weight, pt = weight.sum(dim=2, keepdim=True), 1
        elif x.ndim != 5:
            raise ValueError(f"expected (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
        b, c, t, h, w = x.shape
        t, h, w = t // pt, h // ph, w // pw  # as the conv: a remainder that fills no tubelet is dropped
        x = x[:, :, : t * pt, : h * ph, : w * pw].reshape(b, c, t, pt, h, ph, w, pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, t * h * w, c * pt * ph * pw)  # (c, t, h, w) as the weight
        return F.linear(x, weight.reshape(weight.shape[0], -1), self.proj.bias)  # (B, N, D), (t, h, w) raster order
