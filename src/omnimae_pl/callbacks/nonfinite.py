"""Ending a run whose steps keep being skipped because their loss or gradients are not finite."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from omnimae_pl.errors import Diverged


class StopOnNonFinite(Callback):
    """Stops the run with exit code 3 (:class:`~omnimae_pl.errors.Diverged`) at the ``patience``-th step in a row
    whose update :meth:`OmniMAETask.optimizer_step <omnimae_pl.tasks.base.OmniMAETask.optimizer_step>` skipped (a
    loss or gradient norm that was not finite). Rank 0 prints one line; nothing is saved, so the last checkpoint
    stays the last good state. The ranks agree on every skip, so they all stop at the same step.
    """

    def __init__(self, patience: int = 5) -> None:
        if patience < 1:
            raise ValueError(f"StopOnNonFinite(patience={patience}): give at least 1")
        self.patience = patience
        self.in_a_row = 0
        self._skipped_before = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._skipped_before = pl_module.skipped_steps  # restored from the checkpoint on resume

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        skipped = pl_module.skipped_steps
        self.in_a_row = self.in_a_row + 1 if skipped > self._skipped_before else 0
        self._skipped_before = skipped
        if self.in_a_row < self.patience:
            return
        line = (f"diverged: the loss or the gradient norm was not finite in {self.in_a_row} steps in a row, up to "
                f"step {trainer.global_step} ({skipped} skipped in all); lower the learning rate "
                "(model.init_args.base_lr) or look at the data of these steps")
        stop = Diverged(line)
        if trainer.is_global_zero:  # the ranks agree on every skip: they all stop here, one of them says why
            stop.announce()
        raise stop

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict) -> None:
        self.in_a_row = state_dict["in_a_row"]
