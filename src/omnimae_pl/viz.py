"""Reconstruction views and figures, shared by the inspection notebook, ``reconstruct.py`` and the wandb callback.

The model predicts every patch in the loss's space: each channel of each (t, h, w) tubelet normalised by that
patch's own mean and std. A prediction therefore carries no brightness or contrast of its own; turning it back
into pixels needs the mean/std of the *true* patch, which for a masked patch is information the model never saw.
The views keep that distinction visible:

- ``input``: the ground truth, un-normalised to pixels.
- ``masked_input``: what the encoder sees; masked patches are flat grey (``MASK_GREY``).
- ``pred_normalized`` / ``target_normalized``: prediction and target in the normalised space, mapped to pixels by
  one global affine, ``0.5 + v / (2 * NORMALIZED_DISPLAY_RANGE)`` clipped (so +-2.5 patch stds span black..white);
  no per-patch stretching, so a low-contrast prediction looks low-contrast.
- ``pasted_normalized``: the raw prediction in the hidden patches beside the target in the visible ones, in the
  same space: what the model made of what it saw, with no statistics of a hidden patch (the loss ignores the
  prediction of a visible patch, so ``pred_normalized`` shows noise there).
- ``pred_stitched``: the prediction turned into pixels with the visible patches only: each hidden patch's
  brightness and contrast chosen so that its borders agree with its neighbours' (:mod:`omnimae_pl.models.stitch`);
  the visible patches are the input's. A blank prediction stitched this way gives flat patches, so what shows
  beyond that is the model's.
- ``pred_denorm``: the prediction de-normalised with each patch's own true mean/std (borrows the hidden patches'
  statistics: an upper bound on what the model alone could show).
- ``pasted``: the visible patches of the input (exact pixels) pasted over ``pred_denorm``.

All views are float (B, 3, T, H, W) tensors in [0, 1] on the CPU. Images (4-D inputs) give T = 1: the model
predicts both copies of the 2-frame repeated image and the views show the mean of the two predicted frames.

Plain numpy / torch / PIL / matplotlib (no pyplot state, no Lightning), so it runs headless in a callback.
"""

from __future__ import annotations

import math
import textwrap
from fractions import Fraction
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path

import av
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from omnimae_pl.masking import token_grid
from omnimae_pl.models.losses import patch_pixels, patch_stats, to_pixels
from omnimae_pl.models.patch import PatchSize, unpatchify
from omnimae_pl.models.stitch import stitch
from omnimae_pl.models.tokens import flatten_mask

MASK_GREY = 0.5
NORMALIZED_DISPLAY_RANGE = 2.5

VIEW_KEYS = (
    "input",
    "masked_input",
    "pred_normalized",
    "pasted_normalized",
    "target_normalized",
    "pred_stitched",
    "pred_denorm",
    "pasted",
)
VIEW_TITLES = {
    "input": "input (ground truth)",
    "masked_input": "encoder input: masked patches grey",
    "pred_normalized": (
        f"raw prediction, per-patch normalised space, shown as 0.5 + v/{2 * NORMALIZED_DISPLAY_RANGE:g}"
    ),
    "pasted_normalized": "raw prediction in the hidden patches, target in the visible ones (normalised space)",
    "target_normalized": (
        f"target in the same normalised space, shown as 0.5 + v/{2 * NORMALIZED_DISPLAY_RANGE:g}"
    ),
    "pred_stitched": (
        "prediction stitched from the visible pixels only: each hidden patch's brightness and contrast fitted "
        "to its neighbours' borders (a blank prediction gives flat patches)"
    ),
    "pred_denorm": (
        "prediction de-normalised with each patch's own true mean/std (borrows the hidden patches' statistics: "
        "even a blank prediction shows their mean colours)"
    ),
    "pasted": "visible input patches pasted over the de-normalised prediction",
}
# Short labels for the GIF / MP4 header, where there is room for a few words only.
VIEW_LABELS = {
    "input": "input",
    "masked_input": "masked input",
    "pred_normalized": "pred (norm. space)",
    "pasted_normalized": "pred in hidden (norm.)",
    "target_normalized": "target (norm. space)",
    "pred_stitched": "pred stitched (visible only)",
    "pred_denorm": "pred x true patch std+mean",
    "pasted": "pred + visible input",
}


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised batch (B, 3, H, W) or (B, 3, T, H, W) -> pixels in [0, 1]."""
    return to_pixels(x).clamp(0.0, 1.0)


def reconstruction_views(
    model_or_pred: nn.Module | torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor,
    patch_size: PatchSize | None = None,
) -> dict[str, torch.Tensor]:
    """The views of :data:`VIEW_KEYS` as (B, 3, T, H, W) float CPU tensors in [0, 1] (T = 1 for images).

    ``model_or_pred`` is an OmniMAE (run here without gradients, in its current train/eval mode) or its
    prediction (B, N, pt*ph*pw*3), which then needs ``patch_size``. ``x`` is the ImageNet-normalised batch,
    4-D for images, 5-D for videos; ``mask`` is bool (B, N) or (B, T', H', W'), True = masked.
    """
    if isinstance(model_or_pred, nn.Module):
        patch_size = patch_size or model_or_pred.patch_size
        with torch.no_grad():
            pred = model_or_pred(x, mask)
    elif patch_size is None:
        raise ValueError("patch_size is needed when a prediction tensor is given instead of a model")
    else:
        pred = model_or_pred
    x, pred = x.detach().float(), pred.detach().float()
    grid = token_grid(x.shape[1:], patch_size)
    is_image = x.ndim == 4

    def to_clip(tokens: torch.Tensor) -> torch.Tensor:  # (B, N, P, 3) -> (B, 3, T, H, W); images: mean of frames
        clip = unpatchify(tokens.flatten(2), patch_size, grid)
        return (clip.mean(dim=2, keepdim=True) if is_image else clip).cpu()

    patches = patch_pixels(x, patch_size)
    mean, std = patch_stats(patches)
    pred = pred.reshape(patches.shape)
    hidden_tokens = flatten_mask(mask).to(x.device)
    hidden = hidden_tokens[:, :, None, None].expand(patches.shape).float()

    def normalized_display(tokens: torch.Tensor) -> torch.Tensor:
        return (0.5 + to_clip(tokens) / (2 * NORMALIZED_DISPLAY_RANGE)).clamp(0.0, 1.0)

    inputs = to_clip(patches).clamp(0.0, 1.0)
    masked = to_clip(hidden) > 0.5
    pred_denorm = to_clip(pred * std + mean).clamp(0.0, 1.0)
    pred_stitched = to_clip(stitch(pred, patches, hidden_tokens, grid, patch_size)).clamp(0.0, 1.0)
    pred_normalized, target_normalized = normalized_display(pred), normalized_display((patches - mean) / std)
    return {
        "input": inputs,
        "masked_input": inputs.masked_fill(masked, MASK_GREY),
        "pred_normalized": pred_normalized,
        "pasted_normalized": torch.where(masked, pred_normalized, target_normalized),
        "target_normalized": target_normalized,
        "pred_stitched": pred_stitched,
        "pred_denorm": pred_denorm,
        "pasted": torch.where(masked, pred_denorm, inputs),
    }


def sample_views(views: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """One sample's views, each (3, T, H, W)."""
    return {key: clip[index] for key, clip in views.items()}


def _hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) tensor or (H, W, 3) array in [0, 1] -> (H, W, 3) float array."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3 and image.shape[0] == 3:
            image = image.transpose(1, 2, 0)
    return np.clip(image, 0.0, 1.0)


FONT_POINTS = 8
_LINE_INCHES = 1.3 * FONT_POINTS / 72
_CHAR_INCHES = 0.62 * FONT_POINTS / 72  # a generous average glyph width of DejaVu Sans


def image_grid(
    rows: Sequence[Sequence[torch.Tensor | np.ndarray]],
    titles: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    suptitle: str | None = None,
    cell_inches: float = 2.2,
    wrap: int = 28,
) -> Figure:
    """A grid of images: ``titles`` over the columns, ``row_labels`` left of the rows (long text is wrapped).

    Each image is (3, H, W) (tensor) or (H, W, 3) (array) with values in [0, 1]; a cell is ``cell_inches``
    wide. The cells are drawn as one mosaic in one Axes (``fig.axes[0]``, its texts are the labels), which
    renders many times faster than an Axes per cell.
    """
    images = [[_hwc(image) for image in row] for row in rows]
    n_rows, n_cols = len(images), max(len(row) for row in images)
    cell_h = max(image.shape[0] for row in images for image in row)
    cell_w = max(image.shape[1] for row in images for image in row)
    gap = max(1, round(0.04 * cell_w))
    mosaic = np.ones((n_rows * (cell_h + gap) - gap, n_cols * (cell_w + gap) - gap, 3))
    for r, row in enumerate(images):
        for c, image in enumerate(row):
            top, left = r * (cell_h + gap), c * (cell_w + gap)
            mosaic[top : top + image.shape[0], left : left + image.shape[1]] = image

    titles = [textwrap.fill(t, wrap, break_on_hyphens=False) for t in titles] if titles is not None else []
    labels = [textwrap.fill(t, wrap, break_on_hyphens=False) for t in row_labels] if row_labels is not None else []
    inches_per_px = cell_inches / cell_w
    margin = 0.08
    top_in = margin + _LINE_INCHES * max((t.count("\n") + 1 for t in titles), default=0)
    top_in += 0.3 * (suptitle is not None)
    left_in = margin + _CHAR_INCHES * max((len(line) for t in labels for line in t.split("\n")), default=0)
    axes_w, axes_h = mosaic.shape[1] * inches_per_px, mosaic.shape[0] * inches_per_px
    fig_w, fig_h = left_in + axes_w + margin, top_in + axes_h + margin
    fig = Figure(figsize=(fig_w, fig_h))
    FigureCanvasAgg(fig)  # an Agg canvas of its own: no pyplot, no global backend
    ax = fig.add_axes((left_in / fig_w, margin / fig_h, axes_w / fig_w, axes_h / fig_h))
    ax.imshow(mosaic)
    ax.set_axis_off()
    pad = 0.04 / inches_per_px  # 0.04 inch, in mosaic pixels
    for c, title in enumerate(titles):
        x = c * (cell_w + gap) + cell_w / 2
        ax.text(x, -pad, title, ha="center", va="bottom", fontsize=FONT_POINTS)
    for r, label in enumerate(labels):
        y = r * (cell_h + gap) + cell_h / 2
        ax.text(-pad, y, label, ha="right", va="center", fontsize=FONT_POINTS)
    if suptitle is not None:
        fig.suptitle(suptitle, y=1 - margin / fig_h, va="top", fontsize=FONT_POINTS + 2)
    return fig


def views_grid(
    views: Mapping[str, torch.Tensor],
    keys: Sequence[str] = VIEW_KEYS,
    frame: int = 0,
    row_labels: Sequence[str] | None = None,
    suptitle: str | None = None,
) -> Figure:
    """One row per sample, one column per view (frame ``frame`` of each clip): the image reconstruction figure."""
    batch = next(iter(views.values())).shape[0]
    rows = [[views[key][i, :, frame] for key in keys] for i in range(batch)]
    return image_grid(rows, [VIEW_TITLES.get(key, key) for key in keys], row_labels, suptitle)


def frame_strip(
    views: Mapping[str, torch.Tensor],
    keys: Sequence[str] = VIEW_KEYS,
    frames: Sequence[int] | None = None,
    suptitle: str | None = None,
    cell_inches: float = 1.4,
) -> Figure:
    """One sample's views (each (3, T, H, W)) over time: one row per view, one column per frame."""
    length = next(iter(views.values())).shape[1]
    frames = range(length) if frames is None else frames
    rows = [[views[key][:, t] for t in frames] for key in keys]
    return image_grid(
        rows,
        [f"frame {t}" for t in frames],
        [VIEW_TITLES.get(key, key) for key in keys],
        suptitle,
        cell_inches=cell_inches,
        wrap=24,
    )


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure to an (H, W, 3) uint8 array, e.g. for ``wandb.Image``."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def labelled_tiles(
    views: Mapping[str, torch.Tensor], keys: Sequence[str] = VIEW_KEYS, min_width: int = 160, gap: int = 4
) -> torch.Tensor:
    """One sample's views side by side under a header of short labels, as one clip (3, T, H', W') in [0, 1].

    Small clips are enlarged by an integer factor (nearest) to at least ``min_width`` so the labels fit;
    :data:`VIEW_TITLES` gives the long form of each label.
    """
    _, length, height, width = next(iter(views.values())).shape
    scale = max(1, math.ceil(min_width / width))
    tile_w, tile_h = width * scale, height * scale
    font = ImageFont.load_default(size=max(10, tile_w // 16))
    header_h = int(font.size * 1.8)
    canvas = torch.ones(3, length, header_h + tile_h, len(keys) * (tile_w + gap) - gap)
    header = Image.new("RGB", (canvas.shape[-1], header_h), "white")
    draw = ImageDraw.Draw(header)
    for k, key in enumerate(keys):
        left = k * (tile_w + gap)
        clip = views[key].float().cpu().repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
        canvas[:, :, header_h:, left : left + tile_w] = clip
        draw.text((left + tile_w / 2, header_h / 2), VIEW_LABELS.get(key, key), fill="black", font=font, anchor="mm")
    canvas[:, :, :header_h] = torch.from_numpy(np.array(header)).permute(2, 0, 1)[:, None].float() / 255
    return canvas


def _uint8_frames(clip: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [0, 1] -> (T, H, W, 3) uint8."""
    return (clip.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


def save_gif(clip: torch.Tensor, path: str | PathLike, fps: float = 4.0) -> Path:
    """Write a (3, T, H, W) clip in [0, 1] as a looping GIF (PIL; 256 colours per frame)."""
    path = Path(path)
    images = [Image.fromarray(frame) for frame in _uint8_frames(clip)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


MP4_ENCODERS = ("libx264", "h264", "mpeg4")


def mp4_encoder() -> str | None:
    """The first MP4 video encoder this PyAV build has (its wheels ship libx264), or None."""
    for name in MP4_ENCODERS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # PyAV raises UnknownCodecError (a ValueError) or an FFmpeg error, by version
            continue
        return name
    return None


def save_mp4(clip: torch.Tensor, path: str | PathLike, fps: float = 4.0) -> Path:
    """Write a (3, T, H, W) clip in [0, 1] as an MP4 (H.264, else MPEG-4 part 2) and return its path; with no
    encoder available, write a GIF beside it instead and return that path."""
    path = Path(path)
    encoder = mp4_encoder()
    if encoder is None:
        return save_gif(clip, path.with_suffix(".gif"), fps)
    frames = _uint8_frames(clip)
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")  # yuv420p: even sizes
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if encoder == "mpeg4":
            stream.bit_rate = 4_000_000
        else:
            stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path
