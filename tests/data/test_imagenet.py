from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omnimae_pl.data.image_transforms import RandomResizedCropFlip, ResizeCenterCrop, random_resized_crop_box
from omnimae_pl.data.imagenet import ImageNet
from omnimae_pl.errors import DatasetError
from omnimae_pl.masking import MaskingConfig

SIZE = 32
MASKING = MaskingConfig("random", 0.75)


def _dataset(root: Path, **kwargs) -> ImageNet:
    kwargs = {"img_size": SIZE, "patch_size": (2, 8, 8), "masking": MASKING, **kwargs}
    return ImageNet(root, **kwargs)


def test_classes_are_sorted_wnids_and_labels_follow_folders(imagenet_root: Path, wnids, bad_files) -> None:
    ds = _dataset(imagenet_root)
    assert ds.classes == sorted(wnids) and ds.num_classes == 3 and ds.modality == "image"
    assert len(ds) == 3 * 4 + 3 + len(bad_files)
    for i in range(len(ds)):
        assert ds.classes[int(ds.labels[i])] == Path(ds.describe(i)).parent.name
        assert ds[i]["label"].item() == ds.labels[i]


def test_every_readable_image_becomes_rgb_and_bad_files_become_placeholders(imagenet_root: Path, bad_files) -> None:
    ds = _dataset(imagenet_root)
    for i in range(len(ds)):
        sample = ds[i]
        name = Path(ds.describe(i)).name
        assert sample["input"].shape == (3, SIZE, SIZE) and sample["input"].dtype == torch.float32
        assert sample["mask"].shape == (1, 4, 4) and sample["mask"].dtype == torch.bool
        assert sample["mask"].sum() == 12
        assert sample["index"].item() == i
        assert sample["valid"].item() == (name not in bad_files), name
        if name in bad_files:
            assert torch.all(sample["input"] == 0)
        else:
            # three distinct channels: greyscale is replicated, CMYK converted, both still RGB-shaped
            assert sample["input"].abs().sum() > 0


def test_draws_derive_from_seed_epoch_index(clean_imagenet_root: Path) -> None:
    ds = _dataset(clean_imagenet_root)
    a, b = ds[(5, 3)], ds[(5, 3)]
    assert torch.equal(a["input"], b["input"]) and torch.equal(a["mask"], b["mask"])
    other_epoch = ds[(5, 4)]
    assert not torch.equal(a["input"], other_epoch["input"]) and not torch.equal(a["mask"], other_epoch["mask"])
    other_seed = _dataset(clean_imagenet_root, seed=1)[(5, 3)]
    assert not torch.equal(a["input"], other_seed["input"])
    ds.set_epoch(3)
    assert torch.equal(ds[5]["input"], a["input"])  # a bare index uses the epoch from set_epoch


def test_eval_transform_is_fixed_and_masks_follow_the_epoch(clean_imagenet_root: Path) -> None:
    ds = _dataset(clean_imagenet_root, split="val")
    a, b = ds[(2, 0)], ds[(2, 1)]
    assert torch.equal(a["input"], b["input"]) and not torch.equal(a["mask"], b["mask"])
    assert "mask" not in _dataset(clean_imagenet_root, split="val", masking=None)[0]


def test_flat_val_with_filename_labels(clean_imagenet_root: Path, tmp_path: Path, wnids) -> None:
    root = _flat_val(clean_imagenet_root)
    labels = tmp_path / "LOC_val_solution.csv"
    wnids = [wnids[i % 3] for i in range(6)]
    lines = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{i + 1:08d},{w} 1 2 3 4" for i, w in enumerate(wnids)]
    labels.write_text("\n".join(reversed(lines[1:])) + "\n")  # any order; names without extension
    ds = _dataset(root, split="val", val_labels=labels)
    assert [ds.classes[label] for label in ds.labels] == wnids
    labels.write_text("\n".join(lines))  # a header line is skipped
    assert [ds.classes[label] for label in _dataset(root, split="val", val_labels=labels).labels] == wnids


def test_flat_val_with_devkit_ids_and_synsets(clean_imagenet_root: Path, tmp_path: Path, wnids) -> None:
    root = _flat_val(clean_imagenet_root)
    synsets = tmp_path / "synsets.txt"  # ILSVRC id order differs from sorted wnids
    synsets.write_text(f"{wnids[2]} goldfish\n{wnids[0]} tench\n{wnids[1]} shark\n")
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("1\n2\n3\n1\n2\n3\n")
    ds = _dataset(root, split="val", val_labels=truth, synsets=synsets)
    assert [ds.classes[label] for label in ds.labels] == [wnids[2], wnids[0], wnids[1]] * 2
    with pytest.raises(DatasetError, match="synsets"):
        _dataset(root, split="val", val_labels=truth)


def test_setup_errors_name_the_path(tmp_path: Path, clean_imagenet_root: Path, image_folder_writer) -> None:
    with pytest.raises(DatasetError, match=str(tmp_path / "nowhere")):
        ImageNet(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match=str(clean_imagenet_root / "test")):
        ImageNet(clean_imagenet_root, split="test")
    (tmp_path / "empty" / "train" / "n1").mkdir(parents=True)
    with pytest.raises(DatasetError, match=str(tmp_path / "empty" / "train")):
        ImageNet(tmp_path / "empty")
    flat = tmp_path / "flat"
    image_folder_writer(flat / "train" / "n1", 1)
    (flat / "val").mkdir()
    Image.new("RGB", (8, 8)).save(flat / "val" / "a.JPEG")
    with pytest.raises(DatasetError, match="val_labels"):
        ImageNet(flat, split="val")


def test_random_resized_crop_box_stays_inside_and_follows_scale() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(375, 500, (0.2, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        assert 0.19 <= h * w / (375 * 500) <= 1.0
    assert random_resized_crop_box(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3), g) == (0, 493, 10, 13)  # fallback: centred, widest box within ratio


def test_jpeg_draft_decoding_matches_full_decoding(tmp_path: Path) -> None:
    """A large crop of a large JPEG is decoded at reduced scale; the result must match a full-size decode."""
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8))
    big.resize((1024, 768), Image.BICUBIC).save(tmp_path / "big.JPEG", quality=95)
    with Image.open(tmp_path / "big.JPEG") as im:
        im.convert("RGB").save(tmp_path / "big.png")  # identical pixels, no draft for PNG
    for transform in (RandomResizedCropFlip(64, scale=(0.5, 1.0)), ResizeCenterCrop(64, crop_ratio=0.875)):
        outs = []
        for name in ("big.JPEG", "big.png"):
            with Image.open(tmp_path / name) as im:
                outs.append(transform(im, torch.Generator().manual_seed(3)))
                if name == "big.JPEG":
                    assert im.size[0] < 1024  # decoded at reduced scale
        assert outs[0].shape == (3, 64, 64)
        assert (outs[0] - outs[1]).abs().mean() < 0.05


def _flat_val(root: Path) -> Path:
    """A copy of six val images in one folder, named like the ILSVRC2012 val tarball."""
    flat = root / "val_flat_root"
    (flat / "val").mkdir(parents=True)
    (flat / "train").symlink_to(root / "train")
    sources = sorted((root / "val").glob("*/*.JPEG"))[:6]
    for i, src in enumerate(sources):
        (flat / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(src.read_bytes())
    return flat
