"""OmniMAE pretraining: one modality per step, masked-pixel loss, AdamW with the official schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnimae_pl.callbacks import ModalitySpeedMonitor, WandbRunId
from omnimae_pl.errors import check_value, config_prefix
from omnimae_pl.masking import token_grid
from omnimae_pl.models import OmniMAE, omnimae_pretrain
from omnimae_pl.models.losses import copy_nearest_visible, patch_pixels
from omnimae_pl.models.stitch import stitched_errors
from omnimae_pl.optim import param_groups
from omnimae_pl.tasks.bad_sample_report import BadSampleReport
from omnimae_pl.tasks.base import OmniMAETask, model_kwargs
from omnimae_pl.tasks.checks import MODEL, check_optimisation, check_trainer
from omnimae_pl.tasks.step_logging import log_epoch_mean, log_this_step


class OmniMAEPretrain(OmniMAETask):
    """Pretrains :class:`~omnimae_pl.models.OmniMAE` on the interleaver's single-modality batches.

    Training logs ``train/loss`` on every step and ``train/loss_{modality}`` (``train/probe_acc_{modality}``) on
    that modality's steps only. Validation and test log ``{stage}/loss_{modality}`` beside
    ``{stage}/loss_{modality}_baseline``, the loss of predicting every hidden patch's mean on the same inputs and
    masks (a little under 1; flat patches have zero targets and lower it): the figure to beat. Video adds
    ``{stage}/loss_video_copy_nearest``, the loss of copying each hidden patch from the nearest visible time step
    (:func:`~omnimae_pl.models.losses.copy_nearest_visible`). With ``stitched_error``, also
    ``{stage}/pixel_error_{modality}_stitched``: the squared pixel error over the hidden patches of the
    prediction turned into pixels with the visible patches only (:mod:`~omnimae_pl.models.stitch`, the
    reconstruction pictures' ``pred_stitched`` view), beside ``..._stitched_blank``, the same for an all-zero
    prediction. All are means over readable samples: a placeholder
    never counts as a perfect reconstruction (``BadSampleReport`` stops a run whose data is mostly placeholders).

    Args:
        size: named model size (tiny, small, base, large, huge).
        model_overrides: fields of the size to change, e.g. ``{depth: 2}`` (not ``patch_size``: see below).
        img_size, num_frames, patch_size: linked from the data; the positional tables are built for them.
            ``patch_size`` None keeps the named size's patch.
        base_lr: lr per 256 samples; the peak lr is ``base_lr * global batch / 256``.
        warmup_fraction: linear warm-up share of all steps, then the official non-rebased cosine to 0. The
            schedule lasts ``trainer.max_epochs`` (steps per epoch from the datamodule), capped by
            ``trainer.max_steps``; see :meth:`~omnimae_pl.tasks.base.OmniMAETask.schedule_facts`.
        grad_checkpointing: per modality. The official recipe checkpoints video steps (V100 memory); on an
            80 GB GPU a video step fits without it and runs faster (docs/benchmarks.md).
        compile: ``torch.compile`` the encoder and decoder (two static shapes: image and video).
        num_classes: classes per modality, linked from the data.
        linear_probe: an online linear probe on detached pooled features of the visible tokens, for every
            modality whose data has labels (more than one class); its accuracy is a label-aware signal.
        stitched_error: log the stitched pixel errors in validation and test. Off by default: it solves a
            (2N x 2N) least squares system per sample and channel, cheap at the demo's 64 tokens, about a
            second per ViT-B clip on a CPU.
    """

    def __init__(
        self,
        size: str = "base",
        model_overrides: dict | None = None,
        img_size: int = 224,
        num_frames: int = 16,
        patch_size: tuple[int, int, int] | None = None,
        base_lr: float = 2e-4,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_fraction: float = 0.05,
        warmup_start_lr: float = 1e-6,
        grad_checkpointing: dict[str, bool] | None = None,
        compile: bool = False,
        num_classes: dict[str, int] | None = None,
        linear_probe: bool = True,
        probe_lr: float = 1e-3,
        stitched_error: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_optimisation(self.hparams)
        check_value(probe_lr > 0, f"{MODEL}.probe_lr", probe_lr, "must be > 0")
        with config_prefix(MODEL):
            self.model: OmniMAE = omnimae_pretrain(
                size, img_size=img_size, num_frames=num_frames, **model_kwargs(model_overrides, patch_size)
            )
        self.grad_checkpointing = {"image": False, "video": False, **(grad_checkpointing or {})}
        dim = self.model.encoder.embed_dim
        self.probes = nn.ModuleDict(
            {m: nn.Linear(dim, n) for m, n in (num_classes or {}).items() if linear_probe and n and n > 1}
        )

    def fsdp_units(self) -> list[nn.Module]:
        """One unit per transformer block, then the encoder, the decoder and each probe: the modules the step
        calls."""
        model = self.model
        return [*model.encoder.blocks, *model.decoder.blocks, model.encoder, model.decoder, *self.probes.values()]

    def compile_targets(self) -> list[tuple[nn.Module, str]]:
        return [(self.model.encoder, "forward_features"), (self.model.decoder, "forward")]

    def configure_callbacks(self) -> list:
        # Always on: resuming continues the same wandb run; speed per modality is part of the dashboard; files
        # that cannot be read are counted, judged and named.
        return [WandbRunId(), ModalitySpeedMonitor(), BadSampleReport()]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_trainer(self.trainer, stage)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(x, mask)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        modality, x, mask = batch["modality"], batch["input"], batch["mask"]
        valid = batch["valid"]
        grad_ckpt = self.grad_checkpointing.get(modality, False)
        latent, ids = self.model.forward_encoder(x, mask, grad_ckpt, batch.get("num_visible"))
        pred = self.model.forward_decoder(latent, ids, x, use_checkpoint=grad_ckpt)
        # evaluation scores three predictions against one target
        target = None if stage == "train" else self.model.forward_target(x)
        loss = self.model.forward_loss(x, pred, mask, valid, target)
        if stage == "train":
            self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=x.shape[0])
            per_modality = {f"train/loss_{modality}": loss}
            if modality in self.probes:
                probe_loss, acc = self._probe(latent, batch, modality)
                per_modality[f"train/probe_acc_{modality}"] = acc
                loss = loss + probe_loss
            log_this_step(self, per_modality)
            return loss + self._touch_idle_probes(latent, modality)
        # Epoch means weighted by the readable samples of every rank: a batch of placeholders (or of an
        # evaluation shard's padding) weighs 0.
        readable = int(valid.sum())  # evaluation only: the read of the device costs nothing here
        # What predicting every hidden patch's mean (zero in the normalised space) scores on the same inputs
        # and masks: a loss that stays on it means the decoder has learnt nothing for this modality.
        baseline = self.model.forward_loss(x, torch.zeros_like(pred), mask, valid, target)
        figures = {f"{stage}/loss_{modality}": loss, f"{stage}/loss_{modality}_baseline": baseline}
        grid = token_grid(x.shape[1:], self.model.patch_size)
        if x.ndim == 5:
            # A clip also gets the score of copying each hidden patch from the nearest visible time step: what
            # a model that only copies in time, ignoring motion, would reach.
            copied = copy_nearest_visible(target, mask, grid)
            figures[f"{stage}/loss_{modality}_copy_nearest"] = self.model.forward_loss(x, copied, mask, valid, target)
        if self.hparams.stitched_error:
            # Does the raw prediction carry the picture? Placed with the visible pixels only, it should be
            # closer to the hidden pixels than a blank prediction placed the same way.
            errors = stitched_errors(pred, patch_pixels(x, self.model.patch_size), mask, grid, self.model.patch_size)
            weight = valid.float()
            for name, error in zip(("stitched", "stitched_blank"), errors):
                figures[f"{stage}/pixel_error_{modality}_{name}"] = (error * weight).sum() / weight.sum().clamp(min=1.0)
        for name, value in figures.items():
            log_epoch_mean(self, name, value, readable)
        if modality in self.probes and bool((batch["label"] >= 0).any()):  # a labelled source (padding copies labels)
            _, acc = self._probe(latent, batch, modality)
            log_epoch_mean(self, f"{stage}/probe_acc_{modality}", acc, int(((batch["label"] >= 0) & valid.bool()).sum()))
        return loss

    def _probe(self, latent: torch.Tensor, batch: dict, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, accuracy) of the online probe over the readable labelled samples: a label-aware signal during
        pretraining; detached, so it never shapes the encoder."""
        label = batch["label"]
        keep = (label >= 0) & batch["valid"].bool()
        logits = self.probes[modality](latent.detach().float().mean(dim=1))
        per_sample = F.cross_entropy(logits, label.clamp(min=0), reduction="none")
        w = keep.float()
        loss = (per_sample * w).sum() / w.sum().clamp(min=1.0)
        acc = ((logits.argmax(-1) == label).float() * w).sum() / w.sum().clamp(min=1.0)
        return loss, acc

    def _touch_idle_probes(self, latent: torch.Tensor, modality: str) -> torch.Tensor:
        """0, through every probe of another modality: each step then has one graph over all parameters, which
        DDP needs (without ``find_unused_parameters``, a graph traversal every step). Their (zero) gradients are
        dropped after backward, so the optimizer leaves them alone as on one device."""
        zeros = latent.detach().new_zeros(1, latent.shape[-1], dtype=torch.float32)
        idle = [probe(zeros).sum() for m, probe in self.probes.items() if m != modality]
        return sum(idle, torch.zeros((), device=latent.device)) * 0.0

    def on_after_backward(self) -> None:
        for m, probe in self.probes.items():
            if m != self._train_modality:
                for p in probe.parameters():
                    p.grad = None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._train_modality = batch["modality"]
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        pred = self.model(batch["input"], batch["mask"], num_visible=batch.get("num_visible"))
        return {**batch, "pred": pred}

    # -- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        facts = self.schedule_facts()
        peak_lr = self.peak_lr(facts)
        groups = param_groups(self.model.named_parameters(), self.hparams.weight_decay)
        if len(self.probes):
            groups.append({"name": "probe", "params": list(self.probes.parameters()), "weight_decay": 0.0,
                           "lr_scale": self.hparams.probe_lr / peak_lr})
        hp = self.hparams
        return self.adamw_warmup_cosine(
            groups, peak_lr, facts["total_steps"], hp.warmup_fraction, hp.warmup_start_lr, min_lr=0.0,
            rebase_cosine=False, betas=tuple(hp.betas),
        )
