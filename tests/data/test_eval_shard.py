"""EvalShard: the ranks' shares of an evaluation set are disjoint, cover it once, and are equally long; the
padding that evens them out is invalid and no bad-sample count sees it."""

from __future__ import annotations

import torch

from omnimae_pl.data.bad_samples import BadSampleTracker
from omnimae_pl.data.eval_shard import EvalShard
from omnimae_pl.data.sample import PADDING_INDEX, collate_samples, make_sample


class _Items(torch.utils.data.Dataset):
    modality = "image"

    def __init__(self, n: int, views: int = 1) -> None:
        self.n, self.views = n, views

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        sample = make_sample(torch.full((3, 4, 4), float(i)), label=i % 3, valid=i != 2, index=i)
        return sample if self.views == 1 else [sample] * self.views


def test_shards_cover_the_set_once_and_are_equally_long():
    data = _Items(7)
    shards = [EvalShard(data, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    items = [s[i] for s in shards for i in range(len(s))]
    real = sorted(int(x["index"]) for x in items if int(x["index"]) != PADDING_INDEX)
    assert real == list(range(7))
    padding = [x for x in items if int(x["index"]) == PADDING_INDEX]
    assert len(padding) == 2 and not any(bool(x["valid"]) for x in padding)


def test_video_views_are_padded_together():
    (pad,) = [EvalShard(_Items(3, views=2), 1, 2)[1]]
    assert [int(v["index"]) for v in pad] == [PADDING_INDEX] * 2 and not any(bool(v["valid"]) for v in pad)


def test_the_bad_sample_counts_leave_padding_out():
    data = _Items(5)
    tracker = BadSampleTracker(max_invalid_fraction=1.0)
    tracker.add_source("s", str, len(data))
    shard = EvalShard(data, 1, 2)  # items 1, 3 and a padding item
    tracker.update(collate_samples([shard[i] for i in range(len(shard))], "image", "s"))
    counts = tracker.state_dict()
    assert counts["s"]["seen"] == 2 and counts["s"]["invalid"] == 0, counts
