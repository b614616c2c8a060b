"""Device-side augmentation: the uint8 batches of the loader workers -> the float batches of ``sample.py``.

With ``PretrainDataModule(augment_on="device")`` the training workers only decode (images: also crop and resize
in uint8) and the rest runs here, after the batch has reached the device, in a few batched ops:

- images: uint8 (B, 3, S, S) + ``flip`` (B,) -> horizontal flip where drawn, then /255 and ImageNet mean / std
  in one fused multiply-add. Exactly the worker path's tensor (the same uint8 crop, flipped and normalised).
- video: each clip once, uint8 (N, T, Hmax, Wmax, 3) padded to the batch's largest (``clip_size`` holds each
  clip's own), plus per replica its crop ``box`` in source pixels (top, left, height, width) and ``clip_index``
  -> per replica the crop resized to S x S (bilinear, antialiased) and normalised: (N * R, 3, T, S, S).

The video resize is the worker's (``F.interpolate``, bilinear, antialiased, on the cropped box) in float, rounded
to whole grey levels as torchvision's uint8 kernel rounds; that kernel computes in fixed point, so some values
still land one grey level apart, never more: on loader-bench's SSv2-sized clips (427x240, 16 frames, 24 crops)
12.6 % of the values, max abs 0.0175 and mean abs 0.0022 in normalised units; on the flat test clips 1.4 %, mean
0.0003. ``VIDEO_TOLERANCE`` (one grey level, mean 0.003) is what tests/data/test_device_augment.py asserts.
Not rounding doubles the mean (0.004 on the SSv2-sized clips, 0.0017 on the test clips).
``torchvision.ops.roi_align`` (aligned, adaptive sampling ratio: one op for all boxes) was measured on SSv2-sized
clips too: up to 0.38 apart at the crop edges (it samples beyond the box, where the worker's resize clamps to
it), and it averages samples in a box instead of an antialiasing kernel, so the per-box ``interpolate`` is used.

Boxes are plain Python ints (they stay on the host when Lightning moves the batch), so that cropping reads them
without a device-to-host synchronisation. Nothing here needs Lightning or a model; on a CPU machine the same
code runs on the CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from omnimae_pl.constants import IMAGENET_MEAN, IMAGENET_STD
from omnimae_pl.data.sample import EncodedImages

Box = tuple[int, int, int, int]  # top, left, height, width in source pixels

# max abs and mean abs difference, in normalised units, from the worker path's video tensors
VIDEO_TOLERANCE = {"max": 1.0 / (255 * min(IMAGENET_STD)) + 1e-4, "mean": 0.003}
# the batch keys of a uint8 batch that the float batch no longer has
UINT8_KEYS = ("flip", "clip", "clip_size", "clip_index", "box")


def is_uint8_batch(batch: dict) -> bool:
    """A batch from workers that left the crop-resize (video) or flip (images) and normalisation to the device."""
    return "clip" in batch or "flip" in batch


def normalise(pixels: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """Pixel values 0-255 (uint8 or float) -> float32 ``(x / 255 - mean) / std``, one fused multiply-add;
    ``channel_dim`` is the axis of the 3 colour channels. A float input is overwritten (it is the output)."""
    scale, shift = _affine(pixels.device, pixels.ndim, channel_dim % pixels.ndim)
    if pixels.dtype == torch.float32:
        return torch.addcmul(shift, pixels, scale, out=pixels)
    return torch.addcmul(shift, pixels, scale)  # uint8 in, float32 out: no float copy of the input


@functools.cache
def _affine(device: torch.device, ndim: int, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``normalise``'s scale and shift, made once per device: copying them there at every batch would wait for
    the device's queued work (a copy from pageable memory synchronises)."""
    shape = [1] * ndim
    shape[channel_dim] = 3
    scale = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(shape).to(device)
    shift = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(shape).to(device)
    return scale, shift


def flip_normalise(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) and bool (B,) -> float32 (B, 3, H, W): flipped left-right where ``flip``, normalised."""
    flipped = torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(-1), images)
    return normalise(flipped)


def crop_resize(clips: torch.Tensor, boxes: Sequence[Box], clip_index: Sequence[int], size: int) -> torch.Tensor:
    """uint8 clips (N, T, H, W, 3), one box per output (source pixels) and the clip each box is cut from ->
    float32 (len(boxes), 3, T, size, size): pixel values 0-255 resized bilinearly with antialiasing, rounded to
    whole grey levels as the worker's uint8 resize rounds them."""
    frames = clips.shape[1]
    out = torch.empty((len(boxes), 3, frames, size, size), device=clips.device)
    for k, ((top, left, height, width), clip) in enumerate(zip(boxes, clip_index, strict=True)):
        crop = clips[clip, :, top : top + height, left : left + width].permute(0, 3, 1, 2).float()
        resized = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[k].copy_(resized.round_().transpose(0, 1))
    return out


def to_float_batch(batch: dict, size: int) -> dict:
    """A uint8 batch (see the module docstring) -> the same batch with ``input`` as the workers would have made
    it (``sample.py``) and without the uint8 keys; ``size``: the output side (the datamodule's ``img_size``)."""
    out = {k: v for k, v in batch.items() if k not in UINT8_KEYS}
    if "clip" in batch:
        pixels = crop_resize(batch["clip"], batch["box"], batch["clip_index"], size)
        out["input"] = normalise(pixels)
    else:
        out["input"] = flip_normalise(batch["input"], batch["flip"])
    return out


def transfer_bytes(batch: dict) -> int:
    """Bytes of the tensors in ``batch``: what moving it to the device copies (boxes are host ints), plus the
    encoded JPEGs of ``image_decode="device"``, which ``decode_jpeg`` copies there."""
    return sum(v.nbytes for v in batch.values() if isinstance(v, (torch.Tensor, EncodedImages)))
