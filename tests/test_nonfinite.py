"""A step whose loss or gradients are not finite leaves the weights and AdamW's moments untouched, is counted and
logged, and training goes on; StopOnNonFinite ends a run that keeps skipping with exit code 3 and one line."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from cli_helpers import DEMO, run_config
from lightning.pytorch import Callback
from reliability_helpers import Poison, checkpointed_config, fit_in_process, start_fit

from omnimae_pl.errors import EXIT_DIVERGED
from omnimae_pl.finite import nonfinite_flag


class Snapshots(Callback):
    """Weights, AdamW state and loss around every step: ``before[step]``, ``after[step]``, ``loss[step]``."""

    def __init__(self) -> None:
        self.before, self.after, self.loss = {}, {}, {}

    @staticmethod
    def _state(trainer, pl_module) -> dict:
        weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        optimizer = trainer.optimizers[0]
        moments = {(i, name): value.detach().clone() for i, p in enumerate(optimizer.state)
                   for name, value in optimizer.state[p].items()}
        return {"weights": weights, "moments": moments}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.before[trainer.global_step + 1] = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step] = self._state(trainer, pl_module)
        self.loss[trainer.global_step] = outputs["loss"].item()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_fused_flag_over_the_loss_and_every_gradient(bad):
    def tensors(grad_value=0.5, loss_value=0.7):  # gradients and a 0-dim loss
        grads = [torch.randn(5, 3), torch.randn(7)]
        grads[1][4] = grad_value
        return [*grads, torch.tensor(loss_value)]

    assert nonfinite_flag(tensors()).item() == 0.0
    assert nonfinite_flag(tensors(grad_value=bad)).item() == 1.0
    assert nonfinite_flag(tensors(loss_value=bad)).item() == 1.0
    assert nonfinite_flag([torch.full((2,), 3e38)]).item() == 1.0  # finite values, a norm beyond float32
    assert nonfinite_flag([]).item() == 0.0


def test_a_nan_batch_skips_the_update_and_training_goes_on(demo_root, tmp_path):
    cfg = checkpointed_config(demo_root, tmp_path, every_n_train_steps=3, patience=2, max_steps=6)
    snapshots = Snapshots()
    cli = fit_in_process(cfg, Poison([3, 5]), snapshots)  # never two in a row: patience 2 is not reached

    assert cli.trainer.global_step == 6
    for step in (3, 5):
        assert math.isnan(snapshots.loss[step])
        assert _same(snapshots.before[step]["weights"], snapshots.after[step]["weights"]), step
        assert _same(snapshots.before[step]["moments"], snapshots.after[step]["moments"]), step
    for step in (1, 2, 4, 6):  # the steps around them do update: the comparison above can fail
        assert math.isfinite(snapshots.loss[step])
        assert not _same(snapshots.before[step]["weights"], snapshots.after[step]["weights"]), step
        assert not _same(snapshots.before[step]["moments"], snapshots.after[step]["moments"]), step
    assert cli.model.skipped_steps == 2
    assert cli.trainer.callback_metrics["train/skipped_steps"] == 2
    # a skipped step is still a step: the per-step lr schedule advanced on it
    assert cli.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6 and last["skipped_steps"] == 2


def test_patience_non_finite_steps_in_a_row_stop_with_exit_code_3(demo_root, tmp_path, capsys):
    cfg = checkpointed_config(demo_root, tmp_path, every_n_train_steps=100, patience=3, max_steps=10)
    snapshots = Snapshots()
    with pytest.raises(SystemExit) as stop:
        fit_in_process(cfg, Poison([2, 3, 4]), snapshots)
    assert stop.value.code == EXIT_DIVERGED
    assert max(snapshots.after) == 4  # stopped at the third skipped step in a row
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("omnimae-pl:")]
    assert lines == ["omnimae-pl: diverged: the loss or the gradient norm was not finite in 3 steps in a row, up to "
                     "step 4 (3 skipped in all); lower the learning rate (model.init_args.base_lr) or look at the "
                     "data of these steps"]
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()  # nothing is saved on the way out


def test_a_huge_learning_rate_on_the_demo_config_exits_3_with_one_line(demo_root, tmp_path):
    """configs/demo.yaml's own callbacks (StopOnNonFinite with patience 5), as shipped, at base_lr 1e8: the first
    full-lr update makes every later loss NaN, so the run stops 5 steps after that, whatever the machine."""
    cfg = run_config(demo_root, tmp_path, max_steps=40, limit_val_batches=0, val_check_interval=None,
                     logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                             "init_args": {"save_dir": str(tmp_path)}})
    layer = yaml.safe_load(cfg.read_text())
    del layer["trainer"]["callbacks"]
    cfg.write_text(yaml.safe_dump(layer))
    log = tmp_path / "fit.log"
    proc = start_fit(["--config", DEMO, "--config", str(cfg), "--model.init_args.base_lr", "1e8"], tmp_path, log)
    assert proc.wait(timeout=300) == EXIT_DIVERGED, log.read_text()[-3000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("omnimae-pl:")]
    assert len(lines) == 1 and "diverged: the loss or the gradient norm was not finite in 5 steps in a row" in lines[0]
