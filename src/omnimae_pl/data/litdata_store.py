"""Sources stored as litdata shards (``kind: litdata``): the items of a folder source, read by index from a
local folder or an object store, through the folder datasets' own decoding, augmentation, replication, masks and
(seed, epoch, index) draws. Only "read the encoded file of item i" differs: :class:`ImageShards` and
:class:`VideoShards` are :class:`~omnimae_pl.data.imagenet.ImageNet` and
:class:`~omnimae_pl.data.video_datasets.VideoClipDataset` with the file read replaced by a :class:`ShardStore`.

Layout, as ``omnimae-cli shards --out ROOT`` writes it (``data.shards``), one folder per split:

    ROOT/<split>/index.json, chunk-*.bin   litdata's shards: one record per item, in the folder source's item
                                           order: index, name (the file's path relative to the split folder;
                                           SSv2: ``<id>.webm``), label, data (the file's bytes as they were,
                                           JPEG / WebM: never decoded pixels)
    ROOT/<split>/omnimae_shards.json       what the main process needs without reading a chunk: kind, modality,
                                           classes, and every item's name and label

``ROOT`` is a folder or a URL litdata reads: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``azure://container/prefix`` (credentials as the store's client finds them), or ``local:/path`` (a folder read
the way a store is, through the cache). From a store each record is fetched on its own (a ranged read of its
bytes), so random access needs no local copy of the chunks; ``cache_dir`` (default: ``$LITDATA_CACHE_DIR``, else
``~/.lightning/chunks``) holds litdata's copy of ``index.json`` and, for ``local:`` and compressed shards, whole
chunks.

Order and resume stay with the interleaver (its per-rank shards, its (seed, epoch) shuffles, its position in the
checkpoint): litdata's shuffling, its StreamingDataLoader and that loader's state are not used (litdata #775: the
state is not restored on resume under Lightning). Every process opens its own reader on its first read, so
DataLoader workers never use one made in their parent (litdata readers hold mmaps and threads).

A record that cannot be had (a missing chunk, a store's error, shards out of order) is an OSError, which the
datasets turn into a counted placeholder, as a file that cannot be read; so is a record whose bytes do not decode.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from omnimae_pl.data.imagenet import ImageNet
from omnimae_pl.data.sample import failure_reason
from omnimae_pl.data.video_datasets import VideoClipDataset
from omnimae_pl.errors import DatasetError

if TYPE_CHECKING:
    from litdata import StreamingDataset

META_FILE = "omnimae_shards.json"
META_FORMAT = 1
INDEX_FILE = "index.json"  # litdata's


def is_url(root: str | os.PathLike) -> bool:
    """True for a location litdata reads through a downloader (``s3://``, ``gs://``, ``local:`` ...)."""
    return "://" in str(root) or str(root).startswith("local:")


def split_location(root: str | os.PathLike, split: str) -> str:
    """The shards of ``split`` under ``root``: ``root/split`` (a URL keeps its form)."""
    return f"{str(root).rstrip('/')}/{split}" if is_url(root) else str(Path(root) / split)


class ShardReadError(OSError):
    """A record that could not be read; the message names the record and the shards."""


class ShardStore:
    """Random access to the records of one split's shards by item index (``read(i)`` -> the file's bytes).

    Made in the main process, it reads ``omnimae_shards.json`` (names, labels, classes) and checks it against
    litdata's ``index.json``; the litdata reader itself is opened in each process on its first read.
    """

    def __init__(self, location: str, cache_dir: str | None = None) -> None:
        self.location = location
        self.cache_dir = cache_dir
        meta, index = _read_json(location, META_FILE), _read_json(location, INDEX_FILE)
        where = f"{location}/{META_FILE}"
        if meta.get("format") != META_FORMAT:
            raise DatasetError(f"{where}: format {meta.get('format')!r}, not {META_FORMAT}; rebuild the shards with "
                               "omnimae-cli shards")
        try:
            self.kind, self.modality = str(meta["kind"]), str(meta["modality"])
            self.classes: list[str] | None = meta["classes"]
            self.num_classes = int(meta["num_classes"])
            names, labels = meta["names"], meta["labels"]
            records = sum(int(chunk["chunk_size"]) for chunk in index["chunks"])
        except (KeyError, TypeError, ValueError) as err:
            raise DatasetError(f"{where} or its {INDEX_FILE} lacks {err}; rebuild the shards with omnimae-cli "
                               "shards") from None
        if not (len(names) == len(labels) == records) or not records:
            raise DatasetError(f"{where} lists {len(names)} items and {len(labels)} labels, its shards hold "
                               f"{records} records: an unfinished conversion? rebuild with omnimae-cli shards")
        # Flat arrays, as ImageNet's listing: no per-item Python objects for forked workers to copy.
        self.names = np.array([os.fsencode(name) for name in names])
        self.labels = np.array(labels, dtype=np.int64)
        self._reader: StreamingDataset | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def expect(self, modality: str) -> None:
        if self.modality != modality:
            raise DatasetError(f"{self.location} holds {self.modality} shards ({self.kind}), not {modality}: "
                               f"set modality: {self.modality}")

    def describe(self, index: int) -> str:
        return f"{self.location} record {index} ({os.fsdecode(self.names[index])})"

    def read(self, index: int) -> bytes:
        """The bytes of item ``index``'s file; raises :class:`ShardReadError`."""
        try:
            record = self._open()[index]
        except Exception as err:  # litdata and each object store's client raise errors of their own
            raise ShardReadError(f"cannot read {self.describe(index)}: {failure_reason(err)}") from err
        if record["index"] != index:
            raise ShardReadError(f"{self.location} record {index} holds item {record['index']}: shards out of "
                                 "order; rebuild them with omnimae-cli shards")
        return bytes(record["data"])  # a copy: litdata hands out a view of its mapped chunk

    def _open(self) -> StreamingDataset:
        if self._pid != os.getpid():  # first read in this process (a fork copies the parent's reader: not used)
            from litdata import StreamingDataset  # here: importing litdata takes a second, and few runs need it

            self._reader = StreamingDataset(self.location, cache_dir=self.cache_dir)
            self._pid = os.getpid()
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        # spawned workers get the listing, never a reader
        return {**self.__dict__, "_reader": None, "_pid": None}


def _read_json(location: str, name: str) -> dict:
    """``location/name`` as JSON: read in place from a folder, through a fresh temporary folder from a store
    (so that ranks never share a half-written copy, and a rebuilt store is never read from a stale one)."""
    where = f"{location}/{name}"
    if not is_url(location):
        path = Path(location) / name
        if not path.is_file():
            raise DatasetError(f"{path} not found: {location} is not a split of shards written by omnimae-cli shards")
        text = path.read_text()
    else:
        from litdata.streaming.downloader import get_downloader

        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, name)
            try:
                get_downloader(location, tmp, []).download_file(where, local)
            except Exception as err:  # each object store's client raises errors of its own
                raise DatasetError(f"cannot read {where}: {failure_reason(err)}") from err
            if not os.path.isfile(local):  # some downloaders give up silently
                raise DatasetError(f"cannot read {where}: missing, or no access to it")
            text = Path(local).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where} is not a JSON object")
    return data


class ImageShards(ImageNet):
    """An image source stored as shards (``root/<split>``, see the module's docstring): the same items, labels,
    classes and samples as the :class:`ImageNet` it was converted from. ``options``: ImageNet's transform,
    masking and seed arguments; ``cache_dir``: litdata's cache for a store."""

    def __init__(self, root: str | os.PathLike, split: str = "train", cache_dir: str | None = None,
                 **options: Any) -> None:
        self.cache_dir = cache_dir
        super().__init__(root, split, **options)

    def _load_items(self, root, split, val_labels, synsets) -> None:
        self.store = ShardStore(split_location(root, split), self.cache_dir)
        self.store.expect("image")
        self.root, self.split = root, split
        self.classes = self.store.classes or [str(i) for i in range(self.store.num_classes)]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.files, self.labels = self.store.names, self.store.labels
        self.records = np.arange(len(self.labels))  # item -> record, which keep() must follow

    def keep(self, indices: np.ndarray) -> None:
        super().keep(indices)
        self.records = self.records[indices]

    def describe(self, index: int) -> str:
        return self.store.describe(int(self.records[index]))

    def encoded(self, index: int) -> io.BytesIO:
        return io.BytesIO(self.store.read(int(self.records[index])))


class VideoShards(VideoClipDataset):
    """A video source stored as shards (``root/<split>``): the same items and samples as the SSv2 or
    VideoFolder dataset it was converted from. ``kwargs``: the clip, crop, masking and replication options of
    :class:`VideoClipDataset`; ``cache_dir``: litdata's cache for a store."""

    def __init__(self, root: str | os.PathLike, split: str = "train", cache_dir: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store = ShardStore(split_location(root, split), cache_dir)
        self.store.expect("video")
        self.classes = self.store.classes
        self.num_classes = self.store.num_classes
        self.videos = [(os.fsdecode(name), int(label)) for name, label in zip(self.store.names, self.store.labels)]
        self.records = list(range(len(self.videos)))

    def keep(self, indices) -> None:
        super().keep(indices)
        self.records = [self.records[i] for i in indices]

    def describe(self, index: int) -> str:
        return self.store.describe(self.records[index])

    def encoded(self, index: int) -> bytes:
        return self.store.read(self.records[index])
