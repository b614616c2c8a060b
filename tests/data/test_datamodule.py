from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from video_helpers import write_test_video

from omnimae_pl.data.datamodule import (
    ClassificationDataModule,
    ImageMasking,
    PretrainDataModule,
    SourceConfig,
    VideoMasking,
)
from omnimae_pl.data.image_transforms import ResizeCenterCrop
from omnimae_pl.data.interleave import ModalityInterleaver
from omnimae_pl.errors import ConfigError, DatasetError
from omnimae_pl.masking import MaskingConfig

SMALL = {"img_size": 32, "num_frames": 4, "clip_duration": 0.5, "short_side": 36, "num_workers": 0, "pin_memory": False}


@pytest.fixture
def video_root(tmp_path: Path) -> Path:
    """``<root>/{train,val}/<class>/*.webm``: 2 classes, 4 train and 1 val video each."""
    root = tmp_path / "videos"
    for split, count in (("train", 4), ("val", 1)):
        for label in ("push", "pull"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                write_test_video(root / split / label / f"{i}.webm", num_frames=8, width=48, height=40)
    return root


def _pretraining(image_root: Path, video_root: Path, **kwargs) -> PretrainDataModule:
    sources = [
        SourceConfig("imagenet", str(image_root), name="in1k", val_split="val"),
        SourceConfig("video_folder", str(video_root), name="clips", val_split="val"),
    ]
    options = {
        **SMALL, "image_batch_size": 4, "video_batch_size": 4, "replicas": 2,
        "image_masking": MaskingConfig("random", 0.75), "video_masking": MaskingConfig("random", 0.75), **kwargs,
    }
    return PretrainDataModule(sources, **options)


def test_pretraining_batches_steps_and_fixed_validation(clean_imagenet_root: Path, video_root: Path) -> None:
    dm = _pretraining(clean_imagenet_root, video_root)
    assert dm.num_classes == {"image": 3, "video": 2}
    assert dm.batch_sizes() == {"image": 4, "video": 4}
    assert (dm.img_size, dm.num_frames, dm.patch_size) == (32, 4, (2, 16, 16))
    dm.setup("fit")
    assert dm.steps_per_epoch() == 24 // 4 + (8 // 2) // 2
    assert dm.steps_per_epoch(world_size=2) == 24 // 8 + (8 // 4) // 2
    train = dm.train_dataloader()
    assert isinstance(train, ModalityInterleaver) and len(train) == dm.steps_per_epoch()
    shapes = {b["modality"]: (tuple(b["input"].shape), tuple(b["mask"].shape), b["source"]) for b in train}
    assert shapes == {
        "image": ((4, 3, 32, 32), (4, 1, 2, 2), "in1k"),
        "video": ((4, 3, 4, 32, 32), (4, 2, 2, 2), "clips"),  # 2 clips x 2 replicas
    }
    runs = [[(b["modality"], b["mask"]) for loader in dm.val_dataloader() for b in loader] for _ in range(2)]
    assert [m for m, _ in runs[0]] == ["image", "image", "image", "video"]  # 12 images in 4s, then 2 clips
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*runs))  # the same masks every time


def test_data_parallel_layout_comes_from_the_strategy(clean_imagenet_root: Path, video_root: Path) -> None:
    dm = _pretraining(clean_imagenet_root, video_root, val_samples=6)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1}))
    train = dm.train_dataloader()
    assert (train.sampler.rank, train.sampler.world_size) == (1, 2)
    assert len(train) == dm.steps_per_epoch(2, 1)
    image_val = dm.val_dataloader()[0]
    assert len(image_val.sampler) == 3  # 6 evenly spaced images, split over 2 ranks


def test_setup_errors_name_the_key_and_the_path(tmp_path: Path, clean_imagenet_root: Path) -> None:
    missing = tmp_path / "no_imagenet"
    dm = PretrainDataModule([SourceConfig("imagenet", str(missing))], **SMALL)
    with pytest.raises(ConfigError, match=re.escape(f"data.init_args.sources[0].root='{missing}'")):
        dm.setup("fit")
    annotations = tmp_path / "ssv2_labels"
    annotations.mkdir()
    (tmp_path / "ssv2_videos").mkdir()
    dm = PretrainDataModule(
        [SourceConfig("imagenet", str(clean_imagenet_root)),
         SourceConfig("ssv2", str(tmp_path / "ssv2_videos"), annotations=str(annotations))], replicas=2, **SMALL
    )
    labels = annotations / "something-something-v2-labels.json"
    with pytest.raises(DatasetError, match=re.escape(f"data.init_args.sources[1] (ssv2 'ssv2', split 'train'): "
                                                     f"SSv2 annotation file not found: {labels}")):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("source", "key"),
    [
        (SourceConfig("kinetics", "/videos"), "sources[0].kind='kinetics': must be one of"),
        (SourceConfig("ssv2", "/videos"), "sources[0].annotations=None"),
        (SourceConfig("ssv2", "/videos", annotations="/labels", val_split="val"), "sources[0].val_split='val'"),
        (SourceConfig("imagenet", "/images", weight=-1.0), "sources[0].weight=-1.0"),
    ],
)
def test_a_bad_source_names_its_place_in_the_config(source: SourceConfig, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"data.init_args.{key}")):
        PretrainDataModule([source])
    with pytest.raises(ConfigError, match=re.escape(f"data.init_args.{key.replace('sources[0]', 'source')}")):
        ClassificationDataModule(source)


def test_pretraining_arguments_are_checked_together(clean_imagenet_root: Path) -> None:
    images = SourceConfig("imagenet", str(clean_imagenet_root))
    with pytest.raises(ConfigError, match=r"video_batch_size=6: must be a multiple of data.init_args.replicas=4"):
        PretrainDataModule([images], video_batch_size=6, replicas=4)
    with pytest.raises(ConfigError, match=r"sources\[1\].name='imagenet': must differ"):
        PretrainDataModule([images, SourceConfig("imagenet", "/elsewhere")])
    with pytest.raises(ConfigError, match=r"sources\[\].weight=\[1.0, None\]"):
        PretrainDataModule([SourceConfig("imagenet", "/a", name="a", weight=1.0), SourceConfig("imagenet", "/b")])
    with pytest.raises(ConfigError, match=r"data.init_args.sources=\['imagenet'\]: must hold at least one source"):
        PretrainDataModule([SourceConfig("imagenet", "/a", split=None)])


def test_classification_datamodule(clean_imagenet_root: Path) -> None:
    source = SourceConfig("imagenet", str(clean_imagenet_root), val_split="val", test_split="val")
    dm = ClassificationDataModule(source, batch_size=4, train_transform=ResizeCenterCrop(32), **SMALL)
    assert dm.num_classes == 3 and dm.modality == "image"
    dm.setup("fit")
    assert dm.steps_per_epoch() == 6 and dm.steps_per_epoch(world_size=2) == 3
    batches = list(dm.train_dataloader())
    assert len(batches) == 6 and "mask" not in batches[0]
    assert all(b["input"].shape == (4, 3, 32, 32) for b in batches)
    # the train_transform hook replaced the random crop: the same image gives the same pixels in any epoch
    dataset = dm.train_dataloader().sources[0].dataset
    assert torch.equal(dataset[(0, 0)]["input"], dataset[(0, 5)]["input"])
    val = list(dm.val_dataloader())
    assert sum(len(b["index"]) for b in val) == 12 and all(b["modality"] == "image" for b in val)
    assert ClassificationDataModule(SourceConfig("imagenet", str(clean_imagenet_root))).test_dataloader() == []


def test_classification_train_fraction(clean_imagenet_root: Path, video_root: Path) -> None:
    source = SourceConfig("imagenet", str(clean_imagenet_root), val_split="val")
    dm = ClassificationDataModule(source, batch_size=2, train_fraction=0.25, **SMALL)
    dm.setup("fit")
    train = dm.train_dataloader().sources[0].dataset
    assert len(train) == 6 and np.bincount(train.labels).tolist() == [2, 2, 2]
    assert len(dm.val_dataloader().dataset) == 12  # evaluation keeps every item
    assert dm.steps_per_epoch() == 3
    videos = ClassificationDataModule(
        SourceConfig("video_folder", str(video_root)), batch_size=2, train_fraction=0.5, **SMALL
    )
    videos.setup("fit")
    assert sorted(videos.train_dataloader().sources[0].dataset.labels) == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match=r"data.init_args.train_fraction=0.0: must be in \(0, 1\]"):
        ClassificationDataModule(source, train_fraction=0.0)


def test_arguments_parse_from_yaml(tmp_path: Path) -> None:
    parser = ArgumentParser()
    parser.add_class_arguments(PretrainDataModule, "data")
    cfg = parser.parse_string(
        """
data:
  sources:
    - {kind: imagenet, root: /data/imagenet, name: in1k, val_split: val, weight: 1.0}
    - {kind: ssv2, root: /data/ssv2/videos, annotations: /data/ssv2/labels, val_split: validation, weight: 0.5}
  video_batch_size: 16
  image_masking: {mask_type: random, ratio: 0.75}
  patch_size: [2, 16, 16]
"""
    )
    init = parser.instantiate_classes(cfg).data
    assert init.sources[1] == SourceConfig(
        "ssv2", "/data/ssv2/videos", name="ssv2", annotations="/data/ssv2/labels", val_split="validation", weight=0.5
    )
    # per-modality classes, so that a mistake names data.init_args.image_masking or video_masking
    assert init.masking == {"image": ImageMasking("random", 0.75), "video": VideoMasking("random", 0.95)}

    parser = ArgumentParser()
    parser.add_class_arguments(ClassificationDataModule, "data")
    cfg = parser.parse_string(
        json.dumps(
            {
                "data": {
                    "source": {"kind": "imagenet", "root": "/data/imagenet", "val_split": "val"},
                    "train_transform": {
                        "class_path": "omnimae_pl.data.image_transforms.ResizeCenterCrop",
                        "init_args": {"size": 32},
                    },
                }
            }
        )
    )
    assert parser.instantiate_classes(cfg).data.train_transform == ResizeCenterCrop(32)
