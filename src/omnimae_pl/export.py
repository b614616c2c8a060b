"""Export OmniMAE weights: for timm's image ``VisionTransformer`` (default), or as a model-hub folder.

    omnimae-cli export SRC OUT [--img-size 224]                # OUT: a timm state dict (torch.save)
    omnimae-cli export SRC OUT --format hub                    # OUT: a folder (safetensors only)

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

The hub folder (:mod:`omnimae_pl.models.hub`) holds the whole model (encoder and decoder of a pretraining
checkpoint, so reconstructions work from it; encoder and head of a fine-tuned one) in ``model.safetensors``,
``config.json`` (architecture, training record, last validation figures), a ``README.md`` model card, and
``timm/`` (the timm export above as ``model.safetensors`` beside timm's ``config.json``, for
``timm.create_model("local-dir:OUT/timm", pretrained=True)``). Its ``SRC`` is one of our Lightning checkpoints
(rebuilt from its hyper-parameters), a released OmniMAE file, or a hub folder; read it back with
:func:`omnimae_pl.load_pretrained`. A hub folder is also a ``SRC`` of the timm format.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from omnimae_pl.constants import IMAGENET_MEAN, IMAGENET_STD
from omnimae_pl.errors import UserError
from omnimae_pl.models.checkpoints import (
    CheckpointError,
    SourceWeights,
    _build_overrides,
    load_checkpoint,
    read_weights,
)
from omnimae_pl.models.factory import model_size, omnimae_classifier, omnimae_pretrain
from omnimae_pl.models.hub import CONFIG, WEIGHTS, load_pretrained, read_config, save_pretrained
from omnimae_pl.models.official import official_model
from omnimae_pl.models.pos_embed import select_pos_embed, sinusoid_table

TIMM_FOLDER = "timm"
# timm builds any ViT shape from a registered name plus model_args; the name only picks the constructor.
TIMM_ARCHITECTURE = "vit_base_patch16_224"


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
    weights = read_weights(load_pretrained(source) if _is_folder(source) else source)
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


def _is_folder(source) -> bool:
    return isinstance(source, (str, PathLike)) and Path(source).is_dir()


# -- the hub folder ---------------------------------------------------------------------------------------
def training_record(contents: Mapping) -> dict:
    """The ``training`` and ``metrics`` sections of config.json from a Lightning checkpoint's contents: steps,
    the data and masking :meth:`~omnimae_pl.tasks.base.OmniMAETask.on_save_checkpoint` recorded, the task's
    hyper-parameters and the last validation figures."""
    hp = dict(contents.get("hyper_parameters") or {})
    training = {
        "task": hp.get("_class_path"),
        "global_step": contents.get("global_step"),
        "epoch": contents.get("epoch"),
        "skipped_steps": contents.get("skipped_steps"),
        "lightning_version": contents.get("pytorch-lightning_version"),
        **dict(contents.get("data") or {}),  # sources, masking, global_batch
        "hyper_parameters": {k: v for k, v in hp.items() if not k.startswith("_")},
    }
    return {"training": training, "metrics": dict(contents.get("metrics") or {})}


def source_model(source: str | PathLike | nn.Module) -> tuple[nn.Module, dict]:
    """(our OmniMAE or classifier holding the source's weights, what is known of its training).

    A Lightning checkpoint of our tasks is rebuilt from its hyper-parameters (size, overrides, patch, layout);
    a released OmniMAE file from its tensors; a hub folder by :func:`~omnimae_pl.models.hub.load_pretrained`.
    A bare state dict names no architecture: load it into a model and pass the model.
    """
    if isinstance(source, nn.Module):
        return source, {}
    if _is_folder(source):
        config = read_config(source)
        return load_pretrained(source), {k: config[k] for k in ("training", "metrics") if k in config}
    weights = read_weights(source)
    contents = load_checkpoint(source)  # memory-mapped: the second read of a zip checkpoint costs little
    if weights.origin == "official":
        return official_model(contents), {"training": {"origin": f"the released OmniMAE file {Path(source).name}"}}
    hp = weights.hparams
    if "size" not in hp:
        raise CheckpointError(
            f"{source}: no hyper_parameters['size'], so no architecture to rebuild; load the weights into "
            "omnimae_pretrain(...) or omnimae_classifier(...) and export that model (export_hub(model, out))"
        )
    spec = model_size(hp["size"], **_build_overrides(hp))
    layout = {key: int(hp[key]) for key in ("img_size", "num_frames") if key in hp}
    state = {f"encoder.{k}": v for k, v in weights.encoder.items()}
    if weights.kind == "pretrain":
        model: nn.Module = omnimae_pretrain(spec, **layout)
        state.update({k: v for k, v in weights.other.items() if k.startswith("decoder.")})  # probes are left
    else:
        model = omnimae_classifier(spec, weights.num_classes, **layout, drop_path_rate=hp.get("drop_path_rate", 0.1),
                                   head_drop=hp.get("head_drop", 0.0))
        for part in ("fc_norm", "head"):
            state.update({f"{part}.{k}": v for k, v in (getattr(weights, part) or {}).items()})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{source}: its weights do not fit its hyper-parameters ({reason})") from None
    return model.eval(), training_record(contents)


def write_timm_folder(model: nn.Module, folder: Path, img_size: int | None = None) -> dict:
    """The timm export of ``model`` as ``folder/model.safetensors`` and timm's ``folder/config.json`` (what
    ``timm.create_model("local-dir:folder")`` reads); returns the ``timm`` section of our config.json."""
    weights = read_weights(model)
    img_size = img_size or weights.img_size
    state, kwargs = timm_state_dict(weights, img_size, weights.num_heads, weights.img_size)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    pretrained_cfg = {
        "input_size": [3, img_size, img_size],
        "interpolation": "bicubic",
        "crop_pct": 1.0,  # our evaluation: short side to img_size, centre crop (ResizeCenterCrop, crop_ratio 1)
        "crop_mode": "center",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "num_classes": kwargs["num_classes"],
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "fixed_input_size": True,
    }
    timm_config = {
        "architecture": TIMM_ARCHITECTURE,
        "num_classes": kwargs["num_classes"],
        "num_features": kwargs["embed_dim"],
        "global_pool": kwargs["global_pool"],
        "model_args": kwargs,
        "pretrained_cfg": pretrained_cfg,
    }
    (folder / CONFIG).write_text(json.dumps(timm_config, indent=2) + "\n")
    return {"folder": folder.name, "architecture": TIMM_ARCHITECTURE, "model_args": kwargs}


def export_hub(
    source: str | PathLike | nn.Module, out_dir: str | PathLike, img_size: int | None = None, verbose: bool = True
) -> dict:
    """Write ``source`` as a hub folder (model.safetensors, config.json, README.md, timm/); returns the config.

    ``img_size``: the image side of the timm export (default: the model's).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is not a folder (--format hub writes a folder)")
    model, record = source_model(source)
    timm_info = write_timm_folder(model, out_dir / TIMM_FOLDER, img_size)
    config = save_pretrained(model, out_dir, {**record, "timm": timm_info})
    if verbose:
        n = sum(v.numel() for v in model.state_dict().values())
        figures = ", ".join(f"{k} {v:.4g}" for k, v in config.get("metrics", {}).items() if v is not None)
        print(
            f"export_hub {source if not isinstance(source, nn.Module) else type(source).__name__} -> {out_dir}: "
            f"{config['model']['type']} ({n / 1e6:.2f} M values) in {WEIGHTS}, {CONFIG}, README.md, "
            f"{TIMM_FOLDER}/ (timm VisionTransformer, num_classes={timm_info['model_args']['num_classes']})\n"
            f"  figures: {figures or 'none recorded in the checkpoint'}"
        )
    return config


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="omnimae-cli export",
        description="Export OmniMAE weights: the encoder (and head) for timm's VisionTransformer, or a model-hub "
        "folder (model.safetensors, config.json, README.md model card, timm/).",
    )
    parser.add_argument("source", help="our .ckpt, a state dict of our models, a released OmniMAE file, or a hub "
                        "folder")
    parser.add_argument("out", help="timm: the state dict file to write; hub: the folder to write")
    parser.add_argument("--format", choices=("timm", "hub"), default="timm",
                        help="timm: a state dict for timm's VisionTransformer (default); hub: a folder of "
                        "safetensors, config.json and a model card, read by omnimae_pl.load_pretrained")
    parser.add_argument("--img-size", type=int, default=None, help="image side of the timm export (default: the "
                        "source's, or 224)")
    parser.add_argument("--num-heads", type=int, default=None, help="attention heads (timm format; default: from "
                        "the source)")
    args = parser.parse_args(argv)
    if args.format == "hub":
        if args.num_heads is not None:
            parser.error("--num-heads is for --format timm: a hub export rebuilds the model from the source")
        return export_hub(args.source, args.out, img_size=args.img_size)
    return export_timm(args.source, args.out, img_size=args.img_size, num_heads=args.num_heads)


if __name__ == "__main__":
    main()
