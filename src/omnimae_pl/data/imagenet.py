"""ImageNet (or any ``<root>/<split>/<class>/<image>`` tree) as samples for pretraining and classification.

Layouts:
  * foldered: ``<root>/<split>/<wnid>/*.JPEG`` (train always; val once sorted into class folders);
  * flat val as extracted from ``ILSVRC2012_img_val.tar``: ``<root>/<split>/*.JPEG`` plus ``val_labels``, either
      - ``<filename> <wnid>`` per line (the extension is optional; a comma may replace the space, and anything
        after the wnid is ignored, so Kaggle's ``LOC_val_solution.csv`` works as is), or
      - the devkit's ``ILSVRC2012_validation_ground_truth.txt``: one 1-based ILSVRC2012 id per line, line k for
        the k-th file in sorted order; then ``synsets`` must name a text file whose line i starts with the wnid
        of ILSVRC2012 id i (the order of the devkit's ``meta.mat``, which is *not* sorted wnid order).

Class index = position in the sorted wnids of ``<root>/train``; without a train folder, the sorted wnids of
``synsets``, else the split's own class folders.

Files that cannot be decoded (missing, empty, truncated, not an image) give a placeholder with
``valid=False`` and the same shapes; the loss skips it and ``BadSampleTracker`` counts it. A folder or labels
file that is missing, empty or does not match raises :class:`~omnimae_pl.errors.DatasetError` naming the path.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from omnimae_pl.constants import IMAGENET_MEAN
from omnimae_pl.data.image_transforms import ImageTransform, RandomResizedCropFlip, ResizeCenterCrop
from omnimae_pl.data.sample import failure_reason, make_sample
from omnimae_pl.data.seeding import sample_generator, split_key
from omnimae_pl.errors import DatasetError
from omnimae_pl.masking import MaskingConfig

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class ImageNet(Dataset):
    """Decoded, augmented and masked images; ``dataset[index]`` or ``dataset[(index, epoch)]`` -> sample dict
    (see ``omnimae_pl.data.sample``). Crop, flip and mask are drawn from ``sample_generator(seed, epoch, index)``.

    ``train`` picks the transform: RandomResizedCrop + flip (``scale``, ``hflip_prob``) when True, resize +
    centre crop (``crop_ratio``) when False; default: ``split == "train"``. ``transform`` replaces both (any
    callable ``(PIL image, generator) -> (3, img_size, img_size) tensor``), the hook for fine-tuning augmentation.
    ``augment_on="device"`` (training with the default transform only): samples hold the uint8 crop and its
    ``flip``; ``device_augment`` flips and normalises them on the device (see ``sample.py``).
    ``decode_on="device"`` (with ``augment_on="device"``): the worker reads the file and its header only and
    ships the JPEG bytes with the crop box and flip drawn from the header's size, the same draws as the worker
    path; ``device_decode`` decodes, crops and resizes them. Files the device's decoder does not take (see
    :func:`device_decodable`) are decoded here as with ``decode_on="worker"``.
    """

    modality = "image"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        train: bool | None = None,
        img_size: int = 224,
        scale: tuple[float, float] = (0.2, 1.0),
        hflip_prob: float = 0.5,
        crop_ratio: float = 1.0,
        interpolation: str = "bicubic",
        transform: ImageTransform | None = None,
        masking: MaskingConfig | None = None,
        patch_size: tuple[int, int, int] = (2, 16, 16),
        seed: int = 0,
        val_labels: str | os.PathLike | None = None,
        synsets: str | os.PathLike | None = None,
        augment_on: str = "worker",
        decode_on: str = "worker",
    ) -> None:
        self._load_items(root, split, val_labels, synsets)
        if train is None:
            train = split == "train"
        if augment_on not in ("worker", "device"):
            raise ValueError(f"augment_on must be 'worker' or 'device', got {augment_on!r}")
        if augment_on == "device" and not (train and transform is None):
            raise ValueError("augment_on='device' needs the default training transform (RandomResizedCropFlip)")
        if decode_on not in ("worker", "device"):
            raise ValueError(f"decode_on must be 'worker' or 'device', got {decode_on!r}")
        if decode_on == "device" and augment_on != "device":
            raise ValueError("decode_on='device' needs augment_on='device' (the crop is cut after the decode)")
        self.augment_on = augment_on
        self.decode_on = decode_on
        if transform is None:
            transform = (
                RandomResizedCropFlip(img_size, scale=scale, hflip_prob=hflip_prob, interpolation=interpolation)
                if train
                else ResizeCenterCrop(img_size, crop_ratio=crop_ratio, interpolation=interpolation)
            )
        self.transform = transform
        self.img_size = img_size
        self.masking = masking
        self.patch_size = tuple(patch_size)
        self.seed = seed
        self.epoch = 0

    def _load_items(
        self,
        root: str | os.PathLike,
        split: str,
        val_labels: str | os.PathLike | None,
        synsets: str | os.PathLike | None,
    ) -> None:
        """List the split: ``classes``, ``class_to_idx``, and per item its file (``files``, relative to
        ``split_dir``) and class (``labels``), in the order that numbers the items."""
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise DatasetError(f"ImageNet root {self.root} is not a directory")
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise DatasetError(f"ImageNet split folder {split_dir} is not a directory")
        synset_order = _read_synsets(Path(synsets)) if synsets is not None else None
        self.classes = _class_names(self.root, split_dir, synset_order)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        samples = self._list_samples(split_dir, val_labels, synset_order)
        if not samples:
            raise DatasetError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {split_dir}")
        # Two flat arrays instead of a list of 1.28 M Python objects, whose reference counts would make every
        # DataLoader worker copy them (the copy-on-write problem of forked workers).
        self.split_dir = split_dir
        self.files = np.array([os.fsencode(path.relative_to(split_dir)) for path, _ in samples])
        self.labels = np.array([label for _, label in samples], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def keep(self, indices: np.ndarray) -> None:
        """Restrict the dataset to ``indices`` (e.g. a labelled fraction), in their order."""
        self.files, self.labels = self.files[indices], self.labels[indices]

    def set_epoch(self, epoch: int) -> None:
        """The epoch used for keys given as a bare index (the interleaver passes ``(index, epoch)`` instead)."""
        self.epoch = epoch

    def describe(self, index: int) -> str:
        return str(self.split_dir / os.fsdecode(self.files[index]))

    def encoded(self, index: int) -> str | BinaryIO:
        """The encoded image of item ``index``, as ``PIL.Image.open`` takes it: here the path of its file (the
        litdata shards give its bytes instead); raises OSError when it cannot be had."""
        return self.describe(index)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = split_key(key, self.epoch)
        label = int(self.labels[index])
        error = ""
        device = self.augment_on == "device"
        encoded = self.decode_on == "device"
        extra = {}
        try:
            generator = sample_generator(self.seed, epoch, index, "crop")
            if encoded:
                pixels, extra = self.read_encoded(index, generator)
            else:
                with Image.open(self.encoded(index)) as image:
                    if device:
                        pixels, flip = self.transform.crop_uint8(image, generator)
                        extra["flip"] = torch.tensor(flip)
                    else:
                        pixels = self.transform(image, generator)
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
            # OSError: missing, empty, truncated and non-image files; PIL's plugins raise the others on
            # corrupt headers and chunks.
            pixels = mean_image(self.img_size, device)
            extra = {"flip": torch.tensor(False)} if device else {}
            if encoded:
                extra["jpeg"] = _NO_BYTES
            error = failure_reason(err)
        mask_generator = sample_generator(self.seed, epoch, index, "mask") if self.masking is not None else None
        return make_sample(
            pixels, label, not error, index, self.masking, self.patch_size, mask_generator, error,
            (3, self.img_size, self.img_size) if pixels is None else None, **extra,
        )

    def read_encoded(self, index: int, generator: torch.Generator) -> tuple[torch.Tensor | None, dict]:
        """``decode_on="device"``: (None, the file's bytes as ``jpeg``, the crop ``box`` and ``flip``) for a file
        the device decodes; (the uint8 crop, an empty ``jpeg`` and ``flip``) for one decoded here instead."""
        with Image.open(self.encoded(index)) as image:  # the header only: size, format, mode
            image.fp.seek(0)  # then the whole file (a decode here seeks to its data itself)
            data = image.fp.read()
            if device_decodable(image, data):
                box, flip = self.transform.draw(*image.size, generator)
                jpeg = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return None, {"jpeg": jpeg, "box": box, "flip": torch.tensor(flip)}
            pixels, flip = self.transform.crop_uint8(image, generator)
            return pixels, {"jpeg": _NO_BYTES, "flip": torch.tensor(flip)}

    def _list_samples(
        self, split_dir: Path, val_labels: str | os.PathLike | None, synset_order: list[str] | None
    ) -> list[tuple[Path, int]]:
        if class_dirs := _subfolders(split_dir):
            samples = []
            for name in class_dirs:
                if name not in self.class_to_idx:
                    raise DatasetError(f"class folder {split_dir / name} is not one of the {len(self.classes)} classes")
                label = self.class_to_idx[name]
                samples.extend((path, label) for path in _images_in(split_dir / name))
            return samples
        if val_labels is None:
            raise DatasetError(f"{split_dir} has no class folders; pass val_labels (see omnimae_pl.data.imagenet)")
        return self._labelled_flat(split_dir, Path(val_labels), synset_order)

    def _labelled_flat(
        self, split_dir: Path, labels_file: Path, synset_order: list[str] | None
    ) -> list[tuple[Path, int]]:
        files = _images_in(split_dir)
        lines = _read_lines(labels_file)
        if lines and lines[0].isdigit():  # the devkit's ids, one per file in sorted order
            if synset_order is None:
                raise DatasetError(f"{labels_file} holds ILSVRC2012 ids; pass synsets= to map them to wnids")
            if len(lines) != len(files):
                raise DatasetError(f"{labels_file} has {len(lines)} labels for {len(files)} images in {split_dir}")
            return [(path, self._label_of(_synset_of(line, synset_order), labels_file)) for path, line in zip(files, lines)]
        by_stem: dict[str, int] = {}
        for number, line in enumerate(lines):
            name, wnid = (re.split(r"[,\s]+", line) + [""])[:2]
            if number == 0 and wnid not in self.class_to_idx:  # a header such as "ImageId,PredictionString"
                continue
            by_stem[Path(name).stem] = self._label_of(wnid, labels_file)
        missing = [path.name for path in files if path.stem not in by_stem]
        if missing:
            raise DatasetError(
                f"{labels_file} has no label for {len(missing)} images in {split_dir}, e.g. {missing[0]}"
            )
        return [(path, by_stem[path.stem]) for path in files]


    def _label_of(self, wnid: str, labels_file: Path) -> int:
        if wnid not in self.class_to_idx:
            raise DatasetError(f"{labels_file}: {wnid!r} is not one of the {len(self.classes)} classes")
        return self.class_to_idx[wnid]


def device_decodable(image: Image.Image, data: bytes) -> bool:
    """Whether nvJPEG (``torchvision.io.decode_jpeg``) can take this file, judged from its header and bytes:
    JPEG content whatever the name (a PNG behind .JPEG is not), greyscale or YCbCr (CMYK / YCCK are not),
    and complete (it ends with the end-of-image marker: a truncated file is left to the worker's decoder, which
    turns it into a placeholder here, before it reaches the device)."""
    return image.format == "JPEG" and image.mode in ("L", "RGB") and data.rstrip(b"\0").endswith(b"\xff\xd9")


_NO_BYTES = torch.empty(0, dtype=torch.uint8)  # the ``jpeg`` of a sample the worker decoded


def mean_image(size: int, uint8: bool) -> torch.Tensor:
    """A placeholder's input: the mean image, as uint8 (device augmentation) or normalised (zeros)."""
    if not uint8:
        return torch.zeros(3, size, size)
    mean = torch.tensor([round(255 * m) for m in IMAGENET_MEAN], dtype=torch.uint8)
    return mean.view(3, 1, 1).expand(3, size, size).clone()


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        Path(e.path) for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError as err:
        raise DatasetError(f"cannot read {path}: {err.strerror}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_synsets(path: Path) -> list[str]:
    """Line i (0-based) -> the wnid of ILSVRC2012 id i + 1: the first token of each line."""
    return [line.split()[0] for line in _read_lines(path)]


def _synset_of(ilsvrc_id: str, synset_order: list[str]) -> str:
    """The wnid of a 1-based ILSVRC2012 id; an id outside the synsets list becomes a name no class has."""
    number = int(ilsvrc_id) if ilsvrc_id.isdigit() else 0
    return synset_order[number - 1] if 1 <= number <= len(synset_order) else f"ILSVRC2012 id {ilsvrc_id}"


def _class_names(root: Path, split_dir: Path, synset_order: list[str] | None) -> list[str]:
    if names := _subfolders(root / "train"):
        return names
    if synset_order is not None:
        return sorted(set(synset_order))
    if names := _subfolders(split_dir):
        return names
    looked = " or ".join(dict.fromkeys(str(folder) for folder in (root / "train", split_dir)))
    raise DatasetError(f"no class folders in {looked}; pass synsets= to name the classes")


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir()) if folder.is_dir() else []
