"""Fine-tuning, linear probing and evaluation of an OmniMAE classifier on images or videos.

Recipes (the official IN1K / SSv2 ones): AdamW (0.9, 0.999), per-step linear warm-up from 1e-6 then a cosine to 1e-6, both
"rescaled" (the cosine restarts after the warm-up); no weight decay on biases and norms; layer-wise lr decay with
the official rule (every group one factor of ``layer_decay`` below MAE's, the head included); drop path 0.1;
Mixup 0.8 / CutMix 1.0 / label smoothing 0.1 on the batch (:mod:`omnimae_pl.tasks.finetune.mixup`). Per-sample
augmentation (RandAugment, erasing) is the data pipeline's: see :mod:`omnimae_pl.data.video_augment`.

Evaluation: rows of a batch that share ``index`` are views of one sample (SSv2: 5 clips x 3 crops, see
:mod:`omnimae_pl.tasks.finetune.multiview`); their logits are averaged before the loss and the metrics, and top-1 / top-5
count every sample once, even when a ``DistributedSampler`` pads the last batches with duplicates.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from omnimae_pl.data.seeding import sample_generator
from omnimae_pl.errors import check_value, config_prefix
from omnimae_pl.models import OmniViTClassifier, omnimae_classifier
from omnimae_pl.models.checkpoints import CheckpointError
from omnimae_pl.optim import LAYER_DECAY_RULES, LayerDecayRule, param_groups
from omnimae_pl.tasks.bad_sample_report import BadSampleReport
from omnimae_pl.tasks.base import OmniMAETask, model_kwargs
from omnimae_pl.tasks.checks import MODEL, check_optimisation, check_trainer
from omnimae_pl.tasks.finetune.metrics import DedupTopKAccuracy
from omnimae_pl.tasks.step_logging import log_epoch_mean
from omnimae_pl.tasks.finetune.mixup import VideoMixup
from omnimae_pl.tasks.finetune.multiview import average_logits_by_id, first_occurrence
from omnimae_pl.tasks.init_from import InitReport, load_classifier_weights


class OmniMAEFinetune(OmniMAETask):
    """Fine-tunes (or linearly probes) :class:`~omnimae_pl.models.OmniViTClassifier` on image or video batches.

    Batches are dicts (``omnimae_pl.data.sample``): ``input`` (B, 3, H, W) or (B, 3, T, H, W), ``label``,
    ``valid`` (placeholders are left out of the loss and the metrics), ``index``, ``modality``.

    Args:
        size: named model size (tiny, small, base, large, huge); ``model_overrides`` changes its fields (not
            ``patch_size``).
        num_classes, img_size, num_frames, patch_size: linked from the data by the CLI (do not set them in the
            model's YAML). ``patch_size`` None keeps the named size's patch.
        drop_path_rate: stochastic depth, linear over the blocks (0.1 in every released fine-tuned model).
        head_init_std: trunc-normal std of the new head (2e-5 IN1K; the official SSv2 config used 0.01).
        head_drop: dropout before the head.
        init_from: our pretraining / fine-tuning ``.ckpt`` or a released OmniMAE file: the encoder is taken (never
            its final norm, the decoder, the mask token or a pixel head); ``fc_norm`` and ``head`` only from a
            fine-tuned source with the same number of classes. A report of the keys is printed and kept in
            ``init_report``. Loaded when the module is built; to rebuild a trained module with
            ``load_from_checkpoint`` without the file, pass ``init_from=None``.
        freeze_encoder: linear probing: the encoder is frozen and kept in eval mode; pooled features -> the
            post-pool LayerNorm -> Linear (no BatchNorm); only ``fc_norm`` and ``head`` train.
        lr: absolute peak lr. When None the peak is ``base_lr x global batch / 256`` (MAE's rule); the official
            recipes are 4e-3 at batch 1024 (IN1K) and 1e-3 at batch 256 (SSv2), both ``base_lr = 1e-3``.
        base_lr: lr per 256 samples (as in pretraining), used when ``lr`` is None.
        betas, eps, weight_decay: AdamW (no weight decay on biases and norms).
        layer_decay: lr factor per layer (0.65 IN1K-B, 0.75 SSv2); None for none.
        layer_decay_rule: "official" (head x decay, block i x decay^(depth+1-i), patch embed x decay^(depth+2))
            or "mae" (one factor less everywhere: head x 1).
        warmup_fraction: share of all steps for the linear warm-up (0.05 IN1K, 0.125 SSv2 over 40 epochs).
        warmup_start_lr, min_lr: lr at step 0 and at the end of the cosine (both 1e-6 in the official recipes),
            scaled per group like the peak. The schedule lasts ``trainer.max_epochs`` (steps per epoch from the
            datamodule), capped by ``trainer.max_steps``: :meth:`~omnimae_pl.tasks.base.OmniMAETask.schedule_facts`.
        steps_per_epoch: override of the optimiser steps per epoch the datamodule gives.
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob: batch-level Mixup / CutMix (0 and 0: off);
            for videos the CutMix box spans all frames (never cut in time).
        label_smoothing: inside the mixed targets, or in the cross entropy when mixing is off.
        eval_chunk: rows per forward pass at evaluation (multi-view batches are B x 15 clips); None: all.
        grad_checkpointing: activation checkpointing in the encoder blocks.
        compile: ``torch.compile`` the encoder's forward.
    """

    def __init__(
        self,
        size: str = "base",
        model_overrides: dict | None = None,
        num_classes: int = 1000,
        img_size: int = 224,
        num_frames: int = 16,
        patch_size: tuple[int, int, int] | None = None,
        drop_path_rate: float = 0.1,
        head_init_std: float = 2e-5,
        head_drop: float = 0.0,
        init_from: str | None = None,
        freeze_encoder: bool = False,
        lr: float | None = None,
        base_lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.05,
        layer_decay: float | None = 0.65,
        layer_decay_rule: LayerDecayRule = "official",
        warmup_fraction: float = 0.05,
        warmup_start_lr: float = 1e-6,
        min_lr: float = 1e-6,
        steps_per_epoch: int | None = None,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        eval_chunk: int | None = None,
        grad_checkpointing: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_optimisation(self.hparams)
        _check_arguments(self.hparams)
        with config_prefix(MODEL):
            self.model: OmniViTClassifier = omnimae_classifier(
                size, num_classes, img_size=img_size, num_frames=num_frames, drop_path_rate=drop_path_rate,
                head_init_std=head_init_std, head_drop=head_drop, **model_kwargs(model_overrides, patch_size),
            )
        self.init_report: InitReport | None = None
        if init_from:
            try:
                self.init_report = load_classifier_weights(self.model, init_from)
            except CheckpointError as err:
                raise CheckpointError(f"{MODEL}.init_from: {err}") from err
            rank_zero_info(self.init_report.summary())
        if freeze_encoder:
            self.model.encoder.requires_grad_(False)
            self.model.encoder.eval()
        if grad_checkpointing:
            self.model.encoder.set_grad_checkpointing(True)
        self.mixup = (
            VideoMixup(mixup_alpha, cutmix_alpha, prob=mixup_prob, switch_prob=mixup_switch_prob,
                       label_smoothing=label_smoothing, num_classes=num_classes)
            if mixup_alpha > 0 or cutmix_alpha > 0 else None
        )
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=-1)
        self.val_acc = DedupTopKAccuracy()
        self.test_acc = DedupTopKAccuracy()

    # -- model ----------------------------------------------------------------------------------------
    def configure_callbacks(self) -> list:
        return [BadSampleReport()]  # files that cannot be read are counted, judged and named

    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_trainer(self.trainer, stage)

    def fsdp_units(self) -> list[nn.Module]:
        """One unit per encoder block, then the classifier (an inner module, never the LightningModule)."""
        return [*self.model.encoder.blocks, self.model]

    def compile_targets(self) -> list[tuple[nn.Module, str]]:
        return [(self.model.encoder, "forward_features")]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.hparams.freeze_encoder:
            self.model.encoder.eval()  # no drop path, and it stays a fixed feature extractor
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) of images (B, 3, H, W) or clips (B, 3, T, H, W)."""
        if self.hparams.freeze_encoder:
            with torch.no_grad():
                pooled = self.model.encoder(x).mean(dim=1)
            return self.model.forward_head(self.model.fc_norm(pooled))
        return self.model(x)

    # -- training -------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x, label = batch["input"], batch["label"]
        valid = _valid(batch)
        target = label.clamp(min=0)
        if self.mixup is not None:
            # the draw is a function of (seed, epoch, batch), so a resumed run mixes the same way
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            generator = sample_generator(seed, self.current_epoch, batch_idx, "mixup")
            x, soft = self.mixup(x, target, generator)
            logits = self(x)
            per_sample = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1)  # timm SoftTargetCE
            if self.mixup.last.get("lam", 1.0) < 1.0:
                valid = valid & valid.flip(0)  # a placeholder's partner saw it pasted in
        else:
            logits = self(x)
            per_sample = F.cross_entropy(
                logits.float(), target, reduction="none", label_smoothing=self.hparams.label_smoothing
            )
        weight = valid.float()
        loss = (per_sample * weight).sum() / weight.sum().clamp(min=1.0)
        bs = x.shape[0]
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=bs)
        if self.mixup is None:  # under mixup the hard-label accuracy means little: not logged
            self.train_acc(logits.detach(), torch.where(valid, label, -1))
            self.log("train/acc1", self.train_acc, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    # -- evaluation -----------------------------------------------------------------------------------
    def evaluate(self, batch: dict) -> dict[str, torch.Tensor]:
        """Per-sample logits of an evaluation batch: rows sharing ``index`` (views of one video, flattened by
        ``collate_samples``) are averaged. Returns ``index``, ``logits``, ``label``, ``valid`` per sample, sorted by
        index; a sample is valid when all its views are."""
        x, index = batch["input"], batch["index"]
        chunk = self.hparams.eval_chunk or x.shape[0]
        logits = torch.cat([self(part) for part in x.split(chunk)]).float()
        ids, mean_logits = average_logits_by_id(logits, index)
        first = first_occurrence(index)
        all_valid = torch.ones(len(ids), dtype=torch.long, device=logits.device).scatter_reduce(
            0, torch.unique(index, return_inverse=True)[1], _valid(batch).long(), reduce="amin"
        )
        return {"index": ids, "logits": mean_logits, "label": batch["label"][first], "valid": all_valid.bool()}

    def _eval_step(self, batch: dict, stage: str, metric: DedupTopKAccuracy) -> dict[str, torch.Tensor]:
        out = self.evaluate(batch)
        keep = out["valid"]
        logits, label = out["logits"][keep], out["label"][keep]
        # updated even when empty, so that every process holds a state to gather at the end
        metric.update(logits, label, out["index"][keep])
        # weighted by the batch's valid samples (none for placeholders and an evaluation shard's padding)
        loss = F.cross_entropy(logits, label) if label.numel() else logits.new_zeros(())
        log_epoch_mean(self, f"{stage}/loss", loss, label.numel())
        return out

    def _log_metric(self, stage: str, metric: DedupTopKAccuracy) -> None:
        for name, value in metric.compute().items():
            # already gathered and de-duplicated over all processes: identical everywhere
            self.log(f"{stage}/{name}", value, prog_bar=name == "acc1", sync_dist=True)
        metric.reset()

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def on_validation_epoch_end(self) -> None:
        self._log_metric("val", self.val_acc)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def on_test_epoch_end(self) -> None:
        self._log_metric("test", self.test_acc)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        return self.evaluate(batch)

    # -- optimisation ---------------------------------------------------------------------------------
    def optimizer_steps_per_epoch(self) -> int:
        return self.hparams.steps_per_epoch or super().optimizer_steps_per_epoch()

    def peak_lr(self, facts: dict) -> float:
        """``lr`` when given, else ``base_lr x global batch / 256``."""
        return float(self.hparams.lr) if self.hparams.lr is not None else super().peak_lr(facts)

    def layer_of(self, name: str) -> int:
        """Layer of a classifier parameter for layer-wise lr decay: the encoder's own numbering for
        ``encoder.*``, depth + 1 (the top) for ``fc_norm`` and ``head``."""
        encoder = self.model.encoder
        if name.startswith("encoder."):
            return encoder.layer_id(name.removeprefix("encoder."))
        return len(encoder.blocks) + 1

    def configure_optimizers(self):
        facts = self.schedule_facts()
        peak = self.peak_lr(facts)
        hp = self.hparams
        layer_decay = None if hp.freeze_encoder else hp.layer_decay
        groups = param_groups(
            self.model.named_parameters(), hp.weight_decay, layer_decay, self.layer_of, len(self.model.encoder.blocks),
            hp.layer_decay_rule,
        )
        # the start-up summary reports the lr, batch and steps; layer decay is fine-tuning's own
        rank_zero_info(f"OmniMAE fine-tuning: layer decay {layer_decay} ({hp.layer_decay_rule} rule), "
                       f"{len(groups)} parameter groups")
        return self.adamw_warmup_cosine(
            groups, peak, facts["total_steps"], hp.warmup_fraction, hp.warmup_start_lr, hp.min_lr,
            rebase_cosine=True, betas=tuple(hp.betas), eps=hp.eps,
        )


def _check_arguments(hp) -> None:
    """The fine-tuning arguments a recipe cannot have (``check_optimisation`` has the shared ones)."""
    check_value(hp.num_classes >= 1, f"{MODEL}.num_classes", hp.num_classes, "must be >= 1 (linked from the data)")
    check_value(hp.lr is None or hp.lr > 0, f"{MODEL}.lr", hp.lr, "must be > 0, or null for base_lr x batch / 256")
    check_value(hp.min_lr >= 0, f"{MODEL}.min_lr", hp.min_lr, "must be >= 0")
    check_value(hp.eps > 0, f"{MODEL}.eps", hp.eps, "must be > 0")
    for key in ("drop_path_rate", "head_drop", "label_smoothing"):
        check_value(0 <= hp[key] < 1, f"{MODEL}.{key}", hp[key], "must be in [0, 1)")
    check_value(hp.layer_decay is None or 0 < hp.layer_decay <= 1, f"{MODEL}.layer_decay", hp.layer_decay,
                "must be in (0, 1], or null for none")
    check_value(hp.layer_decay_rule in LAYER_DECAY_RULES, f"{MODEL}.layer_decay_rule", hp.layer_decay_rule,
                f"must be one of {LAYER_DECAY_RULES}")
    for key in ("mixup_alpha", "cutmix_alpha"):
        check_value(hp[key] >= 0, f"{MODEL}.{key}", hp[key], "must be >= 0 (0: off)")
    for key in ("mixup_prob", "mixup_switch_prob"):
        check_value(0 <= hp[key] <= 1, f"{MODEL}.{key}", hp[key], "must be in [0, 1]")
    for key in ("eval_chunk", "steps_per_epoch"):
        check_value(hp[key] is None or hp[key] >= 1, f"{MODEL}.{key}", hp[key], "must be an integer >= 1 or null")


def _valid(batch: dict) -> torch.Tensor:
    """Rows that count: readable samples with a label."""
    return batch["valid"].bool() & (batch["label"] >= 0)
