"""What a data config names: the sources on disk (``SourceConfig``) and the per-modality masking, with the
checks that run when the config is read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from omnimae_pl.data.video_datasets import SSV2_SPLITS
from omnimae_pl.errors import check_value
from omnimae_pl.masking import MaskingConfig

# kind -> modality; litdata shards hold either, named by the source's `modality`
KINDS = {"imagenet": "image", "ssv2": "video", "video_folder": "video", "litdata": None}
MODALITIES = ("image", "video")
KEY = "data.init_args"  # where the CLI's config holds the datamodule's arguments, for error messages


class ImageMasking(MaskingConfig):
    """The image masking of :class:`PretrainDataModule`: a mistake in it names ``data.init_args.image_masking``."""

    key = f"{KEY}.image_masking"


class VideoMasking(MaskingConfig):
    """The video masking of :class:`PretrainDataModule`: a mistake in it names ``data.init_args.video_masking``."""

    key = f"{KEY}.video_masking"


@dataclass
class SourceConfig:
    """One dataset on disk.

    kind: "imagenet" (``<root>/<split>/<class>/*.JPEG``, or a flat val folder with ``val_labels``),
        "video_folder" (``<root>/<split>/<class>/*.{mp4,webm,avi,mkv}``), "ssv2" (``root`` holds
        ``<id>.webm``; ``annotations`` the ``something-something-v2-*.json`` files; splits train/validation/test)
        or "litdata" (``<root>/<split>/``: shards written by ``omnimae-cli shards``; ``root`` a folder or a URL
        such as ``s3://bucket/prefix``; see ``data.litdata_store``).
    name: tag of the batches (``batch["source"]``) and of logged counts; default: ``kind``.
    split / val_split / test_split: the split of each stage; None: this source has no such stage.
    weight: share of the pretraining steps (given for every source or none; see ``data.interleave``).
    num_workers: loader workers for this source; default: the datamodule's.
    val_labels, synsets: imagenet with a flat val folder (see ``data.imagenet``).
    modality: "image" or "video": what litdata shards hold (checked against them); other kinds know theirs.
    cache_dir: litdata: where litdata keeps what it fetches from an object store (default ``$LITDATA_CACHE_DIR``,
        else ``~/.lightning/chunks``). A litdata source ignores annotations, val_labels and synsets (its shards
        hold the labels), which a config layered over a folder source's config may leave in place.
    """

    kind: str
    root: str
    name: str | None = None
    split: str | None = "train"
    val_split: str | None = None
    test_split: str | None = None
    annotations: str | None = None
    weight: float | None = None
    num_workers: int | None = None
    val_labels: str | None = None
    synsets: str | None = None
    modality: Literal["image", "video"] | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = self.kind
        if self.modality is None:
            self.modality = KINDS.get(self.kind)

    def check(self, key: str) -> None:
        """Refuse values this source cannot have, naming ``<key>.<field>`` (``key``: its place in the config).
        The datamodules check their sources when they are made; the folders are looked at when a dataset is built."""
        check_value(self.kind in KINDS, f"{key}.kind", self.kind, f"must be one of {sorted(KINDS)}")
        if self.kind == "litdata":
            check_value(self.modality in MODALITIES, f"{key}.modality", self.modality,
                        f"must be one of {MODALITIES}: what the shards hold (kind litdata)")
        else:
            check_value(self.modality == KINDS[self.kind], f"{key}.modality", self.modality,
                        f"must be {KINDS[self.kind]!r} (or null) for kind {self.kind}")
        if self.kind == "ssv2":
            check_value(bool(self.annotations), f"{key}.annotations", self.annotations,
                        "must be the folder of the something-something-v2-*.json files")
            for field in ("split", "val_split", "test_split"):
                split = getattr(self, field)
                check_value(split is None or split in SSV2_SPLITS, f"{key}.{field}", split,
                            f"must be one of the SSv2 splits {SSV2_SPLITS} or null")
        check_value(self.weight is None or self.weight >= 0, f"{key}.weight", self.weight, "must be >= 0 or null")
        check_value(self.num_workers is None or self.num_workers >= 0, f"{key}.num_workers", self.num_workers,
                    "must be >= 0 or null (the datamodule's)")


def check_sources(sources: list[SourceConfig]) -> None:
    """What the pretraining sources must be together: each one valid, a training split, unique names, and
    ``weight`` given for all trained sources or for none."""
    check_value(any(cfg.split is not None for cfg in sources), f"{KEY}.sources", [cfg.name for cfg in sources],
                "must hold at least one source with a training split (split: train)")
    names = [cfg.name for cfg in sources]
    for i, cfg in enumerate(sources):
        cfg.check(f"{KEY}.sources[{i}]")
        check_value(names.index(cfg.name) == i, f"{KEY}.sources[{i}].name", cfg.name,
                    f"must differ from the other sources' names {names[:i]}")
    weights = [cfg.weight for cfg in sources if cfg.split is not None]
    if any(w is not None for w in weights):
        check_value(None not in weights and sum(weights) > 0, f"{KEY}.sources[].weight", weights,
                    "must be given for every trained source or for none, and not all 0")
