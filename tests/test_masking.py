"""Fixed-count masking: exact counts, mask geometry per type, determinism, argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from omnimae_pl.masking import (
    IMAGE_MASKING,
    MASK_TYPES,
    VIDEO_MASKING,
    MaskingConfig,
    make_mask,
    num_masked,
    token_grid,
)

GRIDS = [(1, 14, 14), (8, 14, 14), (1, 16, 16), (8, 16, 16), (2, 3, 5), (4, 7, 7), (3, 1, 1)]
RATIOS = [0.0, 0.25, 0.5, 0.75, 0.9, 0.95, 0.33]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expected(grid, ratio, mask_type) -> int:
    t, h, w = grid
    if mask_type in ("random", "causal"):
        return int(ratio * t * h * w)
    if mask_type == "tube":
        return int(ratio * h * w) * t
    return math.floor(t * ratio) * h * w  # frame


# ---------------------------------------------------------------- token grids

@pytest.mark.parametrize(
    ("shape", "patch", "grid"),
    [
        ((3, 224, 224), (2, 16, 16), (1, 14, 14)),
        ((3, 16, 224, 224), (2, 16, 16), (8, 14, 14)),
        ((3, 224, 224), (2, 14, 14), (1, 16, 16)),
        ((3, 16, 224, 224), (2, 14, 14), (8, 16, 16)),
        ((3, 1, 32, 48), (2, 16, 16), (1, 2, 3)),  # a 1-frame clip still has one time slice
    ],
)
def test_token_grid(shape, patch, grid):
    assert token_grid(shape, patch) == grid


def test_token_grid_rejects_other_ranks():
    with pytest.raises(ValueError):
        token_grid((224, 224), (2, 16, 16))


# ---------------------------------------------------------------- counts

@pytest.mark.parametrize("mask_type", MASK_TYPES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_exact_counts(mask_type, grid, ratio):
    expected = _expected(grid, ratio, mask_type)
    assert num_masked(grid, ratio, mask_type) == expected
    for seed in range(3):
        m = make_mask(grid, ratio, mask_type, generator=_gen(seed))
        assert m.dtype == torch.bool
        assert tuple(m.shape) == grid
        assert int(m.sum()) == expected


@pytest.mark.parametrize(
    ("grid", "ratio", "masked", "visible"),
    [
        ((1, 14, 14), 0.90, 176, 20),   # B/L image, paper ratio
        ((8, 14, 14), 0.95, 1489, 79),  # B/L video, paper ratio
        ((1, 16, 16), 0.90, 230, 26),   # H image
        ((8, 16, 16), 0.95, 1945, 103),  # H video
        ((1, 14, 14), 0.75, 147, 49),   # released yaml, IN1K
        ((8, 14, 14), 0.90, 1411, 157),  # released yaml, SSv2
    ],
)
def test_paper_counts(grid, ratio, masked, visible):
    for mask_type in ("random", "causal"):
        assert num_masked(grid, ratio, mask_type) == masked
        m = make_mask(grid, ratio, mask_type, generator=_gen())
        assert int(m.sum()) == masked
        assert int((~m).sum()) == visible


def test_default_configs_are_the_paper_ratios():
    assert IMAGE_MASKING == MaskingConfig("random", 0.90)
    assert VIDEO_MASKING == MaskingConfig("random", 0.95)
    assert int(IMAGE_MASKING((1, 14, 14), _gen()).sum()) == 176
    assert int(VIDEO_MASKING((8, 14, 14), _gen()).sum()) == 1489


def test_frame_masking_masks_seven_of_eight_slices_at_paper_ratios():
    for ratio in (0.9, 0.95):
        m = make_mask((8, 14, 14), ratio, "frame", _gen())
        assert int(m.flatten(1).all(dim=1).sum()) == 7
        assert int(m.sum()) == 7 * 196


# ---------------------------------------------------------------- geometry per type

@pytest.mark.parametrize("seed", range(5))
def test_tube_mask_is_constant_over_time(seed):
    m = make_mask((8, 14, 14), 0.9, "tube", _gen(seed))
    assert torch.equal(m, m[:1].expand_as(m))
    assert int(m[0].sum()) == int(0.9 * 196)


def test_tube_equals_random_count_on_images():
    grid = (1, 14, 14)
    assert num_masked(grid, 0.9, "tube") == num_masked(grid, 0.9, "random")


@pytest.mark.parametrize("seed", range(5))
def test_frame_mask_is_whole_slices(seed):
    m = make_mask((8, 5, 6), 0.6, "frame", _gen(seed))
    per_slice = m.flatten(1)
    # every time slice is all masked or all visible
    assert torch.all(per_slice.all(dim=1) | (~per_slice).all(dim=1))
    assert int(per_slice.all(dim=1).sum()) == math.floor(8 * 0.6)


@pytest.mark.parametrize("grid", [(8, 14, 14), (1, 14, 14), (2, 3, 5)])
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.95])
def test_causal_masks_the_last_tokens_in_raster_order(grid, ratio):
    m = make_mask(grid, ratio, "causal")
    flat = m.flatten()  # (t, h, w) raster order
    n = flat.numel()
    k = int(ratio * n)
    assert not flat[: n - k].any()
    assert flat[n - k :].all()
    # explicit raster order: the last masked index is the final (t, h, w) position
    t, h, w = grid
    assert bool(m[t - 1, h - 1, w - 1])
    if k < n:
        assert not bool(m[0, 0, 0])


def test_causal_ignores_the_generator():
    a = make_mask((8, 4, 4), 0.75, "causal", _gen(1))
    b = make_mask((8, 4, 4), 0.75, "causal", _gen(2))
    assert torch.equal(a, b)


def test_random_mask_spreads_over_time_and_space():
    """Random masking is not tube/frame-shaped: over a few draws every token is sometimes visible."""
    grid = (4, 4, 4)
    ms = torch.stack([make_mask(grid, 0.75, "random", _gen(s)) for s in range(200)]).float()
    freq = ms.mean(dim=0)
    assert torch.all(freq > 0.5) and torch.all(freq < 0.95)  # uniform ~0.75 per token
    # not constant over time (as a tube mask would be)
    assert any(not torch.equal(m, m[:1].expand_as(m)) for m in ms.bool())


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("mask_type", ["random", "tube", "frame"])
def test_generator_determinism(mask_type):
    grid = (8, 14, 14)
    a = make_mask(grid, 0.5, mask_type, _gen(123))
    b = make_mask(grid, 0.5, mask_type, _gen(123))
    assert torch.equal(a, b)
    others = [make_mask(grid, 0.5, mask_type, _gen(s)) for s in range(124, 130)]
    assert any(not torch.equal(a, o) for o in others)


def test_config_call_uses_the_generator():
    cfg = MaskingConfig("tube", 0.9)
    assert torch.equal(cfg((8, 14, 14), _gen(7)), make_mask((8, 14, 14), 0.9, "tube", _gen(7)))


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_invalid_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        make_mask((8, 14, 14), ratio)
    with pytest.raises(ValueError, match="ratio"):
        MaskingConfig("random", ratio)


def test_invalid_type():
    with pytest.raises(ValueError, match="mask_type"):
        make_mask((8, 14, 14), 0.9, "block")
    with pytest.raises(ValueError, match="mask_type"):
        num_masked((8, 14, 14), 0.9, "block")
    with pytest.raises(ValueError, match="mask_type"):
        MaskingConfig("block", 0.9)
