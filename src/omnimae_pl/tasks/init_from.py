"""Start a classifier from pretrained or fine-tuned weights, with a short report of what was taken.

The source is anything :func:`omnimae_pl.models.checkpoints.read_weights` reads (our Lightning checkpoints, bare
state dicts of our modules, the released OmniMAE files), opened safely there.

What a classifier takes: the encoder (patch embedding and blocks). Never the encoder's final norm (it normed
tokens before the decoder; the classifier norms after pooling and that norm starts fresh, as in the official
fine-tuning configs), the decoder, the mask token or the pixel head. ``fc_norm`` and ``head`` are taken only
from a fine-tuned source whose head has the model's number of classes. The fixed positional table is never
taken: it is rebuilt for the model's layout (and checked against the file when the layouts agree).

Used by ``OmniMAEFinetune(init_from=...)``; never through ``ckpt_path``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike

import torch
from torch import nn

from omnimae_pl.models.checkpoints import CheckpointError, SourceWeights, read_weights


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


def load_classifier_weights(
    model: nn.Module, source: str | PathLike | Mapping | nn.Module | SourceWeights, load_head: bool | None = None
) -> InitReport:
    """Load ``source`` into an :class:`~omnimae_pl.models.OmniViTClassifier` (in place) and report.

    ``load_head``: None (default) takes ``fc_norm`` + ``head`` from a fine-tuned source whose number of classes
    matches the model; False never; True requires it (error otherwise).
    """
    weights = source if isinstance(source, SourceWeights) else read_weights(source)
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
                    raise CheckpointError(f"{weights.name}: encoder.pos_embed is not the fixed sinusoid table of OmniMAE")
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
        raise CheckpointError(
            f"init_from {weights.name} ({weights.describe()}, hparams {_hp(weights.hparams)}) does not fit the "
            f"model (ViT {model.encoder.embed_dim} x {len(model.encoder.blocks)}, patch "
            f"{model.encoder.patch_size}): {shown}. Set model.size / model.model_overrides and data.patch_size to "
            "the checkpoint's."
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
        raise CheckpointError(f"init_from {weights.name}: cannot load the head ({reason})")
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
    keys = ("size", "model_overrides", "patch_size", "img_size", "num_frames")
    picked = {k: hparams[k] for k in keys if k in hparams}
    return str(picked) if picked else "n/a"
