"""ResumableCheckpoint: last.ckpt holds a finished run's final step, writes land beside their target (not in
$TMPDIR) and an interrupted one never replaces a good file, leftovers go at the next start, non-finite weights are
never written, and every shipped config uses it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import REPO, run_config
from jsonargparse import Namespace
from lightning.pytorch import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from reliability_helpers import checkpointed_config, fit_in_process

from omnimae_pl.callbacks.checkpoint import AtomicCheckpointIO, ResumableCheckpoint
from omnimae_pl.cli import _resolve_checkpoint
from omnimae_pl.errors import EXIT_DIVERGED, UserError


def _step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


@pytest.fixture
def tmpdir_spy(tmp_path, monkeypatch) -> list:
    """$TMPDIR is another folder; every temporary file made there through ``tempfile.mkstemp`` is recorded."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    made, mkstemp = [], tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = mkstemp(*args, **kwargs)
        made.append(Path(name).parent)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    return made


def test_last_ckpt_holds_the_final_step_when_the_cadence_does_not_divide_the_run(demo_root, tmp_path, tmpdir_spy,
                                                                                  capsys):
    """7 steps at a cadence of 3 (the 156 / 50 case): Lightning's ModelCheckpoint ends with last.ckpt at step 6."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "ours").mkdir()
    plain = run_config(demo_root, tmp_path / "plain", max_steps=7, limit_val_batches=0, val_check_interval=None,
                       logger=False, callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                 "init_args": {"dirpath": str(tmp_path / "plain" / "ckpt"),
                                                               "save_last": True, "every_n_train_steps": 3}}])
    fit_in_process(plain)
    assert _step(tmp_path / "plain" / "ckpt" / "last.ckpt") == 6
    assert tmpdir_spy  # Lightning's own write goes through $TMPDIR

    tmpdir_spy.clear()
    ours = checkpointed_config(demo_root, tmp_path / "ours", every_n_train_steps=3, max_steps=7,
                               extra_callbacks=["omnimae_pl.callbacks.RunSummary"])
    cli = fit_in_process(ours)
    ckpt = tmp_path / "ours" / "ckpt"
    assert _step(ckpt / "last.ckpt") == 7
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt", "previous.ckpt", "stepstep=3.ckpt", "stepstep=6.ckpt"]
    assert _step(ckpt / "previous.ckpt") == 6  # the two most recent complete checkpoints
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert tmpdir_spy == [] and not list((tmp_path / "elsewhere").iterdir())
    assert f"  last checkpoint:  {(ckpt / 'last.ckpt').resolve()} (step 7)\n" in capsys.readouterr().out


def test_a_write_goes_beside_its_target_and_an_interrupted_one_keeps_the_old_file(tmp_path, tmpdir_spy, monkeypatch):
    target = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    seen_during_write = []
    save = torch.save

    def save_and_look(obj, f):
        seen_during_write.extend(p.name for p in target.parent.iterdir())
        save(obj, f)

    monkeypatch.setattr(torch, "save", save_and_look)
    io.save_checkpoint({"global_step": 1}, target)
    assert seen_during_write == [f".last.ckpt.{os.getpid()}.partial"]
    assert _step(target) == 1 and tmpdir_spy == []

    def killed_half_way(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, target)
    assert _step(target) == 1  # the old file is whole and still there
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]

    monkeypatch.setattr(torch, "save", save)
    TorchCheckpointIO().save_checkpoint({"global_step": 3}, tmp_path / "lightning.ckpt")
    assert tmpdir_spy == [tmp_path / "elsewhere"]  # what this write avoids: Lightning's temporary file in $TMPDIR


def test_leftovers_of_an_interrupted_write_are_removed_at_the_next_start(demo_root, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".last.ckpt.12345.partial").write_bytes(b"killed mid-write")
    (ckpt / "notes.txt").write_text("not ours")
    fit_in_process(checkpointed_config(demo_root, tmp_path, every_n_train_steps=2, max_steps=2))
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt", "notes.txt", "stepstep=2.ckpt"]


class BreakWeights(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("inf")


def test_non_finite_weights_are_never_written(demo_root, tmp_path, capsys):
    cfg = checkpointed_config(demo_root, tmp_path, every_n_train_steps=2, max_steps=6)
    with pytest.raises(SystemExit) as stop:
        fit_in_process(cfg, BreakWeights(step=4))
    assert stop.value.code == EXIT_DIVERGED
    ckpt = tmp_path / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["last.ckpt", "stepstep=2.ckpt"]
    assert _step(ckpt / "last.ckpt") == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("omnimae-pl:")]
    assert lines == [f"omnimae-pl: the weights are not finite at step 4: {ckpt / 'stepstep=4.ckpt'} was not written; "
                     f"the last complete checkpoint is {ckpt / 'last.ckpt'}"]


def test_last_is_always_a_whole_file(tmp_path):
    with pytest.raises(UserError, match="save_last='link'"):
        ResumableCheckpoint(dirpath=str(tmp_path), save_last="link")
    assert ResumableCheckpoint(dirpath=str(tmp_path), save_last=True).save_last is True


def test_ckpt_path_last_is_the_resumable_checkpoints_last_ckpt():
    callbacks = [Namespace(class_path="omnimae_pl.callbacks.RunSummary", init_args=Namespace()),
                 Namespace(class_path="omnimae_pl.callbacks.ResumableCheckpoint", init_args=Namespace(dirpath="/run"))]
    cfg = Namespace(ckpt_path="last", trainer=Namespace(callbacks=callbacks))
    assert _resolve_checkpoint(cfg) == Path("/run/last.ckpt")


SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if "callbacks:" in p.read_text())


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_checkpoint_is_resumable_and_keeps_two(config):
    callbacks = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    names = [cb if isinstance(cb, str) else cb["class_path"] for cb in callbacks]
    assert "lightning.pytorch.callbacks.ModelCheckpoint" not in names
    assert "omnimae_pl.callbacks.StopOnNonFinite" in names
    (checkpoint,) = [cb["init_args"] for cb in callbacks
                     if isinstance(cb, dict) and cb["class_path"] == "omnimae_pl.callbacks.ResumableCheckpoint"]
    assert checkpoint["dirpath"]
    # every cadence file (pretraining), or the best (fine-tuning, monitored); last and previous.ckpt always
    assert checkpoint["save_top_k"] == -1 or (checkpoint.get("monitor") and checkpoint["save_top_k"] >= 1)
