"""Running the CLI in tests: a config layered over configs/demo.yaml with test data and a tiny model."""

from __future__ import annotations

from pathlib import Path

import yaml

from omnimae_pl.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


def run_config(demo_root: Path, tmp_path: Path, **trainer) -> Path:
    """A config layered over configs/demo.yaml: test data, a tiny model, everything written under tmp_path."""
    cfg = {
        "model": {"init_args": {"model_overrides": {"depth": 2}}},
        "data": {
            "init_args": {
                "sources": [
                    {"name": "imagenet_demo", "kind": "imagenet", "root": str(demo_root / "imagenet"),
                     "val_split": "val"},
                    {"name": "ssv2_demo", "kind": "ssv2", "root": str(demo_root / "ssv2" / "videos"),
                     "annotations": str(demo_root / "ssv2"), "val_split": "validation", "test_split": "validation"},
                ],
                "image_batch_size": 8,
                "video_batch_size": 8,
                "replicas": 4,
                "img_size": 32,
                "num_frames": 4,
                "short_side": 36,
                "val_samples": 8,
                "num_workers": 0,
                "persistent_workers": False,
            }
        },
        "trainer": {
            "max_steps": 4,
            "max_epochs": None,
            "log_every_n_steps": 1,
            "val_check_interval": 2,
            "check_val_every_n_epoch": 1,  # configs/demo.yaml validates every 10 epochs
            "limit_val_batches": 1,
            "limit_test_batches": 1,
            "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.WandbLogger",
                       "init_args": {"project": "test", "save_dir": str(tmp_path), "offline": True}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "every_n_train_steps": 2,
                               "save_top_k": -1, "filename": "step{step}"}},
                {"class_path": "omnimae_pl.callbacks.ReconstructionLogger",
                 "init_args": {"out_dir": str(tmp_path / "recon"), "every_n_steps": 2, "num_images": 2}},
            ],
            **trainer,
        },
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*args: str):
    return run_cli(list(args))
