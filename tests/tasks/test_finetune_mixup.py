"""VideoMixup: timm's batch Mixup / CutMix, with the CutMix box never cut in time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.data import Mixup

from omnimae_pl.tasks.finetune.mixup import VideoMixup


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _two_sample_batch(shape):
    x = torch.stack([torch.zeros(shape), torch.ones(shape)])
    return x, torch.tensor([0, 1])


def test_video_cutmix_box_is_constant_over_time():
    mixer = VideoMixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=2)
    cuts = 0
    for seed in range(20):
        x, y = _two_sample_batch((3, 4, 16, 24))
        x, target = mixer(x, y, _gen(seed))
        assert mixer.last["cutmix"]
        pasted = x[0] == 1  # sample 0 received sample 1's box
        assert all(torch.equal(pasted[0, 0], pasted[c, t]) for c in range(3) for t in range(4))
        yl, yh, xl, xh = mixer.last["box"]
        expected = torch.zeros(16, 24, dtype=torch.bool)
        expected[yl:yh, xl:xh] = True
        assert torch.equal(pasted[0, 0], expected)
        lam = mixer.last["lam"]
        assert lam == pytest.approx(1 - expected.float().mean().item())
        assert torch.allclose(target[0], torch.tensor([lam, 1 - lam]))
        assert torch.equal(x[1] == 0, pasted)  # the partner got the same box
        cuts += int(pasted.any())
    assert cuts >= 10


def test_video_mixup_blends_whole_clips_and_smooths_labels():
    mixer = VideoMixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=4)
    x, y = _two_sample_batch((3, 2, 8, 8))
    x, target = mixer(x, y, _gen(0))
    lam = mixer.last["lam"]
    assert not mixer.last["cutmix"] and 0 < lam < 1
    assert torch.allclose(x[0], torch.full((3, 2, 8, 8), 1 - lam))
    off = 0.1 / 4
    assert torch.allclose(target[0], torch.tensor([lam * (0.9 + off) + (1 - lam) * off, (1 - lam) * (0.9 + off) + lam * off, off, off]))
    odd = mixer(torch.randn(3, 3, 2, 8, 8), torch.tensor([0, 1, 2]), _gen(1))[1]  # odd batches are fine
    assert odd.shape == (3, 4)


def test_video_mixup_on_images_is_timms_batch_mixup():
    x = torch.randn(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 3])
    for seed in range(6):
        np.random.seed(seed)
        ours = VideoMixup(num_classes=5)(x.clone(), y)
        np.random.seed(seed)
        theirs = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=5, label_smoothing=0.1)(x.clone(), y)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
