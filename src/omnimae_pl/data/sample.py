"""The sample and batch contract between datasets, the interleaver and the LightningModules.

A dataset item is a dict (or, for replicated video, a list of such dicts, one per replica):

    input   float32 (3, H, W) image or (3, T, H, W) clip, normalised with ImageNet mean / std
    mask    bool (T', H', W') token mask, True = masked (images: T' = 1); absent for fine-tuning
    label   int64 scalar class index, -1 when the source has no labels
    valid   bool scalar, False for a placeholder that stands in for a file that could not be read
    index   int64 scalar, the sample's index in its dataset (replicas share it); ``PADDING_INDEX`` for the
            padding that evens out the ranks' shares of an evaluation set (invalid, and never counted)
    error   str, why a placeholder's file could not be read ("" for a readable sample)

A collated batch has the same keys with a leading batch axis, plus

    modality     "image" or "video" (str): every batch holds a single modality
    source       the name of the dataset it came from (str)
    num_visible  visible tokens per sample (int, with masks only): read here on the CPU so that the
                 training step never reads it back from the device
    errors       {index: error} of the batch's placeholders, for the reports of files that could not be read

Training batches of ``PretrainDataModule(augment_on="device")`` leave the rest to ``device_augment``, which
turns them into the batch above once on the device:

    images  ``input`` is the uint8 (3, H, W) crop, not yet flipped or normalised, plus ``flip`` (bool scalar)
    video   no ``input``: every replica carries ``clip``, the uint8 decoded frames (T, H, W, 3) it shares with
            the clip's other replicas, and ``box``, its crop in source pixels (top, left, height, width: ints).
            The batch holds each clip once, ``clip`` uint8 (N, T, Hmax, Wmax, 3) zero-padded to the largest,
            ``clip_size`` int64 (N, 2) each clip's own (H, W), and per replica ``clip_index`` (its clip) and
            ``box``: lists of plain ints, which stay on the host, so the device op reads them without a sync

and with ``image_decode="device"`` as well, image samples leave the JPEG decode to ``device_decode``: each
carries ``jpeg``, its file's bytes (uint8, 1-D), with its crop ``box`` in full-size pixels and ``flip``, and no
``input``; a file the device's decoder does not take (not a JPEG, not L / RGB, truncated) is decoded by the
worker as above and carries an empty ``jpeg`` beside its uint8 ``input``. The batch holds ``jpeg``, one
:class:`EncodedImages` for all rows, ``box`` per row (None where the worker decoded), and ``input`` uint8
(K, 3, H, W) of the K worker-decoded rows only, in row order (absent when K is 0)
"""

from __future__ import annotations

import torch

from omnimae_pl.masking import MaskingConfig, token_grid

SAMPLE_KEYS = ("input", "mask", "label", "valid", "index")
PADDING_INDEX = -1


def make_sample(
    x: torch.Tensor,
    label: int,
    valid: bool,
    index: int,
    masking: MaskingConfig | None = None,
    patch_size: tuple[int, int, int] | None = None,
    mask_generator: torch.Generator | None = None,
    error: str = "",
    input_shape: tuple[int, ...] | None = None,
    **extra,
) -> dict:
    """One sample dict; with ``masking``, a mask over the token grid of ``x`` drawn from ``mask_generator``;
    ``error`` says why a placeholder's file could not be read (see :func:`failure_reason`). ``x`` is None for
    a replica whose crop is cut on the device: then ``input_shape`` is the shape the model will get, and
    ``extra`` holds the uint8 keys (module docstring)."""
    sample = {} if x is None else {"input": x}
    sample.update(
        label=torch.tensor(label, dtype=torch.int64),
        valid=torch.tensor(valid),
        index=torch.tensor(index, dtype=torch.int64),
        error=error,
        **extra,
    )
    if masking is not None:
        sample["mask"] = masking(token_grid(input_shape or tuple(x.shape), patch_size), mask_generator)
    return sample


class EncodedImages:
    """The ``jpeg`` of a batch: every row's file bytes in one uint8 tensor (one shared-memory hand-over from the
    worker instead of one per file) and each row's length, 0 for a row the worker decoded (``cpu_decoded`` of
    those were readable). Neither a tensor nor a collection, so Lightning leaves it on the host: that is where
    ``torchvision.io.decode_jpeg`` takes its input, also when it decodes on the GPU."""

    def __init__(self, data: torch.Tensor, sizes: list[int], cpu_decoded: int) -> None:
        self.data, self.sizes, self.cpu_decoded = data, sizes, cpu_decoded

    @classmethod
    def join(cls, files: list[torch.Tensor], cpu_decoded: int) -> EncodedImages:
        return cls(torch.cat(files), [len(f) for f in files], cpu_decoded)

    def files(self) -> list[torch.Tensor | None]:
        """Per row its bytes (a view, uint8 1-D), None where the worker decoded."""
        return [f if len(f) else None for f in torch.split(self.data, self.sizes)]

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


def collate_samples(items: list, modality: str, source: str) -> dict:
    """Stack samples into a batch; a list item (replicas of one clip) is flattened in place."""
    flat: list[dict] = []
    for item in items:
        flat.extend(item if isinstance(item, list) else [item])
    encoded = "jpeg" in flat[0]
    keys = [k for k in (*SAMPLE_KEYS, "flip") if k in flat[0] and not (encoded and k == "input")]
    batch = {k: torch.stack([torch.as_tensor(s[k]) for s in flat]) for k in keys}
    if encoded:
        batch["jpeg"] = EncodedImages.join(
            [s["jpeg"] for s in flat], sum(1 for s in flat if not len(s["jpeg"]) and bool(s["valid"]))
        )
        batch["box"] = [tuple(s["box"]) if len(s["jpeg"]) else None for s in flat]
        if crops := [s["input"] for s in flat if not len(s["jpeg"])]:
            batch["input"] = torch.stack(crops)
    if "clip" in flat[0]:
        firsts = [item[0] if isinstance(item, list) else item for item in items]
        batch["clip"], batch["clip_size"] = pad_clips([s["clip"] for s in firsts])
        per_clip = torch.tensor([len(item) if isinstance(item, list) else 1 for item in items])
        batch["clip_index"] = torch.repeat_interleave(torch.arange(len(items)), per_clip).tolist()
        batch["box"] = [tuple(s["box"]) for s in flat]
    batch["modality"] = modality
    batch["source"] = source
    batch["errors"] = {int(s["index"]): s["error"] for s in flat if s.get("error")}
    if "mask" in batch:
        batch["num_visible"] = int((~batch["mask"][0]).sum())
    return batch


def pad_clips(clips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 clips (T, H_i, W_i, 3) -> one zero-padded uint8 (N, T, Hmax, Wmax, 3) and their sizes (N, 2)."""
    sizes = torch.tensor([clip.shape[1:3] for clip in clips], dtype=torch.int64)
    height, width = sizes.max(dim=0).values.tolist()
    out = torch.zeros((len(clips), clips[0].shape[0], height, width, 3), dtype=torch.uint8)
    for n, clip in enumerate(clips):
        out[n, :, : clip.shape[1], : clip.shape[2]] = clip
    return out, sizes


def failure_reason(err: BaseException) -> str:
    """Why a file could not be read, as one line of at most 200 characters for the reports."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:200]
