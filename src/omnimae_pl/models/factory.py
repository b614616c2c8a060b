"""Named model sizes: the paper's ViT-B/L/H and two small ones for tests and the CPU demo."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from omnimae_pl.errors import check_value
from omnimae_pl.models.classifier import OmniViTClassifier
from omnimae_pl.models.decoder import MAEDecoder
from omnimae_pl.models.encoder import VisionTransformerEncoder
from omnimae_pl.models.omnimae import OmniMAE


@dataclass(frozen=True)
class ModelSize:
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    patch_size: tuple[int, int, int] = (2, 16, 16)
    mlp_ratio: float = 4.0
    # Not architecture: decoder attention computed at this head size (same math; models/padded_attention.py).
    decoder_attn_head_pad_to: int | None = None


SIZES: dict[str, ModelSize] = {
    # tiny / small: ViT-Ti and ViT-S widths with light decoders, for tests and the CPU demo.
    "tiny": ModelSize(192, 12, 3, 128, 2, 4),
    "small": ModelSize(384, 12, 6, 256, 4, 8),
    "base": ModelSize(768, 12, 12, 384, 4, 16),
    "large": ModelSize(1024, 24, 16, 512, 4, 16),
    "huge": ModelSize(1280, 32, 16, 512, 8, 16, patch_size=(2, 14, 14)),
}


def model_size(size: str | ModelSize, **overrides) -> ModelSize:
    """A named size (or a ModelSize) with any field overridden, e.g. ``model_size("tiny", depth=2)``. An unknown
    size or field raises :class:`~omnimae_pl.errors.ConfigError` naming ``size`` or ``model_overrides``."""
    if isinstance(size, str):
        check_value(size in SIZES, "size", size, f"must be one of {sorted(SIZES)} (unknown model size)")
        size = SIZES[size]
    names = [f.name for f in fields(ModelSize)]
    unknown = sorted(set(overrides) - set(names))
    check_value(not unknown, "model_overrides", overrides, f"has unknown fields {unknown}; the fields are {names}")
    if "patch_size" in overrides:
        overrides["patch_size"] = tuple(overrides["patch_size"])
    return replace(size, **overrides)


def num_heads_for(embed_dim: int, depth: int) -> int:
    """Attention heads of a trunk known only by its width and depth (a weights file stores no head count): the
    named size with that shape, else one head per 64 channels."""
    for spec in SIZES.values():
        if (spec.embed_dim, spec.depth) == (embed_dim, depth):
            return spec.num_heads
    return max(embed_dim // 64, 1)


def build_encoder(
    spec: ModelSize, img_size: int, num_frames: int, drop_path_rate: float, final_norm: bool
) -> VisionTransformerEncoder:
    return VisionTransformerEncoder(
        img_size=img_size,
        num_frames=num_frames,
        patch_size=spec.patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        drop_path_rate=drop_path_rate,
        final_norm=final_norm,
    )


def omnimae_pretrain(
    size: str | ModelSize = "base", img_size: int = 224, num_frames: int = 16, **overrides
) -> OmniMAE:
    """The pretraining model; the positional tables are built for ``num_frames`` x ``img_size``."""
    spec = model_size(size, **overrides)
    pad = spec.decoder_attn_head_pad_to
    head_dim = spec.decoder_embed_dim // spec.decoder_num_heads
    check_value(pad is None or (isinstance(pad, int) and pad >= head_dim), "model_overrides.decoder_attn_head_pad_to",
                pad, f"must be an integer >= the decoder's head size {head_dim}, or null")
    encoder = build_encoder(spec, img_size, num_frames, 0.0, final_norm=True)
    decoder = MAEDecoder(
        encoder_dim=spec.embed_dim,
        grid=encoder.grid,
        patch_size=spec.patch_size,
        embed_dim=spec.decoder_embed_dim,
        depth=spec.decoder_depth,
        num_heads=spec.decoder_num_heads,
        mlp_ratio=spec.mlp_ratio,
        attn_head_pad_to=pad,
    )
    return OmniMAE(encoder, decoder)


def omnimae_classifier(
    size: str | ModelSize = "base",
    num_classes: int = 1000,
    img_size: int = 224,
    num_frames: int = 16,
    drop_path_rate: float = 0.1,
    head_init_std: float = 2e-5,
    head_drop: float = 0.0,
    **overrides,
) -> OmniViTClassifier:
    """The fine-tuning model: drop path linear over depth (0.1 in every released fine-tuned model)."""
    spec = model_size(size, **overrides)
    encoder = build_encoder(spec, img_size, num_frames, drop_path_rate, final_norm=False)
    return OmniViTClassifier(encoder, num_classes, head_init_std=head_init_std, head_drop=head_drop)
