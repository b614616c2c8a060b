"""Export an OmniMAE encoder (and its fine-tuned head) as a state dict for timm's image ``VisionTransformer``.

    omnimae-cli export SRC OUT [--img-size 224]

``SRC`` is anything :func:`omnimae_pl.models.checkpoints.read_weights` reads: our pretraining or fine-tuning ``.ckpt``, a bare state dict of our
models, or a released OmniMAE file. ``OUT`` loads with ``strict=True`` into::

    timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
        class_token=False, global_pool="avg", fc_norm=True, num_classes=1000)

(the exact arguments are printed and returned by :func:`export_timm`). For images this computes what our
model computes: an image is a 2-frame static clip, so the Conv3d tubelet folds into a Conv2d whose weight is
the sum over the time taps; the positional table of an image is the first time slice of ours (its first
H'*W' rows). The post-pool norm maps to timm's ``fc_norm``; it and the head are copied when the source has
them (a pretraining source gives a fresh ``fc_norm`` and ``num_classes=0``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from omnimae_pl.models.checkpoints import SourceWeights, load_checkpoint, read_weights
from omnimae_pl.models.pos_embed import select_pos_embed, sinusoid_table


def timm_state_dict(
    weights: SourceWeights, img_size: int, num_heads: int, trained_img_size: int | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(timm state dict, timm ``VisionTransformer`` kwargs) for images of ``img_size``.

    ``trained_img_size``: the side the source's table was built for (default ``img_size``); another
    ``img_size`` gets the bicubically resized first time slice, exactly as our encoder does for such images.
    """
    _, ph, pw = weights.patch_size
    if ph != pw:
        raise ValueError(f"timm's VisionTransformer needs square patches, got {ph}x{pw}")
    if img_size % ph:
        raise ValueError(f"img_size {img_size} is not a multiple of the patch size {ph}")
    enc = weights.encoder
    dim = weights.embed_dim
    out: dict[str, torch.Tensor] = {
        # An image is repeated over the tubelet's time taps: sum them into a 2-D kernel.
        "patch_embed.proj.weight": enc["patch_embed.proj.weight"].float().sum(dim=2),
        "patch_embed.proj.bias": enc["patch_embed.proj.bias"].float(),
    }
    # The 1-D table's first H'W' rows are the first time slice; they depend on nothing but H'W' and D.
    side0 = (trained_img_size or img_size) // ph
    first = sinusoid_table(side0 * side0, dim)
    side = img_size // ph
    out["pos_embed"] = select_pos_embed(first, (1, side0, side0), (1, side, side), is_image=True).clone()
    for key, value in enc.items():
        if key.startswith("blocks."):
            out[key] = value.float()
    norm = weights.fc_norm if weights.kind == "finetune" else None
    out["fc_norm.weight"] = norm["weight"].float() if norm else torch.ones(dim)
    out["fc_norm.bias"] = norm["bias"].float() if norm else torch.zeros(dim)
    num_classes = 0
    if weights.kind == "finetune" and weights.head is not None:
        out["head.weight"] = weights.head["weight"].float()
        out["head.bias"] = weights.head["bias"].float()
        num_classes = int(out["head.weight"].shape[0])
    mlp_ratio = enc["blocks.0.mlp.fc1.weight"].shape[0] / dim
    kwargs = dict(
        img_size=img_size,
        patch_size=ph,
        embed_dim=dim,
        depth=weights.depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in enc,
        class_token=False,
        global_pool="avg",
        fc_norm=True,
        num_classes=num_classes,
    )
    return {k: v.contiguous() for k, v in out.items()}, kwargs


def export_timm(
    source: str | PathLike | Mapping | nn.Module,
    out_path: str | PathLike,
    img_size: int | None = None,
    verbose: bool = True,
    num_heads: int | None = None,
) -> dict:
    """Write the timm state dict of ``source`` to ``out_path``; returns the timm ``VisionTransformer`` kwargs.

    ``img_size`` defaults to the source's; ``num_heads`` is read from the source's hyper-parameters or module, or
    from the named sizes by width and depth (a released file stores no head count): give it for other shapes.
    """
    weights = read_weights(source)
    img_size = img_size or weights.img_size
    state, kwargs = timm_state_dict(weights, img_size, num_heads or weights.num_heads, weights.img_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out_path)
    if verbose:
        print(export_report(weights, state, kwargs, out_path))
    return kwargs


def export_report(weights: SourceWeights, state: dict, kwargs: dict, out_path: Path) -> str:
    left = [k for k in weights.other] + [f"encoder.{k}" for k in weights.encoder if k.startswith("norm.")]
    has_norm = weights.kind == "finetune" and weights.fc_norm is not None
    lines = [
        f"export_timm {weights.name} -> {out_path}: {weights.describe()}",
        f"  wrote {len(state)} tensors ({sum(v.numel() for v in state.values()) / 1e6:.2f} M values)",
        "  patch_embed: Conv3d folded to Conv2d (sum over the time taps); pos_embed: first time slice "
        f"({state['pos_embed'].shape[1]} rows)",
        f"  fc_norm: {'copied' if has_norm else 'fresh (ones / zeros): the source has no post-pool norm'}",
        f"  head: {'copied' if kwargs['num_classes'] else 'none (num_classes=0)'}",
    ]
    if weights.kind == "pretrain" and weights.head is not None:
        left += [f"head.{k}" for k in weights.head]
    if left:
        lines.append(f"  left: {len(left)} tensors (decoder, mask token, pixel head, encoder final norm, probes)")
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    lines.append(f"  timm.models.vision_transformer.VisionTransformer({args})")
    return "\n".join(lines)


def load_timm(path: str | PathLike, **kwargs) -> nn.Module:
    """Build timm's ``VisionTransformer`` with ``kwargs`` (from :func:`export_timm`) and load ``path`` strictly."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**kwargs)
    model.load_state_dict(load_checkpoint(path), strict=True)
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="omnimae-cli export", description="Export an OmniMAE encoder for timm's VisionTransformer."
    )
    parser.add_argument("source", help="our .ckpt, a state dict of our models, or a released OmniMAE file")
    parser.add_argument("out", help="where to write the timm state dict")
    parser.add_argument("--img-size", type=int, default=None, help="image side (default: the source's, or 224)")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (default: from the source)")
    args = parser.parse_args(argv)
    return export_timm(args.source, args.out, img_size=args.img_size, num_heads=args.num_heads)


if __name__ == "__main__":
    main()
