"""Metrics that only some training steps produce (one modality's loss, one source's count), logged on those;
and evaluation means weighted by each rank's own count of samples.

``self.log(name, on_step=True)`` does not fit such a key: Lightning keeps the last value of every key it was
given and sends all of them to the loggers at every logging step, so an image loss logged on an image step
reappears, stale, in the rows of the video steps after it (and a count summed over the rows is counted again).
These keys go straight to the loggers instead, in the row of the step that produced them, with Lightning's step
number and logging cadence (``trainer.log_every_n_steps``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric


def log_this_step(module: LightningModule, metrics: Mapping[str, torch.Tensor | float]) -> None:
    """Log ``metrics`` for the current training step only: call it in ``training_step`` or
    ``on_train_batch_start``, before the optimiser steps. Values are read (from the device) on logging steps
    only, as Lightning does."""
    trainer = module.trainer
    every = trainer.log_every_n_steps
    if not trainer.loggers or not every or (trainer.global_step + 1) % every:
        return
    row = {name: float(value.detach()) if torch.is_tensor(value) else float(value) for name, value in metrics.items()}
    row["epoch"] = trainer.current_epoch
    for logger in trainer.loggers:
        logger.log_metrics(row, step=trainer.global_step)


def log_epoch_mean(module: LightningModule, name: str, value: torch.Tensor, weight: int) -> None:
    """Log ``value`` (a batch mean over ``weight`` samples, which may be 0) into the epoch's mean over every rank's
    samples. Lightning's own weighted mean (``self.log(..., batch_size=, sync_dist=True)``) divides by the ranks'
    integer-averaged sample counts, which is wrong when they differ (7 samples over 2 ranks count as 6); these
    sums go through a torchmetrics ``MeanMetric``, whose sums are reduced as sums. Log a key on every rank for
    every batch, so that all ranks reduce the same keys."""
    if not hasattr(module, "epoch_means"):
        module.epoch_means = nn.ModuleDict()  # no parameters and no saved state: nothing changes in checkpoints
    key = name.replace("/", "-")
    if key not in module.epoch_means:
        module.epoch_means[key] = MeanMetric().to(value.device)
    metric = module.epoch_means[key]
    metric.update(value.detach().float(), weight=float(weight))
    module.log(name, metric, on_step=False, on_epoch=True, add_dataloader_idx=False, metric_attribute=f"epoch_means.{key}")
