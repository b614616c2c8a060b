"""Fine-tuning augmentations per sample: RandAugment and random erasing, for images and for videos.

The video versions keep a clip one clip: RandAugment draws its operations and magnitudes ONCE and applies
them identically to every frame; random erasing cuts one box through all frames. No flip for SSv2 (it has
left / right classes). Batch-level Mixup / CutMix is the fine-tuning task's
(:class:`omnimae_pl.tasks.finetune.mixup.VideoMixup`).

They run in DataLoader workers and take an explicit ``torch.Generator`` (derived from
(seed, epoch, index)), so a resumed run draws the same augmentations. timm's implementations draw from the
global ``random`` / ``numpy`` / ``torch`` generators; :func:`seeded_global_rng` seeds those from the
sample's generator for the duration of one call and restores them afterwards.

* :class:`ImageFinetuneTransform` - the IN1K fine-tuning recipe, an ``ImageNet(transform=...)`` hook:
  RandomResizedCrop(224, scale 0.08-1, bicubic) -> flip 0.5 -> RandAugment ``rand-m9-mstd0.5-inc1`` ->
  normalise -> RandomErasing(0.25, pixel mode).
* :class:`VideoFinetuneTransform` - the SSv2 recipe, a drop-in for ``VideoTrainTransform``: short side 256
  -> RandomResizedCrop(224, scale 0.08-1), one box for the clip, no flip -> frame-consistent RandAugment
  (``rand-m7-n4-mstd0.5-inc1``: pytorchvideo's magnitude 7, 4 ops, p 0.5 in timm's op set) -> normalise ->
  one erasing box for the clip.

Erasing runs after normalisation (timm's order: the "pixel" noise is N(0, 1) in normalised units).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from omnimae_pl.constants import IMAGENET_MEAN
from omnimae_pl.data import image_transforms as itf
from omnimae_pl.data import video_transforms as vtf

try:  # timm's magnitude upper bound (private; 10 in every timm 1.x)
    from timm.data.auto_augment import _LEVEL_DENOM
except ImportError:  # pragma: no cover
    _LEVEL_DENOM = 10.0

IMAGE_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
VIDEO_RAND_AUGMENT = "rand-m7-n4-mstd0.5-inc1"
_PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@contextlib.contextmanager
def seeded_global_rng(generator: torch.Generator | None) -> Iterator[None]:
    """Seed Python's ``random``, NumPy's and torch's global generators from ``generator`` (one draw) and
    restore all three on exit. ``None`` leaves the global generators alone."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ------------------------------------------------------------------------------------------- RandAugment


@dataclass(frozen=True)
class AugmentStep:
    """One drawn operation: ``fn(image, *args, **kwargs)`` (a timm PIL op with its level already drawn)."""

    name: str
    fn: Callable
    args: tuple
    kwargs: dict


class FrameConsistentRandAugment:
    """timm's RandAugment (``config_str`` as in timm, e.g. ``rand-m9-mstd0.5-inc1``) whose random choices -
    which ops, whether each fires, its magnitude, its sign, its interpolation - are drawn once per call and
    applied identically to every frame. For a single image it is timm's RandAugment.

    ``img_size`` sets the translate constant (0.45 x side, as timm's ``create_transform``); the fill colour
    is the ImageNet mean.
    """

    def __init__(self, config_str: str = VIDEO_RAND_AUGMENT, img_size: int = 224, interpolation: str = "bicubic"):
        hparams = {
            "translate_const": int(img_size * 0.45),
            "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN),
            "interpolation": _PIL_INTERPOLATION[interpolation],
        }
        self.config_str = config_str
        self.policy = rand_augment_transform(config_str, hparams)

    def draw(self, generator: torch.Generator | None = None) -> list[AugmentStep]:
        """The operations for one clip, drawn as timm's ``RandAugment.__call__`` / ``AugmentOp.__call__`` do."""
        policy = self.policy
        steps = []
        with seeded_global_rng(generator):
            ops = np.random.choice(
                policy.ops, policy.num_layers, replace=policy.choice_weights is None, p=policy.choice_weights
            )
            for op in ops:
                if op.prob < 1.0 and random.random() > op.prob:
                    continue
                magnitude = op.magnitude
                if op.magnitude_std > 0:
                    if op.magnitude_std == float("inf"):
                        magnitude = random.uniform(0, magnitude)
                    else:
                        magnitude = random.gauss(magnitude, op.magnitude_std)
                magnitude = max(0.0, min(magnitude, op.magnitude_max or _LEVEL_DENOM))
                args = tuple(op.level_fn(magnitude, op.hparams)) if op.level_fn is not None else ()
                kwargs = dict(op.kwargs)
                if isinstance(kwargs.get("resample"), (list, tuple)):
                    kwargs["resample"] = random.choice(kwargs["resample"])
                fn = op.aug_fn
                if op.name.startswith("Posterize") and args and args[0] < 1:
                    fn = _posterize_to_zero_bits  # Pillow >= 11 refuses bits=0, which timm asks for at m >= 10
                steps.append(AugmentStep(op.name, fn, args, kwargs))
        return steps

    @staticmethod
    def apply(steps: Sequence[AugmentStep], image: Image.Image) -> Image.Image:
        for step in steps:
            image = step.fn(image, *step.args, **step.kwargs)
        return image

    def __call__(self, frames: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 frames (T, 3, H, W) (or one image (3, H, W)) -> the same shape, every frame augmented alike."""
        steps = self.draw(generator)
        if not steps:
            return frames
        single = frames.ndim == 3
        batch = frames.unsqueeze(0) if single else frames
        out = torch.stack([_from_pil(self.apply(steps, _to_pil(f))) for f in batch])
        return out[0] if single else out


def _posterize_to_zero_bits(image: Image.Image, *args, **kwargs) -> Image.Image:
    """Keeping 0 bits (older Pillow's result for ``posterize(image, 0)``): a black image."""
    return Image.new(image.mode, image.size)


def _to_pil(frame: torch.Tensor) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(frame.permute(1, 2, 0).numpy()))


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


# ------------------------------------------------------------------------------------------ erasing


class ClipRandomErasing:
    """timm's ``RandomErasing`` with one box for a whole clip: a (3, T, H, W) clip is erased as one
    (3T, H, W) image, so every frame loses the same box (and, in "pixel" mode, gets its own noise). Images
    (3, H, W) are erased as timm does. Works in place on a normalised float tensor and returns it."""

    def __init__(
        self,
        probability: float = 0.25,
        mode: str = "pixel",
        max_count: int = 1,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
    ) -> None:
        self.probability = probability
        self.eraser = RandomErasing(
            probability=probability, min_area=min_area, max_area=max_area, min_aspect=min_aspect, mode=mode,
            max_count=max_count, device="cpu",
        )

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.probability <= 0:
            return x
        flat = x if x.ndim == 3 else x.view(x.shape[0] * x.shape[1], *x.shape[2:])
        with seeded_global_rng(generator):
            self.eraser(flat)
        return x


# ------------------------------------------------------------------------------------------ transforms


def _normalise_frames(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> float32 (3, T, H, W) with the ImageNet mean / std."""
    return vtf.normalise(frames)


@dataclass(frozen=True)
class ImageFinetuneTransform:
    """IN1K fine-tuning (the official recipe), an ``ImageNet(transform=...)``: ``(PIL image, generator) -> (3, S, S)``."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    interpolation: str = "bicubic"
    rand_augment: str | None = IMAGE_RAND_AUGMENT
    erase_prob: float = 0.25
    erase_mode: str = "pixel"
    erase_count: int = 1
    _ra: FrameConsistentRandAugment | None = field(default=None, init=False, repr=False, compare=False)
    _erase: ClipRandomErasing | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ra = FrameConsistentRandAugment(self.rand_augment, self.size, self.interpolation) if self.rand_augment else None
        object.__setattr__(self, "_ra", ra)
        object.__setattr__(self, "_erase", ClipRandomErasing(self.erase_prob, self.erase_mode, self.erase_count))

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        width, height = image.size
        box = itf.random_resized_crop_box(height, width, self.scale, self.ratio, generator)
        flip = bool(torch.rand((), generator=generator) < self.hflip_prob)
        top, left, h, w = itf.draft_for_box(image, box, self.size, self.size)
        out = F.resized_crop(
            itf.decode_rgb(image), top, left, h, w, [self.size, self.size],
            interpolation=itf.INTERPOLATIONS[self.interpolation], antialias=True,
        )
        if flip:
            out = F.horizontal_flip(out)
        if self._ra is not None:
            out = self._ra(out, generator)
        return self._erase(itf.normalise(out), generator)


@dataclass(frozen=True)
class VideoFinetuneTransform:
    """SSv2 fine-tuning (the official recipe), a drop-in for ``VideoTrainTransform``: uint8 (T, H, W, 3) clip and a
    generator -> normalised float32 (3, T, S, S). One crop, one RandAugment draw and one erasing box for all
    frames; ``hflip_prob`` 0 (SSv2) unless a dataset without left / right classes wants it."""

    crop_size: int = 224
    short_side: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.0
    rand_augment: str | None = VIDEO_RAND_AUGMENT
    erase_prob: float = 0.25
    erase_mode: str = "pixel"
    erase_count: int = 1
    _ra: FrameConsistentRandAugment | None = field(default=None, init=False, repr=False, compare=False)
    _erase: ClipRandomErasing | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ra = FrameConsistentRandAugment(self.rand_augment, self.crop_size, "bilinear") if self.rand_augment else None
        object.__setattr__(self, "_ra", ra)
        object.__setattr__(self, "_erase", ClipRandomErasing(self.erase_prob, self.erase_mode, self.erase_count))

    def crop(self, clip: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """uint8 (T, H, W, 3) -> uint8 (T, 3, S, S): the RandomResizedCrop of ``VideoTrainTransform``, in
        short-side-resized coordinates mapped back to the source (one resampling)."""
        if clip.dtype != torch.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
            raise ValueError(f"expected a uint8 clip (T, H, W, 3), got {clip.dtype} {tuple(clip.shape)}")
        height, width = clip.shape[1:3]
        scaled_h, scaled_w = vtf.short_side_size(height, width, self.short_side)
        top, left, h, w = vtf.random_resized_crop_box(scaled_h, scaled_w, self.scale, self.ratio, generator)
        sy, sx = height / scaled_h, width / scaled_w
        src_top, src_left = min(round(top * sy), height - 1), min(round(left * sx), width - 1)
        src_h = max(min(round(h * sy), height - src_top), 1)
        src_w = max(min(round(w * sx), width - src_left), 1)
        video = tv_tensors.Video(clip.permute(0, 3, 1, 2))
        out = F.resized_crop(
            video, src_top, src_left, src_h, src_w, [self.crop_size, self.crop_size],
            interpolation=InterpolationMode.BILINEAR, antialias=True,
        )
        return out.as_subclass(torch.Tensor)

    def __call__(self, clip: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        frames = self.crop(clip, generator)
        if self.hflip_prob > 0 and bool(torch.rand((), generator=generator) < self.hflip_prob):
            frames = frames.flip(-1)
        if self._ra is not None:
            frames = self._ra(frames, generator)
        return self._erase(_normalise_frames(frames), generator)
