"""Multi-view evaluation: logits averaged per video.

The paper's SSv2 protocol: 5 evenly spaced 2.7-s clips x 3 spatial crops (short side 224, left / centre / right
224 crops) = 15 views per video, logits averaged over the views before top-1 / top-5. The views come from the
video datasets' evaluation mode (``VideoClipDataset(train=False, num_clips=5, num_crops=3, short_side=224)``):
item ``i`` is a list of 15 samples with ``index = i``, which ``collate_samples`` flattens, so a batch holds whole
videos.

* :func:`average_logits_by_id` averages rows of logits that share an id: ``OmniMAEFinetune.evaluate`` applies it
  to every evaluation batch (a no-op for single-view data, where ids are unique).
* :func:`first_occurrence` de-duplicates by id, for the padded duplicates of a ``DistributedSampler``
  (:class:`~omnimae_pl.tasks.finetune.metrics.DedupTopKAccuracy`).
"""

from __future__ import annotations

import torch


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
