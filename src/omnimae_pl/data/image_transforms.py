"""Image transforms for pretraining and evaluation, whose random draws come from an explicit generator.

A transform maps an opened (not yet decoded) PIL image and a ``torch.Generator`` to a normalised float tensor
(3, size, size). Taking the generator as an argument keeps every draw a function of (seed, epoch, index), and
taking the image before decoding lets JPEGs be decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``) whenever the
region that survives the crop still covers the output size. Crop boxes are drawn on the full image size, so
they do not depend on that shortcut.

PIL decodes; the resize runs on a uint8 tensor in channels-last layout with torchvision's antialiased kernels
(bicubic within a few grey levels of PIL's, at a third of the time), and normalisation is one fused
multiply-subtract (per-image timings: docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from omnimae_pl.constants import IMAGENET_MEAN, IMAGENET_STD

INTERPOLATIONS = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}

# (x / 255 - mean) / std == x * _SCALE - _SHIFT, applied in place through stride-0 expanded views of the
# constants: measured fastest on CPU (a plain (3, 1, 1) broadcast is up to ten times slower in place).
_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(3, 1, 1)
_SHIFT = (torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)

Box = tuple[int, int, int, int]  # top, left, height, width


class ImageTransform(Protocol):
    """What the image datasets call: (opened PIL image, generator) -> normalised (3, size, size) float tensor."""

    size: int

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor: ...


def normalise(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float32 normalised with the ImageNet mean and std."""
    x = image.float()
    return x.mul_(_SCALE.expand_as(x)).sub_(_SHIFT.expand_as(x))


def decode_rgb(image: Image.Image) -> torch.Tensor:
    """Decode to a uint8 (3, H, W) RGB tensor (a channels-last view, which the resize kernels prefer).
    Greyscale, CMYK, palette and alpha images all become RGB."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    attempts: int = 10,
) -> Box:
    """A box covering a random fraction ``scale`` of the area with a random aspect ratio (log-uniform in
    ``ratio``); after ``attempts`` boxes that do not fit, the largest centred box within ``ratio``."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        u_area, u_ratio = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_for_box(image: Image.Image, box: Box, out_height: int, out_width: int) -> Box:
    """Ask a JPEG decoder for the smallest 1/2^k scale at which ``box`` still covers the output size, and
    return the box in the coordinates of the image that will be decoded (unchanged for other formats)."""
    top, left, h, w = box
    full_w, full_h = image.size
    wanted = (math.ceil(full_w * out_width / w), math.ceil(full_h * out_height / h))
    drafted = image.draft(None, wanted) if image.format == "JPEG" else None
    if drafted is None or drafted[1][2] == full_w:
        return box
    factor = drafted[1][2] / full_w  # 1 / (the decoder's reduction)
    new_top, new_left = round(top * factor), round(left * factor)
    bottom, right = round((top + h) * factor), round((left + w) * factor)
    return new_top, new_left, max(1, bottom - new_top), max(1, right - new_left)


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """Pretraining: RandomResizedCrop(size, scale, ratio) then a horizontal flip with ``hflip_prob``, then
    normalise. The defaults are OmniMAE's IN1K recipe: size 224, scale (0.2, 1), bicubic, flip 0.5."""

    size: int = 224
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        _check_interpolation(self.interpolation)

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        out, flip = self.crop_uint8(image, generator)
        return normalise(F.horizontal_flip(out) if flip else out)

    def draw(self, width: int, height: int, generator: torch.Generator) -> tuple[Box, bool]:
        """The random draws for an image of ``width`` x ``height``: its crop box (full-size pixels) and whether
        to flip; every path (``__call__``, ``crop_uint8``, the device-side decode) cuts what these give."""
        box = random_resized_crop_box(height, width, self.scale, self.ratio, generator)
        return box, bool(torch.rand((), generator=generator) < self.hflip_prob)

    def crop_uint8(self, image: Image.Image, generator: torch.Generator) -> tuple[torch.Tensor, bool]:
        """The worker's share of the transform: the resized crop as uint8 (3, size, size) and whether to flip
        it (the same draws as ``__call__``); flip and normalise are left to ``device_augment``."""
        box, flip = self.draw(*image.size, generator)
        top, left, h, w = draft_for_box(image, box, self.size, self.size)
        out = F.resized_crop(
            decode_rgb(image), top, left, h, w, [self.size, self.size],
            interpolation=INTERPOLATIONS[self.interpolation], antialias=True,
        )
        return out, flip


@dataclass(frozen=True)
class ResizeCenterCrop:
    """Evaluation: resize the short side to ``size / crop_ratio``, then take the centred ``size`` square.
    ``crop_ratio=1.0`` (OmniMAE's IN1K evaluation) keeps the whole short side; 0.875 is the classic 256 -> 224."""

    size: int = 224
    crop_ratio: float = 1.0
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        _check_interpolation(self.interpolation)
        if not 0.0 < self.crop_ratio <= 1.0:
            raise ValueError(f"crop_ratio must be in (0, 1], got {self.crop_ratio}")

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        short = int(self.size / self.crop_ratio)
        width, height = image.size
        draft_for_box(image, (0, 0, height, width), short, short)
        out = F.resize(
            decode_rgb(image), [short], interpolation=INTERPOLATIONS[self.interpolation], antialias=True
        )
        return normalise(F.center_crop(out, [self.size, self.size]))


def _check_interpolation(name: str) -> None:
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; choose one of {sorted(INTERPOLATIONS)}")
