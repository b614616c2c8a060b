"""Multi-view evaluation data: 5 clips x 3 crops per video in one item, flattened by the collate (the logits are
averaged per video by the fine-tuning task: tests/tasks/test_finetune_multiview.py)."""

from __future__ import annotations

import torch
from video_helpers import read_frame_numbers, write_test_video

from omnimae_pl.constants import IMAGENET_MEAN, IMAGENET_STD
from omnimae_pl.data.sample import collate_samples
from omnimae_pl.data.video_datasets import VideoFolder


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def _folder(tmp_path, frames=60):
    root = tmp_path / "videos"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    write_test_video(root / "a" / "v0.webm", frames, fps=12, width=64, height=48)
    (root / "b" / "broken.webm").write_bytes(b"not a video")
    return root


def test_fifteen_views_clip_major(tmp_path):
    views = VideoFolder(_folder(tmp_path), num_frames=4, clip_duration=1.0, crop_size=32, short_side=32,
                        train=False, num_clips=5, num_crops=3)
    assert len(views) == 2 and views.views_per_item == 15
    item = views[0]
    assert len(item) == 15 and all(v["index"] == 0 and v["label"] == 0 and v["valid"] for v in item)
    assert all(v["input"].shape == (3, 4, 32, 32) for v in item)
    numbers = [read_frame_numbers(_unnormalise(v["input"]).permute(1, 2, 3, 0)) for v in item]
    for k in range(5):
        assert numbers[3 * k] == numbers[3 * k + 1] == numbers[3 * k + 2]  # 3 crops of one window
        means = [_unnormalise(item[3 * k + c]["input"]).float().mean().item() for c in range(3)]
        assert means[0] < means[1] < means[2]  # left, centre, right (the frames brighten to the right)
    starts = [numbers[3 * k][0] for k in range(5)]
    assert starts == sorted(starts) and len(set(starts)) == 5  # 5 evenly spaced windows over the 5 s video
    assert starts[0] <= 6 and numbers[-1][-1] >= 52


def test_an_unreadable_video_gives_placeholder_views(tmp_path):
    views = VideoFolder(_folder(tmp_path), num_frames=4, crop_size=32, short_side=32, train=False, num_clips=5,
                        num_crops=3)
    item = views[1]
    assert len(item) == 15 and not any(bool(v["valid"]) for v in item)
    batch = collate_samples([views[0], item], modality="video", source="x")
    assert batch["input"].shape == (30, 3, 4, 32, 32)
    assert batch["index"].tolist() == [0] * 15 + [1] * 15
