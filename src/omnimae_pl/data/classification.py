"""The single-source LightningDataModule for fine-tuning, linear probing and evaluation (no masks)."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader, Dataset

from omnimae_pl.data.datamodule import _SourcesDataModule
from omnimae_pl.data.interleave import InterleaveSampler, ModalityInterleaver, Source
from omnimae_pl.data.label_fraction import check_fraction
from omnimae_pl.data.sources import KEY, SourceConfig
from omnimae_pl.data.video_io import VideoBackend
from omnimae_pl.errors import check_value


class ClassificationDataModule(_SourcesDataModule):
    """One labelled image or video source for fine-tuning, linear probing and evaluation (no masks).

    Args:
        source: the dataset (``SourceConfig``): ``split`` trains, ``val_split`` / ``test_split`` evaluate.
        batch_size: training samples per device and step.
        eval_batch_size: evaluation items per device (a multi-view video item holds clips x crops rows);
            default ``batch_size``.
        train_transform: the per-sample training augmentation, replacing the default. Images: a callable
            ``(PIL image, generator) -> (3, S, S)`` (e.g. ``video_augment.ImageFinetuneTransform``); videos: a
            drop-in for ``VideoTrainTransform`` (e.g. ``video_augment.VideoFinetuneTransform``). Default:
            RandomResizedCrop(``image_scale``) + flip for images, the video datasets' own train crop for videos.
        image_scale: RandomResizedCrop area range of the default image augmentation.
        crop_ratio: image evaluation: resize the short side to ``img_size / crop_ratio``, centre crop.
        eval_num_clips, eval_num_crops, eval_short_side: video evaluation views per video (SSv2 protocol: 5,
            3, 224; rows of a batch sharing ``index`` are views of one video); ``eval_short_side`` defaults to
            ``short_side``.
        train_fraction: train on this class-balanced share of the training split (e.g. 0.01 for "1 % of the
            labels"; at least one item per class), the same items for every run with the same ``seed``.
        other arguments: as in ``PretrainDataModule``.
    """

    def __init__(
        self,
        source: SourceConfig,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        train_transform: Callable | None = None,
        img_size: int = 224,
        num_frames: int = 16,
        clip_duration: float = 2.7,
        short_side: int = 256,
        patch_size: tuple[int, int, int] = (2, 16, 16),
        image_scale: tuple[float, float] = (0.08, 1.0),
        crop_ratio: float = 1.0,
        eval_num_clips: int = 1,
        eval_num_crops: int = 1,
        eval_short_side: int | None = None,
        train_fraction: float | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        timeout: float = 600.0,
        seed: int = 0,
        max_invalid_fraction: float = 0.1,
        video_backend: VideoBackend = "pyav",
    ) -> None:
        super().__init__(
            img_size=img_size, num_frames=num_frames, clip_duration=clip_duration, short_side=short_side,
            patch_size=patch_size, image_scale=image_scale, num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=persistent_workers, prefetch_factor=prefetch_factor, timeout=timeout, seed=seed,
            max_invalid_fraction=max_invalid_fraction, video_backend=video_backend,
        )
        source.check(f"{KEY}.source")
        check_value(batch_size >= 1, f"{KEY}.batch_size", batch_size, "must be an integer >= 1")
        check_value(eval_batch_size is None or eval_batch_size >= 1, f"{KEY}.eval_batch_size", eval_batch_size,
                    "must be an integer >= 1 or null (batch_size)")
        check_value(0 < crop_ratio <= 1, f"{KEY}.crop_ratio", crop_ratio, "must be in (0, 1]")
        check_value(eval_num_clips >= 1, f"{KEY}.eval_num_clips", eval_num_clips, "must be an integer >= 1")
        check_value(eval_num_crops in (1, 3), f"{KEY}.eval_num_crops", eval_num_crops,
                    "must be 1 (centre) or 3 (along the long side)")
        check_value(eval_short_side is None or eval_short_side >= img_size, f"{KEY}.eval_short_side",
                    eval_short_side, f"must be >= {KEY}.img_size {img_size} or null ({KEY}.short_side)")
        if train_fraction is not None:
            check_fraction(train_fraction, f"{KEY}.train_fraction")  # before any dataset is listed
        self.source = source
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_transform = train_transform
        self.crop_ratio = crop_ratio
        self.eval_views = (eval_num_clips, eval_num_crops, eval_short_side)
        self.train_fraction = train_fraction

    def _source_key(self, cfg: SourceConfig) -> str:
        return f"{KEY}.source"

    @property
    def modality(self) -> str:
        return self.source.modality

    @property
    def num_classes(self) -> int:
        split = self.source.split or self.source.val_split or self.source.test_split
        return self._split_dataset(split).num_classes

    def batch_sizes(self) -> dict[str, int]:
        """Samples per device and step of the one modality."""
        return {self.modality: self.batch_size}

    def steps_per_epoch(self, world_size: int = 1, rank: int = 0) -> int:
        dataset = self._split_dataset(self._train_split())
        sampler = InterleaveSampler(
            [self.source.name], [len(dataset)], [self.batch_size], [1], [None], self.seed, rank, world_size
        )
        return len(sampler)

    def setup(self, stage: str | None = None) -> None:
        splits = {
            "fit": [self.source.split, self.source.val_split],
            "validate": [self.source.val_split],
            "test": [self.source.test_split],
            "predict": [self.source.test_split or self.source.val_split],
        }
        for split in splits.get(stage, [self.source.split, self.source.val_split, self.source.test_split]):
            if split is not None:
                self._split_dataset(split)

    def train_dataloader(self) -> ModalityInterleaver:
        dataset = self._split_dataset(self._train_split())
        return self._interleaver([Source(self.source.name, dataset, self.batch_size, None, 1, self.source.num_workers)])

    def val_dataloader(self) -> DataLoader | list:
        return self._stage_loader(self.source.val_split)

    def test_dataloader(self) -> DataLoader | list:
        return self._stage_loader(self.source.test_split)

    def predict_dataloader(self) -> DataLoader | list:
        return self._stage_loader(self.source.test_split or self.source.val_split)

    def _train_split(self) -> str:
        check_value(self.source.split is not None, f"{KEY}.source.split", self.source.split,
                    "must name the training split to fit (e.g. train)")
        return self.source.split

    def _split_dataset(self, split: str) -> Dataset:
        train = split == self.source.split
        return self._dataset(
            self.source, split, train, None, 1, self.crop_ratio, self.train_transform, self.eval_views,
            self.train_fraction if train else None,
        )

    def _stage_loader(self, split: str | None) -> DataLoader | list:
        if split is None:
            return []
        return self._eval_loader(self._split_dataset(split), self.source, self.eval_batch_size)

