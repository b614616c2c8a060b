"""A model as a folder like those on model hubs, readable without running any code.

    folder/
      model.safetensors  every tensor of the model in our names: encoder.* and decoder.* (pretraining, so
                         reconstructions work) or encoder.*, fc_norm.* and head.* (fine-tuning)
      config.json        what :func:`load_pretrained` builds (the constructor arguments of the encoder, decoder
                         or head), how the weights were trained, their last validation figures, library version
      README.md          the model card, made from config.json alone (:func:`model_card`)

``omnimae-cli export SRC OUT --format hub`` (:mod:`omnimae_pl.export`) adds ``timm/`` beside them: the encoder
as timm's ``VisionTransformer`` (its own ``model.safetensors`` and ``config.json``). Tensors are only ever in
safetensors files, so opening a folder never unpickles anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from omnimae_pl.errors import UserError
from omnimae_pl.models.classifier import OmniViTClassifier
from omnimae_pl.models.decoder import MAEDecoder
from omnimae_pl.models.encoder import VisionTransformerEncoder
from omnimae_pl.models.omnimae import OmniMAE

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
FORMAT_VERSION = 1
MODEL_TYPES = ("OmniMAE", "OmniViTClassifier")


class HubFolderError(UserError):
    """A folder :func:`load_pretrained` refuses; the message names the file and says why."""


# -- the architecture, read from a model and built back ---------------------------------------------------
def _mlp_ratio(block: nn.Module, dim: int) -> float:
    return block.mlp.fc1.out_features / dim


def encoder_args(encoder: VisionTransformerEncoder) -> dict:
    """The :class:`VisionTransformerEncoder` arguments that rebuild ``encoder``."""
    (pt, ph, pw), (t, h, w) = encoder.patch_size, encoder.grid
    if h * ph != w * pw:
        raise ValueError(f"the encoder's table is {h * ph} x {w * pw} pixels; the hub format stores square images")
    first, last = encoder.blocks[0], encoder.blocks[-1]
    return {
        "img_size": h * ph,
        "num_frames": t * pt,
        "patch_size": list(encoder.patch_size),
        "in_chans": encoder.patch_embed.proj.in_channels,
        "embed_dim": encoder.embed_dim,
        "depth": len(encoder.blocks),
        "num_heads": first.attn.num_heads,
        "mlp_ratio": _mlp_ratio(first, encoder.embed_dim),
        "qkv_bias": first.attn.qkv.bias is not None,
        # the rate is linear over depth: the last block has the whole of it
        "drop_path_rate": float(getattr(last.drop_path1, "drop_prob", 0.0)),
        "final_norm": not isinstance(encoder.norm, nn.Identity),
    }


def model_config(model: OmniMAE | OmniViTClassifier) -> dict:
    """The ``model`` section of config.json: its type and the constructor arguments of its parts."""
    section = {"type": type(model).__name__, "encoder": encoder_args(model.encoder)}
    if isinstance(model, OmniMAE):
        dec = model.decoder
        section["decoder"] = {
            "in_chans": dec.pred.out_features // math.prod(model.patch_size),
            "embed_dim": dec.decoder_embed.out_features,
            "depth": len(dec.blocks),
            "num_heads": dec.blocks[0].attn.num_heads,
            "mlp_ratio": _mlp_ratio(dec.blocks[0], dec.decoder_embed.out_features),
        }
    elif isinstance(model, OmniViTClassifier):
        section["head"] = {"num_classes": model.num_classes, "head_drop": float(model.head_drop.p)}
    else:
        raise TypeError(f"save_pretrained takes an OmniMAE or an OmniViTClassifier, not {type(model).__name__}")
    return section


def build_model(section: Mapping) -> OmniMAE | OmniViTClassifier:
    """The model a config.json ``model`` section describes, freshly initialised."""
    encoder = VisionTransformerEncoder(**section["encoder"])
    if section["type"] == "OmniMAE":
        decoder = MAEDecoder(encoder.embed_dim, encoder.grid, encoder.patch_size, **section["decoder"])
        return OmniMAE(encoder, decoder)
    head = section["head"]
    return OmniViTClassifier(encoder, int(head["num_classes"]), head_drop=float(head.get("head_drop", 0.0)))


# -- writing ------------------------------------------------------------------------------------------
def plain(value):
    """``value`` as JSON can hold it: tuples become lists, tensors numbers, NaN and infinities null, and any
    other object its ``str``."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def save_pretrained(model: OmniMAE | OmniViTClassifier, folder: str | PathLike, info: Mapping | None = None) -> dict:
    """Write ``model`` to ``folder`` (model.safetensors, config.json, README.md); returns the config.

    ``info``: more sections for config.json and the card: ``training`` (``task``, ``global_step``, ``epoch``,
    ``sources``, ``masking``, ``global_batch``, ``hyper_parameters``, ...), ``metrics`` ({name: float}, the last
    validation figures) and ``timm`` (what :mod:`omnimae_pl.export` wrote under ``timm/``).
    """
    from omnimae_pl import __version__  # the package imports this module: read at call time

    folder = Path(folder)
    config = {
        "library": "omnimae-pl",
        "library_version": __version__,
        "format_version": FORMAT_VERSION,
        "model": model_config(model),
        **plain(dict(info or {})),
    }
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (folder / CARD).write_text(model_card(config))
    return config


# -- reading ------------------------------------------------------------------------------------------
def read_config(folder: str | PathLike) -> dict:
    """config.json of a hub folder, checked for what :func:`build_model` needs."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise HubFolderError(f"{folder}: {what} (a hub export is a folder with {WEIGHTS} and {CONFIG})")
    path = folder / CONFIG
    if not path.is_file():
        raise HubFolderError(f"{path}: no such file (a hub folder holds {WEIGHTS} and {CONFIG})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HubFolderError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
    section = config.get("model") if isinstance(config, dict) else None
    if not isinstance(section, dict) or section.get("type") not in MODEL_TYPES:
        raise HubFolderError(f"{path}: no 'model' section with a 'type' in {list(MODEL_TYPES)}")
    part = "decoder" if section["type"] == "OmniMAE" else "head"
    for key in ("encoder", part):
        if not isinstance(section.get(key), dict):
            raise HubFolderError(f"{path}: model.{key} is missing (a {section['type']} needs it)")
    return config


def _check_tensors(path: Path, model: nn.Module, config_path: Path) -> None:
    """Refuse a weights file whose names or shapes are not those of the model config.json describes."""
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise HubFolderError(f"{path}: not a safetensors file ({str(err).splitlines()[0][:120]})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} {list(shapes[k])} (config: {list(shape)})" for k, shape in expected.items()
             if shapes.get(k, shape) != shape]
    problems = [f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
                for name, keys in (("missing", missing), ("unexpected", unexpected), ("shapes", wrong)) if keys]
    if problems:
        raise HubFolderError(f"{path}: does not match {config_path}: " + "; ".join(problems))


def load_pretrained(folder: str | PathLike) -> OmniMAE | OmniViTClassifier:
    """A folder written by :func:`save_pretrained` (or ``omnimae-cli export --format hub``) -> the model, in
    eval mode, with exactly the saved tensors. A missing or malformed config.json, a missing weights file, or
    tensors that do not fit the config are refused with a one-line :class:`HubFolderError` naming the file."""
    folder = Path(folder)
    config = read_config(folder)
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise HubFolderError(f"{weights}: no such file (a hub folder holds {WEIGHTS} and {CONFIG})")
    try:
        model = build_model(config["model"])
    except (TypeError, ValueError, KeyError) as err:  # a value of the wrong type or range in the sections
        reason = (str(err).splitlines() or [""])[0]
        raise HubFolderError(f"{folder / CONFIG}: cannot build the model ({type(err).__name__}: {reason})") from None
    _check_tensors(weights, model, folder / CONFIG)
    model.load_state_dict(load_file(weights), strict=True)
    return model.eval()


# -- the model card -------------------------------------------------------------------------------------
FIGURES = {  # what each logged validation figure is, by the end of its name
    "_baseline": "the same loss for predicting every hidden patch's mean: the figure to beat",
    "loss_image": "masked-patch MSE on images (per-patch normalised pixels)",
    "loss_video": "masked-patch MSE on videos (per-patch normalised pixels)",
    "probe_acc_image": "accuracy of the online linear probe on detached image features",
    "probe_acc_video": "accuracy of the online linear probe on detached video features",
    "acc1": "top-1 accuracy",
    "acc5": "top-5 accuracy",
    "loss": "cross-entropy",
}


def _describe_figure(name: str) -> str:
    if "/invalid_" in name:
        return "unreadable samples of that source in the run (left out of the figures)"
    return next((text for end, text in FIGURES.items() if name.endswith(end)), "")


def _architecture_lines(section: Mapping) -> list[str]:
    enc = section["encoder"]
    patch = "x".join(str(p) for p in enc["patch_size"])
    lines = [
        f"- encoder: ViT, width {enc['embed_dim']}, {enc['depth']} blocks, {enc['num_heads']} heads, MLP ratio "
        f"{enc['mlp_ratio']:g}, no class token; tubelets of {patch} (time x height x width) pixels",
        f"- positional tables (fixed sinusoids) built for {enc['num_frames']} frames of {enc['img_size']} x "
        f"{enc['img_size']}; an image is a 2-frame static clip and uses the first time slice",
    ]
    if section["type"] == "OmniMAE":
        dec = section["decoder"]
        lines.append(f"- decoder: width {dec['embed_dim']}, {dec['depth']} blocks, {dec['num_heads']} heads; "
                     "predicts the normalised pixels of every patch")
    else:
        lines.append(f"- head: mean over all tokens, LayerNorm, Linear to {section['head']['num_classes']} classes")
    return lines


def _training_lines(training: Mapping) -> list[str]:
    if not training:
        return ["Not recorded: these weights were saved from a model in memory, not from a training checkpoint."]
    if training.get("origin"):
        return [f"Converted from {training['origin']}; trained as in the OmniMAE paper (Girdhar et al., CVPR 2023)."]
    lines = []
    if training.get("task"):
        lines.append(f"- task: `{training['task']}`")
    steps = training.get("global_step")
    if steps is not None:
        lines.append(f"- optimiser steps: {steps} (epoch {training.get('epoch')}; "
                     f"{training.get('skipped_steps') or 0} skipped as non-finite)")
    for source in training.get("sources") or []:
        weight = f", weight {source['weight']}" if source.get("weight") is not None else ""
        lines.append(f"- data: `{source['name']}` ({source['kind']}, split `{source['split']}`{weight})")
    for modality, mask in (training.get("masking") or {}).items():
        lines.append(f"- {modality} masking: {mask['mask_type']}, ratio {mask['ratio']:g}")
    if training.get("global_batch"):
        batch = ", ".join(f"{m} {b}" for m, b in training["global_batch"].items())
        lines.append(f"- global batch per step: {batch}")
    hp = training.get("hyper_parameters") or {}
    if hp:
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in hp.items())
        lines.append(f"- hyper-parameters: {shown}")
    if not training.get("sources"):
        lines.append("- data and masking: not recorded in the checkpoint")
    return lines


def _metrics_lines(metrics: Mapping, training: Mapping) -> list[str]:
    if not metrics:
        return ["None recorded: the checkpoint was saved before any validation, or by a version that did not "
                "store its figures."]
    step = training.get("global_step")
    when = f" (the checkpoint of step {step})" if step is not None else ""
    lines = [f"The last validation figures logged before this checkpoint was written{when}:", "",
             "| figure | value | what it is |", "|---|---|---|"]
    for name, value in metrics.items():
        shown = "n/a" if value is None else f"{value:.4g}"
        lines.append(f"| `{name}` | {shown} | {_describe_figure(name)} |")
    return lines


def _loading_lines(config: Mapping) -> list[str]:
    section = config["model"]
    lines = [
        "In omnimae-pl:", "", "```python", "from omnimae_pl import load_pretrained", "",
        'model = load_pretrained("path/to/this/folder")  # an ' + section["type"] + ", in eval mode",
    ]
    if section["type"] == "OmniMAE":
        lines += ["pred = model(x, mask)  # x (B, 3, H, W) or (B, 3, T, H, W); mask bool (B, N), True = hidden",
                  "```", "", "Reconstructions: `omnimae-cli reconstruct --checkpoint path/to/this/folder --inputs "
                  "photo.jpg clip.mp4 --out-dir recon`."]
    else:
        lines += ["logits = model(x)  # x (B, 3, H, W) or (B, 3, T, H, W)", "```"]
    timm_info = config.get("timm")
    if timm_info:
        args = ", ".join(f"{k}={v!r}" for k, v in timm_info["model_args"].items())
        lines += [
            "", f"In timm (images), the encoder{' and head' if timm_info['model_args']['num_classes'] else ''} "
            f"under `{timm_info['folder']}/`:", "", "```python", "import timm", "",
            f'model = timm.create_model("local-dir:path/to/this/folder/{timm_info["folder"]}", pretrained=True)',
            "# or: an architecture name, timm's arguments, and the file", "model = timm.create_model(",
            f'    "{timm_info["architecture"]}", pretrained=True,',
            f'    pretrained_cfg_overlay=dict(file="path/to/this/folder/{timm_info["folder"]}/{WEIGHTS}", '
            f"num_classes={timm_info['model_args']['num_classes']}),",
            f"    {args})", "```", "",
            "The tubelet kernel is summed over time into timm's 2-D patch kernel and the positions are the first "
            "time slice, so timm computes what this model computes on an image"
            + (" (timm's `fc_norm` is fresh: the pretraining encoder has no post-pool norm)."
               if section["type"] == "OmniMAE" else "."),
        ]
    return lines


def model_card(config: Mapping) -> str:
    """The README.md of a hub folder, from its config.json alone."""
    section = config["model"]
    enc = section["encoder"]
    what = "pretrained (masked autoencoder: encoder and decoder)" if section["type"] == "OmniMAE" else "fine-tuned"
    training = config.get("training") or {}
    size = (training.get("hyper_parameters") or {}).get("size")
    title = f"OmniMAE ViT {enc['embed_dim']} x {enc['depth']}" + (f" ({size})" if size else "")
    tags = ["omnimae", "masked-autoencoder", "vision-transformer", "image", "video"]
    tags += ["timm"] if config.get("timm") else []
    parts = [
        "---", "library_name: omnimae-pl", "tags:", *[f"- {tag}" for tag in tags], "---", "", f"# {title}, {what}", "",
        "One Vision Transformer for images and videos (OmniMAE: masked autoencoding of both with one model), "
        f"exported by omnimae-pl {config.get('library_version', '')} (`omnimae-cli export --format hub`).", "",
        *_architecture_lines(section), "", "## How it was trained", "", *_training_lines(training), "",
        "## Validation", "", *_metrics_lines(config.get("metrics") or {}, training), "", "## How to load it", "",
        *_loading_lines(config), "", "## Files", "",
        f"- `{WEIGHTS}`: every tensor (safetensors; nothing here is pickled)",
        f"- `{CONFIG}`: the architecture `load_pretrained` builds, the training record and the figures above",
    ]
    if config.get("timm"):
        parts.append(f"- `{config['timm']['folder']}/`: the encoder as timm's VisionTransformer "
                     f"({WEIGHTS} and timm's {CONFIG})")
    return "\n".join(parts) + "\n"
