"""Image JPEGs decoded on the device: ``PretrainDataModule(image_decode="device")``, the batches of ``sample.py``
whose image rows carry ``jpeg`` -> the uint8 image batch that ``device_augment`` flips and normalises.

The loader workers (``ImageNet(decode_on="device")``) only read each file and its header; they draw the crop
box and flip from the header's size with the same ``sample_generator(seed, epoch, index, "crop")`` draws as the
worker path (``RandomResizedCropFlip.draw``), so resume stays exact and both paths cut the same box. Here, once
the batch is on its device:

1. ``torchvision.io.decode_jpeg`` decodes all the batch's JPEGs in ONE call on that device (nvJPEG on a GPU,
   libjpeg-turbo on a CPU machine: the same code). If that call raises, the files are decoded one by one, and a
   file the device rejects is decoded on the CPU with PIL, the worker path's decoder, and counted as CPU-decoded
   (as are the rows the workers decoded: PNG behind .JPEG, CMYK, truncated; see ``imagenet.device_decodable``).
   A file no decoder reads becomes the placeholder a worker makes (the mean image, ``valid`` False, its reason
   in ``errors``), counted as a bad sample by the caller: never a crash.
2. Each image is cut to its box and resized to ``size`` (bicubic, antialiased, as the worker's default
   transform), rounded and clamped to whole grey levels as the worker's uint8 resize is.

What differs from the worker path is the decoder and the resize kernel: the worker decodes a JPEG at 1/2, 1/4
or 1/8 scale when the box allows (``Image.draft``) and resizes in torchvision's fixed-point uint8 kernel, this
path decodes at full size and resizes in float. At the pretraining geometry (224 px crops of loader-bench's
500 x 375 photo JPEGs, 128 crops) the two differ by at most 10 grey levels (0.171 in normalised units), mean
0.0028: ``TOLERANCE``, which tests/data/test_device_decode.py asserts. Where the worker decodes at 1/4 or 1/8
(outputs far smaller than the file: 32 px crops of the same photos) the mean is 0.06 (about 3 grey levels),
up to 85 levels on fine detail: the scaled IDCT is a cruder downscale than the antialiased resize of the full
decode. Averaging the full decode down by the draft's factor first does not bring them closer (measured: mean
0.05 at 32 px), so it is not done.

Boxes are host ints and the decoded sizes are known on the host (nvJPEG parses headers there), so the steady
state reads nothing back from the device; a file that fails reads its row's ``index`` (one sync per failure).
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from omnimae_pl.data.image_transforms import decode_rgb
from omnimae_pl.data.imagenet import mean_image
from omnimae_pl.data.sample import EncodedImages, failure_reason

# max abs and mean abs difference from the worker path's float batch, in normalised units (see the docstring)
TOLERANCE = {"max": 0.2, "mean": 0.004}


def decode_images(batch: dict, size: int) -> tuple[dict, int, dict[int, str]]:
    """A batch with ``jpeg`` (``sample.py``) -> (the same batch with ``input`` uint8 (B, 3, size, size) for
    every row and without ``jpeg`` / ``box``, rows decoded on a CPU, {dataset index: why} of the rows that
    became placeholders here)."""
    encoded: EncodedImages = batch["jpeg"]
    device = batch["flip"].device
    files = encoded.files()
    rows = [i for i, f in enumerate(files) if f is not None]
    decoded = decode_jpegs([files[i] for i in rows], device)
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8, device=device)
    crops = iter(batch.get("input", ()))
    for i, file in enumerate(files):
        if file is None:  # decoded by the worker (or its placeholder)
            out[i].copy_(next(crops))
    cpu_decoded, failed = encoded.cpu_decoded, {}
    result = {k: v for k, v in batch.items() if k not in ("jpeg", "box", "input")}
    for i, (image, how) in zip(rows, decoded):
        if image is None:
            out[i].copy_(mean_image(size, True))
            if not failed:
                result["valid"] = result["valid"].clone()  # the batch handed in keeps its own
            result["valid"][i] = False
            failed[int(batch["index"][i])] = how
            continue
        cpu_decoded += how == "cpu"
        resize_box(image, batch["box"][i], size, out[i])
    if failed:
        result["errors"] = {**batch["errors"], **failed}
    result["input"] = out
    return result, cpu_decoded, failed


def decode_jpegs(files: list[torch.Tensor], device: torch.device) -> list[tuple[torch.Tensor | None, str]]:
    """Each file (uint8 1-D, on the host) -> (uint8 (3, H, W) RGB on ``device``, how): "device" from
    ``decode_jpeg`` there, "cpu" from PIL after ``decode_jpeg`` rejected it; (None, why) when neither read it."""
    if not files:
        return []
    try:
        return [(image, "device") for image in decode_jpeg(files, mode=ImageReadMode.RGB, device=device)]
    except (RuntimeError, ValueError):
        pass  # some file of the batch is rejected: find which
    out = []
    for file in files:
        try:
            out.append((decode_jpeg(file, mode=ImageReadMode.RGB, device=device), "device"))
        except (RuntimeError, ValueError):
            out.append(_decode_with_pil(file, device))
    return out


def _decode_with_pil(file: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, str]:
    try:
        with Image.open(io.BytesIO(file.numpy().tobytes())) as image:
            return decode_rgb(image).to(device), "cpu"
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return None, failure_reason(err)  # the reason a worker gives for the same file


def resize_box(image: torch.Tensor, box: tuple[int, int, int, int], size: int, out: torch.Tensor) -> None:
    """uint8 (3, H, W), a box (top, left, height, width) -> ``out`` uint8 (3, size, size): the box resized
    bicubically with antialiasing, rounded and clamped to 0-255 as torchvision's uint8 kernel does."""
    top, left, height, width = box
    crop = image[:, top : top + height, left : left + width].unsqueeze(0).float()
    resized = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    out.copy_(resized[0].round_().clamp_(0, 255))
