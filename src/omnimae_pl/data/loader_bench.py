"""Loader throughput on ONE core, single process: is the data pipeline fast enough to feed the model?

Generates SSv2-sized clips (427x240 VP9 .webm, 12 fps, 30-60 frames: a pan and zoom over photos with a moving
digit) and ImageNet-sized JPEGs (about 500x375), then measures, each for ``--seconds``:

- clip decodes/s: our reader, the paper's 16 frames from a random 2.7 s window (and the torchcodec backend,
  when it is usable here);
- naive decodes/s: every frame decoded to RGB with PyAV, then 16 of them picked (the baseline);
- replicated video samples/s: one decode + 4 crops + 4 masks through :class:`VideoFolder`;
- images/s: JPEG decode + RandomResizedCrop + flip + normalise (the ImageNet pretraining transform).

and the same two for the uint8 path (``augment_on: device``, see ``data.device_augment``) in the same run:

- replicated_samples_uint8: one decode + 4 crop boxes + 4 masks (the crop-resize moves to the device);
- images_uint8: JPEG decode + the resized crop in uint8 (flip and normalise move to the device);
- image_decodes: the JPEG decode alone (box drawn, ``Image.draft`` as above): the floor of any split of the
  image work that leaves decoding in the worker;
- images_jpeg: the worker's share with ``image_decode: device`` (``data.device_decode``): the file read, its
  header parsed, the box and flip drawn; the decode moves to the device;

then the bytes per sample that a batch sends to the device on each path (``image_jpeg``: the encoded files,
which ``decode_jpeg`` copies there, plus the rest of the batch), and the time of the device-side op
(``to_float_batch``, with ``decode_images`` before it for ``image_jpeg``) per batch when it runs on this CPU.

Rates are given per second of wall time and per second of CPU time of this process: on a shared machine the
second one is closer to what one dedicated core would do. Run ``omnimae-cli loader-bench``.

Every replica is a fresh 9.6 MB float tensor, and in a VM first-touching fresh pages is costly: glibc returns
such large blocks to the kernel on free, so each sample faults its pages in again. Keeping freed memory for reuse
(``MALLOC_MMAP_THRESHOLD_=268435456 MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment of the training
process) helps; docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from omnimae_pl.data.demo import digit_images, digit_sprite, paste, photo, write_webm
from omnimae_pl.data.device_augment import to_float_batch, transfer_bytes
from omnimae_pl.data.device_decode import decode_images
from omnimae_pl.data.image_transforms import RandomResizedCropFlip, decode_rgb, draft_for_box, random_resized_crop_box
from omnimae_pl.data.imagenet import ImageNet
from omnimae_pl.data.sample import collate_samples
from omnimae_pl.data.seeding import sample_generator
from omnimae_pl.data.video_datasets import VideoFolder
from omnimae_pl.data.video_io import (
    PyAVReader,
    TorchCodecReader,
    clip_times,
    frames_shown_at,
    torchcodec_available,
)
from omnimae_pl.masking import IMAGE_MASKING, VIDEO_MASKING

# images_uint8, images_jpeg: twice the worker path's 441 images/s per core of docs/benchmarks.md (issue 17)
TARGETS = {
    "clip_decodes": 40.0, "replicated_samples": 60.0, "images": 400.0, "images_uint8": 882.0, "images_jpeg": 882.0,
    "speedup_vs_naive": 1.3,
}
BATCHES = {"image": 32, "video": 8}  # images, clips (x 4 replicas): the ViT-B config's batch per GPU
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
BENCH_VERSION = 2


def make_bench_files(folder: Path, num_clips: int = 24, num_images: int = 64, seed: int = 0) -> tuple[list, list]:
    """Write (or reuse) the clips under ``folder/clips/bench`` and the JPEGs under ``folder/imagenet/train/bench``
    (the folder layouts of VideoFolder and ImageNet)."""
    clip_dir, image_dir = folder / "clips" / "bench", folder / "imagenet" / "train" / "bench"
    marker = folder / "bench.json"
    config = {"version": BENCH_VERSION, "clips": num_clips, "images": num_images, "seed": seed}
    if not (marker.is_file() and json.loads(marker.read_text()) == config):
        clip_dir.mkdir(parents=True, exist_ok=True)
        image_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        photos = [photo(name) for name in PHOTOS]
        digits, _ = digit_images()
        for n in range(num_clips):
            frames = _panning_clip(photos[n % len(photos)], digits[n], int(rng.integers(30, 61)), rng)
            write_webm(clip_dir / f"{n:03d}.webm", frames)
        for n in range(num_images):
            picture = Image.fromarray(photos[n % len(photos)])
            width, height = (500, 375) if n % 3 else (375, 500)
            left, top = int(rng.integers(0, 40)), int(rng.integers(0, 40))
            box = (left, top, left + picture.width * 3 // 4, top + picture.height * 3 // 4)
            picture.resize((width, height), Image.BICUBIC, box=box).save(image_dir / f"{n:03d}.JPEG", quality=90)
        marker.write_text(json.dumps(config))
    return sorted(clip_dir.glob("*.webm")), sorted(image_dir.glob("*.JPEG"))


def _panning_clip(picture: np.ndarray, digit: np.ndarray, n_frames: int, rng: np.random.Generator) -> np.ndarray:
    """427x240 frames: a slow pan and zoom over ``picture`` (camera motion) with a digit sliding across it."""
    height, width = 240, 427
    frames = np.empty((n_frames, height, width, 3), dtype=np.uint8)
    image = Image.fromarray(picture)
    x0, y0 = rng.uniform(0, 0.2) * image.width, rng.uniform(0, 0.2) * image.height
    colour = rng.uniform(120, 255, size=3)
    sprite = digit_sprite(digit, 96, colour)
    for i in range(n_frames):
        p = i / max(n_frames - 1, 1)
        crop_w = image.width * (0.75 - 0.1 * p)
        crop_h = crop_w * height / width
        left, top = x0 + 0.05 * image.width * p, y0 + 0.05 * image.height * p
        view = image.resize((width, height), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
        frames[i] = paste(np.asarray(view), sprite, int(-96 + (width + 96) * p), 70)
    return frames


def naive_read_clip(path: Path, generator: torch.Generator, num_frames: int = 16, clip_duration: float = 2.7):
    """Baseline: decode every frame of the file to RGB, then take the ``num_frames`` of a random window."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_count = 1
        frames, times = [], []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(frame.time)
    duration = times[-1] - times[0] + 1.0 / float(stream.average_rate)
    position = float(torch.rand((), generator=generator))
    targets = [times[0] + t for t in clip_times(duration, clip_duration, [position], num_frames)[0]]
    return torch.from_numpy(np.stack([frames[i] for i in frames_shown_at(times, targets)]))


def measure(step: Callable[[int], int], seconds: float) -> dict[str, float]:
    """Call ``step(i)`` (returns the number of items it produced) for about ``seconds``; items per second."""
    step(0)  # warm-up: first-call allocations and imports
    items, calls = 0, 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        items += step(calls + 1)
        calls += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"items": items, "per_s_wall": items / wall, "per_s_cpu": items / max(cpu, 1e-9)}


def run(
    folder: Path, seconds: float, num_clips: int = 24, num_images: int = 64
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """(rates of every row, per path and modality: bytes per sample sent and device-op ms per batch)."""
    torch.set_num_threads(1)
    clips, images = make_bench_files(folder, num_clips, num_images)
    readers = {"clip_decodes": PyAVReader()}
    if torchcodec_available():
        readers["torchcodec_decodes"] = TorchCodecReader()
    results = {}
    for name, reader in readers.items():
        results[name] = measure(
            lambda i, r=reader: _one(r.read_clip(clips[i % len(clips)], 16, 2.7, sample_generator(0, 0, i, "w"))),
            seconds,
        )
    results["naive_decodes"] = measure(
        lambda i: _one(naive_read_clip(clips[i % len(clips)], sample_generator(0, 0, i, "w"))), seconds
    )
    videos = {a: VideoFolder(folder / "clips", masking=VIDEO_MASKING, replicas=4, augment_on=a) for a in PATHS}
    for augment_on, name in PATHS.items():
        dataset = videos[augment_on]
        results[f"replicated_samples{name}"] = measure(lambda i, d=dataset: len(d[(i % len(d), i)]), seconds)
    transform = RandomResizedCropFlip()
    results["images"] = measure(
        lambda i: _one(transform(Image.open(images[i % len(images)]), sample_generator(0, 0, i, "crop"))), seconds
    )
    results["images_uint8"] = measure(
        lambda i: _one(transform.crop_uint8(Image.open(images[i % len(images)]), sample_generator(0, 0, i, "crop"))),
        seconds,
    )
    results["image_decodes"] = measure(lambda i: _one(_decode(transform, images[i % len(images)], i)), seconds)
    pictures = {a: ImageNet(folder / "imagenet", masking=IMAGE_MASKING, augment_on=a) for a in PATHS}
    pictures["jpeg"] = ImageNet(folder / "imagenet", augment_on="device", decode_on="device", masking=IMAGE_MASKING)
    encoded = pictures["jpeg"]
    results["images_jpeg"] = measure(
        lambda i: _one(encoded.read_encoded(i % len(encoded), sample_generator(0, 0, i, "crop"))), seconds
    )
    transfers = {f"image{PATHS.get(a, '_' + a)}": _transfer(d, "image", seconds) for a, d in pictures.items()}
    transfers.update({f"video{name}": _transfer(videos[a], "video", seconds) for a, name in PATHS.items()})
    return results, transfers


PATHS = {"worker": "", "device": "_uint8"}  # augment_on -> the suffix of its rows


def _decode(transform: RandomResizedCropFlip, path: Path, i: int) -> torch.Tensor:
    """The decode that ``transform`` does, without the resize: box drawn, JPEG draft scale chosen, decoded."""
    with Image.open(path) as image:
        box = random_resized_crop_box(image.height, image.width, transform.scale, transform.ratio,
                                      sample_generator(0, 0, i, "crop"))
        draft_for_box(image, box, transform.size, transform.size)
        return decode_rgb(image)


def _transfer(dataset, modality: str, seconds: float) -> dict[str, float]:
    """Bytes per sample of a batch as it goes to the device, and the device-side op's time on it (uint8 path)."""
    batch = collate_samples([dataset[(i % len(dataset), 0)] for i in range(BATCHES[modality])], modality, "bench")
    samples = len(batch["index"])
    out = {"bytes_per_sample": transfer_bytes(batch) / samples, "samples_per_batch": samples}
    if "flip" in batch or "clip" in batch:
        def device_op():
            return to_float_batch(decode_images(batch, 224)[0] if "jpeg" in batch else batch, 224)

        device_op()  # warm-up
        start, calls = time.perf_counter(), 0
        while calls == 0 or time.perf_counter() - start < seconds:
            device_op()
            calls += 1
        out["device_op_ms_per_batch"] = 1000 * (time.perf_counter() - start) / calls
    return out


def _one(_) -> int:
    return 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnimae-cli loader-bench", description="Data loader throughput on one core.")
    parser.add_argument("--out-dir", help="folder for the generated clips and JPEGs (reused); default: a temp dir")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    if args.out_dir:
        results, transfers = run(Path(args.out_dir), args.seconds)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results, transfers = run(Path(tmp), args.seconds)
    speedups = {
        clock: results["clip_decodes"][clock] / results["naive_decodes"][clock] for clock in ("per_s_wall", "per_s_cpu")
    }
    print(f"load average before: {load[0]:.1f} (1 min); one core, single process (torch threads 1)")
    print(f"{'':28s} {'/s (wall)':>10s} {'/s (cpu)':>10s} {'target':>8s}")
    for name, rates in results.items():
        target = TARGETS.get(name)
        print(
            f"{name:28s} {rates['per_s_wall']:10.1f} {rates['per_s_cpu']:10.1f} "
            f"{'' if target is None else f'{target:8.0f}'}"
        )
    print(
        f"{'speedup_vs_naive':28s} {speedups['per_s_wall']:10.2f} {speedups['per_s_cpu']:10.2f} "
        f"{TARGETS['speedup_vs_naive']:8.1f}"
    )
    print("\nsent to the device (224 px, 16 frames, 4 replicas) and the device-side op run on this CPU:")
    print(f"{'':28s} {'bytes/sample':>12s} {'batch':>6s} {'op ms/batch':>12s}")
    for name, row in transfers.items():
        op = row.get("device_op_ms_per_batch")
        print(f"{name:28s} {row['bytes_per_sample']:12.0f} {row['samples_per_batch']:6d} "
              f"{'' if op is None else f'{op:12.1f}'}")


if __name__ == "__main__":
    main()
