"""What pretraining and fine-tuning share: FSDP2 sharding and ``torch.compile`` in ``configure_model``, the
model's build arguments, the schedule's facts (from the datamodule's public API) and AdamW with a warm-up +
cosine schedule."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule
from torch import nn

from omnimae_pl.optim import fused_adamw, warmup_cosine


def model_kwargs(model_overrides: dict | None, patch_size) -> dict:
    """Overrides of the named size for the model factory: ``model_overrides`` plus ``patch_size`` (linked from
    the data; None keeps the size's own patch). The patch is given once: a different one in the overrides is
    an error."""
    overrides = dict(model_overrides or {})
    if patch_size is not None:
        patch_size = tuple(patch_size)
        if "patch_size" in overrides and tuple(overrides["patch_size"]) != patch_size:
            raise ValueError(
                f"model_overrides.patch_size {tuple(overrides['patch_size'])} differs from patch_size {patch_size} "
                "(linked from data.patch_size): give the patch once, under data"
            )
        overrides["patch_size"] = patch_size
    return overrides


class OmniMAETask(LightningModule):
    """Base of :class:`~omnimae_pl.tasks.pretrain.OmniMAEPretrain` and
    :class:`~omnimae_pl.tasks.finetune.OmniMAEFinetune`. A task lists its FSDP2 units (:meth:`fsdp_units`) and
    what ``compile: true`` compiles (:meth:`compile_targets`); each is done once, whatever the number of
    ``configure_model`` calls."""

    _sharded = False
    _compiled = False

    def fsdp_units(self) -> list[nn.Module]:
        """Modules to ``fully_shard``, inner ones first (never the LightningModule itself)."""
        raise NotImplementedError

    def compile_targets(self) -> list[tuple[nn.Module, str]]:
        """(module, method name) pairs whose methods ``torch.compile`` replaces; state-dict keys stay unchanged."""
        raise NotImplementedError

    def configure_model(self) -> None:
        if self.device_mesh is not None and not self._sharded:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for unit in self.fsdp_units():
                fully_shard(unit, mesh=mesh)
            self._sharded = True
        if self.hparams.compile and not self._compiled:
            # dynamic=False: every static shape (image, video, evaluation batch) gets its own graph
            for module, method in self.compile_targets():
                setattr(module, method, torch.compile(getattr(module, method), dynamic=False))
            self._compiled = True

    # -- optimisation ---------------------------------------------------------------------------------
    def optimizer_steps_per_epoch(self) -> int:
        """Optimiser steps per epoch from the datamodule's ``steps_per_epoch(world_size, rank)`` (batches per
        device), after ``limit_train_batches`` and gradient accumulation (the last, short one steps too)."""
        trainer = self.trainer
        dm = _datamodule(trainer)
        batches = int(dm.steps_per_epoch(trainer.world_size, trainer.global_rank))
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None and limit < 1.0:
            batches = int(batches * limit)
        return math.ceil(max(batches, 1) / trainer.accumulate_grad_batches)

    def schedule_facts(self) -> dict:
        """Per-device and global batch per modality, optimiser steps per epoch and in the schedule.

        The length is ``trainer.max_epochs`` epochs, capped by ``trainer.max_steps`` when that is set; just
        ``trainer.max_steps`` when ``max_epochs`` is -1 or None. Never ``estimated_stepping_batches``.
        """
        trainer = self.trainer
        batch_size = dict(_datamodule(trainer).batch_sizes())
        samples_per_step = trainer.world_size * trainer.accumulate_grad_batches
        steps_per_epoch = self.optimizer_steps_per_epoch()
        epochs = trainer.max_epochs if (trainer.max_epochs or -1) > 0 else None
        max_steps = trainer.max_steps if (trainer.max_steps or -1) > 0 else None
        total = steps_per_epoch * epochs if epochs else None
        if max_steps:
            total = min(total, max_steps) if total else max_steps
        if not total:
            raise ValueError("set trainer.max_epochs or trainer.max_steps: the lr schedule needs its length")
        return {
            "batch_size": batch_size,
            "global_batch": {m: b * samples_per_step for m, b in batch_size.items()},
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
        }

    def peak_lr(self, facts: dict) -> float:
        """MAE's rule: ``base_lr x global batch / 256``, with the larger global batch of the modalities."""
        return self.hparams.base_lr * max(facts["global_batch"].values()) / 256

    def adamw_warmup_cosine(
        self,
        groups: list[dict],
        peak: float,
        total_steps: int,
        warmup_fraction: float,
        warmup_start_lr: float,
        min_lr: float,
        rebase_cosine: bool,
        **adamw,
    ) -> dict:
        """``configure_optimizers``' answer: AdamW (fused where torch has one) over ``groups``, each peaking at
        ``peak x lr_scale``, and a per-step :func:`~omnimae_pl.optim.warmup_cosine` from ``warmup_start_lr`` to
        ``min_lr`` (both scaled per group like the peak)."""
        for group in groups:
            group["lr"] = peak * group["lr_scale"]
        optimizer = torch.optim.AdamW(groups, lr=peak, fused=fused_adamw(self.device), **adamw)
        start, end = warmup_start_lr / peak, min_lr / peak
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, total_steps, warmup_fraction, start, end, rebase_cosine=rebase_cosine),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _datamodule(trainer):
    """The trainer's datamodule, if it can size the schedule: ``batch_sizes()`` and ``steps_per_epoch()``."""
    dm = trainer.datamodule
    missing = [m for m in ("batch_sizes", "steps_per_epoch") if not callable(getattr(dm, m, None))]
    if missing:
        what = "no datamodule" if dm is None else f"the datamodule {type(dm).__name__} has no {' / '.join(missing)}"
        raise TypeError(
            f"the lr schedule is sized from the datamodule's batch_sizes() -> {{modality: batch per device and step}} "
            f"and steps_per_epoch(world_size, rank), but the trainer has {what}: fit with one that has both "
            "(e.g. omnimae_pl.data.datamodule's)"
        )
    return dm
