"""Reconstruction views are exact where they claim to be, and the figure helpers label what they show."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from omnimae_pl.constants import IMAGENET_MEAN, IMAGENET_STD
from omnimae_pl.masking import make_mask, token_grid
from omnimae_pl.models import omnimae_pretrain
from omnimae_pl.models.losses import norm_pix_targets
from omnimae_pl.models.patch import patchify, unpatchify
from omnimae_pl.viz import (
    MASK_GREY,
    VIEW_KEYS,
    VIEW_TITLES,
    figure_to_array,
    frame_strip,
    image_grid,
    labelled_tiles,
    patch_pixels,
    patch_stats,
    reconstruction_views,
    sample_views,
    save_gif,
    save_mp4,
    unnormalize,
    views_grid,
)

PATCH = (2, 8, 8)


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    shape = (1, 3) + (1,) * (pixels.ndim - 2)
    return (pixels - torch.tensor(IMAGENET_MEAN).view(shape)) / torch.tensor(IMAGENET_STD).view(shape)


def batch(kind: str) -> torch.Tensor:
    """Random pixels in [0, 1], normalised: 2 images 32x32 or 2 clips of 4 frames."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 32, 32) if kind == "image" else (2, 3, 4, 32, 32)
    return normalised(torch.rand(shape, generator=g))


def masks(x: torch.Tensor, ratio: float = 0.75) -> torch.Tensor:
    grid = token_grid(x.shape[1:], PATCH)
    g = torch.Generator().manual_seed(1)
    return torch.stack([make_mask(grid, ratio, "random", g) for _ in range(x.shape[0])])


def pixel_mask(mask: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, T', H', W') token mask -> (B, 3, frames, H, W) pixel mask."""
    pt, ph, pw = PATCH
    m = mask.repeat_interleave(ph, 2).repeat_interleave(pw, 3)
    m = m.repeat_interleave(pt, 1)[:, :frames] if frames > 1 else m[:, :1]
    return m.unsqueeze(1).expand(-1, 3, -1, -1, -1)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_unpatchify_inverts_patchify(kind):
    x = batch(kind)
    grid = token_grid(x.shape[1:], PATCH)
    back = unpatchify(patchify(x, PATCH), PATCH, grid)
    expected = x.unsqueeze(2).expand(-1, -1, 2, -1, -1) if kind == "image" else x
    assert torch.equal(back, expected)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_patch_stats_match_the_loss_bit_for_bit(kind):
    x = batch(kind)
    patches = patch_pixels(x, PATCH)
    mean, std = patch_stats(patches)
    assert torch.equal(((patches - mean) / std).flatten(2), norm_pix_targets(x, PATCH))


@pytest.mark.parametrize("kind", ["image", "video"])
def test_views_shapes_and_range(kind):
    x = batch(kind)
    mask = masks(x)
    views = reconstruction_views(torch.randn(2, mask[0].numel(), 2 * 8 * 8 * 3), x, mask, PATCH)
    frames = 1 if kind == "image" else 4
    assert set(views) == set(VIEW_KEYS)
    for clip in views.values():
        assert clip.shape == (2, 3, frames, 32, 32)
        assert clip.min() >= 0 and clip.max() <= 1


@pytest.mark.parametrize("kind", ["image", "video"])
def test_perfect_prediction_denormalises_to_the_input(kind):
    x = batch(kind)
    mask = masks(x)
    views = reconstruction_views(norm_pix_targets(x, PATCH), x, mask, PATCH)
    truth = unnormalize(x if kind == "video" else x.unsqueeze(2))
    assert torch.equal(views["input"], truth)
    torch.testing.assert_close(views["pred_denorm"], truth, atol=1e-5, rtol=0)
    torch.testing.assert_close(views["pasted"], truth, atol=1e-5, rtol=0)
    assert torch.equal(views["pred_normalized"], views["target_normalized"])


@pytest.mark.parametrize("kind", ["image", "video"])
def test_paste_keeps_visible_pixels_exact_and_masked_input_is_grey_exactly_on_masked_patches(kind):
    x = batch(kind)
    mask = masks(x)
    views = reconstruction_views(torch.randn(2, mask[0].numel(), 2 * 8 * 8 * 3) * 3, x, mask, PATCH)
    hidden = pixel_mask(mask, views["input"].shape[2])
    assert hidden.any() and (~hidden).any()
    assert torch.equal(views["pasted"][~hidden], views["input"][~hidden])
    assert torch.equal(views["pasted"][hidden], views["pred_denorm"][hidden])
    assert torch.equal(views["pasted_normalized"][hidden], views["pred_normalized"][hidden])
    assert torch.equal(views["pasted_normalized"][~hidden], views["target_normalized"][~hidden])
    assert torch.all(views["masked_input"][hidden] == MASK_GREY)
    assert torch.equal(views["masked_input"][~hidden], views["input"][~hidden])
    torch.testing.assert_close(views["pred_stitched"][~hidden], views["input"][~hidden], atol=1e-6, rtol=0)


def test_views_from_a_model_on_an_image_batch():
    model = omnimae_pretrain("tiny", img_size=32, num_frames=4, depth=2, decoder_depth=1, patch_size=PATCH)
    x = batch("image")
    mask = masks(x, 0.5)
    views = reconstruction_views(model, x, mask)
    hidden = pixel_mask(mask, 1)
    assert torch.equal(views["pasted"][~hidden], unnormalize(x).unsqueeze(2)[~hidden])


def test_figures_have_titles_and_render():
    x = batch("video")
    mask = masks(x)
    views = reconstruction_views(torch.randn(2, mask[0].numel(), 2 * 8 * 8 * 3), x, mask, PATCH)

    grid = views_grid(views, suptitle="two clips, frame 0")
    assert isinstance(grid, Figure)
    assert grid.get_suptitle() == "two clips, frame 0"
    assert texts(grid) == [VIEW_TITLES[k] for k in VIEW_KEYS]

    strip = frame_strip(sample_views(views, 0), suptitle="clip 0")
    assert texts(strip) == [f"frame {t}" for t in range(4)] + [VIEW_TITLES[k] for k in VIEW_KEYS]
    pixels = figure_to_array(strip)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3

    plain = image_grid([[np.zeros((4, 4, 3)), torch.ones(3, 4, 4)]], ["black", "white"], ["row"], "two squares")
    assert texts(plain) == ["black", "white", "row"]


def texts(fig: Figure) -> list[str]:
    """The column titles then the row labels of an image_grid figure, unwrapped."""
    return [t.get_text().replace("\n", " ") for t in fig.axes[0].texts]


def test_gif_and_mp4_round_trip(tmp_path):
    x = batch("video")
    mask = masks(x)
    views = reconstruction_views(norm_pix_targets(x, PATCH), x, mask, PATCH)
    tiles = labelled_tiles(sample_views(views, 0))
    assert tiles.shape[:2] == (3, 4) and tiles.shape[-1] >= len(VIEW_KEYS) * 160

    gif = save_gif(tiles, tmp_path / "clip.gif", fps=4)
    with Image.open(gif) as image:
        assert image.n_frames == 4 and image.size == (tiles.shape[-1], tiles.shape[-2])

    mp4 = save_mp4(tiles, tmp_path / "clip.mp4", fps=4)
    with av.open(str(mp4)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
