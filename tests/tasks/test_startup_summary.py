"""The start-up summary (OmniMAETask.on_train_start): printed once when `omnimae-cli fit` starts training, with the
very lr and schedule the optimizer runs, and gradient accumulation counted in both (the global batch that sets
the lr is per-rank batch x ranks x accumulation; the schedule counts optimizer steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cli_helpers import DEMO, REPO, cli, run_config
from lightning.pytorch import Callback

from omnimae_pl.optim import warmup_cosine
from omnimae_pl.tasks.base import _count


class LrRecorder(Callback):
    """The lr / lr_scale of every group as each optimizer step runs (once per step, after accumulation): the peak
    times the schedule's factor at that step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        per_group = {g["lr"] / g["lr_scale"] for g in optimizer.param_groups if g.get("name") != "probe"}
        assert max(per_group) == pytest.approx(min(per_group), rel=1e-12)  # one schedule for every group
        self.lrs.append(per_group.pop())


RECORDER = {"class_path": "test_startup_summary.LrRecorder"}


def _summary(out: str) -> list[str]:
    """The summary's lines in ``out``; it is printed exactly once."""
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "Start-up summary:"]
    assert len(starts) == 1, out[-2000:]
    block = [lines[starts[0]]]
    for line in lines[starts[0] + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return block


def _fit(demo_root: Path, tmp_path: Path, *args: str, **trainer):
    tmp_path.mkdir(exist_ok=True)
    cfg = run_config(demo_root, tmp_path, limit_val_batches=0, val_check_interval=None, callbacks=[RECORDER],
                     enable_checkpointing=False, **trainer)
    return cli("fit", "--config", DEMO, "--config", str(cfg), *args)


def _recorder(run) -> LrRecorder:
    return next(cb for cb in run.trainer.callbacks if isinstance(cb, LrRecorder))


def test_demo_fit_prints_the_lr_and_schedule_the_optimizer_runs(demo_root, tmp_path, capsys):
    run = _fit(demo_root, tmp_path, "--model.init_args.base_lr", "1.6e-3", "--model.init_args.warmup_fraction", "0.2",
               max_steps=-1, max_epochs=1)  # the test data: 7 image + 3 video batches of 8 per epoch
    assert _summary(capsys.readouterr().out) == [
        "Start-up summary:",
        "  processes        1 = 1 node x 1 device per node (SingleDeviceStrategy, precision 32-true)",
        "  batch image      8 per rank x 1 rank x 1 accumulated = 8 per optimizer step",
        "  batch video      8 per rank (2 clips x 4 replicas) x 1 rank x 1 accumulated = 8 per optimizer step "
        "(2 clips)",
        "  accumulation     1 batch per optimizer step (trainer.accumulate_grad_batches)",
        "  peak lr          1.6e-3 x 8 / 256 = 5e-5 (base_lr x global batch / 256, the larger modality's)",
        "  warm-up          2 optimizer steps (warmup_fraction 0.2) from 1e-6, then cosine to 0",
        "  optimizer steps  10 per epoch, 10 in total (1 epoch)",
    ]
    facts = run.model.startup_facts()
    peak = facts["peak_lr"]
    assert peak == 1.6e-3 * 8 / 256
    # the optimizer ran that peak through that schedule: warm-up from 1e-6 over 2 steps, the non-rebased cosine
    lrs = _recorder(run).lrs
    assert len(lrs) == run.trainer.global_step == facts["total_steps"] == 10
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs == pytest.approx([peak * warmup_cosine(s, 10, 0.2, 1e-6 / peak, rebase_cosine=False) for s in range(10)])
    assert max(lrs) == lrs[2] < peak  # the official cosine is past its top when the warm-up ends
    assert run.trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # after the last step: the cosine's end
    # and the loggers' config has the same facts (wandb here)
    config = run.trainer.logger.experiment.config["startup"]
    assert config["peak_lr"] == peak and config["total_steps"] == 10
    assert config["global_batch"] == {"image": 8, "video": 8} and config["accumulate_grad_batches"] == 1


def test_accumulation_sets_the_lr_of_the_whole_batch_and_counts_optimizer_steps(demo_root, tmp_path, capsys):
    """Batches of 8 accumulated twice train as batches of 16: the same peak lr, half the optimizer steps of the
    batches of 8 (10 a epoch, the test above), the same lr at every optimizer step, down to the cosine's end."""
    lr = ("--model.init_args.base_lr", "1e-2", "--model.init_args.warmup_fraction", "0.2")
    accumulated = _fit(demo_root, tmp_path / "accumulated", *lr, max_steps=-1, max_epochs=1, accumulate_grad_batches=2,
                       logger=False)
    lines = _summary(capsys.readouterr().out)
    assert lines[2:7] == [
        "  batch image      8 per rank x 1 rank x 2 accumulated = 16 per optimizer step",
        "  batch video      8 per rank (2 clips x 4 replicas) x 1 rank x 2 accumulated = 16 per optimizer step "
        "(4 clips)",
        "  accumulation     2 batches per optimizer step (trainer.accumulate_grad_batches)",
        "  peak lr          1e-2 x 16 / 256 = 6.25e-4 (base_lr x global batch / 256, the larger modality's)",
        "  warm-up          1 optimizer step (warmup_fraction 0.2) from 1e-6, then cosine to 0",
    ]
    assert lines[7] == "  optimizer steps  5 per epoch, 5 in total (1 epoch)"  # 10 batches / 2

    # 16 a step without accumulation (4 steps an epoch of this data), as long: 5 steps
    double = _fit(demo_root, tmp_path / "double", *lr, "--data.init_args.image_batch_size", "16",
                  "--data.init_args.video_batch_size", "16", max_steps=5, max_epochs=None, logger=False)
    lines = _summary(capsys.readouterr().out)
    assert lines[5] == ("  peak lr          1e-2 x 16 / 256 = 6.25e-4 (base_lr x global batch / 256, the larger "
                        "modality's)")
    assert lines[7] == "  optimizer steps  4 per epoch, 5 in total (trainer.max_steps)"

    a, b = accumulated.model.startup_facts(), double.model.startup_facts()
    assert a["global_batch"] == b["global_batch"] == {"image": 16, "video": 16}
    assert a["peak_lr"] == b["peak_lr"] == 1e-2 * 16 / 256
    assert a["total_steps"] == b["total_steps"] == 5
    assert accumulated.trainer.global_step == double.trainer.global_step == 5
    assert _recorder(accumulated).lrs == _recorder(double).lrs  # step by step
    assert len(_recorder(accumulated).lrs) == 5
    for run in (accumulated, double):
        assert run.trainer.optimizers[0].param_groups[0]["lr"] == 0.0  # the schedule ended at its last step


def test_finetuning_with_a_set_lr_prints_it_unscaled(demo_root, tmp_path, capsys):
    """Fine-tuning's own ``lr`` is the peak as given (not scaled with the batch); its rebased cosine is at the peak
    when the warm-up ends and at min_lr after the last step; 15 batches of 4 accumulated 3 times are 5 steps."""
    layer = {
        "model": {"init_args": {"model_overrides": {"depth": 2}, "init_from": None, "lr": 1e-3, "min_lr": 1e-5,
                                "warmup_fraction": 0.2, "warmup_start_lr": 1e-6}},
        "data": {"init_args": {
            "source": {"name": "imagenet_demo", "kind": "imagenet", "root": str(demo_root / "imagenet"),
                       "annotations": None, "val_split": None},
            "batch_size": 4, "num_workers": 0, "persistent_workers": False,
            "train_transform": {"class_path": "omnimae_pl.data.video_augment.ImageFinetuneTransform",
                                "init_args": {"size": 32}},
        }},
        "trainer": {"max_epochs": 1, "accumulate_grad_batches": 3, "enable_progress_bar": False, "logger": False,
                    "enable_checkpointing": False, "callbacks": [RECORDER]},
    }
    path = tmp_path / "layer.yaml"
    path.write_text(yaml.safe_dump(layer))
    run = cli("fit", "--config", str(REPO / "configs" / "finetune" / "demo.yaml"), "--config", str(path))
    assert _summary(capsys.readouterr().out)[1:] == [
        "  processes        1 = 1 node x 1 device per node (SingleDeviceStrategy, precision 32-true)",
        "  batch image      4 per rank x 1 rank x 3 accumulated = 12 per optimizer step",
        "  accumulation     3 batches per optimizer step (trainer.accumulate_grad_batches)",
        "  peak lr          1e-3 (model.init_args.lr, not scaled with the batch)",
        "  warm-up          1 optimizer step (warmup_fraction 0.2) from 1e-6, then cosine to 1e-5",
        "  optimizer steps  5 per epoch, 5 in total (1 epoch)",
    ]
    lrs = _recorder(run).lrs
    assert len(lrs) == run.trainer.global_step == 5
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(1e-3, rel=1e-12)
    assert run.trainer.optimizers[0].param_groups[0]["lr"] / run.trainer.optimizers[0].param_groups[0]["lr_scale"] \
        == pytest.approx(1e-5, rel=1e-12)


def test_the_summary_of_two_nodes_and_replicated_video():
    """What several processes print (the numbers as on 2 nodes of 4 GPUs, without starting them)."""
    facts = {
        "world_size": 8, "num_nodes": 2, "devices_per_node": 4, "strategy": "FSDP2Strategy", "precision": "bf16-mixed",
        "batch_per_rank": {"image": 64, "video": 32}, "global_batch": {"image": 1024, "video": 512},
        "video_replicas": 4, "accumulate_grad_batches": 2, "base_lr": 1.5e-4, "peak_lr": 1.5e-4 * 1024 / 256,
        "peak_lr_scaled": True, "warmup_steps": 40, "warmup_fraction": 0.05, "warmup_start_lr": 1e-6, "min_lr": 0.0,
        "optimizer_steps_per_epoch": 100, "total_steps": 800, "schedule_length": "8 epochs",
    }
    from omnimae_pl.tasks.base import OmniMAETask

    assert OmniMAETask.startup_summary(facts).splitlines()[1:6] == [
        "  processes        8 = 2 nodes x 4 devices per node (FSDP2Strategy, precision bf16-mixed)",
        "  batch image      64 per rank x 8 ranks x 2 accumulated = 1024 per optimizer step",
        "  batch video      32 per rank (8 clips x 4 replicas) x 8 ranks x 2 accumulated = 512 per optimizer step "
        "(128 clips)",
        "  accumulation     2 batches per optimizer step (trainer.accumulate_grad_batches)",
        "  peak lr          1.5e-4 x 1024 / 256 = 6e-4 (base_lr x global batch / 256, the larger modality's)",
    ]


def test_counts_read_as_english():
    assert [_count(1, "epoch"), _count(50, "epoch"), _count(2, "batch"), _count(8, "node")] == [
        "1 epoch", "50 epochs", "2 batches", "8 nodes"]
