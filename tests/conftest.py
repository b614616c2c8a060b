"""Fixtures shared across the suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from omnimae_pl.data.demo import build_demo_data


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The demo corpus at test size: ImageNet- and SSv2-layout files, built once per run."""
    root = tmp_path_factory.mktemp("demo_data")
    build_demo_data(root, train_images_per_class=6, val_images_per_class=2, num_videos=40, video_size=(64, 48))
    return root


@pytest.fixture(autouse=True)
def _wandb_quiet(monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
