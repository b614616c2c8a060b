"""Video datasets: Something-Something v2 from its official files, and class-per-folder trees (Kinetics style).

One ``__getitem__`` decodes one clip. In training it returns ``replicas`` samples of that single decode (the
paper's sample replication, x4 for SSv2), each with its own random crop and its own mask; in evaluation it
returns ``num_clips`` x ``num_crops`` deterministic views. Either way several samples come back as a list that
shares ``index`` and that ``collate_samples`` flattens; a single sample comes back as a dict (see ``sample.py``).

Every random draw (window, each replica's crop, each replica's mask) comes from
``sample_generator(seed, epoch, index, stream...)``, so a resumed run draws the same samples. A file that
cannot be decoded becomes placeholder samples (mid-grey input, ``valid=False``, same shapes, a mask all the
same, the decoder's reason in ``error``) rather than an exception or a re-pick. A folder or annotation file that
is missing, empty or does not match raises :class:`~omnimae_pl.errors.DatasetError` naming the path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from omnimae_pl.data.sample import failure_reason, make_sample
from omnimae_pl.data.seeding import sample_generator, split_key
from omnimae_pl.data.video_io import VideoBackend, VideoDecodeError, VideoSource, make_reader
from omnimae_pl.data.video_transforms import VideoEvalTransform, VideoTrainTransform, grey_clip
from omnimae_pl.errors import DatasetError, check_value
from omnimae_pl.masking import MaskingConfig

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv")
SSV2_SPLITS = ("train", "validation", "test")
Sample = dict[str, torch.Tensor]


class VideoClipDataset(Dataset):
    """Clips of the videos in ``self.videos`` (path, label); subclasses fill the list and ``num_classes``.

    Args:
        num_frames: frames per clip (16 in the paper).
        clip_duration: seconds spanned by a clip (2.7 in the paper); shorter videos repeat frames.
        crop_size: side of the square crops (224).
        short_side: the short side is resized to this before cropping (256; 224 for 3-crop SSv2 testing).
        masking: token masking for pretraining, or None (no ``mask`` key) for fine-tuning.
        patch_size: (t, h, w) tubelet size that defines the mask's token grid.
        replicas: training only: augmented + masked copies of each decoded clip (4 for SSv2 pretraining).
        seed: base seed of every random draw.
        train: random window + RandomResizedCrop; otherwise deterministic windows and crops.
        num_clips: evaluation only: evenly spaced windows per video (5 for the SSv2 test protocol).
        num_crops: evaluation only: 1 (centre) or 3 (along the long side) crops per window.
        backend: video decoder, "pyav", "torchcodec" or "auto" (torchcodec when it is usable).
        augment_on: "worker" (default) or "device" (training with the default crop only): the replicas share
            the uint8 decoded clip and each carries its crop box; ``device_augment`` crops, resizes and
            normalises them on the device (see ``sample.py``).
    """

    modality = "video"

    def __init__(
        self,
        *,
        num_frames: int = 16,
        clip_duration: float = 2.7,
        crop_size: int = 224,
        short_side: int = 256,
        masking: MaskingConfig | None = None,
        patch_size: tuple[int, int, int] = (2, 16, 16),
        replicas: int = 1,
        seed: int = 0,
        train: bool = True,
        num_clips: int = 1,
        num_crops: int = 1,
        backend: VideoBackend = "pyav",
        augment_on: str = "worker",
    ) -> None:
        if replicas < 1 or num_clips < 1:
            raise ValueError(f"replicas and num_clips must be >= 1, got {replicas} and {num_clips}")
        if augment_on not in ("worker", "device") or (augment_on == "device" and not train):
            raise ValueError(f"augment_on must be 'worker' or (in training) 'device', got {augment_on!r}")
        self.augment_on = augment_on
        self.num_frames = num_frames
        self.clip_duration = clip_duration
        self.crop_size = crop_size
        self.masking = masking
        self.patch_size = tuple(patch_size)
        self.replicas = replicas
        self.seed = seed
        self.train = train
        self.num_clips = num_clips
        self.epoch = 0
        self.reader = make_reader(backend)
        self.train_transform = VideoTrainTransform(crop_size=crop_size, short_side=short_side)
        self.eval_transform = VideoEvalTransform(crop_size=crop_size, short_side=short_side, num_crops=num_crops)
        self.videos: list[tuple[Path, int]] = []
        self.num_classes = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for keys given as a bare index."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.videos)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.videos]

    def keep(self, indices: Sequence[int]) -> None:
        """Restrict the dataset to ``indices`` (e.g. a labelled fraction), in their order."""
        self.videos = [self.videos[i] for i in indices]

    def describe(self, index: int) -> str:
        """The file behind ``index``, for error reports."""
        return str(self.videos[index][0])

    def encoded(self, index: int) -> VideoSource:
        """The encoded video of item ``index``, as the readers take it: here the path of its file (the litdata
        shards give its bytes instead); raises OSError when it cannot be had."""
        return self.videos[index][0]

    @property
    def views_per_item(self) -> int:
        """Samples returned by one ``__getitem__``."""
        return self.replicas if self.train else self.num_clips * self.eval_transform.num_crops

    def __getitem__(self, key: int | tuple[int, int]) -> Sample | list[Sample]:
        index, epoch = split_key(key, self.epoch)
        if not self.train:
            epoch = 0  # evaluation views and masks are the same every epoch
        if self.augment_on == "device":
            return self._uint8_replicas(index, epoch)
        try:
            inputs = self._train_views(index, epoch) if self.train else self._eval_views(index)
            error = ""
        except (VideoDecodeError, OSError) as err:
            inputs, error = self._placeholders(), failure_reason(err)
        label = self.videos[index][1]
        samples = [self._sample(x, label, error, index, epoch, view) for view, x in enumerate(inputs)]
        return samples[0] if len(samples) == 1 else samples

    def _uint8_replicas(self, index: int, epoch: int) -> list[Sample]:
        """The decoded clip once, shared by ``replicas`` samples that each carry their crop box (source pixels)
        and mask, from the same draws as the worker path; a placeholder is a mid-grey clip, boxed whole."""
        try:
            window = sample_generator(self.seed, epoch, index, "window")
            clip = self.reader.read_clip(self.encoded(index), self.num_frames, self.clip_duration, window)
            crops = [sample_generator(self.seed, epoch, index, "crop", r) for r in range(self.replicas)]
            boxes = [self.train_transform.crop_box(clip, g) for g in crops]
            error = ""
        except (VideoDecodeError, OSError) as err:
            size = self.crop_size
            clip = torch.full((self.num_frames, size, size, 3), 128, dtype=torch.uint8)
            boxes, error = [(0, 0, size, size)] * self.replicas, failure_reason(err)
        label = self.videos[index][1]
        shape = (3, self.num_frames, self.crop_size, self.crop_size)
        return [
            make_sample(
                None, label, not error, index, self.masking, self.patch_size,
                self._mask_generator(index, epoch, view), error, input_shape=shape, clip=clip, box=box,
            )
            for view, box in enumerate(boxes)
        ]

    def _train_views(self, index: int, epoch: int) -> list[torch.Tensor]:
        window = sample_generator(self.seed, epoch, index, "window")
        clip = self.reader.read_clip(self.encoded(index), self.num_frames, self.clip_duration, window)
        crops = [sample_generator(self.seed, epoch, index, "crop", r) for r in range(self.replicas)]
        return [self.train_transform(clip, g) for g in crops]

    def _eval_views(self, index: int) -> list[torch.Tensor]:
        clips = self.reader.read_uniform_clips(self.encoded(index), self.num_clips, self.num_frames, self.clip_duration)
        return [view for clip in clips for view in self.eval_transform(clip)]

    def _placeholders(self) -> list[torch.Tensor]:
        return [grey_clip(self.num_frames, self.crop_size) for _ in range(self.views_per_item)]

    def _sample(self, x: torch.Tensor, label: int, error: str, index: int, epoch: int, view: int) -> Sample:
        mask_generator = self._mask_generator(index, epoch, view)
        return make_sample(x, label, not error, index, self.masking, self.patch_size, mask_generator, error)

    def _mask_generator(self, index: int, epoch: int, view: int) -> torch.Generator | None:
        return sample_generator(self.seed, epoch, index, "mask", view) if self.masking is not None else None


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise DatasetError(f"SSv2 annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"SSv2 annotation file {path} is not valid JSON: {err}") from err


class SSv2(VideoClipDataset):
    """Something-Something v2: ``<video_root>/<id>.webm`` with the official annotation files.

    The class of a video is its ``template`` with the brackets removed, looked up in
    ``something-something-v2-labels.json`` (174 classes); the ``label`` sentence (with the objects filled in)
    is never used. The test split lists ids only, so its labels are -1.

    Args:
        annotation_dir: folder with ``something-something-v2-{labels,train,validation,test}.json``.
        video_root: folder with the ``<id>.webm`` files.
        split: "train", "validation" or "test".
        **kwargs: clip, crop, masking and replication options of :class:`VideoClipDataset`.
    """

    def __init__(
        self,
        annotation_dir: str | Path,
        video_root: str | Path,
        split: Literal["train", "validation", "test"] = "train",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        annotation_dir, video_root = Path(annotation_dir), Path(video_root)
        check_value(split in SSV2_SPLITS, "split", split, f"must be one of the SSv2 splits {SSV2_SPLITS}")
        if not video_root.is_dir():
            raise DatasetError(f"SSv2 video folder not found: {video_root}")
        if not annotation_dir.is_dir():
            raise DatasetError(f"SSv2 annotations folder not found: {annotation_dir} (the folder of its JSON files)")
        labels_file = annotation_dir / "something-something-v2-labels.json"
        labels = _read_json(labels_file)
        if not isinstance(labels, dict) or not labels:
            raise DatasetError(f"SSv2 labels file {labels_file} must map templates to class indices")
        classes = {template: int(i) for template, i in labels.items()}
        self.num_classes = len(classes)
        split_file = annotation_dir / f"something-something-v2-{split}.json"
        entries = _read_json(split_file)
        if not isinstance(entries, list) or not entries:
            raise DatasetError(f"SSv2 split file {split_file} lists no videos")
        for n, entry in enumerate(entries):
            try:
                video_id = entry["id"]
                template = None if split == "test" else entry["template"].replace("[", "").replace("]", "")
            except (KeyError, TypeError, AttributeError) as err:
                raise DatasetError(f"SSv2 split file {split_file}: entry {n} lacks an id or a template") from err
            if template is not None and template not in classes:
                raise DatasetError(f"SSv2 video {video_id} in {split_file}: template {template!r} not in {labels_file}")
            self.videos.append((video_root / f"{video_id}.webm", -1 if template is None else classes[template]))


class VideoFolder(VideoClipDataset):
    """``<root>/<class>/<name>.{mp4,webm,avi,mkv}`` (Kinetics style); classes are the sorted folder names.

    Args:
        root: folder with one sub-folder per class.
        **kwargs: clip, crop, masking and replication options of :class:`VideoClipDataset`.
    """

    def __init__(self, root: str | Path, **kwargs) -> None:
        super().__init__(**kwargs)
        root = Path(root)
        if not root.is_dir():
            raise DatasetError(f"video folder not found: {root}")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.num_classes = len(self.classes)
        for label, name in enumerate(self.classes):
            files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
            self.videos.extend((p, label) for p in files)
        if not self.videos:
            raise DatasetError(f"no {'/'.join(VIDEO_EXTENSIONS)} videos in class folders under {root}")
