"""One rank's share of an evaluation set, with every rank running the same number of batches."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import Dataset

from omnimae_pl.data.sample import PADDING_INDEX


class EvalShard(Dataset):
    """Items ``rank, rank + world_size, ...`` of ``dataset``, padded to ``ceil(len / world_size)``.

    Sharded models (FSDP) need the same number of forward passes on every rank, so the ranks short of an item
    get a padding item: a copy of a real one marked invalid, with index ``PADDING_INDEX``, left out of the loss,
    the metrics and the bad-sample counts. (``DistributedSampler`` pads with real items instead, which are then
    counted twice.)
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.modality = getattr(dataset, "modality", None)

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.world_size)

    def __getitem__(self, i: int) -> Any:
        index = self.rank + i * self.world_size
        if index < len(self.dataset):
            return self.dataset[index]
        return _as_padding(self.dataset[index % len(self.dataset)])


def _as_padding(item: Any) -> Any:
    if isinstance(item, list):  # the views of one video
        return [_as_padding(view) for view in item]
    return {**item, "valid": torch.tensor(False), "index": torch.tensor(PADDING_INDEX), "error": ""}
