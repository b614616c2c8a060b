"""What pretraining and fine-tuning share: FSDP2 sharding and ``torch.compile`` in ``configure_model``, the
model's build arguments, the schedule's facts (from the datamodule's public API), AdamW with a warm-up +
cosine schedule, the start-up summary of what a fit trains with, and the skipping of steps whose loss or
gradients are not finite."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from omnimae_pl.errors import ConfigError
from omnimae_pl.finite import nonfinite_flag
from omnimae_pl.optim import fused_adamw, warmup_cosine, with_initial_state


def model_kwargs(model_overrides: dict | None, patch_size) -> dict:
    """Overrides of the named size for the model factory: ``model_overrides`` plus ``patch_size`` (linked from
    the data; None keeps the size's own patch). The patch is given once: a different one in the overrides is
    an error."""
    overrides = dict(model_overrides or {})
    if patch_size is not None:
        patch_size = tuple(patch_size)
        if "patch_size" in overrides and tuple(overrides["patch_size"]) != patch_size:
            raise ConfigError(
                f"model.init_args.model_overrides.patch_size={tuple(overrides['patch_size'])}: differs from "
                f"data.init_args.patch_size={patch_size}; give the patch once, under data"
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
    skipped_steps = 0  # steps whose update was skipped (non-finite loss or gradients), over the whole run

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

        The global batch counts every sample of an optimiser step: per-device batch x world size x
        ``trainer.accumulate_grad_batches``; the steps are optimiser steps (batches / accumulation). The length
        is ``trainer.max_epochs`` epochs, capped by ``trainer.max_steps`` when that is set; just
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
        self._schedule_facts = {
            "batch_size": batch_size,
            "global_batch": {m: b * samples_per_step for m, b in batch_size.items()},
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total,
        }
        return dict(self._schedule_facts)

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
        optimizer = with_initial_state(torch.optim.AdamW(groups, lr=peak, fused=fused_adamw(self.device), **adamw))
        start, end = warmup_start_lr / peak, min_lr / peak
        # what the start-up summary reports: these very numbers, not a second computation of them
        self._lr_schedule = {
            "peak_lr": peak, "total_steps": total_steps, "warmup_fraction": warmup_fraction,
            # warmup_cosine warms up while step < warmup_fraction x total_steps
            "warmup_steps": math.ceil(warmup_fraction * total_steps), "warmup_start_lr": warmup_start_lr,
            "min_lr": min_lr, "rebase_cosine": rebase_cosine,
        }
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, total_steps, warmup_fraction, start, end, rebase_cosine=rebase_cosine),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- the start-up summary ----------------------------------------------------------------------------
    def startup_facts(self) -> dict:
        """What this fit trains with, from the facts and the schedule that ``configure_optimizers`` built the
        optimizer from (:meth:`schedule_facts`, :meth:`adamw_warmup_cosine`), not a second computation of them:
        processes, strategy and precision, batch per rank and per optimiser step for each modality, gradient
        accumulation, the peak lr and whether MAE's rule gave it, warm-up and optimiser steps. Plain numbers
        and strings (they go to the loggers' config)."""
        trainer, facts, schedule = self.trainer, self._schedule_facts, self._lr_schedule
        epochs = trainer.max_epochs if (trainer.max_epochs or -1) > 0 else None
        by_epochs = epochs is not None and schedule["total_steps"] == facts["steps_per_epoch"] * epochs
        return {
            "world_size": trainer.world_size, "num_nodes": trainer.num_nodes, "devices_per_node": trainer.num_devices,
            "strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
            "batch_per_rank": dict(facts["batch_size"]), "global_batch": dict(facts["global_batch"]),
            # the pretraining data's augmented copies of each decoded clip: video batches are clips x replicas
            "video_replicas": getattr(trainer.datamodule, "replicas", 1) if "video" in facts["batch_size"] else 1,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "base_lr": self.hparams.base_lr, "peak_lr": schedule["peak_lr"],
            # else the task's own lr (fine-tuning's ``lr``)
            "peak_lr_scaled": schedule["peak_lr"] == OmniMAETask.peak_lr(self, facts),
            "warmup_steps": schedule["warmup_steps"], "warmup_fraction": schedule["warmup_fraction"],
            "warmup_start_lr": schedule["warmup_start_lr"], "min_lr": schedule["min_lr"],
            "optimizer_steps_per_epoch": facts["steps_per_epoch"], "total_steps": schedule["total_steps"],
            "schedule_length": _count(epochs, "epoch") if by_epochs else "trainer.max_steps",
        }

    @staticmethod
    def startup_summary(facts: dict) -> str:
        """:meth:`startup_facts` as the aligned lines printed when training starts."""
        world, accumulate, replicas = facts["world_size"], facts["accumulate_grad_batches"], facts["video_replicas"]
        rows = [("processes", f"{world} = {_count(facts['num_nodes'], 'node')} x "
                              f"{_count(facts['devices_per_node'], 'device')} per node ({facts['strategy']}, "
                              f"precision {facts['precision']})")]
        for modality, per_rank in facts["batch_per_rank"].items():
            step = facts["global_batch"][modality]
            clips = modality == "video" and replicas > 1
            rows.append((f"batch {modality}", f"{per_rank} per rank"
                         + (f" ({per_rank // replicas} clips x {replicas} replicas)" if clips else "")
                         + f" x {_count(world, 'rank')} x {accumulate} accumulated = {step} per optimizer step"
                         + (f" ({step // replicas} clips)" if clips else "")))
        rows.append(("accumulation", f"{_count(accumulate, 'batch')} per optimizer step "
                                     "(trainer.accumulate_grad_batches)"))
        global_batch, peak = max(facts["global_batch"].values()), _lr(facts["peak_lr"])
        rows.append(("peak lr", f"{_lr(facts['base_lr'])} x {global_batch} / 256 = {peak} (base_lr x global batch "
                                "/ 256, the larger modality's)" if facts["peak_lr_scaled"]
                     else f"{peak} (model.init_args.lr, not scaled with the batch)"))
        rows.append(("warm-up", f"{_count(facts['warmup_steps'], 'optimizer step')} (warmup_fraction "
                                f"{facts['warmup_fraction']:g}) from {_lr(facts['warmup_start_lr'])}, then cosine "
                                f"to {_lr(facts['min_lr'])}"))
        rows.append(("optimizer steps", f"{facts['optimizer_steps_per_epoch']} per epoch, {facts['total_steps']} in "
                                        f"total ({facts['schedule_length']})"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(["Start-up summary:", *(f"  {name:<{width}}  {text}" for name, text in rows)])

    def on_train_start(self) -> None:
        """Prints the start-up summary on rank 0 (after a resumed run's state is restored) and adds its facts to
        the loggers' config, under ``startup`` (wandb's run config, hparams.yaml)."""
        facts = self.startup_facts()
        if self.trainer.is_global_zero:
            print(self.startup_summary(facts), flush=True)
        for logger in self.loggers:
            logger.log_hyperparams({"startup": facts})

    # -- steps whose loss or gradients are not finite ----------------------------------------------------
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Runs the closure (``training_step`` and backward), then steps the optimizer unless the loss or the
        gradient norm is not finite on some rank. A skipped step leaves the weights and AdamW's moments and step
        count as they were, is counted in :attr:`skipped_steps` and logged as ``train/skipped_steps`` (the count so
        far); :class:`~omnimae_pl.callbacks.StopOnNonFinite` ends a run that keeps skipping.

        A skipped step still counts as a step: ``global_step`` and the per-step lr schedule advance, so the
        schedule, ``max_steps`` and the data position stay those of the run without the bad batch. With
        gradient accumulation the check covers the accumulated gradient and the last micro-batch's loss."""

        def checked_closure():
            loss = optimizer_closure()
            if not self._finite_step(loss, optimizer):
                # AdamW passes over parameters without a gradient: no update, no moment decay, no step count
                optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
            return loss

        optimizer.step(closure=checked_closure)
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping (``trainer.gradient_clip_val``), also under FSDP1, whose precision plugin refuses
        clipping by norm: there the norm over all shards is FSDP's own ``clip_grad_norm_`` of the root module.
        (DDP and FSDP2 need nothing: the gradients are whole, or DTensors whose norm is reduced over the ranks.)"""
        if gradient_clip_val and isinstance(self.trainer.strategy, FSDPStrategy) and gradient_clip_algorithm in (
            None, "norm"
        ):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _finite_step(self, loss: torch.Tensor | None, optimizer) -> bool:
        """Whether the loss and every gradient are finite on every rank: the flag is all-reduced, so the ranks
        all skip or all step (FSDP2 shards and per-rank losses differ)."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = nonfinite_flag(grads if loss is None else [*grads, loss.detach()])
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad.to(self.device), reduce_op="sum")
        return not bad.item()  # the step's one read of the device: the decision must be known before stepping

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["skipped_steps"] = self.skipped_steps
        # For the model card of `omnimae-cli export --format hub`: the last validation figures and the data the
        # weights were trained on, as plain floats and strings (the file stays weights_only-loadable).
        trainer = self._trainer  # None for a module saved without a trainer attached (`self.trainer` raises)
        if trainer is None:
            return
        checkpoint["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        dm = trainer.datamodule
        sources = getattr(dm, "sources", None) or [s for s in [getattr(dm, "source", None)] if s is not None]
        per_step = trainer.world_size * trainer.accumulate_grad_batches
        batch = dm.batch_sizes() if callable(getattr(dm, "batch_sizes", None)) else {}
        checkpoint["data"] = {
            "sources": [{"name": s.name, "kind": s.kind, "split": s.split, "weight": s.weight} for s in sources],
            "masking": {m: {"mask_type": c.mask_type, "ratio": float(c.ratio)}
                        for m, c in (getattr(dm, "masking", None) or {}).items()},
            "global_batch": {m: int(b) * per_step for m, b in batch.items()},
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.skipped_steps = checkpoint.get("skipped_steps", 0)


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


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}es" if word.endswith(("tch", "sh", "s", "x")) else f"{n} {word}s"


def _lr(value: float) -> str:
    """1.25e-3 rather than 0.00125 or 1.250e-03: learning rates read at a glance, 4 significant digits."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
