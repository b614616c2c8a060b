"""Every weights file a user names is opened here, and only here.

Files are read with ``torch.load(weights_only=True)``, always: a pickle that holds anything but tensors,
numbers, strings and plain containers is refused with :class:`CheckpointError` (unpickling such objects can run
code), never loaded some other way. What a file holds is recognised from its contents, whatever its name:

* our Lightning checkpoints: ``state_dict`` with ``model.encoder.*`` plus ``model.decoder.*`` (pretraining,
  maybe ``probe.*``) or ``model.fc_norm.*`` / ``model.head.*`` (fine-tuning), and ``hyper_parameters``;
* a bare state dict of our modules (``encoder.*``, ``decoder.*`` / ``fc_norm.*``, ``head.*``);
* the released OmniMAE files (``trunk.*`` / ``head.*``, pretrained or fine-tuned) and omnivision trainer
  checkpoints, through :mod:`omnimae_pl.models.official`.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from omnimae_pl.errors import UserError
from omnimae_pl.models.classifier import OmniViTClassifier
from omnimae_pl.models.factory import model_size, num_heads_for, omnimae_pretrain
from omnimae_pl.models.hub import load_pretrained
from omnimae_pl.models.official import convert_official, infer_official_size, official_model, unwrap_trainer_state
from omnimae_pl.models.omnimae import OmniMAE
from omnimae_pl.models.pos_embed import table_layout

Source = str | PathLike | Mapping[str, torch.Tensor] | nn.Module


class CheckpointError(UserError):
    """A weights file that is refused or unreadable; the message names the file and says why."""


def load_checkpoint(path: str | PathLike) -> dict:
    """The contents of a ``torch.save`` file, tensors memory-mapped when the file allows it; never runs code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # bytes the unpickler cannot parse: no object was built
            raise CheckpointError(f"{path}: not a PyTorch checkpoint (unreadable as a torch.save file)") from None
        raise CheckpointError(
            f"{path}: refused: it holds Python objects other than tensors, numbers, strings and containers, and "
            "unpickling those can run code; load only the weights (re-save its state_dict)"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError) as err:  # what torch raises for non-checkpoint bytes
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({reason})") from None


def _read(source: str | PathLike | Mapping) -> tuple[Mapping, str]:
    if isinstance(source, Mapping):
        return source, "<state dict>"
    return load_checkpoint(source), str(source)


@dataclass
class SourceWeights:
    """A checkpoint in our names: ``encoder`` keys relative to the encoder (``blocks.0.attn.qkv.weight``),
    ``fc_norm`` / ``head`` relative to themselves (None when absent), everything else in ``other``;
    ``num_heads`` and ``img_size`` as the source gives or implies them."""

    kind: str  # "pretrain" or "finetune"
    origin: str  # "lightning", "state_dict" or "official"
    encoder: dict[str, torch.Tensor]
    fc_norm: dict[str, torch.Tensor] | None = None
    head: dict[str, torch.Tensor] | None = None
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)
    name: str = "<state dict>"
    num_heads: int = 0
    img_size: int = 0

    @property
    def embed_dim(self) -> int:
        return int(self.encoder["patch_embed.proj.weight"].shape[0])

    @property
    def depth(self) -> int:
        return len({m.group(1) for k in self.encoder if (m := re.match(r"blocks\.(\d+)\.", k))})

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.encoder["patch_embed.proj.weight"].shape[2:])

    @property
    def num_classes(self) -> int | None:
        return None if self.head is None else int(self.head["weight"].shape[0])

    def describe(self) -> str:
        what = {"pretrain": "pretrained", "finetune": "fine-tuned"}[self.kind]
        origin = {"lightning": "Lightning checkpoint", "state_dict": "state dict", "official": "released OmniMAE file"}
        classes = f", {self.num_classes} classes" if self.head is not None else ""
        return f"{what} {origin[self.origin]} (ViT {self.embed_dim} x {self.depth}{classes})"


def _strip(key: str) -> str:
    return key.replace("_orig_mod.", "").removeprefix("module.")


def _split_ours(state: Mapping[str, torch.Tensor], origin: str, hparams: dict, name: str) -> SourceWeights:
    parts: dict[str, dict[str, torch.Tensor]] = {"encoder": {}, "fc_norm": {}, "head": {}}
    other = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts and rest:
            parts[prefix][rest] = value
        else:
            other[key] = value
    if "patch_embed.proj.weight" not in parts["encoder"]:
        raise CheckpointError(f"{name}: no encoder weights (encoder.patch_embed.proj.weight) in {len(state)} keys")
    pretrain = any(k.startswith("decoder.") for k in other) or not parts["head"]
    return SourceWeights(
        kind="pretrain" if pretrain else "finetune",
        origin=origin,
        encoder=parts["encoder"],
        fc_norm=parts["fc_norm"] or None,
        head=parts["head"] or None,
        other=other,
        hparams=hparams,
        name=name,
    )


def _build_overrides(hparams: Mapping) -> dict:
    """The ModelSize overrides a task's hyper-parameters name (``model_overrides`` and the linked patch size)."""
    overrides = dict(hparams.get("model_overrides") or {})
    if hparams.get("patch_size"):
        overrides["patch_size"] = tuple(hparams["patch_size"])
    return overrides


def _with_layout(weights: SourceWeights, num_heads: int | None = None, img_size: int | None = None) -> SourceWeights:
    """Fill in the head count and image side: given, from the hyper-parameters, or implied by the tensors."""
    hp = weights.hparams
    if num_heads is None and "size" in hp:
        spec = model_size(hp["size"], **_build_overrides(hp))
        num_heads = spec.num_heads if spec.embed_dim == weights.embed_dim else None
    weights.num_heads = num_heads or num_heads_for(weights.embed_dim, weights.depth)
    if img_size is None and "img_size" in hp:
        img_size = int(hp["img_size"])
    if img_size is None and "pos_embed" in weights.encoder:
        img_size = table_layout(weights.encoder["pos_embed"].shape[1], weights.patch_size)[1]
    weights.img_size = img_size or 224
    return weights


def read_weights(source: Source) -> SourceWeights:
    """Any supported checkpoint (path, loaded dict, or one of our models) -> :class:`SourceWeights`."""
    if isinstance(source, nn.Module):
        encoder = source.encoder
        weights = _split_ours(source.state_dict(), "state_dict", {}, type(source).__name__)
        return _with_layout(weights, int(encoder.blocks[0].attn.num_heads), encoder.grid[1] * encoder.patch_size[1])
    contents, name = _read(source)
    if "state_dict" in contents and isinstance(contents["state_dict"], Mapping):  # a Lightning checkpoint
        state = {}
        for key, value in contents["state_dict"].items():
            key = _strip(key)
            state[key.removeprefix("model.")] = value  # probe.* and metric states stay as they are: reported
        hparams = dict(contents.get("hyper_parameters") or {})
        return _with_layout(_split_ours(state, "lightning", hparams, name))
    state = unwrap_trainer_state(contents)
    if any(k.startswith("trunk.") for k in state):
        size, _, img_size, is_pretrain = infer_official_size(state)
        weights = _split_ours(convert_official(state, pretrain=is_pretrain), "official", {}, name)
        weights.kind = "pretrain" if is_pretrain else "finetune"
        return _with_layout(weights, size.num_heads, img_size)
    return _with_layout(_split_ours({_strip(k): v for k, v in state.items()}, "state_dict", {}, name))


def load_official(
    path_or_state_dict: str | PathLike | Mapping[str, torch.Tensor],
    num_frames: int | None = None,
    img_size: int | None = None,
) -> OmniMAE | OmniViTClassifier:
    """Any of the nine released files -> our pretraining model or classifier, in eval mode
    (see :func:`omnimae_pl.models.official.official_model`)."""
    state, _ = _read(path_or_state_dict)
    return official_model(state, num_frames, img_size)


def load_pretrain_model(path: str | PathLike) -> OmniMAE:
    """A Lightning checkpoint of our pretraining module, a released pretraining file or a hub folder of a
    pretraining model (``omnimae-cli export --format hub``) -> OmniMAE, in eval mode.

    A Lightning checkpoint's hyper-parameters name the architecture (``size``, ``model_overrides``,
    ``patch_size``, ``img_size``, ``num_frames``) and its ``state_dict`` holds the model under ``model.``.
    """
    if Path(path).is_dir():
        model = load_pretrained(path)
        if not isinstance(model, OmniMAE):
            raise CheckpointError(f"{path} is a fine-tuned model: it has no decoder, so it cannot reconstruct")
        return model
    contents = load_checkpoint(path)
    if "state_dict" not in contents:
        model = official_model(contents)
        if not isinstance(model, OmniMAE):
            raise CheckpointError(f"{path} is a fine-tuned checkpoint: it has no decoder, so it cannot reconstruct")
        return model
    hparams = contents.get("hyper_parameters") or {}
    if "size" not in hparams:
        raise CheckpointError(f"{path}: a Lightning checkpoint without hyper_parameters['size'] (not our pretraining)")
    build = {key: hparams[key] for key in ("img_size", "num_frames") if key in hparams}
    model = omnimae_pretrain(hparams["size"], **build, **_build_overrides(hparams))
    state = {_strip(k).removeprefix("model."): v for k, v in contents["state_dict"].items() if _strip(k).startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model.eval()
