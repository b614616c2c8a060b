"""Top-k accuracy over distinct samples, for evaluation under a padding ``DistributedSampler``."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from omnimae_pl.tasks.finetune.multiview import first_occurrence


class DedupTopKAccuracy(Metric):
    """Top-k accuracy (micro, as the papers report) over distinct sample indices: a sample seen twice (the
    padded duplicates of a ``DistributedSampler``) counts once. States are gathered across processes."""

    full_state_update = False

    def __init__(self, top_k: tuple[int, ...] = (1, 5), **kwargs) -> None:
        super().__init__(**kwargs)
        self.top_k = tuple(top_k)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("hits", default=[], dist_reduce_fx="cat")

    def update(self, logits: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> None:
        k = min(max(self.top_k), logits.shape[1])
        ranked = logits.topk(k, dim=1).indices == target[:, None]
        hits = torch.stack([ranked[:, : min(kk, k)].any(dim=1) for kk in self.top_k], dim=1)
        self.index.append(index.long())
        self.hits.append(hits.float())

    def compute(self) -> dict[str, torch.Tensor]:
        # a list of tensors, or one tensor after a sync; empty when never updated (or only with empty batches)
        index = dim_zero_cat(self.index) if len(self.index) else torch.empty(0)
        if index.numel() == 0:
            return {f"acc{k}": torch.tensor(float("nan"), device=self.device) for k in self.top_k}
        hits = dim_zero_cat(self.hits)[first_occurrence(index)].mean(dim=0)
        return {f"acc{k}": hits[i] for i, k in enumerate(self.top_k)}
