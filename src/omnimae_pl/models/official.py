"""The released OmniMAE layout (bare ``trunk.*`` / ``head.*`` state dicts) mapped onto our modules.

The size, patch and positional layout are read from the tensors; the fixed positional tables are rebuilt
and checked against the file. Pure functions on state dicts: files are opened by
:mod:`omnimae_pl.models.checkpoints` (``load_official``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from omnimae_pl.models.classifier import OmniViTClassifier
from omnimae_pl.models.factory import ModelSize, num_heads_for, omnimae_classifier, omnimae_pretrain
from omnimae_pl.models.omnimae import OmniMAE
from omnimae_pl.models.pos_embed import table_layout

# official prefix -> ours (applied in order, first match wins)
_PRETRAIN_RENAMES = (
    ("trunk.patch_embed.proj.1.", "encoder.patch_embed.proj."),
    ("trunk.pos_embed", "encoder.pos_embed"),
    ("trunk.blocks.", "encoder.blocks."),
    ("trunk.norm.", "encoder.norm."),
    ("trunk.mask_token", "decoder.mask_token"),
    ("trunk.decoder.decoder_blocks.", "decoder.blocks."),
    ("trunk.decoder.", "decoder."),
    ("head.", "decoder.pred."),
)
_FINETUNE_RENAMES = (
    ("trunk.patch_embed.proj.1.", "encoder.patch_embed.proj."),
    ("trunk.pos_embed", "encoder.pos_embed"),
    ("trunk.blocks.", "encoder.blocks."),
    ("trunk.norm.", "fc_norm."),  # the released fine-tuned models norm after pooling
    ("head.", "head."),
)
# Trainer (omnivision) checkpoints wrap the model and name the heads differently.
_TRAINER_HEADS = (("heads.0.projector.", "head."), ("heads.0.0.", "head."), ("heads.0.", "head."))
_REQUIRED = ("trunk.patch_embed.proj.1.weight", "trunk.pos_embed", "trunk.blocks.0.attn.qkv.weight", "head.weight")


def _rename(key: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def unwrap_trainer_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An omnivision trainer checkpoint (``model`` with ``heads.0.*``) -> the released layout; others unchanged."""
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    out = {}
    for k, v in state.items():
        for old, new in _TRAINER_HEADS:
            if k.startswith(old):
                k = new + k[len(old) :]
                break
        out[k] = v
    return out


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in state if (m := rx.match(k))})


def _foreign(state: Mapping[str, torch.Tensor], missing, unexpected) -> ValueError:
    def short(keys):
        keys = sorted(keys)
        return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") or "none"

    return ValueError(
        f"not an OmniMAE checkpoint ({len(state)} keys): missing keys: {short(missing)}; "
        f"unexpected keys: {short(unexpected)}"
    )


def infer_official_size(state: Mapping[str, torch.Tensor]) -> tuple[ModelSize, int, int, bool]:
    """(size, num_frames, img_size, is_pretrain) read from the tensors of an official state dict."""
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise _foreign(state, missing, [k for k in state if not k.startswith(("trunk.", "head."))])
    proj = state["trunk.patch_embed.proj.1.weight"]
    dim, patch = proj.shape[0], tuple(int(s) for s in proj.shape[2:])
    depth = _count(state, r"trunk\.blocks\.(\d+)\.")
    is_pretrain = "trunk.mask_token" in state or any(k.startswith("trunk.decoder.") for k in state)
    if is_pretrain:
        dec_dim = state["trunk.decoder.decoder_embed.weight"].shape[0]
        dec_depth = _count(state, r"trunk\.decoder\.decoder_blocks\.(\d+)\.")
        dec_heads = 16 if dec_dim % 16 == 0 else max(dec_dim // 32, 1)  # 16 in every released decoder
    else:
        dec_dim, dec_depth, dec_heads = 0, 0, 1
    size = ModelSize(dim, depth, num_heads_for(dim, depth), dec_dim, dec_depth, dec_heads, patch_size=patch)
    num_frames, img_size = table_layout(state["trunk.pos_embed"].shape[1], patch)
    return size, num_frames, img_size, is_pretrain


def convert_official(state: Mapping[str, torch.Tensor], pretrain: bool) -> dict[str, torch.Tensor]:
    """Official keys -> ours; keys that map nowhere are kept under their own name (and so reported)."""
    renames = _PRETRAIN_RENAMES if pretrain else _FINETUNE_RENAMES
    return {(_rename(k, renames) or k): v for k, v in state.items()}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Strict load with one error listing missing and unexpected keys; fixed tables must equal ours."""
    own = model.state_dict()
    for key in ("encoder.pos_embed", "decoder.pos_embed"):
        if key in state and key in own and state[key].shape == own[key].shape:
            if not torch.allclose(state[key].float(), own[key], atol=1e-4):
                raise ValueError(f"{key} in the checkpoint is not the fixed sinusoid table this model expects")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise _foreign(state, missing, unexpected)
    model.load_state_dict(state, strict=True)


def official_model(
    state: Mapping[str, torch.Tensor], num_frames: int | None = None, img_size: int | None = None
) -> OmniMAE | OmniViTClassifier:
    """A released state dict -> our pretraining model (``model(x, mask=mask)`` returns pixel predictions) or our
    classifier (``model(x)`` returns logits), in eval mode.

    The input layout is read from the positional table (16 frames when that fits, as in every released
    file); give ``num_frames`` and ``img_size`` for other layouts, where the row count alone is ambiguous.
    """
    state = unwrap_trainer_state(state)
    size, frames, size_px, is_pretrain = infer_official_size(state)
    num_frames, img_size = num_frames or frames, img_size or size_px
    if is_pretrain:
        model: nn.Module = omnimae_pretrain(size, img_size=img_size, num_frames=num_frames)
    else:
        num_classes = state["head.weight"].shape[0]
        model = omnimae_classifier(size, num_classes, img_size=img_size, num_frames=num_frames, drop_path_rate=0.0)
    load_into(model, convert_official(state, is_pretrain))
    return model.eval()
