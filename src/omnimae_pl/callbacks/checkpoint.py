"""Checkpoints a long, preemptible run can trust: whole files, the final step, finite weights, and a save when
the scheduler says stop."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path
from typing import NoReturn

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from omnimae_pl.errors import Diverged, Preempted, RunStopped, UserError
from omnimae_pl.finite import nonfinite_flag

# SIGUSR1 is what SLURM sends ahead of the time limit (sbatch --signal=USR1@90); SIGINT is Ctrl-C.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
PARTIAL_SUFFIX = ".partial"  # a write in progress: ".<name>.<pid>.partial" beside its target
PREVIOUS_NAME = "previous.ckpt"  # what last.ckpt held before its latest write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file in the target's own folder, then renames it over the target.

    Lightning's own write puts the temporary file in ``$TMPDIR`` and moves it into place, which is a copy, not
    an atomic rename, when ``$TMPDIR`` is another filesystem; a killed write leaves the temporary file there. Here
    the rename is atomic wherever the folder is, and a killed write leaves ``.<name>.<pid>.partial`` beside the
    target, which :class:`ResumableCheckpoint` removes when the next run starts. The file is streamed to disk
    (no second copy in memory) and synced before the rename. Paths that are not local keep Lightning's write.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        try:
            with open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the name points at them
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # and the rename itself survives a crash of the node
        finally:
            os.close(directory)


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with what a long, preemptible run needs (every shipped config uses it).

    * ``last.ckpt`` in ``dirpath`` is always a whole file, never a link or ``last-v1.ckpt``: it is what
      ``fit --ckpt_path last`` resumes from. A finished run's ``last.ckpt`` holds its final step whatever
      ``every_n_train_steps`` is (Lightning writes it at the end only if it wrote nothing during the run).
    * Files are written through :class:`AtomicCheckpointIO` (unless the strategy has a CheckpointIO of its own);
      leftovers of an interrupted write are removed when the next fit starts.
    * Weights that are not finite are never written: the run stops with exit code 3 instead
      (:class:`~omnimae_pl.errors.Diverged`).
    * SIGTERM, SIGUSR1 (SLURM's warning before the time limit) and SIGINT only set a flag: saving inside a signal
      handler can deadlock under DDP. At the end of the step under way every rank saves ``last.ckpt``, rank 0
      prints one line saying where, and the process exits with 75 (:class:`~omnimae_pl.errors.Preempted`).
      Under SLURM with auto-requeue (Lightning's default there) a SIGUSR1 also requeues the job, as Lightning's
      own handler, which this one replaces, would. A second Ctrl-C interrupts at once, without saving.

    * The two most recent complete checkpoints are always kept, whatever ``save_top_k`` and ``monitor`` keep:
      before ``last.ckpt`` is replaced, the file it was becomes ``previous.ckpt`` (a hard link: nothing is
      copied, and ``last.ckpt`` is never missing), so a bad latest state still has one to go back to.

    Other arguments are ``ModelCheckpoint``'s.
    """

    def __init__(self, dirpath: str, enable_version_counter: bool = False, **kwargs) -> None:
        save_last = kwargs.pop("save_last", None)
        if save_last not in (None, True):
            raise UserError(
                f"ResumableCheckpoint(save_last={save_last!r}): last.ckpt is always written as a whole file (it is "
                "what fit --ckpt_path last resumes from): leave save_last out"
            )
        super().__init__(dirpath=dirpath, save_last=True, enable_version_counter=enable_version_counter, **kwargs)
        self._signal: signal.Signals | None = None

    # -- whole files, written beside their target ------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a CheckpointIO the user chose stays
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit" and trainer.is_global_zero and _is_local_file_protocol(self.dirpath):
            for leftover in Path(self.dirpath).glob(f".*{PARTIAL_SUFFIX}"):
                leftover.unlink()
                rank_zero_info(f"removed {leftover}, left by an interrupted checkpoint write")

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        flag = nonfinite_flag(trainer.lightning_module.parameters())
        if trainer.strategy.reduce_boolean_decision(bool(flag), all=False):
            line = (f"the weights are not finite at step {trainer.global_step}: {filepath} was not written"
                    + (f"; the last complete checkpoint is {self.last_model_path}" if self.last_model_path else ""))
            _raise_on_every_rank(trainer, Diverged(line))
        last = Path(filepath)
        if trainer.is_global_zero and last.name == self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION:
            _keep_previous(last)
        super()._save_checkpoint(trainer, filepath)

    @property
    def last_model_step(self) -> int:
        """The step ``last.ckpt`` holds (0: none written by this run): every save here writes ``last.ckpt``."""
        return self._last_global_step_saved

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._should_skip_saving_checkpoint(trainer):  # skips when this step is saved already
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    # -- preemption ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("ResumableCheckpoint: fit is not on the main thread, so signals cannot be handled here")
            return
        # Lightning installs its SIGTERM (and, under SLURM, SIGUSR1) handlers just before training starts: these
        # replace them, and Lightning puts back the handlers it found when fit ends.
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        self._signal = signal.Signals(signum)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C interrupts at once

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Any rank's signal stops every rank at this same step: one boolean all-reduce per step when distributed.
        if trainer.strategy.reduce_boolean_decision(self._signal is not None, all=False):
            self._save_and_stop(trainer)

    def _save_and_stop(self, trainer: Trainer) -> None:
        if self._last_global_step_saved != trainer.global_step:  # the cadence may have saved this very step
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        cause = self._signal.name if self._signal is not None else "a signal to another rank"
        line = (f"{cause} at step {trainer.global_step}: saved {Path(self.last_model_path).resolve()}; "
                "resume with fit --ckpt_path last")
        environment = trainer._accelerator_connector.cluster_environment  # what Lightning's own handler reads
        if (
            trainer.is_global_zero
            and isinstance(environment, SLURMEnvironment)
            and environment.auto_requeue
            and self._signal == environment.requeue_signal
        ):
            line += f"; {_requeue_slurm_job()}"
        _raise_on_every_rank(trainer, Preempted(line))


def _keep_previous(last: Path) -> None:
    if not _is_local_file_protocol(str(last)) or not last.is_file():  # the first save, or a sharded folder
        return
    partial = last.with_name(f".{PREVIOUS_NAME}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        os.link(last, partial)
    except OSError:  # a filesystem without hard links
        shutil.copyfile(last, partial)
    os.replace(partial, last.with_name(PREVIOUS_NAME))


def _requeue_slurm_job() -> str:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"scontrol requeue {job} failed: {err}"
    if result.returncode:
        return f"scontrol requeue {job} failed: {result.stderr.strip() or result.returncode}"
    return f"SLURM job {job} requeued"


def _raise_on_every_rank(trainer: Trainer, stop: RunStopped) -> NoReturn:
    """Every rank reached the same decision; one line is enough."""
    if trainer.is_global_zero:
        stop.announce()
    raise stop
