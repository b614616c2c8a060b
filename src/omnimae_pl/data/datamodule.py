"""LightningDataModules: joint image + video pretraining here, and single-source classification (in
``data/classification.py``, importable from here as the configs name it).

Both shard their data themselves (``trainer.use_distributed_sampler: false``, the CLI's default): training goes
through a ``ModalityInterleaver`` (seeded per-epoch shuffling, the rank's shard, ``(index, epoch)`` keys, a
mid-epoch resumable position in the checkpoint, bad-sample counting), and evaluation loaders split their set over
the ranks in order (``EvalShard``: no sample counted twice, the same number of batches on every rank).

Arguments are checked when a datamodule is made: a value that is not accepted raises
:class:`~omnimae_pl.errors.ConfigError` naming its full key (``data.init_args.image_masking.ratio``) and what is
accepted. Datasets are built on first need: ``setup()``, or earlier when the CLI links ``num_classes`` into the
model. Either way a missing, empty or inconsistent folder or annotation file fails before the first step, as a
:class:`~omnimae_pl.errors.UserError` naming the source's key and the path.

Placeholders of unreadable files are counted per source (``BadSampleTracker``): training batches by the
interleaver (``bad_samples``, saved with its position), evaluation batches in ``eval_bad_samples``, which
``omnimae_pl.tasks.bad_sample_report.BadSampleReport`` feeds, resets and judges at every evaluation.

Example (``data:`` of a LightningCLI config in subclass mode)::

    data:
      class_path: omnimae_pl.data.datamodule.PretrainDataModule
      init_args:
        sources:
          - {name: in1k, kind: imagenet, root: /data/imagenet, val_split: val}
          - {name: ssv2, kind: ssv2, root: /data/ssv2/videos, annotations: /data/ssv2/labels, val_split: validation}
        image_batch_size: 32
        video_batch_size: 32       # samples: 8 clips x 4 replicas
        replicas: 4
        image_masking: {mask_type: random, ratio: 0.9}
        video_masking: {mask_type: random, ratio: 0.95}
        num_workers: 8
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset

from omnimae_pl.data.bad_samples import BadSampleTracker
from omnimae_pl.data.device_augment import is_uint8_batch, to_float_batch
from omnimae_pl.data.device_decode import decode_images
from omnimae_pl.data.eval_shard import EvalShard
from omnimae_pl.data.imagenet import ImageNet
from omnimae_pl.data.interleave import InterleaveSampler, ModalityInterleaver, Source
from omnimae_pl.data.label_fraction import stratified_indices
from omnimae_pl.data.litdata_store import ImageShards, VideoShards, is_url
from omnimae_pl.data.sample import collate_samples
from omnimae_pl.data.seeding import loader_generator
from omnimae_pl.data.sources import KEY, ImageMasking, SourceConfig, VideoMasking, check_sources
from omnimae_pl.data.workers import ignore_stop_signals
from omnimae_pl.data.video_datasets import SSv2, VideoFolder
from omnimae_pl.data.video_io import VideoBackend, make_reader
from omnimae_pl.errors import UserError, check_value, config_prefix
from omnimae_pl.masking import IMAGE_MASKING, VIDEO_MASKING, MaskingConfig

class _SourcesDataModule(LightningDataModule):
    """Argument checks, dataset construction and loader plumbing shared by the two datamodules."""

    def __init__(
        self,
        *,
        img_size: int,
        num_frames: int,
        clip_duration: float,
        short_side: int,
        patch_size: tuple[int, int, int],
        image_scale: tuple[float, float],
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        prefetch_factor: int,
        timeout: float,
        seed: int,
        max_invalid_fraction: float,
        video_backend: VideoBackend,
    ) -> None:
        super().__init__()
        patch_size = tuple(patch_size)
        check_value(len(patch_size) == 3 and min(patch_size) >= 1, f"{KEY}.patch_size", list(patch_size),
                    "must be three integers >= 1: [time, height, width]")
        pt, ph, pw = patch_size
        check_value(img_size >= ph and img_size % ph == 0 and img_size % pw == 0, f"{KEY}.img_size", img_size,
                    f"must be a multiple of the patch's height and width {ph} x {pw} ({KEY}.patch_size)")
        check_value(num_frames >= pt and num_frames % pt == 0, f"{KEY}.num_frames", num_frames,
                    f"must be a multiple of the patch's time size {pt} ({KEY}.patch_size)")
        check_value(clip_duration > 0, f"{KEY}.clip_duration", clip_duration, "must be > 0 seconds")
        check_value(short_side >= img_size, f"{KEY}.short_side", short_side,
                    f"must be >= {KEY}.img_size {img_size}: the short side is resized to it before cropping")
        low, high = image_scale
        check_value(0 < low <= high <= 1, f"{KEY}.image_scale", list(image_scale),
                    "must be [low, high] with 0 < low <= high <= 1 (shares of the image area)")
        check_value(num_workers >= 0, f"{KEY}.num_workers", num_workers, "must be >= 0")
        check_value(0.0 <= max_invalid_fraction <= 1.0, f"{KEY}.max_invalid_fraction", max_invalid_fraction,
                    "must be in [0, 1]: the share of unreadable samples a source may have before the run stops")
        with config_prefix(KEY):
            make_reader(video_backend)  # unusable here (torchcodec without FFmpeg): refused now, not at the first video
        self.img_size = img_size
        self.num_frames = num_frames
        self.clip_duration = clip_duration
        self.short_side = short_side
        self.patch_size = patch_size
        self.image_scale = tuple(image_scale)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.timeout = timeout
        self.seed = seed
        self.video_backend = video_backend
        self.bad_samples = BadSampleTracker(max_invalid_fraction)
        self.eval_bad_samples = BadSampleTracker(max_invalid_fraction)
        self.interleaver: ModalityInterleaver | None = None
        self._datasets: dict[tuple[str, str], Dataset] = {}

    def _source_key(self, cfg: SourceConfig) -> str:
        """Where ``cfg`` is in the config (``data.init_args.sources[1]``), for error messages."""
        raise NotImplementedError

    def _dataset(
        self,
        cfg: SourceConfig,
        split: str,
        train: bool,
        masking: MaskingConfig | None,
        replicas: int = 1,
        crop_ratio: float = 1.0,
        transform: Callable | None = None,
        eval_views: tuple[int, int, int | None] = (1, 1, None),
        fraction: float | None = None,
        augment_on: str = "worker",
        decode_on: str = "worker",
    ) -> Dataset:
        """The dataset of one source and split, built once. ``eval_views``: video (clips, crops, short side);
        ``fraction``: keep a class-balanced share of the items (``label_fraction``); ``augment_on``: where the
        training crops are resized and normalised (``device_augment``); ``decode_on``: where training JPEGs are
        decoded (``device_decode``; image sources). A folder or file that is
        missing, empty or inconsistent raises a UserError that names the source's key."""
        if (cfg.name, split) in self._datasets:
            return self._datasets[cfg.name, split]
        where = self._source_key(cfg)
        if not (cfg.kind == "litdata" and is_url(cfg.root)):  # an object store is read when the dataset is built
            check_value(Path(cfg.root).is_dir(), f"{where}.root", cfg.root, f"must be an existing folder ({cfg.kind})")
        if cfg.annotations is not None and cfg.kind != "litdata":
            check_value(Path(cfg.annotations).is_dir(), f"{where}.annotations", cfg.annotations,
                        "must be an existing folder (of the something-something-v2-*.json files)")
        try:
            dataset = self._build_dataset(
                cfg, split, train, masking, replicas, crop_ratio, transform, eval_views, augment_on, decode_on
            )
        except UserError as err:
            raise type(err)(f"{where} ({cfg.kind} {cfg.name!r}, split {split!r}): {err}") from err
        if fraction is not None:
            total = len(dataset)
            dataset.keep(stratified_indices(dataset.labels, fraction, self.seed))
            rank_zero_info(f"{cfg.name}/{split}: training on {len(dataset)} of {total} labelled items "
                           f"(train_fraction {fraction}, class-balanced, seed {self.seed})")
        self._datasets[cfg.name, split] = dataset
        return dataset

    def _build_dataset(
        self,
        cfg: SourceConfig,
        split: str,
        train: bool,
        masking: MaskingConfig | None,
        replicas: int,
        crop_ratio: float,
        transform: Callable | None,
        eval_views: tuple[int, int, int | None],
        augment_on: str,
        decode_on: str = "worker",
    ) -> Dataset:
        if cfg.modality == "image":
            image: dict[str, Any] = {
                "train": train, "img_size": self.img_size, "scale": self.image_scale, "crop_ratio": crop_ratio,
                "transform": transform if train else None, "masking": masking, "patch_size": self.patch_size,
                "seed": self.seed, "augment_on": augment_on, "decode_on": decode_on,
            }
            if cfg.kind == "litdata":
                return ImageShards(cfg.root, split, cache_dir=cfg.cache_dir, **image)
            return ImageNet(cfg.root, split, val_labels=cfg.val_labels, synsets=cfg.synsets, **image)
        clips, crops, eval_short = eval_views
        options: dict[str, Any] = {
            "num_frames": self.num_frames, "clip_duration": self.clip_duration, "crop_size": self.img_size,
            "short_side": self.short_side if train or eval_short is None else eval_short,
            "masking": masking, "patch_size": self.patch_size, "replicas": replicas, "seed": self.seed,
            "train": train, "num_clips": 1 if train else clips, "num_crops": 1 if train else crops,
            "backend": self.video_backend, "augment_on": augment_on,
        }
        if cfg.kind == "ssv2":
            dataset = SSv2(cfg.annotations, cfg.root, split, **options)
        elif cfg.kind == "litdata":
            dataset = VideoShards(cfg.root, split, cache_dir=cfg.cache_dir, **options)
        else:
            dataset = VideoFolder(Path(cfg.root) / split, **options)
        if train and transform is not None:
            dataset.train_transform = transform  # the video datasets' augmentation hook
        return dataset

    def _data_parallel(self) -> tuple[int, int]:
        """(rank, world size) of data parallelism: the strategy's when attached to a trainer (this also covers
        ModelParallelStrategy's data-parallel sub-mesh), else torch.distributed's, else (0, 1)."""
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) if self.trainer is not None else None
        if kwargs:
            return kwargs["rank"], kwargs["num_replicas"]
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _loader_options(self, num_workers: int) -> dict[str, Any]:
        return {
            "num_workers": num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers and num_workers > 0,
            "prefetch_factor": self.prefetch_factor if num_workers > 0 else None,
            "timeout": self.timeout if num_workers > 0 else 0.0,
        }

    def _interleaver(self, sources: list[Source]) -> ModalityInterleaver:
        rank, world_size = self._data_parallel()
        self.interleaver = ModalityInterleaver(
            sources, seed=self.seed, rank=rank, world_size=world_size, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
            prefetch_factor=self.prefetch_factor, timeout=self.timeout, bad_samples=self.bad_samples,
        )
        return self.interleaver

    def teardown(self, stage: str) -> None:
        self._shutdown_train_workers()

    def on_exception(self, exception: BaseException) -> None:
        # also a preempted run (its stop is an exception): its workers end before the interpreter's exit
        self._shutdown_train_workers()

    def _shutdown_train_workers(self) -> None:
        # Lightning ends the workers of the DataLoaders it sees; the interleaver's are inside it
        if self.interleaver is not None:
            self.interleaver.shutdown()

    def _eval_loader(self, dataset: Dataset, cfg: SourceConfig, batch_size: int, limit: int | None = None) -> DataLoader:
        """In-order loader over (an evenly spaced ``limit``-item subset of) ``dataset``, split over the ranks
        (:class:`EvalShard`: every sample counts once, every rank runs as many batches); its source is registered
        in ``eval_bad_samples``."""
        describe = dataset.describe  # batches carry the full dataset's indices, also from a subset
        if limit is not None and limit < len(dataset):
            dataset = Subset(dataset, torch.linspace(0, len(dataset) - 1, limit).round().long().tolist())
        self.eval_bad_samples.add_source(cfg.name, describe, len(dataset))
        rank, world_size = self._data_parallel()
        if world_size > 1:
            dataset = EvalShard(dataset, rank, world_size)
        workers = self.num_workers if cfg.num_workers is None else cfg.num_workers
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=False, drop_last=False,
            collate_fn=functools.partial(collate_samples, modality=cfg.modality, source=cfg.name),
            generator=loader_generator(self.seed, "eval", cfg.name), worker_init_fn=ignore_stop_signals,
            **self._loader_options(workers),
        )


class PretrainDataModule(_SourcesDataModule):
    """Pretraining on any number of image and video sources, one source per step (``ModalityInterleaver``).

    Args:
        sources: the datasets (``SourceConfig``): those with a ``split`` train, those with a ``val_split``
            are validated.
        image_batch_size: images per device and step.
        video_batch_size: video samples per device and step, i.e. ``video_batch_size / replicas`` clips.
        replicas: augmented and masked copies of each decoded clip; also divides the video steps per epoch.
        image_masking, video_masking: mask type and ratio per modality (paper: random 0.90 / 0.95).
        img_size, num_frames, clip_duration, short_side, patch_size: input geometry (video: ``short_side``
            resize before the random crop; frames sampled uniformly from ``clip_duration`` seconds).
        image_scale: RandomResizedCrop area range for images (0.2-1 in OmniMAE; videos use 0.08-1).
        val_batch_size: evaluation samples per device (default: the modality's training batch).
        val_samples: validate on this many evenly spaced items per source instead of all of them.
        num_workers, pin_memory, persistent_workers, prefetch_factor, timeout: DataLoader options (per source).
        seed: base of every random draw (shuffles, crops, masks).
        max_invalid_fraction: abort when a source's share of unreadable files exceeds this.
        video_backend: "pyav", "torchcodec" or "auto".
        augment_on: where the training batches are cropped, resized, flipped and normalised: "worker" (the
            loader workers ship float32) or "device" (the workers decode and ship uint8, images already cropped
            and resized, each video clip once with its replicas' boxes; ``on_after_batch_transfer`` finishes
            them on the device, see ``data.device_augment``). The same draws either way; validation and test
            batches are always made by the workers.
        image_decode: where the training JPEGs of image sources are decoded: "worker" (PIL) or "device"
            (needs ``augment_on: device``): the workers read the files and their headers only and ship the
            bytes; ``on_after_batch_transfer`` decodes them in one ``torchvision.io.decode_jpeg`` call on the
            batch's device (nvJPEG on a GPU), then crops and resizes (``data.device_decode``). Files it does not
            take (PNG behind .JPEG, CMYK, truncated) are decoded on a CPU instead and counted:
            ``data/cpu_decoded_<source>`` in the logs, beside ``data/invalid_<source>``.

    Validation masks and crops are the same every epoch. ``val_dataloader`` returns one loader per validated
    source (Lightning passes ``dataloader_idx``; every batch carries ``modality`` and ``source``).
    """

    def __init__(
        self,
        sources: list[SourceConfig],
        image_batch_size: int = 32,
        video_batch_size: int = 32,
        replicas: int = 4,
        image_masking: ImageMasking = ImageMasking(IMAGE_MASKING.mask_type, IMAGE_MASKING.ratio),
        video_masking: VideoMasking = VideoMasking(VIDEO_MASKING.mask_type, VIDEO_MASKING.ratio),
        img_size: int = 224,
        num_frames: int = 16,
        clip_duration: float = 2.7,
        short_side: int = 256,
        patch_size: tuple[int, int, int] = (2, 16, 16),
        image_scale: tuple[float, float] = (0.2, 1.0),
        val_batch_size: int | None = None,
        val_samples: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        timeout: float = 600.0,
        seed: int = 0,
        max_invalid_fraction: float = 0.1,
        video_backend: VideoBackend = "pyav",
        augment_on: Literal["worker", "device"] = "worker",
        image_decode: Literal["worker", "device"] = "worker",
    ) -> None:
        super().__init__(
            img_size=img_size, num_frames=num_frames, clip_duration=clip_duration, short_side=short_side,
            patch_size=patch_size, image_scale=image_scale, num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=persistent_workers, prefetch_factor=prefetch_factor, timeout=timeout, seed=seed,
            max_invalid_fraction=max_invalid_fraction, video_backend=video_backend,
        )
        check_sources(sources)
        check_value(augment_on in ("worker", "device"), f"{KEY}.augment_on", augment_on,
                    "must be 'worker' or 'device' (where the training crops are resized and normalised)")
        check_value(image_decode in ("worker", "device"), f"{KEY}.image_decode", image_decode,
                    "must be 'worker' or 'device' (where the training JPEGs are decoded)")
        check_value(image_decode == "worker" or augment_on == "device", f"{KEY}.image_decode", image_decode,
                    f"needs {KEY}.augment_on: device (the crop is cut on the device, after the decode)")
        check_value(image_batch_size >= 1, f"{KEY}.image_batch_size", image_batch_size, "must be an integer >= 1")
        check_value(video_batch_size >= 1, f"{KEY}.video_batch_size", video_batch_size, "must be an integer >= 1")
        check_value(replicas >= 1, f"{KEY}.replicas", replicas,
                    "must be an integer >= 1: the augmented copies of each decoded clip")
        check_value(video_batch_size % replicas == 0, f"{KEY}.video_batch_size", video_batch_size,
                    f"must be a multiple of {KEY}.replicas={replicas} (each clip gives {replicas} samples)")
        check_value(val_batch_size is None or val_batch_size >= 1, f"{KEY}.val_batch_size", val_batch_size,
                    "must be an integer >= 1 or null (the modality's training batch)")
        check_value(val_samples is None or val_samples >= 1, f"{KEY}.val_samples", val_samples,
                    "must be an integer >= 1 or null (every item)")
        self.sources = list(sources)
        self.image_batch_size = image_batch_size
        self.video_batch_size = video_batch_size
        self.replicas = replicas
        self.masking = {"image": image_masking, "video": video_masking}
        self.val_batch_size = val_batch_size
        self.val_samples = val_samples
        self.augment_on = augment_on
        self.image_decode = image_decode

    def _source_key(self, cfg: SourceConfig) -> str:
        return f"{KEY}.sources[{[c.name for c in self.sources].index(cfg.name)}]"

    @property
    def num_classes(self) -> dict[str, int]:
        """Classes per modality for the pretraining probes; 0 where the sources of a modality disagree."""
        counts: dict[str, set[int]] = {}
        for cfg in self._trained():
            counts.setdefault(cfg.modality, set()).add(self._train_dataset(cfg).num_classes)
        return {modality: n.pop() if len(n) == 1 else 0 for modality, n in counts.items()}

    def batch_sizes(self) -> dict[str, int]:
        """Samples per device and step, per modality present."""
        sizes = {"image": self.image_batch_size, "video": self.video_batch_size}
        return {m: sizes[m] for m in dict.fromkeys(cfg.modality for cfg in self._trained())}

    def steps_per_epoch(self, world_size: int = 1, rank: int = 0) -> int:
        """Steps per epoch on every rank, from the dataset sizes alone (no loader is started)."""
        s = self._train_sources()
        return len(
            InterleaveSampler(
                [x.name for x in s], [len(x.dataset) for x in s], [x.batch_size for x in s],
                [x.replicas for x in s], [x.weight for x in s], self.seed, rank, world_size,
            )
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._train_sources()
        if stage in (None, "fit", "validate"):
            self._eval_datasets("val_split")
        if stage in (None, "test"):
            self._eval_datasets("test_split")

    def train_dataloader(self) -> ModalityInterleaver:
        return self._interleaver(self._train_sources())

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val_split")

    def test_dataloader(self) -> list[DataLoader]:
        """The reconstruction loss on each source's ``test_split``, with fixed masks as in validation."""
        return self._eval_loaders("test_split")

    def _eval_loaders(self, split_key: str) -> list[DataLoader]:
        batch = {"image": self.image_batch_size, "video": self.video_batch_size}
        return [
            self._eval_loader(ds, cfg, self.val_batch_size or batch[cfg.modality], self.val_samples)
            for cfg, ds in self._eval_datasets(split_key)
        ]

    def _trained(self) -> list[SourceConfig]:
        return [cfg for cfg in self.sources if cfg.split is not None]

    def _train_dataset(self, cfg: SourceConfig) -> Dataset:
        replicas = self.replicas if cfg.modality == "video" else 1
        decode_on = self.image_decode if cfg.modality == "image" else "worker"
        return self._dataset(cfg, cfg.split, True, self.masking[cfg.modality], replicas, augment_on=self.augment_on,
                             decode_on=decode_on)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A uint8 training batch (``augment_on="device"``) -> the float batch of ``data.sample``, on its device;
        its JPEGs decoded first (``image_decode="device"``), the CPU-decoded and unreadable rows counted."""
        if "jpeg" in batch:
            batch, cpu_decoded, failed = decode_images(batch, self.img_size)
            self.bad_samples.count_decoded(batch["source"], cpu_decoded, failed)
        return to_float_batch(batch, self.img_size) if is_uint8_batch(batch) else batch

    def _train_sources(self) -> list[Source]:
        out = []
        for cfg in self._trained():
            video = cfg.modality == "video"
            batch = self.video_batch_size // self.replicas if video else self.image_batch_size
            out.append(
                Source(cfg.name, self._train_dataset(cfg), batch, cfg.weight, self.replicas if video else 1,
                       cfg.num_workers)
            )
        return out

    def _eval_datasets(self, split_key: str) -> list[tuple[SourceConfig, Dataset]]:
        """(config, dataset) of every source with a ``val_split`` / ``test_split``: fixed crops and masks."""
        return [
            (cfg, self._dataset(cfg, getattr(cfg, split_key), False, self.masking[cfg.modality]))
            for cfg in self.sources
            if getattr(cfg, split_key) is not None
        ]


class OmniMAEDataModule(PretrainDataModule):
    """Deprecated: the old name of :class:`PretrainDataModule`, kept importable for configs that name it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> OmniMAEDataModule:
        rank_zero_deprecation(
            "omnimae_pl.data.datamodule.OmniMAEDataModule is now PretrainDataModule; the old name goes in 0.3"
        )
        return super().__new__(cls)


def __getattr__(name: str) -> Any:
    """``omnimae_pl.data.datamodule.ClassificationDataModule``, the path the fine-tuning configs name, lives in
    ``data/classification.py`` (imported on first use: that module builds on this one)."""
    if name == "ClassificationDataModule":
        from omnimae_pl.data.classification import ClassificationDataModule

        return ClassificationDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
