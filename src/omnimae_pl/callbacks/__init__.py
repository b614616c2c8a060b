"""Callbacks Lightning does not already have: wandb run continuity, per-modality speed, a run summary,
reconstruction pictures, checkpoints a preemptible run can trust (:class:`ResumableCheckpoint`) and the end of a
run that keeps producing non-finite steps (:class:`StopOnNonFinite`)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

# configs name them omnimae_pl.callbacks.<Name>
from omnimae_pl.callbacks.checkpoint import ResumableCheckpoint
from omnimae_pl.callbacks.nonfinite import StopOnNonFinite  # noqa: F401

WANDB_RUN_ID_KEY = "wandb_run_id"


def wandb_logger(trainer: Trainer) -> WandbLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


class WandbRunId(Callback):
    """Stores the wandb run id in every checkpoint, so ``fit --ckpt_path`` continues the same run."""

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        logger = wandb_logger(trainer)
        if logger is not None and trainer.is_global_zero:
            checkpoint[WANDB_RUN_ID_KEY] = logger.experiment.id


class ModalitySpeedMonitor(Callback):
    """Samples/s per modality and the time spent waiting for data, averaged over ``window`` steps.

    Wall time between batches is measured without synchronising the device: over a window the queue of
    launched kernels is bounded, so the average rate is right without a sync on the hot path.
    """

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._reset(time.perf_counter())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset(time.perf_counter())  # start-up and the previous epoch's tail do not count

    def on_validation_end(self, trainer, pl_module) -> None:
        self._reset(time.perf_counter())  # nor does time spent validating

    def _reset(self, now: float) -> None:
        self._start = now
        self._samples: dict[str, int] = {}
        self._steps = 0
        self._wait = 0.0
        self._last_end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._wait += now - self._last_end
        modality = batch["modality"]
        self._samples[modality] = self._samples.get(modality, 0) + batch["input"].shape[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._last_end = now
        self._steps += 1
        if self._steps < self.window:
            return
        elapsed = max(now - self._start, 1e-9)
        metrics = {f"perf/samples_per_s_{m}": n / elapsed for m, n in self._samples.items()}
        metrics["perf/steps_per_s"] = self._steps / elapsed
        metrics["perf/data_wait_fraction"] = self._wait / elapsed
        # straight to the loggers, once per window: self.log(on_step=True) would repeat these values on later rows
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._reset(now)


class RunSummary(Callback):
    """Prints where the run's checkpoints, logs and pictures are once training ends."""

    def __init__(self, extra: dict[str, str] | None = None) -> None:
        self.extra = extra or {}

    @rank_zero_only
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        lines = ["", "Run summary:"]
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath:
                lines.append(f"  checkpoints:      {Path(cb.dirpath).resolve()}")
                if cb.last_model_path:
                    step = f" (step {cb.last_model_step})" if isinstance(cb, ResumableCheckpoint) else ""
                    lines.append(f"  last checkpoint:  {Path(cb.last_model_path).resolve()}{step}")
        for logger in trainer.loggers:
            where = getattr(logger.experiment, "dir", None) if isinstance(logger, WandbLogger) else logger.log_dir
            lines.append(f"  {type(logger).__name__}: {where}")
        for cb in trainer.callbacks:
            out = getattr(cb, "out_dir", None)
            if out:
                lines.append(f"  {type(cb).__name__}: {Path(out).resolve()}")
        lines += [f"  {k}: {v}" for k, v in self.extra.items()]
        print("\n".join(lines), flush=True)


class ReconstructionLogger(Callback):
    """Every ``every_n_steps`` per modality: a grid of ``num_images`` image reconstructions and one video's
    frame strip and GIF, drawn with :mod:`omnimae_pl.viz` (the notebook's helpers), written as files under
    ``out_dir`` and logged to wandb when a WandbLogger is attached.

    The forward runs on every rank (sharded models need all ranks); only rank 0 draws and writes.
    """

    def __init__(self, out_dir: str = "runs/reconstructions", every_n_steps: int = 500, num_images: int = 4) -> None:
        self.out_dir = out_dir
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self._next = {"image": 0, "video": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        modality = batch["modality"]
        step = trainer.global_step
        if step < self._next.get(modality, 0):
            return
        self._next[modality] = (step // self.every_n_steps + 1) * self.every_n_steps
        self.log_batch(trainer, pl_module, batch, step)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._next = {"image": 0, "video": 0}  # so the final pictures of the run are drawn next time too

    def log_batch(self, trainer, pl_module, batch: dict, step: int) -> None:
        from omnimae_pl import viz

        modality = batch["modality"]
        k = self.num_images if modality == "image" else 1
        x, mask = batch["input"][:k], batch["mask"][:k]
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                pred = pl_module.model(x, mask)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return
        from omnimae_pl.reconstruct import reconstruction_scores

        model = pl_module.model
        views = viz.reconstruction_views(pred, x, mask, model.patch_size)
        scores = reconstruction_scores(model, x, mask, pred)
        out = Path(self.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        title = (
            f"step {step}, {modality}, {int(mask[0].float().mean() * 100)}% of patches masked; masked-patch loss "
            f"{scores['loss']:.3f}; hidden-pixel error stitched {scores['pixel_error_stitched']:.4f} "
            f"(blank {scores['pixel_error_stitched_blank']:.4f})"
        )
        if modality == "image":
            fig = viz.views_grid(views, suptitle=title)
        else:
            fig = viz.frame_strip(viz.sample_views(views, 0), suptitle=title)
        png = out / f"step{step:07d}_{modality}.png"
        fig.savefig(png, dpi=100)
        files = {"png": png}
        if modality == "video":
            files["gif"] = viz.save_gif(viz.labelled_tiles(viz.sample_views(views, 0)), png.with_suffix(".gif"))
        logger = wandb_logger(trainer)
        if logger is not None:
            import wandb

            media = {f"reconstruction/{modality}": wandb.Image(str(png), caption=title)}
            if "gif" in files:
                media["reconstruction/video_clip"] = wandb.Video(str(files["gif"]), format="gif")
            logger.experiment.log({**media, "trainer/global_step": step})
