"""A small demo corpus in the real on-disk layouts, built from data shipped inside installed packages.

``imagenet/{train,val}/<wnid>/*.JPEG``: scikit-learn's handwritten digits (10 classes), upscaled and coloured, on a
plain dark background. As in the real ImageNet, the train split holds a greyscale JPEG, a CMYK JPEG and a PNG
named .JPEG.

``ssv2/``: the three official Something-Something v2 JSON files and ``videos/<id>.webm`` (VP9, 12 fps, 1-1.7 s):
a digit filling most of the frame moving left to right, right to left, up, down, towards or away from the camera
over a plain background, slowly (a quarter of a crossing of the frame over the clip) or quickly (half of one):
12 classes. The class depends on the order and the spacing of the frames, as in SSv2 (a reversed clip has another
label), so a model needs time; the speed keeps the task from being solved from scratch by a few labelled clips
(docs/learning_check.md).

Plain backgrounds because the loss normalises every patch: a textured background becomes per-patch noise that
hides the digit (a flat patch has a zero target, so only the digit's patches count). Large digits and short moves
because a clip keeps only a few visible patches (75 % or more are masked): a small digit crossing the whole frame
is mostly unseen, and its hidden patches cannot be predicted (docs/learning_check.md measures both). Everything
is deterministic given ``seed``; a marker file records what was built, and a second call with the same arguments
reuses it. Run ``omnimae-cli demo-data --root DIR`` to build and print the paths.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
from pathlib import Path

import av
import numpy as np
from PIL import Image

DEMO_VERSION = 4
MARKER = "omnimae_demo.json"
DIRECTIONS = (
    "from left to right",
    "from right to left",
    "up",
    "down",
    "towards the camera",
    "away from the camera",
)
# Share of a crossing of the frame (or of the size range, towards / away) covered from the first frame to the last.
SPEEDS = {"slowly": 0.25, "quickly": 0.5}
MOTIONS = tuple((direction, speed) for speed in SPEEDS for direction in DIRECTIONS)
FPS = 12


def build_demo_data(
    root: str | Path,
    train_images_per_class: int = 100,
    val_images_per_class: int = 20,
    num_videos: int = 1200,
    video_size: tuple[int, int] = (64, 64),
    seed: int = 0,
) -> dict[str, Path]:
    """Write (or reuse) the demo corpus under ``root``; returns its paths.

    Keys: imagenet, imagenet_train, imagenet_val, ssv2 (the annotation folder), ssv2_videos, ssv2_labels,
    ssv2_train, ssv2_validation, ssv2_test. ``num_videos`` splits 70/15/15 into train/validation/test;
    ``video_size`` is (width, height). Call it from one process (e.g. ``prepare_data``), not from every rank.
    """
    root = Path(root)
    paths = demo_paths(root)
    config = {
        "version": DEMO_VERSION,
        "train_images_per_class": train_images_per_class,
        "val_images_per_class": val_images_per_class,
        "num_videos": num_videos,
        "video_size": list(video_size),
        "seed": seed,
    }
    marker = root / MARKER
    if _read_marker(marker) == config and all(p.exists() for p in paths.values()):
        return paths
    root.mkdir(parents=True, exist_ok=True)
    for name in ("imagenet", "ssv2"):
        if (root / name).exists() and not marker.exists():
            raise FileExistsError(f"{root / name} exists and was not made by build_demo_data; choose another root")
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=root))
    try:
        rng = np.random.default_rng(seed)
        _write_imagenet(staging / "imagenet", train_images_per_class, val_images_per_class, rng)
        _write_ssv2(staging / "ssv2", num_videos, video_size, rng)
        marker.write_text(json.dumps({"version": DEMO_VERSION, "complete": False}))
        for name in ("imagenet", "ssv2"):
            shutil.rmtree(root / name, ignore_errors=True)
            (staging / name).rename(root / name)
        marker.write_text(json.dumps(config))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def demo_paths(root: str | Path) -> dict[str, Path]:
    """Where :func:`build_demo_data` puts each part under ``root`` (nothing is checked or written)."""
    root = Path(root)
    ssv2 = root / "ssv2"
    return {
        "imagenet": root / "imagenet",
        "imagenet_train": root / "imagenet" / "train",
        "imagenet_val": root / "imagenet" / "val",
        "ssv2": ssv2,
        "ssv2_videos": ssv2 / "videos",
        **{f"ssv2_{s}": ssv2 / f"something-something-v2-{s}.json" for s in ("labels", "train", "validation", "test")},
    }


def _read_marker(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- pictures


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as uint8 (N, 8, 8) images, and their labels."""
    from sklearn.datasets import load_digits  # the optional [demo] extra, so imported on use

    digits = load_digits()
    return (digits.images * (255.0 / 16.0)).astype(np.uint8), digits.target


def photo(name: str) -> np.ndarray:
    """A photo shipped with scikit-image, as uint8 RGB (H, W, 3)."""
    import skimage.data  # the optional [demo] extra, so imported on use

    image = getattr(skimage.data, name)()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(background, digit) colours: a dark background and a light digit or, half the time, the reverse, at
    least 90 levels apart in every channel (the loss normalises each channel of a patch on its own: a channel
    with little contrast would be all noise). Either polarity leaves the digit's shape and motion the same."""
    dark, light = rng.uniform(0, 60, size=3), rng.uniform(150, 255, size=3)
    return (light, dark) if rng.random() < 0.5 else (dark, light)


def digit_sprite(digit: np.ndarray, side: int, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An upscaled digit as (colour image, alpha), both (side, side, ...) floats. Alpha under 4 % is cut to 0:
    bicubic ripples around the strokes would leave single-level specks on a plain background, which the loss's
    per-patch normalisation turns into full-strength noise."""
    alpha = np.asarray(Image.fromarray(digit).resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
    alpha[alpha < 0.04] = 0.0
    return np.broadcast_to(colour, (side, side, 3)).astype(np.float32), alpha[..., None]


def paste(canvas: np.ndarray, sprite: tuple[np.ndarray, np.ndarray], x: int, y: int) -> np.ndarray:
    """Alpha-blend ``sprite`` with its top-left corner at (x, y), clipped to the canvas."""
    colour, alpha = sprite
    h, w = canvas.shape[:2]
    s = colour.shape[0]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + s, w), min(y + s, h)
    if x0 >= x1 or y0 >= y1:
        return canvas
    out = canvas.astype(np.float32)
    a = alpha[y0 - y : y1 - y, x0 - x : x1 - x]
    out[y0:y1, x0:x1] = a * colour[y0 - y : y1 - y, x0 - x : x1 - x] + (1 - a) * out[y0:y1, x0:x1]
    return out.astype(np.uint8)


def _write_imagenet(root: Path, n_train: int, n_val: int, rng: np.random.Generator) -> None:
    images, labels = digit_images()
    val_number = 0
    for k in range(10):
        wnid = f"n{k:08d}"
        pool = np.flatnonzero(labels == k)
        for split, count in (("train", n_train), ("val", n_val)):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for n in range(count):
                size = (int(rng.integers(48, 65)), int(rng.integers(48, 65)))
                digit = images[pool[(n if split == "train" else n_train + n) % len(pool)]]  # train and val differ
                background, colour = _colours(rng)
                picture = np.broadcast_to(background, (size[1], size[0], 3)).astype(np.uint8)
                side = int(min(size) * rng.uniform(0.55, 0.9))
                x, y = rng.integers(0, size[0] - side + 1), rng.integers(0, size[1] - side + 1)
                picture = paste(picture, digit_sprite(digit, side, colour), x, y)
                if split == "train":
                    name = f"{wnid}_{n}.JPEG"
                else:
                    val_number += 1
                    name = f"ILSVRC2012_val_{val_number:08d}.JPEG"
                _save_picture(Image.fromarray(picture), folder / name, special=n if split == "train" and k == 0 else -1)


def _save_picture(image: Image.Image, path: Path, special: int) -> None:
    """JPEG, except the oddities real ImageNet has: 0 = greyscale, 1 = CMYK, 2 = PNG bytes behind .JPEG."""
    if special == 0:
        image.convert("L").save(path, format="JPEG", quality=100)
    elif special == 1:
        image.convert("CMYK").save(path, format="JPEG", quality=100)
    elif special == 2:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())
    else:  # quality 100, no chroma subsampling: ringing would be noise in the per-patch normalised targets
        image.save(path, format="JPEG", quality=100, subsampling=0)


# ---------------------------------------------------------------- videos


def template(direction: str, speed: str) -> str:
    """The SSv2-style template (``[something]`` is the placeholder) of one demo class."""
    return f"Moving [something] {direction} {speed}"


def _motion_frames(
    direction: str, speed: str, digit: np.ndarray, background: np.ndarray, colour: np.ndarray, n_frames: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Frames (N, H, W, 3) of one digit moving ``direction`` at ``speed``, from the first frame to the last: sideways
    or up / down it covers the middle ``SPEEDS[speed]`` of a crossing of the frame (its side is 0.7-0.9 of the
    frame's, so it stays mostly in view); towards / away it grows / shrinks within 0.55-0.85 of the frame."""
    h, w = background.shape[:2]
    span = SPEEDS[speed]
    progress = np.linspace(0.5 - span / 2, 0.5 + span / 2, n_frames)
    frames = np.empty((n_frames, h, w, 3), dtype=np.uint8)
    if "camera" in direction:
        sides = h * (0.4 + 0.6 * (progress if direction.startswith("towards") else 1 - progress))
        cx, cy = rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h
        for i, side in enumerate(sides.astype(int)):
            sprite = digit_sprite(digit, side, colour)
            frames[i] = paste(background, sprite, int(cx - side / 2), int(cy - side / 2))
        return frames
    base = int(h * rng.uniform(0.7, 0.9))
    sprite = digit_sprite(digit, base, colour)
    if "left" in direction:  # a full crossing: from 35 % outside one edge to 35 % outside the other
        a, b = -base * 0.35, w - base * 0.65
        xs = a + (b - a) * (progress if direction.endswith("to right") else 1 - progress)
        ys = np.full(n_frames, rng.uniform(0, h - base))
    else:
        a, b = -base * 0.35, h - base * 0.65
        ys = a + (b - a) * (1 - progress if direction == "up" else progress)
        xs = np.full(n_frames, rng.uniform(0, w - base))
    for i in range(n_frames):
        frames[i] = paste(background, sprite, int(xs[i]), int(ys[i]))
    return frames


def write_webm(path: Path, frames: np.ndarray, fps: int = FPS, crf: int = 30, lossless: bool = False) -> None:
    """VP9 in WebM, fast single-threaded realtime settings; bit-exact muxing (no random ids), so the same frames
    give the same bytes. ``crf``: 0-63, lower is closer to the frames; ``lossless``: exact (4:2:0) frames."""
    with av.open(str(path), "w", container_options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.thread_count = 1
        quality = {"lossless": "1"} if lossless else {"crf": str(crf), "b:v": "0"}
        stream.options = {"deadline": "realtime", "cpu-used": "8", "row-mt": "0", **quality}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_ssv2(root: Path, num_videos: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    images, labels = digit_images()
    videos = root / "videos"
    videos.mkdir(parents=True)
    plain = [template(*motion).replace("[", "").replace("]", "") for motion in MOTIONS]
    (root / "something-something-v2-labels.json").write_text(
        json.dumps({t: str(i) for i, t in enumerate(plain)}, indent=1)
    )
    entries = []
    for n in range(num_videos):
        video_id = str(n + 1)
        direction, speed = MOTIONS[n % len(MOTIONS)]
        pick = int(rng.integers(len(images)))
        n_frames = int(rng.integers(FPS, FPS * 5 // 3 + 1))  # 1-1.7 s: shorter than the loaders' 2.7 s window
        background, colour = _colours(rng)
        background = np.broadcast_to(background, (size[1], size[0], 3)).astype(np.uint8)
        frames = _motion_frames(direction, speed, images[pick], background, colour, n_frames, rng)
        write_webm(videos / f"{video_id}.webm", frames, lossless=True)  # coding noise: see digit_sprite
        thing, name = f"digit {labels[pick]}", template(direction, speed)
        entries.append(
            {
                "id": video_id,
                "label": name.replace("[something]", thing),
                "template": name,
                "placeholders": [thing],
            }
        )
    order = rng.permutation(num_videos)
    n_train, n_val = int(num_videos * 0.7), int(num_videos * 0.15)
    splits = {
        "train": order[:n_train],
        "validation": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    for split, picks in splits.items():
        rows = [entries[i] if split != "test" else {"id": entries[i]["id"]} for i in sorted(picks)]
        (root / f"something-something-v2-{split}.json").write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnimae-cli demo-data", description="Build (or reuse) the omnimae-pl demo corpus.")
    parser.add_argument("--root", required=True, help="folder to write into")
    parser.add_argument("--train-images-per-class", type=int, default=100)
    parser.add_argument("--val-images-per-class", type=int, default=20)
    parser.add_argument("--num-videos", type=int, default=1200)
    parser.add_argument("--video-width", type=int, default=64)
    parser.add_argument("--video-height", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = build_demo_data(
        args.root,
        args.train_images_per_class,
        args.val_images_per_class,
        args.num_videos,
        (args.video_width, args.video_height),
        args.seed,
    )
    for key, path in paths.items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
