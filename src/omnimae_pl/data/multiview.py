"""Multi-view evaluation: every view of a video in one item, and logits averaged per video.

The paper's SSv2 protocol: 5 evenly spaced 2.7-s clips x 3 spatial crops (short side 224, left / centre / right
224 crops) = 15 views per video, logits averaged over the views before top-1 / top-5.

* :class:`MultiViewVideo` wraps any video dataset that lists ``videos`` as (path, label) and has a ``reader``
  (``VideoClipDataset``: ``SSv2``, ``VideoFolder``), whatever its own train / eval settings, and yields for item
  ``i`` a list of ``num_clips x num_crops`` samples (clip-major), all with ``index = i``. ``collate_samples``
  flattens them, so a batch holds whole videos: B items -> B x 15 rows sharing their video's index. (A
  ``VideoClipDataset(train=False, num_clips=5, num_crops=3, short_side=224)`` yields the same views.)
* :func:`average_logits_by_id` averages rows of logits that share an id: the LightningModule applies it to every
  evaluation batch (a no-op for single-view data, where ids are unique).
* :func:`first_occurrence` de-duplicates by id, for the padded duplicates of a ``DistributedSampler``.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from omnimae_pl.data.video_io import VideoDecodeError
from omnimae_pl.data.video_transforms import VideoEvalTransform, grey_clip

Sample = dict[str, torch.Tensor]


def average_logits_by_id(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unique ids sorted (U,), mean logits per id (U, C)) from rows ``logits`` (N, C) labelled ``ids`` (N,)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    sums = torch.zeros(len(unique), logits.shape[1], dtype=torch.float32, device=logits.device)
    sums.index_add_(0, inverse, logits.float())
    counts = torch.bincount(inverse, minlength=len(unique)).clamp(min=1).to(sums.dtype)
    return unique, sums / counts[:, None]


def first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """Positions (sorted by id) of the first row of every distinct id in ``ids`` (N,)."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(unique),), len(ids), dtype=positions.dtype, device=ids.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")


class MultiViewVideo(Dataset):
    """All ``num_clips x num_crops`` evaluation views of each video of ``dataset`` in one item.

    Args:
        dataset: a dataset with ``videos`` [(path, label)], ``reader``, ``num_frames``, ``clip_duration``.
        num_clips: evenly spaced windows per video (5).
        num_crops: 1 (centre) or 3 (start / centre / end of the long side).
        short_side: short side after resizing (224 for the 3-crop protocol: the crops tile the long side).
        crop_size: side of the square views (default: the dataset's ``crop_size``).
    """

    modality = "video"

    def __init__(
        self,
        dataset: Dataset,
        num_clips: int = 5,
        num_crops: int = 3,
        short_side: int = 224,
        crop_size: int | None = None,
    ) -> None:
        for attr in ("videos", "reader", "num_frames", "clip_duration"):
            if not hasattr(dataset, attr):
                raise TypeError(f"MultiViewVideo needs a video dataset with `{attr}` (e.g. SSv2, VideoFolder)")
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        self.dataset = dataset
        self.num_clips = num_clips
        self.crop_size = crop_size or getattr(dataset, "crop_size", 224)
        self.transform = VideoEvalTransform(crop_size=self.crop_size, short_side=short_side, num_crops=num_crops)

    @property
    def views_per_item(self) -> int:
        return self.num_clips * self.transform.num_crops

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def num_frames(self) -> int:
        return self.dataset.num_frames

    def __len__(self) -> int:
        return len(self.dataset.videos)

    def set_epoch(self, epoch: int) -> None:
        """Evaluation views do not depend on the epoch."""

    def describe(self, index: int) -> str:
        return str(self.dataset.videos[index][0])

    def __getitem__(self, key: int | tuple[int, int]) -> list[Sample]:
        index = int(key[0]) if isinstance(key, tuple) else int(key)
        path, label = self.dataset.videos[index]
        try:
            clips = self.dataset.reader.read_uniform_clips(
                path, self.num_clips, self.dataset.num_frames, self.dataset.clip_duration
            )
            views, valid = [view for clip in clips for view in self.transform(clip)], True
        except VideoDecodeError:
            views = [grey_clip(self.dataset.num_frames, self.crop_size) for _ in range(self.views_per_item)]
            valid = False
        common = {
            "label": torch.tensor(label, dtype=torch.long),
            "valid": torch.tensor(valid),
            "index": torch.tensor(index, dtype=torch.long),
        }
        return [{"input": view, **common} for view in views]
