"""copy_nearest_visible, the video reference of validation: each hidden patch copies the visible patch at the same
place and the nearest time step."""

from __future__ import annotations

import pytest
import torch

from omnimae_pl.models import omnimae_pretrain
from omnimae_pl.models.losses import copy_nearest_visible, masked_mse, norm_pix_targets


def test_hand_made_grid():
    # grid (T', H', W') = (4, 1, 2): token t * 2 + w; the target of token k is the value k in every channel
    target = torch.arange(8.0).view(1, 8, 1).expand(1, 8, 3).clone()
    mask = torch.tensor([[True, True,    # t = 0
                          False, True,   # t = 1
                          True, True,    # t = 2
                          True, True]])  # t = 3: position w = 1 is visible at no time step
    out = copy_nearest_visible(target, mask, (4, 1, 2))[0, :, 0].tolist()
    # w = 0 is visible only at t = 1 (token 2): every time step copies it; w = 1 gets the patch mean, 0
    assert out == [2.0, 0.0, 2.0, 0.0, 2.0, 0.0, 2.0, 0.0]


def test_nearest_step_and_ties_to_the_earlier_one():
    target = torch.arange(5.0).view(1, 5, 1)  # grid (5, 1, 1): one position over five time steps
    mask = torch.tensor([[True, False, True, False, True]])  # visible at t = 1 and t = 3
    out = copy_nearest_visible(target, mask, (5, 1, 1))[0, :, 0].tolist()
    # t = 0 -> 1; t = 1 keeps itself; t = 2 is as near to 1 as to 3 -> 1; t = 3 keeps itself; t = 4 -> 3
    assert out == [1.0, 1.0, 1.0, 3.0, 3.0]


def test_a_still_clip_is_copied_exactly_and_a_moving_one_is_not():
    g = torch.Generator().manual_seed(0)
    frame = torch.randn(1, 3, 1, 16, 16, generator=g)
    still = frame.expand(1, 3, 8, 16, 16).clone()
    moving = torch.cat([frame.roll(4 * t, dims=-1) for t in range(8)], dim=2)
    grid, patch = (4, 2, 2), (2, 8, 8)
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, [0, 1, 2, 3]] = False  # every position visible at t = 0 only
    for clip, expected_zero in ((still, True), (moving, False)):
        target = norm_pix_targets(clip, patch)
        loss = masked_mse(copy_nearest_visible(target, mask, grid), target, mask)
        assert (loss.item() < 1e-8) is expected_zero


def test_it_is_what_the_model_layout_gives():
    # the (B, N, D) layout of a model's targets, with a (B, T', H', W') mask, as validation calls it
    model = omnimae_pretrain("tiny", img_size=16, num_frames=4, patch_size=(2, 8, 8), depth=1, decoder_depth=1)
    x = torch.randn(2, 3, 4, 16, 16)
    target = model.forward_target(x)
    mask = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    mask[:, 1] = True  # the second time step hidden: it copies the first
    out = copy_nearest_visible(target, mask, (2, 2, 2))
    assert torch.equal(out[:, 4:], target[:, :4]) and torch.equal(out[:, :4], target[:, :4])


def test_refuses_a_grid_that_does_not_match():
    with pytest.raises(ValueError, match="grid"):
        copy_nearest_visible(torch.zeros(1, 8, 3), torch.zeros(1, 8, dtype=torch.bool), (2, 2, 3))
