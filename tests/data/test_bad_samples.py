from __future__ import annotations

from pathlib import Path

import pytest
import torch

from omnimae_pl.data.bad_samples import BadSampleTracker, TooManyInvalidSamplesError
from omnimae_pl.data.imagenet import ImageNet
from omnimae_pl.data.interleave import ModalityInterleaver, Source


def _batch(source: str, valid: list[bool], index: list[int]) -> dict:
    return {"source": source, "valid": torch.tensor(valid), "index": torch.tensor(index)}


def _tracker(**kwargs) -> BadSampleTracker:
    tracker = BadSampleTracker(**kwargs)
    tracker.add_source("a", lambda i: f"/a/{i}.JPEG", size=1000)
    tracker.add_source("b", lambda i: f"/b/{i}.webm", size=6)
    return tracker


def test_counts_per_source_and_worst_files() -> None:
    tracker = _tracker(max_invalid_fraction=0.5, min_samples=100)
    tracker.update(_batch("a", [True, False, False, True], [0, 1, 2, 3]))
    tracker.update(_batch("a", [False, True, True, True], [1, 4, 5, 6]))
    tracker.update(_batch("b", [True, True], [0, 1]))
    counts = tracker.counts()
    assert counts["a/invalid"] == 3 and counts["a/seen"] == 8 and counts["a/invalid_fraction"] == 3 / 8
    assert counts["b/invalid"] == 0 and counts["b/invalid_fraction"] == 0.0
    assert tracker.worst("a") == [("/a/1.JPEG", 2), ("/a/2.JPEG", 1)]


def test_threshold_waits_for_enough_samples_then_names_the_worst_files() -> None:
    tracker = _tracker(max_invalid_fraction=0.1, min_samples=100)
    tracker.update(_batch("a", [False] * 4, [7] * 4))  # 4 replicas of one bad clip: too few samples to judge
    for start in range(0, 96, 8):
        tracker.update(_batch("a", [True] * 8, list(range(start, start + 8))))  # 4 of 100: fine
    with pytest.raises(
        TooManyInvalidSamplesError, match=r"source 'a': 20 of 116 .*worst files: /a/7\.JPEG \(2x\), /a/9\.JPEG \(1x\)"
    ):
        tracker.update(_batch("a", [False] * 16, [7] * 8 + [9] * 8))
    # a dataset smaller than min_samples is judged once its length has been seen
    small = _tracker(max_invalid_fraction=0.1, min_samples=100)
    small.update(_batch("b", [False, True, True], [0, 1, 2]))
    with pytest.raises(TooManyInvalidSamplesError, match="/b/0.webm"):
        small.update(_batch("b", [True, True, True], [3, 4, 5]))


def test_state_dict_round_trip(tmp_path: Path) -> None:
    tracker = _tracker()
    tracker.update(_batch("a", [False, True], [3, 4]))
    torch.save(tracker.state_dict(), tmp_path / "state.pt")
    restored = _tracker()
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.counts() == tracker.counts() and restored.worst("a") == [("/a/3.JPEG", 1)]
    with pytest.raises(KeyError, match="'c'"):
        restored.update(_batch("c", [True], [0]))


def test_unreadable_imagenet_files_are_counted_placeholders(imagenet_root: Path, bad_files) -> None:
    dataset = ImageNet(imagenet_root, img_size=32)
    interleaver = ModalityInterleaver(
        [Source("in1k", dataset, len(dataset))], bad_samples=BadSampleTracker(max_invalid_fraction=0.5)
    )
    batch = next(iter(interleaver))
    assert batch["input"].shape == (len(dataset), 3, 32, 32)
    assert interleaver.bad_samples.counts()["in1k/invalid"] == len(bad_files)
    assert sorted(Path(p).name for p, _ in interleaver.bad_samples.worst("in1k")) == sorted(bad_files)

    strict = ModalityInterleaver(
        [Source("in1k", dataset, len(dataset))], bad_samples=BadSampleTracker(max_invalid_fraction=0.1)
    )
    with pytest.raises(TooManyInvalidSamplesError, match=r"'in1k'.*(empty|truncated|text)\.JPEG"):
        next(iter(strict))

