"""Start a classifier from pretrained or fine-tuned weights, with a short report of what was taken.

Sources (all recognised from their contents, whatever the file name):

* our Lightning checkpoints: ``state_dict`` with ``model.encoder.*`` plus ``model.decoder.*`` (pretraining,
  maybe ``probe.*``) or ``model.fc_norm.*`` / ``model.head.*`` (fine-tuning);
* a bare state dict of our modules (``encoder.*``, ``decoder.*`` / ``fc_norm.*``, ``head.*``);
* the released OmniMAE files (``trunk.*`` / ``head.*``, pretrained or fine-tuned) and omnivision trainer
  checkpoints, through :mod:`omnimae_pl.models.official`.

What a classifier takes: the encoder (patch embedding and blocks). Never the encoder's final norm (it normed
tokens before the decoder; the classifier norms after pooling and that norm starts fresh, as in the official
fine-tuning configs), the decoder, the mask token or the pixel head. ``fc_norm`` and ``head`` are taken only
from a fine-tuned source whose head has the model's number of classes. The fixed positional table is never
taken: it is rebuilt for the model's layout (and checked against the file when the layouts agree).

Used by ``OmniMAEFinetune(init_from=...)`` and by :mod:`omnimae_pl.export`; never through ``ckpt_path``.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path

import torch
from torch import nn

from omnimae_pl.models.official import convert_official, infer_official_size, read_state_dict

SOURCE_KINDS = ("pretrain", "finetune")


@dataclass
class SourceWeights:
    """A checkpoint in our names: ``encoder`` keys relative to the encoder (``blocks.0.attn.qkv.weight``),
    ``fc_norm`` / ``head`` relative to themselves (None when absent), everything else in ``other``."""

    kind: str  # "pretrain" or "finetune"
    origin: str  # "lightning", "state_dict" or "official"
    encoder: dict[str, torch.Tensor]
    fc_norm: dict[str, torch.Tensor] | None = None
    head: dict[str, torch.Tensor] | None = None
    other: dict[str, torch.Tensor] = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)
    name: str = "<state dict>"

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


@dataclass
class InitReport:
    """What ``init_from`` did: keys taken (model names), keys of the file left (with why) and model keys that
    kept their fresh initialisation."""

    source: str
    description: str
    taken: list[str]
    left: dict[str, str]
    fresh: list[str]

    def summary(self) -> str:
        lines = [f"init_from {self.source}: {self.description}"]
        lines.append(f"  took {len(self.taken)} tensors: {_grouped(self.taken)}")
        if self.left:
            by_reason: dict[str, list[str]] = {}
            for key, reason in self.left.items():
                by_reason.setdefault(reason, []).append(key)
            lines.append(f"  left {len(self.left)} tensors of the file:")
            lines.extend(f"    {_grouped(keys)} ({reason})" for reason, keys in by_reason.items())
        lines.append(f"  fresh: {_grouped(self.fresh) if self.fresh else 'nothing'}")
        return "\n".join(lines)


def _grouped(keys: list[str]) -> str:
    """``encoder.blocks.3.attn.qkv.weight`` ... -> ``encoder.blocks.* (48), encoder.pos_embed (1)``."""
    groups: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        if len(parts) > 2:
            prefix = ".".join(parts[:2]) + ".*"
        elif len(parts) == 2 and parts[1] in ("weight", "bias"):
            prefix = parts[0] + ".*"
        else:
            prefix = key
        groups[prefix] = groups.get(prefix, 0) + 1
    return ", ".join(f"{p} ({n})" for p, n in groups.items())


def _torch_load(path: Path) -> Mapping:
    """Weights only when the file allows it. Lightning checkpoints often hold Python objects besides tensors
    (hyper-parameters, callback and loop states): those are loaded in full, with a warning, as Lightning does."""
    mmap = zipfile.is_zipfile(path)  # memory-map the (new-format) file instead of reading it twice
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        pass
    warnings.warn(
        f"init_from: {path} holds Python objects besides tensors; loaded with weights_only=False "
        "(use only checkpoints you trust)",
        stacklevel=3,
    )
    return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)


def _strip(key: str) -> str:
    return key.replace("_orig_mod.", "").removeprefix("module.")


def _split_ours(state: Mapping[str, torch.Tensor], origin: str, hparams: dict, name: str) -> SourceWeights:
    encoder, fc_norm, head, other = {}, {}, {}, {}
    for key, value in state.items():
        if key.startswith("encoder."):
            encoder[key[len("encoder.") :]] = value
        elif key.startswith("fc_norm."):
            fc_norm[key[len("fc_norm.") :]] = value
        elif key.startswith("head."):
            head[key[len("head.") :]] = value
        else:
            other[key] = value
    if "patch_embed.proj.weight" not in encoder:
        raise ValueError(f"{name}: no encoder weights (encoder.patch_embed.proj.weight) in {len(state)} keys")
    pretrain = any(k.startswith("decoder.") for k in other) or not head
    return SourceWeights(
        kind="pretrain" if pretrain else "finetune",
        origin=origin,
        encoder=encoder,
        fc_norm=fc_norm or None,
        head=head or None,
        other=other,
        hparams=hparams,
        name=name,
    )


def read_source(source: str | PathLike | Mapping[str, torch.Tensor] | nn.Module) -> SourceWeights:
    """Any supported checkpoint (path, loaded dict, or one of our models) -> :class:`SourceWeights`."""
    name = "<state dict>"
    if isinstance(source, nn.Module):
        return _split_ours(source.state_dict(), "state_dict", {}, type(source).__name__)
    if not isinstance(source, Mapping):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"init_from: no such file {path}")
        name = str(path)
        source = _torch_load(path)
    if "state_dict" in source and isinstance(source["state_dict"], Mapping):  # a Lightning checkpoint
        hparams = dict(source.get("hyper_parameters") or {})
        state = {}
        for key, value in source["state_dict"].items():
            key = _strip(key)
            if key.startswith("model."):
                state[key[len("model.") :]] = value
            else:
                state[key] = value  # probe.*, metric states: reported as left
        return _split_ours(state, "lightning", hparams, name)
    state = read_state_dict(source)  # unwraps omnivision trainer checkpoints
    if any(k.startswith("trunk.") for k in state):
        _, _, _, is_pretrain = infer_official_size(state)
        ours = convert_official(state, pretrain=is_pretrain)
        weights = _split_ours(ours, "official", {}, name)
        weights.kind = "pretrain" if is_pretrain else "finetune"
        return weights
    return _split_ours({_strip(k): v for k, v in state.items()}, "state_dict", {}, name)


def load_classifier_weights(
    model: nn.Module, source: str | PathLike | Mapping | nn.Module | SourceWeights, load_head: bool | None = None
) -> InitReport:
    """Load ``source`` into an :class:`~omnimae_pl.models.OmniViTClassifier` (in place) and report.

    ``load_head``: None (default) takes ``fc_norm`` + ``head`` from a fine-tuned source whose number of classes
    matches the model; False never; True requires it (error otherwise).
    """
    weights = source if isinstance(source, SourceWeights) else read_source(source)
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    left: dict[str, str] = {}
    problems: list[str] = []

    for key, value in weights.encoder.items():
        target = f"encoder.{key}"
        if key.startswith("norm."):
            left[target] = "the encoder's final norm: the classifier norms after pooling, fresh"
        elif key == "pos_embed":
            if target in own and own[target].shape == value.shape:
                if not torch.allclose(own[target], value.float(), atol=1e-4):
                    raise ValueError(f"{weights.name}: encoder.pos_embed is not the fixed sinusoid table of OmniMAE")
                left[target] = "fixed table, rebuilt (equal to the file's)"
            else:
                left[target] = "fixed table, rebuilt for this model's layout"
        elif target not in own:
            problems.append(f"{target} {tuple(value.shape)} has no place in the model")
        elif own[target].shape != value.shape:
            problems.append(f"{target}: file {tuple(value.shape)} vs model {tuple(own[target].shape)}")
        else:
            new[target] = value
    missing = [k for k in own if k.startswith("encoder.") and k != "encoder.pos_embed" and k not in new]
    if missing:
        problems.append(f"{len(missing)} encoder tensors missing from the file, e.g. {missing[0]}")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise ValueError(
            f"init_from {weights.name} ({weights.describe()}, hparams {_hp(weights.hparams)}) does not fit the "
            f"model (ViT {model.encoder.embed_dim} x {len(model.encoder.blocks)}, patch "
            f"{model.encoder.patch_size}): {shown}. Set model.size / model.model_overrides to the checkpoint's."
        )

    head_reason = _head_reason(weights, model, load_head)
    for part in ("fc_norm", "head"):
        tensors = getattr(weights, part) or {}
        for key, value in tensors.items():
            if head_reason is None:
                new[f"{part}.{key}"] = value
            else:
                left[f"{part}.{key}"] = head_reason
    for key in weights.other:
        left[key] = _other_reason(key)

    model.load_state_dict(new, strict=False)
    fresh = [k for k in own if k not in new and k != "encoder.pos_embed"]
    return InitReport(
        source=weights.name, description=weights.describe(), taken=list(new), left=left, fresh=fresh
    )


def _head_reason(weights: SourceWeights, model: nn.Module, load_head: bool | None) -> str | None:
    """None when fc_norm and head are taken, else why not."""
    if weights.head is None:
        return None
    if load_head is False:
        return "load_head=False"
    if weights.kind == "pretrain":
        reason = "pretraining head"
    elif weights.head["weight"].shape != model.head.weight.shape:
        reason = f"{weights.num_classes} classes in the file, {model.head.out_features} in the model: fresh"
    elif weights.fc_norm is None:
        reason = "a head without its fc_norm"
    else:
        return None
    if load_head:
        raise ValueError(f"init_from {weights.name}: cannot load the head ({reason})")
    return reason


def _other_reason(key: str) -> str:
    if key.startswith("decoder.mask_token"):
        return "mask token"
    if key.startswith("decoder.pred."):
        return "pixel head"
    if key.startswith("decoder."):
        return "decoder"
    if key.startswith("probe"):
        return "online probe"
    return "not part of the classifier"


def _hp(hparams: dict) -> str:
    keys = ("size", "model_overrides", "img_size", "num_frames")
    picked = {k: hparams[k] for k in keys if k in hparams}
    return str(picked) if picked else "n/a"
