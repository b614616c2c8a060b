"""`omnimae-cli finetune-check`: the fine-tuning demo configs from a pretraining checkpoint and from random
initialisation over seeds, and the verdict on the mean of the seeds."""

from __future__ import annotations

import json

import pytest

from omnimae_pl.cli import main
from omnimae_pl.data.demo import build_demo_data
from omnimae_pl.finetune_check import Run, report
from omnimae_pl.miniature import pretrain


def test_the_check_fine_tunes_both_tasks_from_the_checkpoint_and_from_scratch(tmp_path, capsys):
    root = tmp_path / "data"
    build_demo_data(root, train_images_per_class=7, val_images_per_class=2, num_videos=60)
    checkpoint, _ = pretrain("both", 2, tmp_path / "pretrain", str(root))  # configs/demo.yaml's model and layout
    out = tmp_path / "check"
    main(["finetune-check", "--checkpoint", checkpoint, "--seeds", "2", "--steps", "2", "--fraction", "0.5",
          "--data-root", str(root), "--out-dir", str(out)])
    runs = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["init"], r["seed"]) for r in runs] == [
        (task, init, seed) for task in ("video", "image") for seed in (0, 1) for init in ("pretrained", "random")
    ]
    assert all(0.0 <= r["acc1"] <= 1.0 for r in runs)
    # one class-balanced half of the labels per seed, the same for both initialisations
    log = (out / "video" / "pretrained" / "seed1" / "layer.yaml").read_text()
    assert "train_fraction: 0.5" in log and "seed: 1" in log
    printed = capsys.readouterr().out
    assert "Fine-tuning check: validation top-1 after 2 steps on 50% of the labels" in printed
    assert "| video | " in printed and "| image | " in printed


def test_a_missing_checkpoint_is_one_line_before_any_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune-check", "--checkpoint", str(tmp_path / "none.ckpt"), "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith("none.ckpt: no such file (make demo writes runs/demo/checkpoints/last.ckpt)")
    assert not (tmp_path / "out").exists()


def test_the_verdict_is_on_the_mean_of_the_seeds():
    runs = [Run("video", "pretrained", 0, 0.9), Run("video", "random", 0, 0.5),
            Run("video", "pretrained", 1, 0.4), Run("video", "random", 1, 0.7),   # means 0.65 > 0.60
            Run("image", "pretrained", 0, 0.3), Run("image", "random", 0, 0.3)]  # a tie is no win
    lines, passed = report(runs)
    assert lines[0] == "| task | pretrained | random | result |"
    assert lines[2].startswith("| video | 0.650 ± 0.354 (n=2) | 0.600 ± 0.141 (n=2) |") and lines[2].endswith("pass |")
    assert lines[3].endswith("FAIL |") and not passed


def test_each_task_gets_its_own_default_budget_and_steps_overrides_both(tmp_path, monkeypatch, capsys):
    import omnimae_pl.finetune_check as fc

    budgets = []
    def finetune(task, checkpoint, seed, fraction, steps, *rest):
        budgets.append((task, steps))
        return 0.5

    monkeypatch.setattr(fc, "finetune", finetune)
    checkpoint = tmp_path / "p.ckpt"
    checkpoint.write_bytes(b"")
    main(["finetune-check", "--checkpoint", str(checkpoint), "--seeds", "1", "--out-dir", str(tmp_path / "a")])
    assert sorted(set(budgets)) == [("image", fc.STEPS["image"]), ("video", fc.STEPS["video"])]
    assert "after video 1000, image 1000 steps" in capsys.readouterr().out
    budgets.clear()
    main(["finetune-check", "--checkpoint", str(checkpoint), "--seeds", "1", "--steps", "7", "--out-dir",
          str(tmp_path / "b")])
    assert set(budgets) == {("image", 7), ("video", 7)}
