"""OmniMAE pretraining: one modality per step, masked-pixel loss, AdamW with the official schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from omnimae_pl.callbacks import ModalitySpeedMonitor, WandbRunId
from omnimae_pl.models import OmniMAE, omnimae_pretrain
from omnimae_pl.optim import fused_adamw, param_groups, warmup_cosine


def shard_fsdp2(module: LightningModule, mesh) -> None:
    """FSDP2 under ModelParallelStrategy: one unit per transformer block, then the encoder, the decoder and
    each probe, the modules the step calls (never the LightningModule itself)."""
    from torch.distributed.fsdp import fully_shard

    model = module.model
    for block in [*model.encoder.blocks, *model.decoder.blocks]:
        fully_shard(block, mesh=mesh)
    for part in [model.encoder, model.decoder, *module.probes.values()]:
        fully_shard(part, mesh=mesh)


class OmniMAEPretrain(LightningModule):
    """Pretrains :class:`~omnimae_pl.models.OmniMAE` on the interleaver's single-modality batches.

    Validation and test log ``{stage}/loss_{modality}`` beside ``{stage}/loss_{modality}_baseline``, the loss of
    predicting every hidden patch's mean on the same inputs and masks (a little under 1): the figure to beat.

    Args:
        size: named model size (tiny, small, base, large, huge).
        model_overrides: fields of the size to change, e.g. ``{depth: 2}``.
        img_size, num_frames: linked from the data; the positional tables are built for them.
        base_lr: lr per 256 samples; the peak lr is ``base_lr * global batch / 256``.
        warmup_fraction: linear warm-up share of all steps, then the official non-rebased cosine to 0.
        max_epochs: length of the schedule in epochs (steps per epoch come from the datamodule); when
            None, ``trainer.max_steps`` is the length. Never taken from ``estimated_stepping_batches``.
        grad_checkpointing: per modality. The official recipe checkpoints video steps (V100 memory); on an
            80 GB GPU a 32-sample video step fits without it and runs 1.7x faster (docs/benchmarks.md).
        compile: ``torch.compile`` the encoder and decoder (two static shapes: image and video).
        num_classes: classes per modality, linked from the data.
        linear_probe: an online linear probe on detached pooled features of the visible tokens, for every
            modality whose data has labels (more than one class); its accuracy is a label-aware signal.
    """

    def __init__(
        self,
        size: str = "base",
        model_overrides: dict | None = None,
        img_size: int = 224,
        num_frames: int = 16,
        base_lr: float = 2e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_fraction: float = 0.05,
        warmup_start_lr: float = 1e-6,
        max_epochs: int | None = 800,
        grad_checkpointing: dict[str, bool] | None = None,
        compile: bool = False,
        num_classes: dict[str, int] | None = None,
        linear_probe: bool = True,
        probe_lr: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: OmniMAE = omnimae_pretrain(size, img_size=img_size, num_frames=num_frames, **(model_overrides or {}))
        self.grad_checkpointing = {"image": False, "video": False, **(grad_checkpointing or {})}
        dim = self.model.encoder.embed_dim
        self.probes = nn.ModuleDict(
            {m: nn.Linear(dim, n) for m, n in (num_classes or {}).items() if linear_probe and n and n > 1}
        )

    def configure_model(self) -> None:
        if self.device_mesh is not None and not getattr(self, "_sharded", False):
            shard_fsdp2(self, self.device_mesh["data_parallel"])
            self._sharded = True
        if self.hparams.compile and not getattr(self, "_compiled", False):
            # Compile the blocks' owners, not the LightningModule; state-dict keys stay unchanged.
            # dynamic=False: the two static shapes (image, video) each get their own graph, no dynamic one.
            self.model.encoder.forward_features = torch.compile(self.model.encoder.forward_features, dynamic=False)
            self.model.decoder.forward = torch.compile(self.model.decoder.forward, dynamic=False)
            self._compiled = True

    def configure_callbacks(self) -> list:
        # Always on: resuming continues the same wandb run; speed per modality is part of the dashboard.
        return [WandbRunId(), ModalitySpeedMonitor()]

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        data_patch = tuple(getattr(dm, "patch_size", self.model.patch_size))
        if data_patch != tuple(self.model.patch_size):
            raise ValueError(
                f"data.patch_size {data_patch} differs from the model's {tuple(self.model.patch_size)}: "
                "set model_overrides.patch_size to the same value"
            )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(x, mask)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        modality, x, mask = batch["modality"], batch["input"], batch["mask"]
        valid = batch.get("valid")
        ckpt = self.grad_checkpointing.get(modality, False)
        latent, ids = self.model.forward_encoder(x, mask, ckpt, batch.get("num_visible"))
        pred = self.model.forward_decoder(latent, ids, x, use_checkpoint=ckpt)
        loss = self.model.forward_loss(x, pred, mask, valid)
        bs = x.shape[0]
        on_step = stage == "train"
        self.log(f"{stage}/loss_{modality}", loss, on_step=on_step, on_epoch=not on_step, batch_size=bs,
                 add_dataloader_idx=False, sync_dist=not on_step)
        if stage == "train":
            self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=bs)
        else:
            # What predicting every hidden patch's mean (zero in the normalised space) scores on the same inputs
            # and masks: a loss that stays on it means the decoder has learnt nothing for this modality.
            baseline = self.model.forward_loss(x, torch.zeros_like(pred), mask, valid)
            self.log(f"{stage}/loss_{modality}_baseline", baseline, on_epoch=True, batch_size=bs,
                     add_dataloader_idx=False, sync_dist=True)
        if valid is not None:
            self.log(f"data/invalid_{batch.get('source', modality)}", (~valid.bool()).sum().float(),
                     on_step=on_step, on_epoch=not on_step, reduce_fx="sum", batch_size=bs,
                     add_dataloader_idx=False)
        if modality in self.probes:
            loss = loss + self._probe(latent, batch, modality, stage)
        return loss

    def _probe(self, latent: torch.Tensor, batch: dict, modality: str, stage: str) -> torch.Tensor:
        """Label-aware signal during pretraining; detached, so it never shapes the encoder."""
        label = batch["label"]
        keep = label >= 0
        if batch.get("valid") is not None:
            keep = keep & batch["valid"].bool()
        logits = self.probes[modality](latent.detach().float().mean(dim=1))
        per_sample = F.cross_entropy(logits, label.clamp(min=0), reduction="none")
        w = keep.float()
        loss = (per_sample * w).sum() / w.sum().clamp(min=1.0)
        acc = ((logits.argmax(-1) == label).float() * w).sum() / w.sum().clamp(min=1.0)
        on_step = stage == "train"
        self.log(f"{stage}/probe_acc_{modality}", acc, on_step=on_step, on_epoch=not on_step,
                 batch_size=label.shape[0], add_dataloader_idx=False, sync_dist=not on_step)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        pred = self.model(batch["input"], batch["mask"], num_visible=batch.get("num_visible"))
        return {**batch, "pred": pred}

    # -- optimisation ---------------------------------------------------------------------------------
    def schedule_facts(self) -> dict:
        """Global batch per modality, steps per epoch and total steps, from the config alone."""
        trainer = self.trainer
        dm = trainer.datamodule
        world = trainer.world_size * trainer.accumulate_grad_batches
        global_batch = {m: b * world for m, b in dm.batch_sizes().items()}
        steps_per_epoch = dm.steps_per_epoch(trainer.world_size, trainer.global_rank)
        if self.hparams.max_epochs is not None:
            total = self.hparams.max_epochs * steps_per_epoch // trainer.accumulate_grad_batches
        elif trainer.max_steps and trainer.max_steps > 0:
            total = trainer.max_steps
        else:
            raise ValueError("set model.max_epochs or trainer.max_steps: the lr schedule needs its length")
        return {"global_batch": global_batch, "steps_per_epoch": steps_per_epoch, "total_steps": total}

    def configure_optimizers(self):
        facts = self.schedule_facts()
        lr_batch = max(facts["global_batch"].values())
        peak_lr = self.hparams.base_lr * lr_batch / 256
        rank_zero_info(
            f"OmniMAE pretraining: peak lr {peak_lr:.3g} = base lr {self.hparams.base_lr:g} x {lr_batch} / 256; "
            f"global batch per modality {facts['global_batch']}; {facts['steps_per_epoch']} steps per epoch; "
            f"{facts['total_steps']} steps in the schedule"
        )
        groups = param_groups(self.model.named_parameters(), self.hparams.weight_decay)
        if len(self.probes):
            groups.append({"name": "probe", "params": list(self.probes.parameters()), "weight_decay": 0.0,
                           "lr_scale": self.hparams.probe_lr / peak_lr})
        for g in groups:
            g["lr"] = peak_lr * g["lr_scale"]
        optimizer = torch.optim.AdamW(
            groups, lr=peak_lr, betas=tuple(self.hparams.betas), fused=fused_adamw(self.device)
        )
        total, warm = facts["total_steps"], self.hparams.warmup_fraction
        start = self.hparams.warmup_start_lr / peak_lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total, warm, start, 0.0, rebase_cosine=False)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
