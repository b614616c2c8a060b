"""JPEGs decoded on the device (``image_decode="device"``) against the worker path, same seeds; the files it
does not take, the files nobody can read, and a fit with the option on."""

from __future__ import annotations

import csv
import io
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_config
from image_helpers import photo
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback
from PIL import Image
from reliability_helpers import fit_in_process
from torch.utils.data import DataLoader

from omnimae_pl.data import device_decode
from omnimae_pl.data.datamodule import PretrainDataModule
from omnimae_pl.data.device_augment import VIDEO_TOLERANCE, to_float_batch, transfer_bytes
from omnimae_pl.data.device_decode import TOLERANCE, decode_images
from omnimae_pl.data.imagenet import ImageNet, mean_image
from omnimae_pl.data.loader_bench import make_bench_files
from omnimae_pl.data.sample import EncodedImages, collate_samples
from omnimae_pl.data.seeding import sample_generator
from omnimae_pl.data.sources import SourceConfig
from omnimae_pl.errors import ConfigError
from omnimae_pl.masking import MaskingConfig

SIZE = 32
MASKING = MaskingConfig("random", 0.75)
WORKER_DECODED = {"cmyk.JPEG", "png_inside.JPEG"}  # readable, but not for nvJPEG
UNREADABLE = {"empty.JPEG", "truncated.JPEG", "text.JPEG"}
ONE_GREY_LEVEL = VIDEO_TOLERANCE["max"]


def both_paths(root, keys, size=SIZE, **options):
    """(worker-decoded batch, device-decoded batch before and after ``decode_images``, its two counts) for the
    same keys; both with the uint8 crops left to the device (``augment_on="device"``)."""
    def make(decode_on):
        return ImageNet(root, "train", img_size=size, masking=MASKING, seed=3, augment_on="device",
                        decode_on=decode_on, **options)

    worker, encoded = make("worker"), make("device")
    worker_batch = collate_samples([worker[k] for k in keys], "image", "src")
    encoded_batch = collate_samples([encoded[k] for k in keys], "image", "src")
    decoded, cpu_decoded, failed = decode_images(encoded_batch, size)
    return worker, worker_batch, encoded_batch, decoded, cpu_decoded, failed


def names(dataset, rows):
    return [Path(dataset.describe(int(i))).name for i in rows]


def bad_huffman_jpeg(path: Path, rng) -> None:
    """A JPEG whose header PIL reads (size, mode, end marker all fine) but whose Huffman table no decoder takes."""
    buffer = io.BytesIO()
    photo(rng, 64, 48).save(buffer, format="JPEG", quality=90)
    data = bytearray(buffer.getvalue())
    table = data.index(b"\xff\xc4")
    data[table + 5 : table + 21] = b"\xff\x00" * 8
    path.write_bytes(bytes(data))


def test_same_draws_and_masks_and_the_files_nvjpeg_does_not_take_stay_on_the_worker(imagenet_root):
    keys = [(i, 2) for i in range(18)]
    dataset, worker, encoded, decoded, cpu_decoded, failed = both_paths(imagenet_root, keys)
    files = encoded["jpeg"].files()
    on_worker = [i for i, f in enumerate(files) if f is None]
    assert set(names(dataset, on_worker)) == WORKER_DECODED | UNREADABLE
    assert "grey.JPEG" not in names(dataset, on_worker)  # L: decode_jpeg's RGB mode takes it
    assert cpu_decoded == encoded["jpeg"].cpu_decoded == len(WORKER_DECODED) and failed == {}
    # the bytes shipped are the files', the boxes the draws of the worker path: box, then flip
    for i, (file, box) in enumerate(zip(files, encoded["box"])):
        path = dataset.describe(i)
        if file is None:
            assert box is None
            continue
        assert file.numpy().tobytes() == Path(path).read_bytes()
        with Image.open(path) as image:
            drawn = dataset.transform.draw(*image.size, sample_generator(3, 2, i, "crop"))
        assert (box, encoded["flip"][i].item()) == drawn
    for key in ("flip", "mask", "label", "valid", "index"):
        assert torch.equal(decoded[key], worker[key]), key
    assert decoded["errors"] == worker["errors"] and set(names(dataset, worker["errors"])) == UNREADABLE
    # rows the worker decoded (and its placeholders) are the worker path's bytes exactly
    assert torch.equal(decoded["input"][on_worker], worker["input"][on_worker])
    assert decoded["input"].shape == worker["input"].shape and decoded["input"].dtype == torch.uint8
    rest = [i for i in range(len(keys)) if i not in on_worker]
    gap = (to_float_batch(decoded, SIZE)["input"][rest] - to_float_batch(worker, SIZE)["input"][rest]).abs()
    assert gap.max() <= 0.3 and gap.mean() <= 0.008  # 40-90 px smooth images at 32 px: 0.26 / 0.0069 measured


def test_the_decoded_crops_equal_the_worker_path_within_the_tolerance_at_224(tmp_path):
    """TOLERANCE (device_decode's docstring): 224 px crops of 500 x 375 photo JPEGs (the loader bench's)."""
    make_bench_files(tmp_path, num_clips=0, num_images=6)
    keys = [(i, epoch) for epoch in range(2) for i in range(6)]
    _, worker, _, decoded, cpu_decoded, _ = both_paths(tmp_path / "imagenet", keys, size=224)
    assert cpu_decoded == 0
    gap = (to_float_batch(decoded, 224)["input"] - to_float_batch(worker, 224)["input"]).abs()
    assert 0 < gap.max() <= TOLERANCE["max"] and gap.mean() <= TOLERANCE["mean"]


def test_files_the_device_rejects_are_decoded_with_pil_and_unreadable_ones_become_counted_placeholders(
    tmp_path, monkeypatch, image_folder_writer
):
    folder = tmp_path / "imagenet" / "train" / "n0"
    image_folder_writer(folder, 5)
    bad_huffman_jpeg(folder / "img_9_bad_table.JPEG", np.random.default_rng(0))
    rejected = (folder / "img_2.JPEG").read_bytes()
    real_decode = device_decode.decode_jpeg
    calls = []

    def fussy_decode(files, **kwargs):  # a device decoder that also rejects img_2 (as nvJPEG might)
        calls.append(len(files) if isinstance(files, list) else 1)
        for file in files if isinstance(files, list) else [files]:
            if file.numpy().tobytes() == rejected:
                raise RuntimeError("nvjpeg: unsupported")
        return real_decode(files, **kwargs)

    monkeypatch.setattr(device_decode, "decode_jpeg", fussy_decode)
    dm = PretrainDataModule([SourceConfig("imagenet", str(tmp_path / "imagenet"), name="in1k")], image_batch_size=6,
                            img_size=SIZE, patch_size=(2, 16, 16), num_workers=0, augment_on="device",
                            image_decode="device", max_invalid_fraction=0.5, pin_memory=False)
    dm.setup("fit")
    interleaver = dm.train_dataloader()
    (batch,) = list(interleaver)
    assert batch["jpeg"].cpu_decoded == 0 and None not in batch["box"]  # every file looked fine to the worker
    out = dm.on_after_batch_transfer(batch, 0)
    assert calls == [6, 1, 1, 1, 1, 1, 1]  # one batched call, then one by one
    dataset = dm._datasets["in1k", "train"]
    invalid = torch.nonzero(~out["valid"]).flatten().tolist()
    assert names(dataset, out["index"][invalid]) == ["img_9_bad_table.JPEG"]
    index = int(out["index"][invalid[0]])
    assert out["errors"] == {index: "OSError: broken data stream when reading image file"}
    placeholder = to_float_batch({"input": mean_image(SIZE, True)[None], "flip": torch.tensor([False])}, SIZE)
    assert torch.equal(out["input"][invalid], placeholder["input"])
    counts = dm.bad_samples.counts()
    assert counts["in1k/cpu_decoded"] == 1 and counts["in1k/invalid"] == 1 and counts["in1k/seen"] == 6
    assert dm.bad_samples.take_failed("in1k") == [(dataset.describe(index), out["errors"][index])]
    # the row PIL decoded is the one the device's decoder makes; the bad table fails there too
    monkeypatch.setattr(device_decode, "decode_jpeg", real_decode)
    decoded, cpu_decoded, failed = decode_images(batch, SIZE)
    assert cpu_decoded == 0 and list(failed) == [index]
    gap = (to_float_batch(decoded, SIZE)["input"] - out["input"]).abs().max()
    assert gap <= ONE_GREY_LEVEL  # PIL against torchvision, both libjpeg-turbo: measured 0 here
    assert dm.bad_samples.state_dict()["in1k"]["cpu_decoded"] == 1


def test_the_bytes_cross_worker_processes_and_stay_on_the_host(imagenet_root):
    dataset = ImageNet(imagenet_root, "train", img_size=SIZE, augment_on="device", decode_on="device")
    loader = DataLoader(dataset, batch_size=len(dataset), num_workers=1,
                        collate_fn=lambda items: collate_samples(items, "image", "src"))
    batch = next(iter(loader))
    assert isinstance(batch["jpeg"], EncodedImages)
    files = batch["jpeg"].files()
    for i, file in enumerate(files):
        if file is not None:
            assert file.numpy().tobytes() == Path(dataset.describe(i)).read_bytes()
    moved = move_data_to_device(batch, torch.device("meta"))  # what Lightning's transfer does to the batch
    assert moved["flip"].is_meta and moved["jpeg"].data.device.type == "cpu"
    sent = sum(len(f) for f in files if f is not None)
    assert transfer_bytes(batch) == sent + batch["input"].nbytes + sum(
        batch[k].nbytes for k in ("label", "valid", "index", "flip"))


def test_the_option_is_checked_in_one_line(imagenet_root):
    source = [SourceConfig("imagenet", str(imagenet_root))]
    with pytest.raises(ConfigError, match=r"data.init_args.image_decode.*needs data.init_args.augment_on: device"):
        PretrainDataModule(source, image_decode="device")
    with pytest.raises(ConfigError, match=r"data.init_args.image_decode.*'worker' or 'device'"):
        PretrainDataModule(source, augment_on="device", image_decode="gpu")
    with pytest.raises(ValueError, match="decode_on='device' needs augment_on='device'"):
        ImageNet(imagenet_root, decode_on="device")


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def test_a_fit_with_device_decoding_has_finite_losses_and_logs_its_counts(demo_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    rng = np.random.default_rng(0)
    for folder in (data / "imagenet" / "train").iterdir():
        photo(rng, 60, 50).convert("CMYK").save(folder / "cmyk.JPEG", quality=90)
        bad_huffman_jpeg(folder / "bad_table.JPEG", rng)
    cfg = run_config(data, tmp_path, max_steps=6, limit_val_batches=0, val_check_interval=None, callbacks=[],
                     enable_checkpointing=False,
                     logger={"class_path": "lightning.pytorch.loggers.CSVLogger",
                             "init_args": {"save_dir": str(tmp_path), "name": "csv"}})
    losses = Losses()
    cli = fit_in_process(cfg, losses, args=("--data.init_args.augment_on", "device", "--data.init_args.image_decode",
                                            "device", "--data.init_args.max_invalid_fraction", "0.5"))
    assert len(losses.losses) == 6 and all(math.isfinite(v) for v in losses.losses)
    counts = cli.datamodule.bad_samples.counts()
    assert counts["imagenet_demo/cpu_decoded"] > 0 and counts["imagenet_demo/invalid"] > 0
    assert "ssv2_demo/cpu_decoded" not in counts  # video sources decode on the worker
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    logged = [float(r["data/cpu_decoded_imagenet_demo"]) for r in rows if r.get("data/cpu_decoded_imagenet_demo")]
    assert logged and logged[-1] <= counts["imagenet_demo/cpu_decoded"]
