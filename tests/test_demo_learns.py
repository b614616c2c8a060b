"""configs/demo.yaml learns on both modalities: on a small demo corpus and 400 steps (the config as
shipped otherwise: model, lr, masking, geometry, batches, interleaving), the validation loss of each modality ends
below what predicting every hidden patch's mean scores on the same inputs and masks, and the end-of-run learning
check reports it. An untrained model sits on that baseline (its predictions are near zero), so a change that
stops the demo learning on either modality fails here."""

from __future__ import annotations

import pytest
import yaml
from cli_helpers import DEMO

from omnimae_pl.cli import run_cli
from omnimae_pl.data.demo import build_demo_data

STEPS = 400
MAX_RATIO = 0.99  # loss / baseline after this short run: 0.974 (image), 0.956 (video); an untrained model ~1.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_learns")
    return build_demo_data(root, train_images_per_class=30, val_images_per_class=4, num_videos=160)


def _layer(paths, tmp_path):
    return {
        "data": {"init_args": {
            "sources": [
                {"name": "imagenet_demo", "kind": "imagenet", "root": str(paths["imagenet"]), "val_split": "val",
                 "weight": 1.0},
                {"name": "ssv2_demo", "kind": "ssv2", "root": str(paths["ssv2_videos"]),
                 "annotations": str(paths["ssv2"]), "val_split": "validation", "weight": 1.5},
            ],
            "val_samples": 24,
        }},
        "trainer": {
            "max_steps": STEPS, "max_epochs": None, "check_val_every_n_epoch": None, "val_check_interval": STEPS,
            "enable_progress_bar": False, "enable_checkpointing": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [{"class_path": "omnimae_pl.callbacks.learning_report.LearningReport",
                           "init_args": {"max_ratio": MAX_RATIO, "probe_data_root": str(paths["imagenet"].parent)}}],
        },
    }


def test_demo_config_learns_on_images_and_videos(corpus, tmp_path, capsys):
    layer = tmp_path / "learns.yaml"
    layer.write_text(yaml.safe_dump(_layer(corpus, tmp_path)))
    cli = run_cli(["fit", "--config", DEMO, "--config", str(layer)])
    assert cli.trainer.global_step == STEPS
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    for modality in ("image", "video"):
        loss, baseline = metrics[f"val/loss_{modality}"], metrics[f"val/loss_{modality}_baseline"]
        assert loss < MAX_RATIO * baseline, (modality, loss, baseline)
    # Copying the nearest visible time step is the stronger reference on the slow clips, and this short run does
    # not beat it yet (0.745 against 0.696); the full demo does (docs/learning_check.md). So the report is read
    # for the reference and the verdict on it, not for an overall pass.
    copy = metrics["val/loss_video_copy_nearest"]
    out = capsys.readouterr().out
    assert f"Learning check (validation at step {STEPS} of {STEPS}, fixed masks):" in out
    video = next(line for line in out.splitlines() if line.startswith("  video "))
    assert f"{copy:.4f}" in video and video.endswith("pass" if metrics["val/loss_video"] < copy else "FAIL")
    # The raw prediction's picture: stitched from the visible pixels only, the video prediction is already closer
    # to the hidden pixels than a blank one stitched the same way (0.886 of it); the image one not yet (1.014; the
    # full demo: 0.61 and 0.58, docs/learning_check.md). The report prints both with their verdicts.
    stitched = {m: metrics[f"val/pixel_error_{m}_stitched"] / metrics[f"val/pixel_error_{m}_stitched_blank"]
                for m in ("image", "video")}
    assert stitched["video"] < MAX_RATIO, stitched
    report = out[out.index("Raw prediction stitched"):].splitlines()
    for line, modality in zip(report[2:4], ("image", "video")):
        assert line.split()[0] == modality and f"{stitched[modality]:.3f}" in line
        assert line.endswith("pass" if stitched[modality] <= MAX_RATIO else "FAIL")
    # the frozen probe ran on the trained encoder (whether it beats random ones this early is not asserted)
    probe = out[out.index("Frozen linear probe"):].splitlines()
    assert f"this run's encoder at step {STEPS} against 3 random encoders" in probe[0]
    assert [line.split()[0] for line in probe[2:4]] == ["image", "video"]
