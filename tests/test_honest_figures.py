"""Figures that say what happened to unreadable files: per-modality keys only on their own steps, invalid counts
whose last value is the true count, the failed files named at every epoch end, and no evaluation over
placeholders (an error naming the source and the files instead of ``val/loss 0.0``)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
from cli_helpers import DEMO, run_config
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from omnimae_pl.cli import main
from omnimae_pl.data.datamodule import ImageMasking, PretrainDataModule, SourceConfig, VideoMasking
from omnimae_pl.errors import EXIT_USER_ERROR
from omnimae_pl.tasks.pretrain import OmniMAEPretrain

BAD_IMAGES = 12  # more than the 10 files the log names per source
BAD_VIDEOS = 8


def _spoil(files: list[Path]) -> list[Path]:
    for path in files:
        path.write_bytes(b"not an image or a video")
    return files


@pytest.fixture
def spoilt(demo_root: Path, tmp_path: Path) -> tuple[Path, set[str]]:
    """A copy of the demo data whose first training images and videos cannot be read, and their paths."""
    root = shutil.copytree(demo_root, tmp_path / "data")
    images = sorted((root / "imagenet" / "train").rglob("*.JPEG"))[:BAD_IMAGES]
    train_ids = [entry["id"] for entry in json.loads((root / "ssv2" / "something-something-v2-train.json").read_text())]
    videos = [root / "ssv2" / "videos" / f"{video_id}.webm" for video_id in train_ids[:BAD_VIDEOS]]
    return root, {str(p) for p in _spoil(images + videos)}


class StepRecorder(pl.Callback):
    """(global step, source, unreadable rows) of every training batch, as the model receives it."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, str, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append((trainer.global_step, batch["source"], int((~batch["valid"]).sum())))


def test_logged_figures_and_the_report_of_failed_files(spoilt, tmp_path, caplog):
    root, bad = spoilt
    dm = PretrainDataModule(
        [SourceConfig("imagenet", str(root / "imagenet"), name="imagenet_demo"),
         SourceConfig("ssv2", str(root / "ssv2" / "videos"), name="ssv2_demo", annotations=str(root / "ssv2"))],
        image_batch_size=12, video_batch_size=8, replicas=4, image_masking=ImageMasking("random", 0.75),
        video_masking=VideoMasking("random", 0.75), img_size=32, num_frames=4, short_side=36, patch_size=(2, 8, 8),
        num_workers=0, pin_memory=False, persistent_workers=False, max_invalid_fraction=0.6,
    )
    model = OmniMAEPretrain(size="tiny", model_overrides={"depth": 1}, img_size=32, num_frames=4,
                            patch_size=(2, 8, 8), num_classes=dm.num_classes)
    recorder = StepRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, log_every_n_steps=1, logger=CSVLogger(tmp_path / "logs"),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt"), recorder], limit_val_batches=0,
        enable_progress_bar=False, enable_model_summary=False,
    )
    with caplog.at_level(logging.WARNING):
        trainer.fit(model, datamodule=dm)

    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    for source, modality in (("imagenet_demo", "image"), ("ssv2_demo", "video")):
        own_steps = {step for step, s, _ in recorder.steps if s == source}
        invalid = sum(n for _, s, n in recorder.steps if s == source)
        assert own_steps and invalid > 0, source
        loss_rows = [int(r["step"]) for r in rows if r.get(f"train/loss_{modality}")]
        assert sorted(loss_rows) == sorted(own_steps)  # each own step once, never a stale copy on another's
        counts = [(int(r["step"]), float(r[f"data/invalid_{source}"])) for r in rows if r.get(f"data/invalid_{source}")]
        assert {step for step, _ in counts} == own_steps
        assert [n for _, n in counts] == sorted(n for _, n in counts)  # a running total ...
        assert counts[-1][1] == invalid  # ... whose last value is the number of unreadable samples
    # the probe accuracy is per modality as well
    assert all(int(r["step"]) in {s for s, src, _ in recorder.steps if src == "imagenet_demo"}
               for r in rows if r.get("train/probe_acc_image"))

    lines = [line.split("\t") for line in (tmp_path / "ckpt" / "bad_samples.txt").read_text().splitlines()]
    assert all(len(fields) == 5 and fields[4] for fields in lines)  # epoch, stage, source, path, reason
    for epoch in ("0", "1"):
        images = {path for e, stage, source, path, _ in lines if (e, stage, source) == (epoch, "train", "imagenet_demo")}
        assert len(images) == BAD_IMAGES  # every image is drawn in every epoch
        videos = {path for e, stage, source, path, _ in lines if (e, stage, source) == (epoch, "train", "ssv2_demo")}
        assert videos and videos | images <= bad
    logged = [r.getMessage() for r in caplog.records if "files of source 'imagenet_demo'" in r.getMessage()]
    assert len(logged) == 2 and all(f"and {BAD_IMAGES - 10} more" in m and "bad_samples.txt" in m for m in logged)
    assert all(m.count(".JPEG") == 10 for m in logged)


@pytest.mark.parametrize(("subcommand", "folder", "source"), [
    ("validate", "imagenet/val", "imagenet_demo"),
    ("test", "ssv2/videos", "ssv2_demo"),  # the test split of run_config is SSv2's validation split
])
def test_an_evaluation_of_unreadable_files_is_an_error(demo_root, tmp_path, capsys, subcommand, folder, source):
    root = shutil.copytree(demo_root, tmp_path / "data")
    files = _spoil([p for p in (root / folder).rglob("*") if p.is_file()])
    cfg = run_config(root, tmp_path, logger=False, callbacks=[], default_root_dir=str(tmp_path))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--config", DEMO, "--config", str(cfg)])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == EXIT_USER_ERROR
    assert message.startswith(f"omnimae-cli: error: source {source!r}: ") and "could not be read" in message
    assert any(str(p) in message for p in files)
    # named in the report too, beside the checkpoints of the trainer's default ModelCheckpoint
    assert f"\t{source}\t" in (tmp_path / "checkpoints" / "bad_samples.txt").read_text()
