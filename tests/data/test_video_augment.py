"""Fine-tuning augmentations per sample: frame-consistent RandAugment, one erasing box per clip."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment

from omnimae_pl.data.video_augment import (
    ClipRandomErasing,
    FrameConsistentRandAugment,
    ImageFinetuneTransform,
    VideoFinetuneTransform,
    seeded_global_rng,
)


def _smooth_frames(t: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 (T, 3, size, size): different smooth pictures, so most ops visibly change them."""
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(t):
        small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        frames.append(np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC)))
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_rand_augment_is_timms_policy():
    ra = FrameConsistentRandAugment("rand-m7-n4-mstd0.5-inc1", img_size=32)
    assert isinstance(ra.policy, RandAugment)
    assert ra.policy.num_layers == 4
    assert {op.magnitude for op in ra.policy.ops} == {7}
    assert {op.prob for op in ra.policy.ops} == {0.5}
    image = FrameConsistentRandAugment("rand-m9-mstd0.5-inc1").policy
    assert image.num_layers == 2 and {op.magnitude for op in image.ops} == {9}


def test_every_frame_gets_the_same_ops():
    ra = FrameConsistentRandAugment("rand-m9-n4-mstd0.5-inc1", img_size=32)
    frames = _smooth_frames(6)
    changed = 0
    for seed in range(12):
        steps = ra.draw(_gen(seed))
        assert [s.name for s in steps] == [s.name for s in ra.draw(_gen(seed))]  # a function of the generator
        out = ra(frames, _gen(seed))
        assert out.shape == frames.shape and out.dtype == torch.uint8
        for k in range(len(frames)):  # frame k = the one drawn plan applied to frame k alone
            alone = np.array(ra.apply(steps, Image.fromarray(frames[k].permute(1, 2, 0).numpy())).convert("RGB"))
            assert torch.equal(out[k], torch.from_numpy(alone).permute(2, 0, 1))
        changed += int(not torch.equal(out, frames))
    assert changed >= 6  # the ops really ran


def test_a_static_clip_stays_static():
    """Identical frames stay identical (a per-frame draw would make them differ), and the draw is made once."""
    ra = FrameConsistentRandAugment("rand-m9-n4-mstd0.5-inc1", img_size=32)
    frames = _smooth_frames(1).expand(8, -1, -1, -1).contiguous()
    calls = []
    original = ra.draw
    ra.draw = lambda g=None: calls.append(1) or original(g)
    for seed in range(10):
        out = ra(frames, _gen(seed))
        assert all(torch.equal(out[0], out[k]) for k in range(1, 8))
    assert len(calls) == 10


def test_seeded_global_rng_restores_the_global_generators():
    import random

    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    with seeded_global_rng(_gen(5)):
        inside = (random.random(), np.random.rand(), torch.rand(()).item())
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected
    with seeded_global_rng(_gen(5)):
        assert (random.random(), np.random.rand(), torch.rand(()).item()) == inside


def _erased(x: torch.Tensor) -> torch.Tensor:
    return x != 0


def test_clip_erasing_cuts_one_box_through_all_frames():
    eraser = ClipRandomErasing(probability=1.0, mode="pixel")
    for seed in range(5):
        clip = eraser(torch.zeros(3, 6, 32, 40), _gen(seed))
        mask = _erased(clip)
        assert mask.any()
        assert all(torch.equal(mask[0, 0], mask[c, t]) for c in range(3) for t in range(6))
        rows, cols = mask[0, 0].any(1).nonzero(), mask[0, 0].any(0).nonzero()
        box = mask[0, 0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and int(mask[0, 0].sum()) == box.numel()  # one filled rectangle
        assert not torch.equal(clip[:, 0], clip[:, 1])  # pixel mode: each frame its own noise
    same = eraser(torch.zeros(3, 2, 32, 32), _gen(3)), eraser(torch.zeros(3, 2, 32, 32), _gen(3))
    assert torch.equal(*same)
    assert ClipRandomErasing(probability=0.0)(torch.zeros(3, 8, 8)).eq(0).all()


def test_video_finetune_transform():
    clip = _smooth_frames(1, size=48).permute(0, 2, 3, 1).expand(5, -1, -1, -1).contiguous()  # (T, H, W, 3)
    clip = torch.cat([clip[:, :, :], clip[:, :, :16]], dim=2)  # 48 x 64
    plain = VideoFinetuneTransform(crop_size=32, short_side=40, erase_prob=0.0)
    for seed in range(4):
        out = plain(clip, _gen(seed))
        assert out.shape == (3, 5, 32, 32) and out.dtype == torch.float32
        assert all(torch.equal(out[:, 0], out[:, t]) for t in range(5))  # one crop and one op draw per clip
        assert torch.equal(out, plain(clip, _gen(seed)))
    erased = VideoFinetuneTransform(crop_size=32, short_side=40, erase_prob=1.0, rand_augment=None)(clip, _gen(0))
    unerased = VideoFinetuneTransform(crop_size=32, short_side=40, erase_prob=0.0, rand_augment=None)(clip, _gen(0))
    box = erased != unerased
    assert box.any() and all(torch.equal(box[0, 0], box[c, t]) for c in range(3) for t in range(5))


def test_image_finetune_transform():
    image = Image.fromarray(_smooth_frames(1, size=64)[0].permute(1, 2, 0).numpy())
    tf = ImageFinetuneTransform(size=32)
    outs = [tf(image, _gen(s)) for s in range(4)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outs)
    assert torch.equal(outs[0], tf(image, _gen(0)))
    assert not torch.equal(outs[0], outs[1])
