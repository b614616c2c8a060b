"""Pixels from a normalised prediction with the visible patches only: "stitching".

The loss's target normalises every channel of every patch by that patch's own mean and std, so a prediction
carries no brightness or contrast; de-normalising it with the hidden patch's true statistics borrows what the
model never saw. Stitching instead picks, for each hidden patch and channel, a contrast ``s`` and a brightness
``m`` so that ``s * prediction + m`` agrees with its neighbours across every patch border, in space and
(tubelet to tubelet) in time, where a visible neighbour contributes its true pixels. That is one linear least
squares problem per sample and channel, solved here through its normal equations (each border pixel pair
touches at most four unknowns), with a weak pull (``ridge``) of ``s`` and ``m`` towards the visible patches'
mean contrast and brightness so that every unknown is determined.

The same stitching of an all-zero prediction is the reference: it fills each hidden patch with the flat value
that best continues its neighbours, which is all the visible pixels give without a model. Where the stitched
prediction is closer to the hidden pixels than that, the prediction itself carries the picture.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from omnimae_pl.models.patch import PatchSize

STITCH_RIDGE = 1e-2


@lru_cache(maxsize=16)
def border_pairs(grid: tuple[int, int, int], patch_size: PatchSize) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair of touching pixels in different patches: (tokens, voxels), each (E, 2) long.

    Neighbours right and below within a time step, and the same place in the next tubelet (last frame of one,
    first frame of the other). Tokens in raster order over ``grid``; voxels in (t, h, w) order in a patch.
    """
    t, h, w = grid
    pt, ph, pw = patch_size
    token = torch.arange(t * h * w).view(t, h, w)
    voxel = torch.arange(pt * ph * pw).view(pt, ph, pw)
    sides = [  # (first tokens, second tokens, first patch's border voxels, second patch's border voxels)
        (token[:, :, :-1], token[:, :, 1:], voxel[:, :, -1], voxel[:, :, 0]),
        (token[:, :-1, :], token[:, 1:, :], voxel[:, -1, :], voxel[:, 0, :]),
        (token[:-1], token[1:], voxel[-1], voxel[0]),
    ]
    tokens, voxels = [], []
    for first, second, v_first, v_second in sides:
        a, b = first.flatten(), second.flatten()
        va, vb = v_first.flatten(), v_second.flatten()
        tokens.append(torch.stack([a.repeat_interleave(len(va)), b.repeat_interleave(len(vb))], dim=1))
        voxels.append(torch.stack([va.repeat(len(a)), vb.repeat(len(b))], dim=1))
    return torch.cat(tokens), torch.cat(voxels)


def stitch(
    pred: torch.Tensor,
    pixels: torch.Tensor,
    hidden: torch.Tensor,
    grid: tuple[int, int, int],
    patch_size: PatchSize,
    ridge: float = STITCH_RIDGE,
) -> torch.Tensor:
    """Hidden patches as ``s * pred + m`` fitted to the borders; visible patches keep their pixels.

    ``pred`` and ``pixels`` are (B, N, P, C): the prediction in the normalised space and the true pixel patches
    (:func:`~omnimae_pl.models.losses.patch_pixels`), voxels in (t, h, w) order; ``hidden`` (B, N) bool. Only
    the visible entries of ``pixels`` are read. Returns (B, N, P, C) float pixels (not clamped).
    """
    b, n, _, c = pixels.shape
    pred, pixels = pred.float(), pixels.float()
    is_hidden = hidden.reshape(b, n).to(pixels.device).bool()
    hid = is_hidden.to(pixels.dtype)  # 1 = hidden
    vis = 1.0 - hid
    known = pixels.masked_fill(is_hidden[:, :, None, None], 0.0)  # from here on, no hidden pixel is read
    tokens, voxels = (t.to(pixels.device) for t in border_pairs(tuple(grid), tuple(patch_size)))
    ta, tb = tokens[:, 0], tokens[:, 1]
    va, vb = voxels[:, 0], voxels[:, 1]

    # Each border pair asks value(a) - value(b) = 0, where a hidden patch's value is s * pred + m (unknowns
    # s_0..s_N-1 then m_0..m_N-1) and a visible one's is its pixel. Coefficients (B, E, C, 4) on the columns
    # (s_a, m_a, s_b, m_b); right-hand side (B, E, C).
    pa, pb = pred[:, ta, va], pred[:, tb, vb]
    ha, hb = hid[:, ta, None], hid[:, tb, None]
    coef = torch.stack([ha * pa, ha.expand_as(pa), -hb * pb, -hb.expand_as(pb)], dim=-1)
    rhs = known[:, tb, vb] - known[:, ta, va]
    cols = torch.stack([ta, n + ta, tb, n + tb], dim=-1)  # (E, 4)

    coef = coef.permute(0, 2, 1, 3).reshape(b * c, -1, 4)  # (BC, E, 4)
    rhs = rhs.permute(0, 2, 1).reshape(b * c, -1)
    pair_index = (cols[:, :, None] * 2 * n + cols[:, None, :]).flatten()  # (E * 16,) into the (2N, 2N) matrix
    normal = torch.zeros(b * c, 4 * n * n, device=pixels.device)
    normal.index_add_(1, pair_index, (coef[..., :, None] * coef[..., None, :]).flatten(1))
    moment = torch.zeros(b * c, 2 * n, device=pixels.device)
    moment.index_add_(1, cols.flatten(), (coef * rhs[..., None]).flatten(1))

    # The weak pull towards the visible patches' mean contrast and brightness.
    count = vis.sum(dim=1).clamp(min=1.0)[:, None]  # (B, 1)
    contrast = (known.std(dim=2) * vis[..., None]).sum(dim=1) / count  # (B, C)
    brightness = (known.mean(dim=2) * vis[..., None]).sum(dim=1) / count
    prior = torch.cat([contrast[..., None].expand(b, c, n), brightness[..., None].expand(b, c, n)], dim=-1)
    normal = normal.view(b * c, 2 * n, 2 * n) + ridge * torch.eye(2 * n, device=pixels.device)
    moment = moment + ridge * prior.reshape(b * c, 2 * n)
    solution = torch.linalg.solve(normal, moment).view(b, c, 2, n)
    s, m = solution[:, :, 0].transpose(1, 2), solution[:, :, 1].transpose(1, 2)  # (B, N, C)
    stitched = pred * s[:, :, None] + m[:, :, None]
    return torch.where(is_hidden[:, :, None, None], stitched, pixels)


def hidden_pixel_error(estimate: torch.Tensor, pixels: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Mean squared pixel error over the hidden patches, per sample: (B,). (B, N, P, C) inputs, (B, N) mask."""
    weight = hidden.reshape(hidden.shape[0], -1).to(pixels.dtype)[:, :, None, None]
    squared = (estimate.float() - pixels.float()).pow(2) * weight
    return squared.flatten(1).sum(1) / (weight.flatten(1).sum(1) * pixels[0, 0].numel()).clamp(min=1.0)


def stitched_errors(
    pred: torch.Tensor,
    pixels: torch.Tensor,
    hidden: torch.Tensor,
    grid: tuple[int, int, int],
    patch_size: PatchSize,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (B,) hidden-pixel errors of the stitched prediction and of a stitched all-zero prediction.

    ``pred`` is the model's output (B, N, P*C) or (B, N, P, C); ``pixels`` the true (B, N, P, C) patches.
    """
    pred = pred.reshape(pixels.shape)
    errors = [
        hidden_pixel_error(stitch(p, pixels, hidden, grid, patch_size), pixels, hidden)
        for p in (pred, torch.zeros_like(pred))
    ]
    return errors[0], errors[1]
