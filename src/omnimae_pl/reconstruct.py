"""Write reconstruction figures for a few images and videos: ``omnimae-cli reconstruct``.

For every input, mask type and mask ratio: a PNG (images: one row of views; videos: a frame strip) and, for
videos, a GIF and an MP4 of the views side by side; ``index.json`` lists them all with each reconstruction's
masked-patch loss and stitched pixel errors (:func:`reconstruction_scores`), and ``index.html`` shows them in a
browser. With ``--image-grid``, also one figure of all the image inputs per mask type and ratio
(``write_image_grid``). The views are those of :mod:`omnimae_pl.viz`.

The checkpoint is a released OmniMAE pretraining file or a Lightning checkpoint of our pretraining module.
"""

from __future__ import annotations

import argparse
import html
import json
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from omnimae_pl.constants import IMAGENET_MEAN, IMAGENET_STD
from omnimae_pl.data.image_transforms import ResizeCenterCrop
from omnimae_pl.data.video_io import DEFAULT_CLIP_DURATION, PyAVReader
from omnimae_pl.errors import UserError
from omnimae_pl.models.losses import patch_pixels
from omnimae_pl.models.stitch import stitched_errors
from omnimae_pl.masking import MASK_TYPES, make_mask, token_grid
from omnimae_pl.models import OmniMAE
from omnimae_pl.models.checkpoints import load_pretrain_model
from omnimae_pl.viz import (
    VIEW_KEYS,
    VIEW_TITLES,
    frame_strip,
    labelled_tiles,
    mp4_encoder,
    reconstruction_views,
    sample_views,
    save_gif,
    save_mp4,
    views_grid,
)

VIDEO_SUFFIXES = frozenset({".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ogv"})
Input = str | PathLike | torch.Tensor


def model_layout(model: OmniMAE) -> tuple[int, int]:
    """(img_size, num_frames) the model's positional tables were built for; videos must match them."""
    (pt, ph, _), (t, h, _) = model.patch_size, model.encoder.grid
    return h * ph, t * pt


def load_image(path: str | PathLike, img_size: int) -> torch.Tensor:
    """An image file -> normalised (3, img_size, img_size): short side resized, centre crop (the eval transform)."""
    with Image.open(path) as image:
        return ResizeCenterCrop(size=img_size)(image)


def load_video(
    path: str | PathLike, img_size: int, num_frames: int, clip_duration: float = DEFAULT_CLIP_DURATION
) -> torch.Tensor:
    """A video file -> normalised (3, num_frames, img_size, img_size): ``num_frames`` evenly spaced frames from
    the central ``clip_duration`` seconds (the pretraining frame spacing), short side resized, centre crop."""
    frames = PyAVReader().read_uniform_clips(path, 1, num_frames, clip_duration)[0]  # (T, H, W, 3) uint8
    frames = F.resize(frames.permute(0, 3, 1, 2), [img_size], antialias=True)
    frames = F.center_crop(frames, [img_size, img_size]).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((frames - mean) / std).permute(1, 0, 2, 3)


def load_input(source: Input, img_size: int, num_frames: int) -> torch.Tensor:
    """A path (image, or video by suffix) or an already normalised (3, H, W) / (3, T, H, W) tensor."""
    if isinstance(source, torch.Tensor):
        return source.float()
    if Path(source).suffix.lower() in VIDEO_SUFFIXES:
        return load_video(source, img_size, num_frames)
    return load_image(source, img_size)


def write_reconstructions(
    model: OmniMAE,
    inputs: Sequence[Input],
    out_dir: str | PathLike,
    mask_ratios: Sequence[float] = (0.75, 0.9, 0.95),
    mask_types: Sequence[str] = ("random",),
    seed: int = 0,
    fps: float = 4.0,
) -> Path:
    """Reconstruct every input under every (mask type, ratio) and write the figures; returns ``index.json``.

    Each mask is drawn from a generator seeded with ``seed``, so reruns (and other checkpoints) see the same
    masks. The model runs without gradients in eval mode on its own device; its mode is restored afterwards.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    img_size, num_frames = model_layout(model)
    device = next(model.parameters()).device
    entries = []
    was_training = model.training
    model.eval()
    try:
        for i, source in enumerate(inputs):
            sample = load_input(source, img_size, num_frames).to(device)
            is_tensor = isinstance(source, torch.Tensor)
            name = f"{i:02d}_{'tensor' if is_tensor else Path(source).stem}"  # the number keeps names unique
            for mask_type in mask_types:
                for ratio in mask_ratios:
                    entry = _reconstruct_one(model, sample, name, mask_type, ratio, seed, fps, out_dir)
                    entries.append({"input": name if is_tensor else str(source), **entry})
    finally:
        model.train(was_training)
    index = out_dir / "index.json"
    index.write_text(json.dumps({"views": {k: VIEW_TITLES[k] for k in VIEW_KEYS}, "entries": entries}, indent=2))
    (out_dir / "index.html").write_text(_index_html(entries))
    return index


def reconstruction_scores(model: OmniMAE, x: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> dict:
    """The masked-patch loss of one reconstruction, and the hidden-pixel errors of its prediction and of a blank
    one once stitched from the visible pixels (:mod:`omnimae_pl.models.stitch`)."""
    mask = mask.to(x.device)
    grid = token_grid(tuple(x.shape[1:]), model.patch_size)
    loss = model.forward_loss(x, pred, mask)
    stitched, blank = stitched_errors(pred, patch_pixels(x, model.patch_size), mask, grid, model.patch_size)
    return {"loss": loss.item(), "pixel_error_stitched": stitched.mean().item(),
            "pixel_error_stitched_blank": blank.mean().item()}


def _reconstruct_one(
    model: OmniMAE, sample: torch.Tensor, name: str, mask_type: str, ratio: float, seed: int, fps: float, out: Path
) -> dict:
    """Figures for one input under one mask; returns its index entry (file names relative to ``out``)."""
    grid = token_grid(tuple(sample.shape), model.patch_size)
    mask = make_mask(grid, ratio, mask_type, torch.Generator().manual_seed(seed)).unsqueeze(0)
    x = sample.unsqueeze(0)
    with torch.no_grad():
        pred = model(x, mask.to(x.device))
        scores = reconstruction_scores(model, x, mask, pred)
    views = reconstruction_views(pred, x, mask, model.patch_size)
    kind = "video" if sample.ndim == 4 else "image"
    hidden = int(mask.sum())
    title = (
        f"{name}: {hidden}/{mask.numel()} patches masked ({mask_type}, ratio {ratio:g}); "
        f"masked-patch loss {scores['loss']:.3f}; hidden-pixel error stitched {scores['pixel_error_stitched']:.4f} "
        f"(blank {scores['pixel_error_stitched_blank']:.4f})"
    )
    stem = f"{name}_{mask_type}_{round(ratio * 100)}"
    files = {"png": f"{stem}.png"}
    if kind == "image":
        fig = views_grid(views, suptitle=title)
    else:
        one = sample_views(views, 0)
        fig = frame_strip(one, suptitle=title)
        tiles = labelled_tiles(one)
        files["gif"] = save_gif(tiles, out / f"{stem}.gif", fps).name
        if mp4_encoder() is not None:
            files["mp4"] = save_mp4(tiles, out / f"{stem}.mp4", fps).name
    fig.savefig(out / files["png"], dpi=100)
    return {
        "kind": kind,
        "mask_type": mask_type,
        "mask_ratio": ratio,
        "num_masked": hidden,
        "num_tokens": mask.numel(),
        **scores,
        "files": files,
    }


def write_image_grid(
    model: OmniMAE,
    inputs: Sequence[Input],
    path: str | PathLike,
    mask_ratio: float = 0.9,
    mask_type: str = "random",
    seed: int = 0,
) -> Path:
    """Every image of ``inputs`` in one figure, one row of views each, under one mask: a compact picture (the
    README's). Each image's mask is the one ``write_reconstructions`` draws for it (a generator seeded with
    ``seed`` per input); each row is labelled with its file name and :func:`reconstruction_scores`. Returns
    ``path``."""
    img_size, num_frames = model_layout(model)
    device = next(model.parameters()).device
    rows, labels = [], []
    was_training = model.training
    model.eval()
    try:
        for i, source in enumerate(inputs):
            x = load_input(source, img_size, num_frames).to(device).unsqueeze(0)
            if x.ndim != 4:
                raise ValueError(f"write_image_grid takes images only; {source} is a video")
            grid = token_grid(tuple(x.shape[1:]), model.patch_size)
            mask = make_mask(grid, mask_ratio, mask_type, torch.Generator().manual_seed(seed)).unsqueeze(0)
            with torch.no_grad():
                pred = model(x, mask.to(device))
                scores = reconstruction_scores(model, x, mask, pred)
            rows.append(reconstruction_views(pred, x, mask, model.patch_size))
            name = f"{i:02d}_tensor" if isinstance(source, torch.Tensor) else Path(source).stem
            labels.append(
                f"{name}, loss {scores['loss']:.3f}, stitched {scores['pixel_error_stitched']:.4f} "
                f"(blank {scores['pixel_error_stitched_blank']:.4f})"
            )
    finally:
        model.train(was_training)
    views = {key: torch.cat([row[key] for row in rows]) for key in VIEW_KEYS}
    title = (
        f"{len(rows)} images, {mask_type} masking, ratio {mask_ratio:g} ({int(mask.sum())}/{mask.numel()} patches "
        "hidden); per row: masked-patch loss, hidden-pixel error of the stitched prediction (of a stitched blank one)"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    views_grid(views, row_labels=labels, suptitle=title).savefig(path, dpi=100)
    return path


def _index_html(entries: list[dict]) -> str:
    legend = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(VIEW_TITLES[k])}</li>" for k in VIEW_KEYS)
    body = []
    for e in entries:
        files = e["files"]
        caption = (
            f"{e['input']} ({e['kind']}): {e['num_masked']}/{e['num_tokens']} patches masked, "
            f"{e['mask_type']} ratio {e['mask_ratio']:g}, masked-patch loss {e['loss']:.3f}, hidden-pixel error "
            f"stitched {e['pixel_error_stitched']:.4f} (blank {e['pixel_error_stitched_blank']:.4f})"
        )
        images = "".join(
            f'<img src="{html.escape(files[key])}" alt="{key}">' for key in ("png", "gif") if key in files
        )
        link = f' <a href="{html.escape(files["mp4"])}">mp4</a>' if "mp4" in files else ""
        body.append(f"<h3>{html.escape(caption)}{link}</h3><div>{images}</div>")
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>OmniMAE reconstructions</title>"
        "<style>img{max-width:100%;margin:4px;vertical-align:top}</style></head><body>"
        f"<h1>OmniMAE reconstructions</h1><p>Views:</p><ul>{legend}</ul>{''.join(body)}</body></html>\n"
    )


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="omnimae-cli reconstruct", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="released OmniMAE pretraining file or Lightning .ckpt")
    parser.add_argument("--inputs", nargs="+", required=True, help="image and video files")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--mask-ratios", nargs="+", type=float, default=[0.75, 0.9, 0.95])
    parser.add_argument("--mask-types", nargs="+", choices=MASK_TYPES, default=["random"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, default=4.0, help="frame rate of the GIF / MP4 outputs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--image-grid",
        action="store_true",
        help="also draw all image inputs in one figure per mask type and ratio: image_grid_<type>_<percent>.png",
    )
    args = parser.parse_args(argv)
    missing = [p for p in args.inputs if not Path(p).is_file()]
    if missing:  # before the checkpoint loads: a typo should not cost a model load and a traceback
        raise UserError(f"--inputs: no such file: {', '.join(missing)}")
    model = load_pretrain_model(args.checkpoint).to(args.device)
    index = write_reconstructions(
        model, args.inputs, args.out_dir, args.mask_ratios, args.mask_types, args.seed, args.fps
    )
    images = [p for p in args.inputs if Path(p).suffix.lower() not in VIDEO_SUFFIXES]
    if args.image_grid and images:
        for mask_type in args.mask_types:
            for ratio in args.mask_ratios:
                name = f"image_grid_{mask_type}_{round(ratio * 100)}.png"
                print(write_image_grid(model, images, Path(args.out_dir) / name, ratio, mask_type, args.seed))
    print(index)
    return index


if __name__ == "__main__":
    main()
