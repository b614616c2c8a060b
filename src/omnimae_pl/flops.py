"""Analytic training FLOPs of one OmniMAE pretraining sample (for throughput and MFU reports).

Counted: every matrix product, at 2 FLOPs per multiply-add.

* patch embedding: the Conv3d over all N tubelets, ``2 N K D`` with ``K = 3 pt ph pw``; an image meets it with
  its time taps summed (its pt frames are identical), ``2 N (K / pt) D``;
* encoder blocks, on the ``n`` visible tokens only: qkv ``6 n D^2``, attention ``Q K^T`` and ``A V``
  ``2 n^2 D`` each, output projection ``2 n D^2``, MLP ``4 n D H`` (H = mlp_ratio D);
* ``decoder_embed`` on all N tokens, ``2 N D Dd``; decoder blocks as above with N tokens and width Dd;
* the pixel head on all N tokens, ``2 N Dd K``.

Training = forward + backward. A backward matmul costs twice its forward (the gradients of both operands),
except for the patch embedding, whose input is pixels that need no gradient: only its weight gradient is
computed (1x). So training = 3 x forward - 1 x patch-embed forward. This is what autograd really runs and what
``torch.utils.flop_counter.FlopCounterMode`` reports for one forward + backward.

Ignored (all memory-bound, well under 1 % of the total at ViT-B size and above): LayerNorm, softmax, GELU,
residual adds, the positional-embedding adds, bias adds, the gather/scatter of visible tokens, the mask-token
fill, target normalisation and the loss, and the optimizer step. Recomputation by activation checkpointing
and the re-computation of ``Q K^T`` inside flash-attention's backward are not counted either: these are
*model* FLOPs, the numerator of MFU, not hardware FLOPs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from omnimae_pl.masking import PAPER_MASK_RATIO, num_masked, token_grid


@dataclass(frozen=True)
class FlopDims:
    """The dimensions the count depends on."""

    patch_size: tuple[int, int, int]
    embed_dim: int
    depth: int
    mlp_hidden: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_mlp_hidden: int
    in_chans: int = 3


def flop_dims(size_spec_or_model) -> FlopDims:
    """Dimensions from a size name ("base"), a ``ModelSize`` or a built ``OmniMAE`` model."""
    if isinstance(size_spec_or_model, nn.Module):
        return _dims_from_model(size_spec_or_model)
    from omnimae_pl.models.factory import model_size

    spec = model_size(size_spec_or_model)
    return FlopDims(
        patch_size=tuple(spec.patch_size),
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        mlp_hidden=int(spec.embed_dim * spec.mlp_ratio),
        decoder_embed_dim=spec.decoder_embed_dim,
        decoder_depth=spec.decoder_depth,
        decoder_mlp_hidden=int(spec.decoder_embed_dim * spec.mlp_ratio),
    )


def _dims_from_model(model: nn.Module) -> FlopDims:
    enc, dec = model.encoder, model.decoder
    conv = enc.patch_embed.proj
    return FlopDims(
        patch_size=tuple(conv.kernel_size),
        embed_dim=conv.out_channels,
        depth=len(enc.blocks),
        mlp_hidden=enc.blocks[0].mlp.fc1.out_features,
        decoder_embed_dim=dec.decoder_embed.out_features,
        decoder_depth=len(dec.blocks),
        decoder_mlp_hidden=dec.blocks[0].mlp.fc1.out_features if len(dec.blocks) else 0,
        in_chans=conv.in_channels,
    )


def token_counts(
    dims: FlopDims, modality: str, img_size: int = 224, num_frames: int = 16, mask_ratio: float | None = None
) -> tuple[int, int]:
    """(all tokens N, visible tokens n) of one sample; random masking with the paper's ratio by default."""
    if modality not in PAPER_MASK_RATIO:
        raise ValueError(f"modality must be one of {tuple(PAPER_MASK_RATIO)}, got {modality!r}")
    shape = (dims.in_chans, img_size, img_size) if modality == "image" else (dims.in_chans, num_frames, img_size, img_size)
    grid = token_grid(shape, dims.patch_size)
    n_all = math.prod(grid)
    ratio = PAPER_MASK_RATIO[modality] if mask_ratio is None else mask_ratio
    return n_all, n_all - num_masked(grid, ratio, "random")


def _block_fwd(tokens: int, dim: int, hidden: int) -> dict[str, int]:
    return {
        "linear": 2 * tokens * dim * 3 * dim + 2 * tokens * dim * dim + 2 * 2 * tokens * dim * hidden,
        "attention": 2 * 2 * tokens * tokens * dim,  # Q K^T and A V, summed over heads
    }


def forward_flops_breakdown(
    size_spec_or_model,
    modality: str,
    img_size: int = 224,
    num_frames: int = 16,
    mask_ratio: float | None = None,
) -> dict[str, int]:
    """Forward FLOPs of one sample by part: patch_embed, encoder_linear, encoder_attention, decoder_embed,
    decoder_linear, decoder_attention, head."""
    d = size_spec_or_model if isinstance(size_spec_or_model, FlopDims) else flop_dims(size_spec_or_model)
    n_all, n_vis = token_counts(d, modality, img_size, num_frames, mask_ratio)
    k = d.in_chans * math.prod(d.patch_size)
    k_in = k // d.patch_size[0] if modality == "image" else k  # models.patch.TubeletEmbed folds an image's frames
    enc = _block_fwd(n_vis, d.embed_dim, d.mlp_hidden)
    dec = _block_fwd(n_all, d.decoder_embed_dim, d.decoder_mlp_hidden)
    return {
        "patch_embed": 2 * n_all * k_in * d.embed_dim,
        "encoder_linear": d.depth * enc["linear"],
        "encoder_attention": d.depth * enc["attention"],
        "decoder_embed": 2 * n_all * d.embed_dim * d.decoder_embed_dim,
        "decoder_linear": d.decoder_depth * dec["linear"],
        "decoder_attention": d.decoder_depth * dec["attention"],
        "head": 2 * n_all * d.decoder_embed_dim * k,
    }


def training_flops_per_sample(
    size_spec_or_model,
    modality: str,
    img_size: int = 224,
    num_frames: int = 16,
    mask_ratio: float | None = None,
) -> int:
    """Training FLOPs (forward + backward) of one image or clip, at the paper's masking by default
    (90 % of image tokens, 95 % of video tokens dropped). See the module docstring for what is counted."""
    parts = forward_flops_breakdown(size_spec_or_model, modality, img_size, num_frames, mask_ratio)
    return 3 * sum(parts.values()) - parts["patch_embed"]


def decoder_share(size_spec_or_model, modality: str, **kwargs) -> float:
    """Fraction of the forward FLOPs spent after the encoder (decoder_embed, decoder blocks, head)."""
    p = forward_flops_breakdown(size_spec_or_model, modality, **kwargs)
    dec = p["decoder_embed"] + p["decoder_linear"] + p["decoder_attention"] + p["head"]
    return dec / sum(p.values())
