"""The CLI in-process on demo-format data written at test time: fit, validate, test, resume, configs."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest
import torch
import yaml
from cli_helpers import REPO, cli, run_config

from omnimae_pl.cli import LIGHTNING_COMMANDS, TOOLS, main, run_cli

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_fit_validate_test_and_resume(demo_root, tmp_path):
    demo = str(REPO / "configs" / "demo.yaml")
    cfg = str(run_config(demo_root, tmp_path))
    first = cli("fit", "--config", demo, "--config", cfg)
    trainer = first.trainer
    assert trainer.global_step == 4
    assert trainer.optimizers[0].defaults["fused"]  # fused AdamW on the CPU as well; resumed below
    logged = trainer.callback_metrics
    assert "train/loss" in logged
    # both modalities ran in 4 steps of this schedule, and were validated
    assert {"val/loss_image", "val/loss_video"} <= set(logged)
    run_id = trainer.logger.experiment.id
    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["wandb_run_id"] == run_id
    assert any(k.startswith("model.decoder.") for k in ckpt["state_dict"])  # full model, for reconstructions
    assert list((tmp_path / "recon").glob("*.png"))

    resumed = cli("fit", "--config", demo, "--config", cfg, "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 6
    assert resumed.trainer.logger.experiment.id == run_id

    for sub in ("validate", "test"):
        out = cli(sub, "--config", demo, "--config", cfg, "--ckpt_path", str(last))
        assert out.trainer.state.finished


def test_video_finetuning_through_the_cli_from_the_demo_pretraining(demo_root, tmp_path):
    """configs/finetune/demo.yaml on the SSv2-format clips, starting from a checkpoint that configs/demo.yaml wrote;
    then ``validate`` of the fine-tuned checkpoint gives back its weights."""
    (tmp_path / "pre").mkdir()
    demo = str(REPO / "configs" / "demo.yaml")
    cli("fit", "--config", demo, "--config", str(run_config(demo_root, tmp_path / "pre", max_steps=2)))
    layer = {
        "model": {"init_args": {"model_overrides": {"depth": 2},
                                "init_from": str(tmp_path / "pre" / "ckpt" / "last.ckpt")}},
        "data": {"init_args": {
            "source": {"name": "ssv2_demo", "kind": "ssv2", "root": str(demo_root / "ssv2" / "videos"),
                       "annotations": str(demo_root / "ssv2"), "val_split": "validation"},
            "batch_size": 4, "eval_batch_size": 4, "img_size": 32, "num_frames": 4, "short_side": 36,
            "eval_num_clips": 2, "eval_num_crops": 3, "num_workers": 0, "persistent_workers": False,
            "train_transform": {"class_path": "omnimae_pl.data.video_augment.VideoFinetuneTransform",
                                "init_args": {"crop_size": 32, "short_side": 36, "scale": [0.4, 1.0],
                                              "hflip_prob": 0.0, "rand_augment": None, "erase_prob": 0.0}},
        }},
        "trainer": {
            "max_steps": 3, "max_epochs": None, "val_check_interval": 3, "limit_val_batches": 2,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ft"), "save_last": True}}],
        },
    }
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(layer))
    finetune = ["--config", str(REPO / "configs" / "finetune" / "demo.yaml"), "--config", str(tmp_path / "ft.yaml")]
    fit = cli("fit", *finetune)
    labels = yaml.safe_load((demo_root / "ssv2" / "something-something-v2-labels.json").read_text())
    assert fit.trainer.global_step == 3
    assert fit.model.hparams.num_classes == len(labels) and fit.model.hparams.num_frames == 4  # linked from data
    assert "encoder.blocks.1.mlp.fc2.weight" in fit.model.init_report.taken
    assert 0.0 <= float(fit.trainer.callback_metrics["val/acc1"]) <= float(fit.trainer.callback_metrics["val/acc5"])

    # init_from null: only the checkpoint can bring back the pretrained-then-fine-tuned encoder
    check = cli("validate", *finetune, "--model.init_from", "null", "--ckpt_path", str(tmp_path / "ft" / "last.ckpt"))
    for name in ("encoder.blocks.1.mlp.fc2.weight", "head.weight"):
        assert torch.equal(check.model.model.state_dict()[name], fit.model.model.state_dict()[name])
    assert "val/acc1" in check.trainer.callback_metrics


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(REPO)) for c in CONFIGS])
def test_every_shipped_config_parses(config):
    layers = ["--config", str(config)]
    # a file naming no model class is a layer (trainer/, logger/, demo_video.yaml): parse it over the demo
    if "class_path" not in (yaml.safe_load(config.read_text()).get("model") or {}):
        layers = ["--config", str(REPO / "configs" / "demo.yaml"), *layers]
    elif "pretrain" in config.parts:
        layers = [*layers, "--config", str(REPO / "configs" / "trainer" / "single_gpu.yaml")]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *layers, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["class_path"].startswith("omnimae_pl.tasks.")


def test_an_in_process_run_ignores_the_outer_commands_arguments(monkeypatch, recwarn):
    """finetune-check and miniature run the CLI in-process: their own sys.argv is neither parsed nor warned about,
    and is back in place afterwards."""
    outer = ["omnimae-cli", "finetune-check", "--seeds", "5"]
    monkeypatch.setattr(sys, "argv", list(outer))
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--print_config"])
    assert not [w for w in recwarn if "args parameter" in str(w.message)]
    assert sys.argv == outer


def test_print_config_output_reruns(demo_root, tmp_path):
    demo = str(REPO / "configs" / "demo.yaml")
    cfg = str(run_config(demo_root, tmp_path, max_steps=2, limit_val_batches=0, val_check_interval=None))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        with pytest.raises(SystemExit):
            main(["fit", "--config", demo, "--config", cfg, "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(out.getvalue())
    rerun = cli("fit", "--config", str(printed))
    assert rerun.trainer.global_step == 2


def test_module_entry_point_is_the_same_program():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "omnimae_pl", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0
    assert "fit" in result.stdout and "predict" in result.stdout


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    for name in (*LIGHTNING_COMMANDS, *TOOLS):
        assert f"\n  {name} " in out, name


@pytest.mark.parametrize("command", [*LIGHTNING_COMMANDS, *TOOLS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code in (0, None)
    assert "usage:" in capsys.readouterr().out.lower()
