"""Unreadable files made visible: counted and judged in evaluation too, logged honestly, named at every epoch end.

The datamodules count placeholders per source (``omnimae_pl.data.bad_samples``): the interleaver counts training
batches; this callback feeds evaluation batches to the datamodule's ``eval_bad_samples``, and reports both.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from omnimae_pl.data.bad_samples import BadSampleTracker
from omnimae_pl.tasks.step_logging import log_this_step

log = logging.getLogger(__name__)

REPORT_FILE = "bad_samples.txt"
SHOWN = 10  # files named per source in the log; the report file holds all of them


class BadSampleReport(Callback):
    """What the datamodule's bad-sample trackers saw; the tasks add it themselves (``configure_callbacks``).

    * Training: ``data/invalid_<source>``, the running total of a source's unreadable samples, logged on that
      source's steps only, so its last value is the true count so far (summing rows would count twice); with
      ``image_decode: device`` also ``data/cpu_decoded_<source>``, the files decoded on a CPU instead.
    * Evaluation: every batch is counted against the same ``max_invalid_fraction`` as training, and each
      validation or test run is judged at its end on what it saw, however few samples: an evaluation of mostly
      unreadable files stops with ``TooManyInvalidSamplesError`` naming the source and the files instead of
      reporting a loss over placeholders. ``val/invalid_<source>`` (``test/...``) is that run's count.
    * At every epoch end, and when the run stops on an error: the files that failed since the last report are
      named, the first ``SHOWN`` per source in the log, all of them appended to ``bad_samples.txt`` beside the
      checkpoints (in the logger's folder without a checkpoint callback; ``bad_samples.rank<r>.txt`` on the
      other ranks, which count their own batches): one file per line, ``epoch  stage  source  path  reason``
      separated by tabs.
    """

    def __init__(self) -> None:
        self._eval_stage = "val"

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        tracker = _tracker(trainer, "bad_samples")
        source = batch["source"]
        if tracker is not None and source in tracker.sources:
            # the interleaver counted this batch before handing it over: the total includes it (and the device
            # decode, in on_after_batch_transfer, what it decoded on a CPU or could not decode)
            counts = tracker.counts()
            logged = {f"data/invalid_{source}": counts[f"{source}/invalid"]}
            if f"{source}/cpu_decoded" in counts:
                logged[f"data/cpu_decoded_{source}"] = counts[f"{source}/cpu_decoded"]
            log_this_step(pl_module, logged)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, "train", _tracker(trainer, "bad_samples"))

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_evaluation(trainer, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_evaluation(trainer, "test")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._count(trainer, batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._count(trainer, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_evaluation(trainer, pl_module)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end_evaluation(trainer, pl_module)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # the run stops, maybe because of the files themselves: name the ones that failed so far
        self._report(trainer, "train", _tracker(trainer, "bad_samples"))
        self._report(trainer, self._eval_stage, _tracker(trainer, "eval_bad_samples"))

    def _start_evaluation(self, trainer: Trainer, stage: str) -> None:
        self._eval_stage = stage
        tracker = _tracker(trainer, "eval_bad_samples")
        if tracker is not None:
            tracker.reset()

    def _count(self, trainer: Trainer, batch: dict) -> None:
        tracker = _tracker(trainer, "eval_bad_samples")
        if tracker is not None and batch["source"] in tracker.sources:
            tracker.update(batch)

    def _end_evaluation(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tracker = _tracker(trainer, "eval_bad_samples")
        if tracker is None:
            return
        counts = tracker.counts()
        for source in tracker.sources:
            if counts[f"{source}/seen"]:
                pl_module.log(f"{self._eval_stage}/invalid_{source}", counts[f"{source}/invalid"], reduce_fx="sum",
                              sync_dist=True, add_dataloader_idx=False)
        self._report(trainer, self._eval_stage, tracker)
        tracker.check()

    def _report(self, trainer: Trainer, stage: str, tracker: BadSampleTracker | None) -> None:
        if tracker is None:
            return
        path = _report_path(trainer)
        lines = []
        for source in tracker.sources:
            failed = tracker.take_failed(source)
            if not failed:
                continue
            shown = ", ".join(file for file, _ in failed[:SHOWN])
            more = f" and {len(failed) - SHOWN} more" if len(failed) > SHOWN else ""
            log.warning(f"epoch {trainer.current_epoch} {stage}: {len(failed)} files of source {source!r} could not "
                        f"be read: {shown}{more} (all of them, with the reasons, in {path})")
            lines += [f"{trainer.current_epoch}\t{stage}\t{source}\t{file}\t{why}\n" for file, why in failed]
        if lines:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as report:
                report.writelines(lines)


def _tracker(trainer: Trainer, name: str) -> BadSampleTracker | None:
    return getattr(trainer.datamodule, name, None)


def _report_path(trainer: Trainer) -> Path:
    """``bad_samples.txt`` in the first ModelCheckpoint's folder, else in the logger's (or the trainer's root)."""
    checkpoint = trainer.checkpoint_callback
    folder = checkpoint.dirpath if checkpoint is not None and checkpoint.dirpath else trainer.log_dir
    name = REPORT_FILE if trainer.global_rank == 0 else f"bad_samples.rank{trainer.global_rank}.txt"
    return Path(folder or trainer.default_root_dir) / name
