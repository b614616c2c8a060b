"""Multi-view evaluation by hand: logits averaged per sample index, duplicates counted once."""

from __future__ import annotations

import pytest
import torch

from omnimae_pl.tasks.finetune.metrics import DedupTopKAccuracy
from omnimae_pl.tasks.finetune.multiview import average_logits_by_id, first_occurrence


def test_average_logits_by_id_by_hand():
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 2.0], [2.0, 4.0]])
    ids = torch.tensor([7, 7, 2, 7, 2])
    unique, mean = average_logits_by_id(logits, ids)
    assert unique.tolist() == [2, 7]
    assert torch.allclose(mean, torch.tensor([[1.5, 2.5], [1.0, 1.0]]))
    assert first_occurrence(ids).tolist() == [2, 0]
    assert first_occurrence(torch.tensor([4, 1, 4, 1, 0])).tolist() == [4, 1, 0]


def test_dedup_accuracy_by_hand():
    metric = DedupTopKAccuracy(top_k=(1, 2))
    logits = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5]])
    metric.update(logits, torch.tensor([1, 1, 0]), torch.tensor([0, 1, 2]))  # top-1: yes, no, no; top-2: y, y, n
    metric.update(logits[:1], torch.tensor([1]), torch.tensor([0]))  # a duplicate of sample 0
    out = metric.compute()
    assert out["acc1"] == pytest.approx(1 / 3) and out["acc2"] == pytest.approx(2 / 3)


def test_dedup_accuracy_without_samples_is_nan():
    metric = DedupTopKAccuracy()
    assert all(v.isnan() for v in metric.compute().values())  # never updated
    metric.update(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert set(metric.compute()) == {"acc1", "acc5"} and all(v.isnan() for v in metric.compute().values())
