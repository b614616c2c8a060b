"""Sources of kind litdata: ``omnimae-cli shards`` writes a folder source's files into litdata shards, and reading
them gives the folder source's samples, bit for bit, through the same interleaver: on DataLoader workers, from a
store URL, on two ranks, across a SIGKILL and ``fit --ckpt_path last``; a corrupt record is a counted placeholder."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml
from cli_helpers import DEMO, run_config
from reliability_helpers import checkpointed_config, fit_in_process, read_steps, start_fit
from torch.utils.data import DataLoader
from video_helpers import truncate_file, write_test_video

from omnimae_pl import cli
from omnimae_pl.data.datamodule import PretrainDataModule
from omnimae_pl.data.imagenet import ImageNet
from omnimae_pl.data.litdata_store import META_FILE, ImageShards, ShardStore, VideoShards
from omnimae_pl.data.sample import collate_samples
from omnimae_pl.data.shards import convert, list_split
from omnimae_pl.data.sources import SourceConfig
from omnimae_pl.data.video_datasets import SSv2, VideoFolder
from omnimae_pl.errors import ConfigError, DatasetError, UserError
from omnimae_pl.masking import MaskingConfig

IMAGE = {"img_size": 32, "masking": MaskingConfig("random", 0.75), "patch_size": (2, 8, 8), "seed": 3}
VIDEO = {"num_frames": 4, "crop_size": 32, "short_side": 36, "masking": MaskingConfig("random", 0.9),
         "patch_size": (2, 8, 8), "replicas": 2, "seed": 3}
TOOL = ("omnimae_pl.data.shards", "write a folder source as litdata shards of its encoded files")


@pytest.fixture(scope="module")
def shards(demo_root, tmp_path_factory) -> Path:
    """The demo sources as shards: ``<out>/imagenet/{train,val}`` (two writers) and ``<out>/ssv2/train``."""
    out = tmp_path_factory.mktemp("shards")
    images = SourceConfig("imagenet", str(demo_root / "imagenet"))
    for split in ("train", "val"):
        convert(images, split, out / "imagenet", workers=2, verbose=False)
    convert(SourceConfig("ssv2", str(demo_root / "ssv2" / "videos"), annotations=str(demo_root / "ssv2")), "train",
            out / "ssv2", verbose=False)
    return out


def _same_samples(a, b) -> None:
    """Two samples (or lists of replicas) equal in every tensor and label."""
    for x, y in zip(a, b) if isinstance(a, list) else [(a, b)]:
        assert x.keys() == y.keys()
        for key in ("input", "mask", "label", "valid", "index"):
            assert torch.equal(x[key], y[key]), key


def test_records_hold_the_files_bytes_labels_and_names_in_the_folder_order(demo_root, shards):
    for cfg, split, out in [
        (SourceConfig("imagenet", str(demo_root / "imagenet")), "train", shards / "imagenet"),
        (SourceConfig("ssv2", str(demo_root / "ssv2" / "videos"), annotations=str(demo_root / "ssv2")), "train",
         shards / "ssv2"),
    ]:
        listing = list_split(cfg, split)
        store = ShardStore(str(out / split))
        assert len(store) == len(listing.files) > 20
        assert [os.fsdecode(n) for n in store.names] == listing.names and store.labels.tolist() == listing.labels
        assert all(store.read(i) == Path(f).read_bytes() for i, f in enumerate(listing.files))  # encoded, as is
    assert len(list((shards / "imagenet" / "train").glob("chunk-*.bin"))) == 2  # two writers kept the order


def test_litdata_datasets_give_the_folder_datasets_samples(demo_root, shards):
    folder = ImageNet(demo_root / "imagenet", "train", **IMAGE)
    stored = ImageShards(shards / "imagenet", "train", **IMAGE)
    assert (stored.classes, stored.num_classes) == (folder.classes, folder.num_classes)
    for index in range(len(folder)):
        _same_samples(folder[(index, 2)], stored[(index, 2)])
    for dataset in (folder, stored):  # a labelled fraction: item i is then another record
        dataset.keep(np.array([5, 0, 7]))
    for index in range(3):
        _same_samples(folder[index], stored[index])
    assert stored.describe(0) == f"{shards / 'imagenet' / 'train'} record 5 ({os.fsdecode(folder.files[0])})"
    for train in (True, False):  # training draws, and the fixed evaluation views
        options = {**VIDEO, "train": train, "num_clips": 1 if train else 2}
        videos = SSv2(demo_root / "ssv2", demo_root / "ssv2" / "videos", "train", **options)
        stored_videos = VideoShards(shards / "ssv2", "train", **options)
        assert stored_videos.num_classes == videos.num_classes
        for index in range(0, len(videos), 3):
            _same_samples(videos[(index, 1)], stored_videos[(index, 1)])


def _pretraining(sources: list[SourceConfig], **options) -> PretrainDataModule:
    return PretrainDataModule(sources, image_batch_size=8, video_batch_size=8, replicas=4, img_size=32,
                              num_frames=4, short_side=36, patch_size=(2, 8, 8), num_workers=0,
                              persistent_workers=False, pin_memory=False, **options)


def _litdata_sources(shards: Path) -> list[SourceConfig]:
    return [SourceConfig("litdata", str(shards / "imagenet"), name="imagenet_demo", val_split="val", modality="image"),
            SourceConfig("litdata", str(shards / "ssv2"), name="ssv2_demo", modality="video")]


def test_a_litdata_datamodule_gives_the_folder_datamodules_batches(demo_root, shards):
    folder = _pretraining([
        SourceConfig("imagenet", str(demo_root / "imagenet"), name="imagenet_demo", val_split="val"),
        SourceConfig("ssv2", str(demo_root / "ssv2" / "videos"), name="ssv2_demo", annotations=str(demo_root / "ssv2")),
    ])
    stored = _pretraining(_litdata_sources(shards))
    assert stored.num_classes == folder.num_classes and stored.steps_per_epoch() == folder.steps_per_epoch()
    a, b = folder.train_dataloader(), stored.train_dataloader()
    for loader in (a, b):
        loader.set_epoch(1)
    for x, y in zip(a, b, strict=True):  # the interleaver's whole epoch: same order, same tensors
        assert (x["source"], x["modality"]) == (y["source"], y["modality"])
        for key in ("input", "mask", "label", "valid", "index"):
            assert torch.equal(x[key], y[key]), key
    (x,), (y,) = [[next(iter(loader)) for loader in dm.val_dataloader()] for dm in (folder, stored)]
    assert torch.equal(x["input"], y["input"]) and torch.equal(x["mask"], y["mask"])


def test_loader_workers_open_their_own_reader_and_a_pickle_carries_none(shards):
    dataset = ImageShards(shards / "imagenet", "train", **IMAGE)
    expected = [dataset[i] for i in range(8)]  # this process's reader is open now; forked workers must not use it
    collate = lambda items: collate_samples(items, "image", "x")  # noqa: E731
    batch = next(iter(DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate)))
    assert torch.equal(batch["input"], torch.stack([s["input"] for s in expected]))
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned worker receives
    _same_samples(copy[5], expected[5])


def test_a_store_url_reads_through_litdatas_cache(shards, tmp_path):
    """``local:`` is read as an object store is (index and records fetched through litdata's downloader into
    ``cache_dir``): the path an s3:// or gs:// source takes, without a network."""
    folder = ImageShards(shards / "imagenet", "val", **IMAGE)
    remote = ImageShards(f"local:{shards / 'imagenet'}", "val", cache_dir=str(tmp_path / "cache"), **IMAGE)
    assert remote.describe(3).startswith(f"local:{shards / 'imagenet'}/val record 3 (")
    for index in range(len(folder)):
        _same_samples(folder[index], remote[index])
    assert any((tmp_path / "cache").rglob("index.json"))
    with pytest.raises(DatasetError, match="cannot read local:/nowhere/val/omnimae_shards.json"):
        ImageShards("local:/nowhere", "val", cache_dir=str(tmp_path / "cache"), **IMAGE)


def test_corrupt_records_are_counted_placeholders_as_the_files_were(imagenet_root, bad_files, tmp_path):
    out = convert(SourceConfig("imagenet", str(imagenet_root)), "train", tmp_path / "shards", verbose=False).parent
    folder, stored = ImageNet(imagenet_root, "train", **IMAGE), ImageShards(out, "train", **IMAGE)
    for index in range(len(folder)):
        _same_samples(folder[index], stored[index])
    invalid = [stored.describe(i) for i in range(len(stored)) if not stored[i]["valid"]]
    assert sorted(d.rsplit("/", 1)[1].rstrip(")") for d in invalid) == sorted(bad_files)
    assert all(d.startswith(f"{out / 'train'} record ") for d in invalid)

    videos = tmp_path / "videos"
    (videos / "train" / "a").mkdir(parents=True)
    write_test_video(videos / "train" / "a" / "0_good.webm", 24)
    truncate_file(write_test_video(videos / "train" / "a" / "1_half.webm", 24), 0.3)
    (videos / "train" / "a" / "2_empty.webm").write_bytes(b"")
    out = convert(SourceConfig("video_folder", str(videos)), "train", tmp_path / "video_shards", verbose=False).parent
    folder_videos, stored_videos = VideoFolder(videos / "train", **VIDEO), VideoShards(out, "train", **VIDEO)
    for index in range(3):
        _same_samples(folder_videos[index], stored_videos[index])
    assert stored_videos[0][0]["valid"] and not stored_videos[2][0]["valid"]

    # a chunk lost from the store: its records are placeholders that say why, and the interleaver counts them
    for chunk in (out / "train").glob("chunk-*.bin"):
        chunk.unlink()
    dm = PretrainDataModule([SourceConfig("litdata", str(out), name="clips", modality="video")], video_batch_size=2,
                            replicas=2, img_size=32, num_frames=4, short_side=36, patch_size=(2, 8, 8),
                            num_workers=0, persistent_workers=False, pin_memory=False, max_invalid_fraction=1.0)
    (batch,) = list(dm.train_dataloader())  # one step: one clip, twice
    assert dm.bad_samples.counts()["clips/invalid"] == dm.bad_samples.counts()["clips/seen"] == 2
    (error,) = batch["errors"].values()
    assert error.startswith(f"ShardReadError: cannot read {out / 'train'} record ")


def test_source_mistakes_are_one_line_errors(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"sources\[0\]\.modality=None: must be one of \('image', 'video'\)"):
        _pretraining([SourceConfig("litdata", str(shards / "imagenet"))])
    with pytest.raises(ConfigError, match=r"sources\[0\]\.modality='video': must be 'image' \(or null\) for kind"):
        _pretraining([SourceConfig("imagenet", str(shards / "imagenet"), modality="video")])
    wrong = _pretraining([SourceConfig("litdata", str(shards / "imagenet"), modality="video")])
    with pytest.raises(UserError, match=r"sources\[0\] \(litdata 'litdata', split 'train'\): .* holds image shards "
                                        r"\(imagenet\), not video: set modality: image"):
        wrong.setup("fit")
    (tmp_path / "half" / "train").mkdir(parents=True)  # a conversion that never finished: no omnimae_shards.json
    with pytest.raises(UserError, match=f"{tmp_path / 'half' / 'train' / META_FILE} not found"):
        _pretraining([SourceConfig("litdata", str(tmp_path / "half"), modality="image")]).setup("fit")


def _one_line_exit(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.main(["shards", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_the_converter_help_and_its_one_line_errors(demo_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(cli.TOOLS, "shards", TOOL)
    with pytest.raises(SystemExit) as stop:
        cli.main(["shards", "--help"])
    assert stop.value.code == 0
    assert "usage: omnimae-cli shards" in capsys.readouterr().out
    missing = tmp_path / "missing"
    assert f"root='{missing}': not a folder" in _one_line_exit(capsys, "--kind", "imagenet", "--root", str(missing),
                                                               "--out", str(tmp_path / "out"))
    assert "--source=None: must name one of the config's sources ['imagenet_demo', 'ssv2_demo']" in _one_line_exit(
        capsys, "--config", DEMO, "--out", str(tmp_path / "out"))
    assert f"config {tmp_path / 'nowhere.yaml'} not found" in _one_line_exit(
        capsys, "--config", str(tmp_path / "nowhere.yaml"), "--out", str(tmp_path))
    images = ["--kind", "imagenet", "--root", str(demo_root / "imagenet"), "--split", "val", "--out", str(tmp_path)]
    cli.main(["shards", *images])
    assert "source for a config: {name: imagenet, kind: litdata, modality: image, root: " in capsys.readouterr().out
    assert "exists and is not empty; pass --overwrite" in _one_line_exit(capsys, *images)


def test_the_converter_reads_its_source_from_composed_configs(demo_root, tmp_path, capsys, monkeypatch):
    """The test config layered over configs/demo.yaml, as fit composes them: the second source's root and
    annotations are the test data's."""
    monkeypatch.setitem(cli.TOOLS, "shards", TOOL)
    layer = run_config(demo_root, tmp_path)
    cli.main(["shards", "--config", DEMO, "--config", str(layer), "--source", "ssv2_demo", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert "source for a config: {name: ssv2_demo, kind: litdata, modality: video, root: " in out
    assert out.endswith("split: train, val_split: validation, test_split: validation}\n")
    folder = SSv2(demo_root / "ssv2", demo_root / "ssv2" / "videos", "validation")
    stored = ShardStore(str(tmp_path / "o" / "validation"))
    assert [os.fsdecode(n) for n in stored.names] == [path.name for path, _ in folder.videos]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["train", "validation"]  # each split once


def _read_two_epochs(rank: int, shards: Path, out: Path) -> None:
    """One of two ranks (gloo): the litdata sources' batches of epochs 0 and 1, as (source, indices, labels,
    valid) per step, into ``out/rank<rank>.json``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    sources = [SourceConfig("litdata", str(shards / "imagenet"), name="images", modality="image"),
               SourceConfig("litdata", str(shards / "ssv2"), name="videos", modality="video")]
    dm = PretrainDataModule(sources, image_batch_size=4, video_batch_size=4, replicas=2, img_size=32, num_frames=4,
                            short_side=36, patch_size=(2, 8, 8), num_workers=0, persistent_workers=False,
                            pin_memory=False)
    loader, epochs = dm.train_dataloader(), []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        epochs.append([[b["source"], b["index"].tolist(), b["label"].tolist(), b["valid"].tolist()] for b in loader])
    (out / f"rank{rank}.json").write_text(json.dumps(epochs))
    dist.destroy_process_group()


def test_two_ranks_read_disjoint_shares_of_each_epoch_and_reshuffle_every_epoch(shards, tmp_path):
    """Two processes (gloo, forked from this one: no second import of torch): each rank's batches come from its
    own indices, the two cover the epoch, the labels read are the items' labels, and the next epoch deals other
    indices in another order."""
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_read_two_epochs, args=(rank, shards, tmp_path)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
        assert proc.exitcode == 0, f"rank exit code {proc.exitcode}"
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    stores = {"images": ShardStore(str(shards / "imagenet" / "train")),
              "videos": ShardStore(str(shards / "ssv2" / "train"))}
    per_batch, replicas = {"images": 4, "videos": 2}, {"images": 1, "videos": 2}  # items per rank and step: clips
    orders = []
    for epoch in (0, 1):
        assert [b[0] for b in ranks[0][epoch]] == [b[0] for b in ranks[1][epoch]]  # one source per step on both
        seen = {}
        for source, store in stores.items():
            shares = []
            for rank in ranks:
                indices = [i for b in rank[epoch] if b[0] == source for i in dict.fromkeys(b[1])]
                labels = [label for b in rank[epoch] if b[0] == source for label in b[2]]
                assert labels == [int(store.labels[i]) for b in rank[epoch] if b[0] == source for i in b[1]]
                assert all(v for b in rank[epoch] for v in b[3])
                shares.append(indices)
            assert not set(shares[0]) & set(shares[1])
            # the epoch: the full batches over both ranks, a replicas-th of them for replicated video
            steps = len(store) // (2 * per_batch[source]) // replicas[source]
            union = set(shares[0]) | set(shares[1])
            assert len(union) == len(shares[0]) + len(shares[1]) == steps * per_batch[source] * 2
            seen[source] = shares
        orders.append(seen)
    assert orders[0]["images"][0] != orders[1]["images"][0] and orders[0]["videos"][0] != orders[1]["videos"][0]


STEPS = 8


def _litdata_config(demo_root: Path, shards: Path, out: Path) -> Path:
    """The reliability tests' config (checkpoint every 3 steps, a step log) with the demo sources as shards."""
    log = {"class_path": "reliability_helpers.StepLog", "init_args": {"path": str(out / "steps.jsonl")}}
    path = checkpointed_config(demo_root, out, every_n_train_steps=3, max_steps=STEPS, extra_callbacks=(log,))
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["init_args"]["sources"] = [
        {"name": "imagenet_demo", "kind": "litdata", "modality": "image", "root": str(shards / "imagenet"),
         "val_split": None},  # (jsonargparse merges these into demo.yaml's sources, item by item)
        {"name": "ssv2_demo", "kind": "litdata", "modality": "video", "root": str(shards / "ssv2"), "val_split": None},
    ]
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_sigkill_mid_epoch_then_ckpt_path_last_continues_exactly(demo_root, shards, tmp_path_factory, monkeypatch):
    """SIGKILL saves nothing: the run resumes from the last periodic checkpoint, inside the first epoch, and the
    interleaver's saved position makes the rest of the run the uninterrupted one's, losses and weights."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # where LightningCLI saves the config of a run without logger
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess's one math thread: the same kernels, the same bits
    try:
        reference_dir, killed_dir = tmp_path_factory.mktemp("reference"), tmp_path_factory.mktemp("killed")
        reference = _litdata_config(demo_root, shards, reference_dir)
        fit_in_process(reference)
        config = _litdata_config(demo_root, shards, killed_dir)
        args = ["--config", DEMO, "--config", str(config)]
        proc = start_fit(args, killed_dir, killed_dir / "fit.log")
        deadline = time.monotonic() + 240
        while len(read_steps(killed_dir / "steps.jsonl")) < 4:  # step 3's checkpoint is written before step 4 runs
            assert proc.poll() is None and time.monotonic() < deadline, (killed_dir / "fit.log").read_text()[-3000:]
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        ckpt = torch.load(killed_dir / "ckpt" / "last.ckpt", weights_only=True)
        layout = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["layout"]["sources"]
        saved = ckpt["global_step"]
        assert saved in (3, 6) and saved < sum(steps for *_, steps in layout)  # inside the first epoch
        resumed = fit_in_process(config, ckpt_path=killed_dir / "ckpt" / "last.ckpt")
        assert resumed.trainer.global_step == STEPS
    finally:
        torch.set_num_threads(threads)
    expected = read_steps(reference_dir / "steps.jsonl")
    killed_and_resumed = read_steps(killed_dir / "steps.jsonl")
    assert killed_and_resumed[:saved] == expected[:saved] and killed_and_resumed[saved - STEPS:] == expected[saved:]
    assert {row["modality"] for row in expected} == {"image", "video"}
    final, want = (torch.load(d / "ckpt" / "last.ckpt", weights_only=True) for d in (killed_dir, reference_dir))
    assert final["global_step"] == want["global_step"] == STEPS
    for key, value in want["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key
