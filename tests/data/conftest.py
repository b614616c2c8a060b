"""A tiny ImageNet made of real files at test time, with the defects the real one has (CMYK, greyscale, a PNG
named .JPEG) and the ones a copy picks up (an empty file, a truncated file, a file that is not an image)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from image_helpers import photo

WNIDS = ("n01440764", "n01443537", "n01484850")
BAD_FILES = ("empty.JPEG", "truncated.JPEG", "text.JPEG")


def write_class_folder(folder: Path, rng: np.random.Generator, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        photo(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90))).save(folder / f"img_{i}.JPEG", quality=90)


def write_odd_images(folder: Path, rng: np.random.Generator) -> None:
    """Readable images in other colour modes or formats, all with a .JPEG name."""
    photo(rng, 60, 50).convert("CMYK").save(folder / "cmyk.JPEG", quality=90)
    photo(rng, 50, 60).convert("L").save(folder / "grey.JPEG", quality=90)
    photo(rng, 48, 48).save(folder / "png_inside.JPEG", format="PNG")


def write_bad_images(folder: Path, rng: np.random.Generator) -> None:
    (folder / "empty.JPEG").write_bytes(b"")
    buffer = io.BytesIO()
    photo(rng, 64, 64).save(buffer, format="JPEG", quality=90)
    (folder / "truncated.JPEG").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "text.JPEG").write_text("not an image")


def make_imagenet(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """``root/train/<wnid>/`` and ``root/val/<wnid>/`` with ``per_class`` good JPEGs per class; the first class of
    train also holds the odd and the bad files."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for wnid in WNIDS:
            write_class_folder(root / split / wnid, rng, per_class)
    write_odd_images(root / "train" / WNIDS[0], rng)
    write_bad_images(root / "train" / WNIDS[0], rng)
    return root


@pytest.fixture
def wnids() -> tuple[str, ...]:
    return WNIDS


@pytest.fixture
def bad_files() -> tuple[str, ...]:
    return BAD_FILES


@pytest.fixture
def image_folder_writer():
    """``write(folder, count, seed)`` puts ``count`` good JPEGs in ``folder``."""
    return lambda folder, count, seed=0: write_class_folder(folder, np.random.default_rng(seed), count)


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    return make_imagenet(tmp_path / "imagenet")


@pytest.fixture
def clean_imagenet_root(tmp_path: Path) -> Path:
    """Good JPEGs only: 8 per class in train, 4 in val."""
    root = tmp_path / "clean"
    rng = np.random.default_rng(1)
    for wnid in WNIDS:
        write_class_folder(root / "train" / wnid, rng, 8)
        write_class_folder(root / "val" / wnid, rng, 4)
    return root
