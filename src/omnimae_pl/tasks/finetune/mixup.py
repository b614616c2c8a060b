"""Batch-level Mixup / CutMix for fine-tuning, images and videos alike.

Mixup 0.8 / CutMix 1.0 / label smoothing 0.1 (the official recipes) are timm's ``Mixup`` in batch mode, with
the CutMix box cut through all frames over height and width only, never along time (timm's ``Mixup`` on a 5-D
batch would index time and height: do not use it for video). For 4-D image batches it is exactly timm's batch
mode.
"""

from __future__ import annotations

import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam, mixup_target

from omnimae_pl.data.video_augment import seeded_global_rng


class VideoMixup(Mixup):
    """timm's batch-mode Mixup / CutMix for (B, C, H, W) images AND (B, C, T, H, W) clips.

    ``mixer(x, target)`` -> (x mixed in place, soft targets (B, num_classes)) with timm's semantics (partner =
    the batch flipped, ``prob`` / ``switch_prob``, lam correction for clipped boxes, label smoothing inside the
    mixed targets). The CutMix box spans all channels and all frames and cuts only height and width. Odd batch
    sizes are allowed. ``generator`` (optional) makes the draws a function of it, e.g. of (seed, step).
    After each call ``last`` holds ``{"lam", "cutmix", "box"}`` (box = (y0, y1, x0, x1) or None).
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        cutmix_minmax: tuple[float, float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        correct_lam: bool = True,
        label_smoothing: float = 0.1,
        num_classes: int = 1000,
    ) -> None:
        super().__init__(
            mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=cutmix_minmax, prob=prob,
            switch_prob=switch_prob, mode="batch", correct_lam=correct_lam, label_smoothing=label_smoothing,
            num_classes=num_classes,
        )
        self.last: dict = {}

    def _mix_batch(self, x: torch.Tensor) -> float:
        lam, use_cutmix = self._params_per_batch()
        self.last = {"lam": 1.0, "cutmix": False, "box": None}
        if lam == 1.0:
            return 1.0
        if use_cutmix:
            (yl, yh, xl, xh), lam = cutmix_bbox_and_lam(
                x.shape[-2:], lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam
            )
            x[..., yl:yh, xl:xh] = x.flip(0)[..., yl:yh, xl:xh]  # every channel and frame; H and W only
            lam = float(lam)  # numpy's float64 would turn the targets into float64
            self.last = {"lam": lam, "cutmix": True, "box": (yl, yh, xl, xh)}
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
            self.last = {"lam": lam, "cutmix": False, "box": None}
        return float(lam)

    def __call__(
        self, x: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim not in (4, 5):
            raise ValueError(f"expected (B, C, H, W) or (B, C, T, H, W), got {tuple(x.shape)}")
        with seeded_global_rng(generator):
            lam = self._mix_batch(x)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)
