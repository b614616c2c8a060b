"""Fixed-count token masks, made per sample in the data pipeline (True = masked, hidden from the encoder).

Every sample of a given modality masks exactly the same number of tokens, so the encoder can gather the
visible tokens into a dense (B, N_vis, D) tensor with no padding, and compiled graphs see one static shape
per modality. Shared by ``omnimae_pl.data`` (which makes masks) and ``omnimae_pl.models`` (which consumes them),
so it imports neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch

from omnimae_pl.errors import check_value

# A Literal, so that the CLI refuses an unknown type while parsing, naming the key and the accepted values.
MaskType = Literal["random", "tube", "frame", "causal"]
MASK_TYPES: tuple[str, ...] = get_args(MaskType)
Grid = tuple[int, int, int]


# The paper's masking: 90 % of image tokens and 95 % of video tokens hidden.
PAPER_MASK_RATIO = {"image": 0.90, "video": 0.95}


def token_grid(shape: tuple[int, ...], patch_size: tuple[int, int, int]) -> Grid:
    """Token grid (T', H', W') of one sample of shape (C, H, W) or (C, T, H, W) (a batch: pass ``x.shape[1:]``).

    An image is a 2-frame static clip, one tubelet deep; a remainder that fills no tubelet is dropped."""
    pt, ph, pw = patch_size
    if len(shape) == 3:
        t = pt  # an image is repeated to fill one tubelet
        h, w = shape[1:]
    elif len(shape) == 4:
        t, h, w = shape[1:]
    else:
        raise ValueError(f"expected (C, H, W) or (C, T, H, W), got shape {tuple(shape)}")
    return max(t // pt, 1), h // ph, w // pw


def num_masked(grid: Grid, ratio: float, mask_type: str = "random") -> int:
    """Exact number of masked tokens for one sample; the same for every sample with this grid."""
    t, h, w = grid
    if mask_type in ("random", "causal"):
        return int(ratio * t * h * w)
    if mask_type == "tube":
        return int(ratio * h * w) * t
    if mask_type == "frame":
        return math.floor(t * ratio) * h * w
    raise ValueError(f"unknown mask_type {mask_type!r}; choose one of {MASK_TYPES}")


def make_mask(
    grid: Grid,
    ratio: float,
    mask_type: str = "random",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One boolean mask of shape ``grid`` (T', H', W'), True = masked, with ``num_masked`` True entries.

    random: uniform over all tokens. tube: one spatial mask repeated over time. frame: whole time slices.
    causal: the last tokens in (t, h, w) raster order, so the model predicts the future from the past.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    t, h, w = grid
    if mask_type == "random":
        flat = _random_flat(t * h * w, int(ratio * t * h * w), generator)
        return flat.view(t, h, w)
    if mask_type == "tube":
        spatial = _random_flat(h * w, int(ratio * h * w), generator).view(1, h, w)
        return spatial.expand(t, h, w).clone()
    if mask_type == "frame":
        frames = _random_flat(t, math.floor(t * ratio), generator)
        return frames.view(t, 1, 1).expand(t, h, w).clone()
    if mask_type == "causal":
        flat = torch.zeros(t * h * w, dtype=torch.bool)
        flat[t * h * w - int(ratio * t * h * w) :] = True
        return flat.view(t, h, w)
    raise ValueError(f"unknown mask_type {mask_type!r}; choose one of {MASK_TYPES}")


def _random_flat(n: int, n_masked: int, generator: torch.Generator | None) -> torch.Tensor:
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=generator)[:n_masked]] = True
    return flat


@dataclass(frozen=True)
class MaskingConfig:
    """Masking of one modality: ``mask_type`` in MASK_TYPES and the fraction of tokens hidden.

    A value that is not accepted raises :class:`~omnimae_pl.errors.ConfigError` naming ``<key>.mask_type`` or
    ``<key>.ratio``; a datamodule's per-modality subclasses set ``key`` to their own argument, so that the message
    says which modality's masking is wrong."""

    mask_type: MaskType = "random"
    ratio: float = 0.9
    key: ClassVar[str] = "masking"

    def __post_init__(self) -> None:
        check_value(self.mask_type in MASK_TYPES, f"{self.key}.mask_type", self.mask_type,
                    f"must be one of {MASK_TYPES}")
        check_value(0.0 <= self.ratio < 1.0, f"{self.key}.ratio", self.ratio,
                    "must be in [0, 1): the fraction of tokens hidden")

    def __call__(self, grid: Grid, generator: torch.Generator | None = None) -> torch.Tensor:
        return make_mask(grid, self.ratio, self.mask_type, generator)


IMAGE_MASKING = MaskingConfig("random", PAPER_MASK_RATIO["image"])
VIDEO_MASKING = MaskingConfig("random", PAPER_MASK_RATIO["video"])
