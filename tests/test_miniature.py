"""`omnimae-cli miniature` end to end on a tiny budget: three pretrainings (images, videos, both) from
configs/demo.yaml, each fine-tuned with random initialisation beside them on the demo image and video tasks, and
the table, the chart and the wandb run it writes."""

from __future__ import annotations

import json

import wandb
from PIL import Image

from omnimae_pl.cli import main
from omnimae_pl.data.demo import build_demo_data


def test_the_miniature_runs_end_to_end_and_writes_its_table_chart_and_wandb_run(tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    build_demo_data(root, train_images_per_class=7, val_images_per_class=2, num_videos=60)
    monkeypatch.setenv("WANDB_MODE", "offline")
    # a run already active in the process (as in a notebook) must neither receive the miniature's table nor end
    elsewhere = wandb.init(project="elsewhere", dir=str(tmp_path), mode="offline", reinit="create_new")
    out = tmp_path / "miniature"
    main(["miniature", "--steps", "3", "--seeds", "1", "--finetune-steps", "2", "--fraction", "0.5",
          "--data-root", str(root), "--out-dir", str(out), "--wandb", "test"])
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["pretraining_ratios"]) == ["both", "images", "videos"]
    assert sorted(results["pretraining_ratios"]["images"]) == ["image"]  # each validated on what it trained on
    assert sorted(results["pretraining_ratios"]["both"]) == ["image", "video"]
    runs = {(r["task"], r["init"]) for r in results["runs"]}
    assert runs == {(t, i) for t in ("image", "video") for i in ("images", "videos", "both", "random")}
    for variant in ("images", "videos", "both"):
        assert (out / "pretrain" / variant / "checkpoints" / "last.ckpt").is_file()
    table = (out / "miniature.md").read_text()
    assert table.startswith("| task | images | videos | both | random |")
    assert "| image |" in table and "| video |" in table
    with Image.open(out / "miniature.png") as chart:
        assert chart.size[0] > 300
    assert list(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert not list(tmp_path.glob("wandb/offline-run-*/files/media/table/miniature"))
    elsewhere.finish()
    assert "Fig. 2 in miniature" in capsys.readouterr().out
