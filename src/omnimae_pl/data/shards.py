"""``omnimae-cli shards``: a folder source (ImageNet, SSv2, video folder) as litdata shards of its files.

    omnimae-cli shards --config configs/demo.yaml --source imagenet_demo --out /data/shards/imagenet_demo
    omnimae-cli shards --kind ssv2 --root /data/ssv2/videos --annotations /data/ssv2/labels --split train --out DIR

The source is taken from a training config's ``data`` section (``--config`` files composed as ``omnimae-cli fit``
composes them; ``--source`` picks one of several by name) or from ``--kind`` / ``--root`` /
``--annotations`` / ``--val-labels`` / ``--synsets``, which also override the config's fields. Each split (by
default every split the source names: ``split``, ``val_split``, ``test_split``) becomes ``OUT/<split>/``: one
record per item in the order the folder dataset numbers them, holding the file's bytes as they are (JPEG, WebM:
never decoded pixels, so the shards are the size of the files), its label and its path relative to the split
folder (SSv2: ``<id>.webm``), plus ``omnimae_shards.json`` (see :mod:`omnimae_pl.data.litdata_store`), written
last: a conversion that did not finish is refused when read.

Train from them with a source ``{kind: litdata, modality: image, root: OUT, split: train, val_split: val}``;
``OUT`` may be copied to an object store and named by its URL (``s3://bucket/prefix``). A file that cannot be read
during the conversion is stored empty (and said so): in training it is a counted placeholder, as it would be
read from the folder.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from litdata import File, Text, optimize

from omnimae_pl.data.imagenet import ImageNet
from omnimae_pl.data.litdata_store import META_FILE, META_FORMAT, is_url
from omnimae_pl.data.sources import KEY, SourceConfig
from omnimae_pl.data.video_datasets import SSv2, VideoFolder
from omnimae_pl.errors import ConfigError, DatasetError, UserError, check_value

FOLDER_KINDS = ("imagenet", "ssv2", "video_folder")


@dataclass
class Listing:
    """One split of a folder source, in its dataset's item order."""

    kind: str
    modality: str
    files: list[str]  # where to read each item
    names: list[str]  # each item's path relative to the split folder (SSv2: <id>.webm)
    labels: list[int]
    classes: list[str] | None  # class names in index order, where the dataset has them (not SSv2)
    num_classes: int


def list_split(cfg: SourceConfig, split: str) -> Listing:
    """The items of ``split`` of a folder source, listed by the dataset that trains on it (so in its order)."""
    if cfg.kind == "imagenet":
        images = ImageNet(cfg.root, split, val_labels=cfg.val_labels, synsets=cfg.synsets)
        names = [os.fsdecode(f) for f in images.files]
        files = [str(images.split_dir / name) for name in names]
        return Listing("imagenet", "image", files, [Path(n).as_posix() for n in names], images.labels.tolist(),
                       list(images.classes), images.num_classes)
    if cfg.kind == "ssv2":
        videos = SSv2(cfg.annotations, cfg.root, split)
        names, classes = [path.name for path, _ in videos.videos], None
    else:
        folder = Path(cfg.root) / split
        videos = VideoFolder(folder)
        names, classes = [path.relative_to(folder).as_posix() for path, _ in videos.videos], list(videos.classes)
    return Listing(cfg.kind, "video", [str(path) for path, _ in videos.videos], names, videos.labels, classes,
                   videos.num_classes)


@dataclass
class _Record:
    """``optimize``'s function: item index -> its record. litdata's own types (File, Text) keep litdata from
    guessing a format from the content (it would store bytes starting with ``%PDF`` as a PDF, and a name that
    happens to be a file's path as that file)."""

    listing: Listing

    def __call__(self, index: int) -> dict[str, Any]:
        path = self.listing.files[index]
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            print(f"omnimae-cli shards: cannot read {path} ({err.strerror}): stored empty, a placeholder in training",
                  file=sys.stderr, flush=True)
            data = b""
        return {"index": index, "name": Text(text=self.listing.names[index]), "label": self.listing.labels[index],
                "data": File(bytes=data)}


def convert(cfg: SourceConfig, split: str, out: str | os.PathLike, workers: int = 1, chunk_bytes: str = "64MB",
            overwrite: bool = False, verbose: bool = True) -> Path:
    """Write ``split`` of the folder source ``cfg`` as shards in ``out/split``; returns that folder."""
    listing = list_split(cfg, split)
    target = Path(out) / split
    if target.exists():
        if not overwrite and (not target.is_dir() or any(target.iterdir())):
            raise UserError(f"{target} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.mkdir(parents=True)
    optimize(
        fn=_Record(listing),
        inputs=list(range(len(listing.files))),
        output_dir=str(target),
        chunk_bytes=chunk_bytes,
        num_workers=workers,
        keep_data_ordered=True,  # each worker writes a contiguous run of items, so records keep the item order
        reorder_files=False,
        # the process's own method: litdata sets it for the whole process, and a forced "spawn" would slow down
        # every DataLoader started after it
        start_method=multiprocessing.get_start_method(),
        verbose=verbose,
    )
    meta = {"format": META_FORMAT, "kind": listing.kind, "modality": listing.modality, "split": split,
            "source": str(Path(cfg.root).resolve()), "classes": listing.classes, "num_classes": listing.num_classes,
            "names": listing.names, "labels": listing.labels}
    partial = target / f"{META_FILE}.partial"
    partial.write_text(json.dumps(meta))
    partial.replace(target / META_FILE)
    return target


def _config_source(configs: list[str], name: str | None) -> tuple[dict, str]:
    """(fields, config key) of the source named ``name`` (or the only one) in ``configs``, composed as
    ``omnimae-cli fit --config ... --config ...`` composes them (jsonargparse: a later file's list of sources
    updates the earlier one's item by item). A mistake in them is a one-line error, as for fit."""
    from lightning.pytorch import LightningDataModule, LightningModule

    from omnimae_pl.cli import TRAINER_DEFAULTS, OmniCLI, OneLineErrorParser

    class ConfigOnly(OmniCLI):
        def instantiate_classes(self) -> None:  # the parsed config is all that is needed
            pass

    for path in configs:
        if not Path(path).is_file():
            raise UserError(f"config {path} not found")
    parsed = ConfigOnly(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                        trainer_defaults=TRAINER_DEFAULTS, parser_class=OneLineErrorParser, save_config_callback=None,
                        seed_everything_default=False, parser_kwargs={"prog": "omnimae-cli fit"},
                        args=[a for path in configs for a in ("--config", path)], run=False).config
    init = parsed.data.init_args.as_dict() if parsed.get("data") is not None else {}
    if init.get("sources") is not None:
        candidates = [(s, f"{KEY}.sources[{i}]") for i, s in enumerate(init["sources"])]
    elif init.get("source") is not None:
        candidates = [(init["source"], f"{KEY}.source")]
    else:
        raise UserError(f"{', '.join(configs)}: no {KEY}.sources or {KEY}.source to convert")
    names = [s.get("name") or s.get("kind") for s, _ in candidates]
    if name is None:
        check_value(len(candidates) == 1, "--source", name, f"must name one of the config's sources {names}")
        return candidates[0]
    check_value(name in names, "--source", name, f"must be one of the config's sources {names}")
    return candidates[names.index(name)]


def source_from_args(args: argparse.Namespace) -> tuple[SourceConfig, str]:
    """The folder source to convert and its key for messages: the config's, with the explicit options over it."""
    fields_, key = _config_source(args.config, args.source) if args.config else ({}, "source")
    explicit = {"kind": args.kind, "root": args.root, "annotations": args.annotations, "val_labels": args.val_labels,
                "synsets": args.synsets}
    fields_ = {**fields_, **{k: v for k, v in explicit.items() if v is not None}}
    known = {f.name for f in fields(SourceConfig)}
    for field in fields_:
        if field not in known:
            raise ConfigError(f"{key}.{field}={fields_[field]!r}: not a source field (fields: {sorted(known)})")
    check_value("kind" in fields_ and "root" in fields_, key, fields_,
                "needs a kind and a root: pass --config (and --source) or --kind and --root")
    cfg = SourceConfig(**fields_)
    cfg.check(key)
    check_value(cfg.kind in FOLDER_KINDS, f"{key}.kind", cfg.kind, f"must be a folder source {FOLDER_KINDS} to convert")
    if not Path(cfg.root).is_dir():
        raise DatasetError(f"{key}.root={cfg.root!r}: not a folder")
    return cfg, key


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="omnimae-cli shards",
        description="Write a folder source (ImageNet, SSv2, video folder) as litdata shards of its encoded files "
        "(read them with a source of kind: litdata).",
    )
    parser.add_argument("--config", action="append", default=[],
                        help="training config (repeatable, later ones win): the source comes from its data section")
    parser.add_argument("--source", help="name of the config's source to convert (needed when it has several)")
    parser.add_argument("--kind", choices=FOLDER_KINDS, help="the source's kind (without --config, or over it)")
    parser.add_argument("--root", help="the source's root folder (as in a config's source)")
    parser.add_argument("--annotations", help="ssv2: the folder of the something-something-v2-*.json files")
    parser.add_argument("--val-labels", help="imagenet with a flat val folder (see omnimae_pl.data.imagenet)")
    parser.add_argument("--synsets", help="imagenet with the devkit's ground truth (see omnimae_pl.data.imagenet)")
    parser.add_argument("--split", nargs="+",
                        help="split(s) to convert (default: those the source names: split, val_split, test_split)")
    parser.add_argument("--out", required=True, help="local folder that receives OUT/<split>/")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards (litdata's num_workers)")
    parser.add_argument("--chunk-bytes", default="64MB", help="target size of a shard file (default 64MB)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing OUT/<split>/ folders")
    args = parser.parse_args(argv)

    check_value(args.workers >= 1, "--workers", args.workers, "must be an integer >= 1")
    check_value(not is_url(args.out), "--out", args.out,
                "must be a local folder (copy it to the object store afterwards, e.g. aws s3 sync)")
    cfg, _ = source_from_args(args)
    splits = args.split or list(dict.fromkeys(s for s in (cfg.split, cfg.val_split, cfg.test_split) if s))
    check_value(bool(splits), "--split", args.split, "must name a split: the source names none")
    for split in splits:
        target = convert(cfg, split, args.out, args.workers, args.chunk_bytes, args.overwrite)
        count = len(json.loads((target / META_FILE).read_text())["labels"])
        size = sum(p.stat().st_size for p in target.iterdir())
        print(f"omnimae-cli shards: {cfg.kind} {cfg.name!r} split {split}: {count} items, {size / 1e6:.1f} MB "
              f"-> {target}")
    stages = [f"{field}: {getattr(cfg, field)}" for field in ("split", "val_split", "test_split")
              if getattr(cfg, field)]
    entries = ", ".join([f"name: {cfg.name}", "kind: litdata", f"modality: {cfg.modality}",
                         f"root: {Path(args.out).resolve()}", *stages])
    print(f"source for a config: {{{entries}}}")
