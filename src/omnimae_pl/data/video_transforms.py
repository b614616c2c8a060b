"""Spatial transforms for decoded clips: uint8 (T, H, W, 3) in, normalised float32 (3, T, H, W) out.

Pretraining (paper, SSv2): short side to 256 -> RandomResizedCrop(224) with torchvision's defaults (scale
0.08-1, ratio 3/4-4/3, bilinear), one crop for all frames, never flipped (SSv2 has left/right classes) ->
/255 -> ImageNet mean/std. Evaluation: short side resize, then a centre crop or three crops along the long side.

The short-side resize and the crop are fused into one ``resized_crop`` on the source frames: the crop box is
drawn in the coordinates of the resized video (so its distribution is exactly the reference one) and mapped back
to the source pixels. One resampling instead of two is cheaper and, if anything, sharper. Crops are drawn from an
explicit ``torch.Generator`` so that every draw derives from (seed, epoch, index, replica).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from omnimae_pl.constants import IMAGENET_MEAN, IMAGENET_STD
from omnimae_pl.data.image_transforms import random_resized_crop_box

Box = tuple[int, int, int, int]  # top, left, height, width


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """Size after resizing the short side to ``short_side`` (long side truncated, as torchvision does)."""
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def spatial_crop_boxes(height: int, width: int, crop_size: int, num_crops: int) -> list[Box]:
    """``num_crops`` square boxes: 1 = the centre, 3 = start / centre / end of the long side (multi-view test)."""
    if num_crops not in (1, 3):
        raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")
    size_h, size_w = min(crop_size, height), min(crop_size, width)
    centre = ((height - size_h) // 2, (width - size_w) // 2)
    if num_crops == 1:
        return [(*centre, size_h, size_w)]
    if width >= height:
        return [(centre[0], left, size_h, size_w) for left in (0, centre[1], width - size_w)]
    return [(top, centre[1], size_h, size_w) for top in (0, centre[0], height - size_h)]


def normalise(video: torch.Tensor) -> torch.Tensor:
    """uint8 (T, 3, H, W) (any memory layout) -> float32 (3, T, H, W) contiguous, /255 and ImageNet mean/std.

    One channel at a time, straight from the (channels-last) source into the output: no intermediate copy,
    and in-place ops with scalar operands, the fast CPU kernels.
    """
    video = video.as_subclass(torch.Tensor)
    frames, _, height, width = video.shape
    out = torch.empty((3, frames, height, width))
    for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)):
        out[channel].copy_(video[:, channel]).mul_(1.0 / (255.0 * std)).sub_(mean / std)
    return out


def grey_clip(num_frames: int, size: int) -> torch.Tensor:
    """A normalised mid-grey (0.5) clip (3, T, size, size): the input of placeholder samples."""
    value = torch.tensor([(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]).view(3, 1, 1, 1)
    return value.expand(3, num_frames, size, size).clone()


def source_box(height: int, width: int, box: Box, short_side: int) -> Box:
    """``box`` given in the coordinates of the short-side-resized frames -> the same box in source pixels of a
    ``height`` x ``width`` clip (rounded, at least one pixel, inside the frame)."""
    scaled_h, scaled_w = short_side_size(height, width, short_side)
    sy, sx = height / scaled_h, width / scaled_w
    top, left, h, w = box
    src_top, src_left = min(round(top * sy), height - 1), min(round(left * sx), width - 1)
    src_h = max(min(round(h * sy), height - src_top), 1)
    src_w = max(min(round(w * sx), width - src_left), 1)
    return src_top, src_left, src_h, src_w


def _crop_resize(clip: torch.Tensor, box: Box, short_side: int, size: int) -> torch.Tensor:
    """Crop ``box`` given in short-side-resized coordinates from the source clip (T, H, W, 3), resize to size^2."""
    src_top, src_left, src_h, src_w = source_box(clip.shape[1], clip.shape[2], box, short_side)
    video = tv_tensors.Video(clip.permute(0, 3, 1, 2))  # channels-last memory: torchvision's fast uint8 path
    out = F.resized_crop(
        video, src_top, src_left, src_h, src_w, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True
    )
    return normalise(out)


def _check_clip(clip: torch.Tensor) -> None:
    if clip.dtype != torch.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"expected a uint8 clip (T, H, W, 3), got {clip.dtype} {tuple(clip.shape)}")


@dataclass(frozen=True)
class VideoTrainTransform:
    """Pretraining / fine-tuning crop: short side -> RandomResizedCrop, one box for all frames, no flip."""

    crop_size: int = 224
    short_side: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float32 (3, T, crop, crop); the box is drawn from ``generator``."""
        _check_clip(clip)
        return _crop_resize(clip, self._draw(clip, generator), self.short_side, self.crop_size)

    def crop_box(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> Box:
        """The box ``__call__`` would crop, in source pixels (top, left, height, width), from the same draws:
        what the worker hands over when the crop-resize runs on the device (``device_augment``)."""
        _check_clip(clip)
        return source_box(clip.shape[1], clip.shape[2], self._draw(clip, generator), self.short_side)

    def _draw(self, clip: torch.Tensor, generator: torch.Generator | None) -> Box:
        scaled_h, scaled_w = short_side_size(clip.shape[1], clip.shape[2], self.short_side)
        return random_resized_crop_box(scaled_h, scaled_w, self.scale, self.ratio, generator)


@dataclass(frozen=True)
class VideoEvalTransform:
    """Deterministic views: short side -> ``num_crops`` square crops (1 = centre; 3 = along the long side)."""

    crop_size: int = 224
    short_side: int = 256
    num_crops: int = 1

    def __post_init__(self) -> None:
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops must be 1 or 3, got {self.num_crops}")
        if self.short_side < self.crop_size:
            raise ValueError(f"short_side {self.short_side} must be at least crop_size {self.crop_size}")

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> float32 (num_crops, 3, T, crop, crop)."""
        _check_clip(clip)
        scaled_h, scaled_w = short_side_size(clip.shape[1], clip.shape[2], self.short_side)
        boxes = spatial_crop_boxes(scaled_h, scaled_w, self.crop_size, self.num_crops)
        return torch.stack([_crop_resize(clip, box, self.short_side, self.crop_size) for box in boxes])
