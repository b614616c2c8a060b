"""The fixed 1-D sinusoid table over all T'·H'·W' token positions (VideoMAE style, not separable).

Images use the first time slice of the table, so an image token at (h, w) gets exactly the position code of
the video token at (0, h, w).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sinusoid_table(n_positions: int, dim: int) -> torch.Tensor:
    """(1, n_positions, dim): angle = p / 10000^(2*floor(j/2)/dim); sin on even channels, cos on odd (interleaved)."""
    pos = torch.arange(n_positions, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(torch.float32).unsqueeze(0)


def select_pos_embed(
    table: torch.Tensor, table_grid: tuple[int, int, int], grid: tuple[int, int, int], is_image: bool
) -> torch.Tensor:
    """The rows of ``table`` (built for ``table_grid``) for an input with token grid ``grid``.

    Images take the first time slice, bicubically resized when their spatial grid differs. Videos must match
    the construction layout: the table has no temporal interpolation, as in the released models.
    """
    t0, h0, w0 = table_grid
    _, h, w = grid
    if not is_image:
        if tuple(grid) != tuple(table_grid):
            raise ValueError(
                f"video token grid {tuple(grid)} differs from the model's {tuple(table_grid)}; build the model "
                "with the clip's num_frames and img_size (there is no temporal interpolation)"
            )
        return table
    first = table[:, : h0 * w0]
    if (h, w) == (h0, w0):
        return first
    dim = table.shape[-1]
    first = first.reshape(1, h0, w0, dim).permute(0, 3, 1, 2)
    first = F.interpolate(first, size=(h, w), mode="bicubic", align_corners=False)
    return first.permute(0, 2, 3, 1).reshape(1, h * w, dim)


def table_layout(n_tokens: int, patch_size: tuple[int, int, int]) -> tuple[int, int]:
    """(num_frames, img_size) of a square-input table with ``n_tokens`` rows; 16 frames when that fits (the row
    count alone is ambiguous, and every released file is 16 x 224)."""
    for t in (8, *range(1, 65)):
        side = math.isqrt(n_tokens // t) if n_tokens % t == 0 else 0
        if side and side * side * t == n_tokens:
            return t * patch_size[0], side * patch_size[1]
    raise ValueError(f"cannot read a (frames, size) layout from a positional table of {n_tokens} rows")
