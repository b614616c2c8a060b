"""Stitching: a normalised prediction turned into pixels with the visible patches only."""

from __future__ import annotations

import pytest
import torch

from omnimae_pl.models.losses import patch_pixels, patch_stats
from omnimae_pl.models.stitch import STITCH_RIDGE, border_pairs, hidden_pixel_error, stitch, stitched_errors


def random_case(grid, patch, batch=2, seed=0, hidden_share=0.7):
    g = torch.Generator().manual_seed(seed)
    n, p = grid[0] * grid[1] * grid[2], patch[0] * patch[1] * patch[2]
    pred = torch.randn(batch, n, p, 3, generator=g)
    pixels = torch.rand(batch, n, p, 3, generator=g)
    hidden = torch.rand(batch, n, generator=g) < hidden_share
    hidden[:, 0] = False  # at least one visible patch
    return pred, pixels, hidden


def dense_least_squares(pred, pixels, hidden, grid, patch, ridge):
    """The same problem written out row by row and solved by lstsq, for one sample and channel at a time."""
    tokens, voxels = border_pairs(grid, patch)
    b, n, _, c = pixels.shape
    out = pixels.clone()
    for i in range(b):
        vis = ~hidden[i]
        for ch in range(c):
            rows, rhs = [], []
            for (ta, tb), (va, vb) in zip(tokens.tolist(), voxels.tolist()):
                row, r = torch.zeros(2 * n), 0.0
                for tok, vox, sign in ((ta, va, 1.0), (tb, vb, -1.0)):
                    if hidden[i, tok]:
                        row[tok] += sign * pred[i, tok, vox, ch]
                        row[n + tok] += sign
                    else:
                        r -= sign * float(pixels[i, tok, vox, ch])
                rows.append(row)
                rhs.append(r)
            prior = torch.cat([
                pixels[i, vis, :, ch].std(dim=1).mean().expand(n), pixels[i, vis, :, ch].mean(dim=1).mean().expand(n)
            ])
            a = torch.cat([torch.stack(rows), ridge**0.5 * torch.eye(2 * n)])
            y = torch.cat([torch.tensor(rhs), ridge**0.5 * prior])
            u = torch.linalg.lstsq(a.double(), y.double()[:, None]).solution.flatten().float()
            values = pred[i, :, :, ch] * u[:n, None] + u[n:, None]
            out[i, hidden[i], :, ch] = values[hidden[i]]
    return out


def test_border_pairs_touch_across_each_border_once():
    grid, patch = (2, 2, 3), (2, 2, 2)
    tokens, voxels = border_pairs(grid, patch)
    t, h, w = grid
    pt, ph, pw = patch
    expected = t * h * (w - 1) * pt * ph + t * (h - 1) * w * pt * pw + (t - 1) * h * w * ph * pw
    assert tokens.shape == voxels.shape == (expected, 2)
    # token 0 = (0, 0, 0): its right neighbour is token 1, voxel (t, h, w = pw - 1) against (t, h, 0)
    right = [tuple(v) for tk, v in zip(tokens.tolist(), voxels.tolist()) if tk == [0, 1]]
    assert sorted(right) == [(1, 0), (3, 2), (5, 4), (7, 6)]
    # the next tubelet at the same place: token 0 and token h * w, last frame against first
    later = [tuple(v) for tk, v in zip(tokens.tolist(), voxels.tolist()) if tk == [0, h * w]]
    assert sorted(later) == [(4, 0), (5, 1), (6, 2), (7, 3)]


@pytest.mark.parametrize("grid, patch", [((3, 2, 3), (2, 2, 2)), ((1, 3, 3), (2, 2, 3))])
def test_equals_the_dense_least_squares_solution(grid, patch):
    pred, pixels, hidden = random_case(grid, patch)
    expected = dense_least_squares(pred, pixels, hidden, grid, patch, STITCH_RIDGE)
    torch.testing.assert_close(stitch(pred, pixels, hidden, grid, patch), expected, atol=1e-4, rtol=1e-4)


def test_never_reads_a_hidden_pixel_and_keeps_the_visible_ones():
    grid, patch = (2, 3, 3), (2, 4, 4)
    pred, pixels, hidden = random_case(grid, patch)
    other = torch.where(hidden[:, :, None, None], torch.rand_like(pixels), pixels)
    out = stitch(pred, pixels, hidden, grid, patch)
    torch.testing.assert_close(out, stitch(pred, other, hidden, grid, patch))
    unknown = pixels.masked_fill(hidden[:, :, None, None], float("nan"))  # not even multiplied by zero
    torch.testing.assert_close(out, stitch(pred, unknown, hidden, grid, patch))
    assert torch.equal(out[~hidden], pixels[~hidden])


def test_a_blank_prediction_continues_a_flat_picture_exactly():
    grid, patch = (2, 3, 3), (2, 4, 4)
    pixels = torch.tensor([0.2, 0.5, 0.9]).expand(1, 18, 32, 3).clone()
    hidden = torch.rand(1, 18, generator=torch.Generator().manual_seed(1)) < 0.75
    hidden[0, 0] = False
    out = stitch(torch.zeros_like(pixels), pixels, hidden, grid, patch)
    torch.testing.assert_close(out, pixels, atol=1e-5, rtol=0)


def moving_ring(frames=8, size=32):
    """A bright ring (a digit's loop) moving right over a dark background, ImageNet-normalised (3, T, H, W)."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    clip = []
    for t in range(frames):
        r = ((yy - 16) ** 2 + (xx - 9 - 2 * t) ** 2).sqrt()
        ring = torch.exp(-((r - 6) ** 2) / 4)
        clip.append(torch.stack([0.1 + 0.8 * ring, 0.1 + 0.7 * ring, 0.3 + 0.6 * ring]))
    pixels = torch.stack(clip, dim=1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (pixels - mean.view(3, 1, 1, 1)) / std.view(3, 1, 1, 1)


def test_the_true_prediction_carries_the_picture_and_noise_does_not():
    x = moving_ring()[None]
    grid, patch = (4, 4, 4), (2, 8, 8)
    hidden = torch.rand(1, 64, generator=torch.Generator().manual_seed(0)) < 0.75
    pixels = patch_pixels(x, patch)
    mean, std = patch_stats(pixels)
    true = (pixels - mean) / std
    stitched, blank = stitched_errors(true.flatten(2), pixels, hidden, grid, patch)
    assert stitched < 0.5 * blank  # the true structure, placed from the visible pixels only, finds the ring
    noise = torch.randn(true.shape, generator=torch.Generator().manual_seed(1))
    stitched_noise, _ = stitched_errors(noise, pixels, hidden, grid, patch)
    assert stitched_noise > 0.9 * blank  # structure that is not the picture adds nothing


def test_hidden_pixel_error_counts_hidden_patches_only():
    pixels = torch.zeros(2, 4, 8, 3)
    estimate = pixels.clone()
    estimate[0, 1] = 1.0  # hidden in sample 0
    estimate[1, 0] = 5.0  # visible in sample 1
    hidden = torch.tensor([[False, True, True, False], [False, True, False, False]])
    assert hidden_pixel_error(estimate, pixels, hidden).tolist() == [0.5, 0.0]
