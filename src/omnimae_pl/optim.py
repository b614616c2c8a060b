"""Parameter groups (no weight decay on biases and norms, optional layer-wise lr decay) and the per-step
warm-up + cosine schedules of the official recipes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal, get_args

import torch
from torch import nn

from omnimae_pl.errors import check_value

# A Literal, so that the CLI refuses an unknown rule while parsing, naming the key and the accepted values.
LayerDecayRule = Literal["official", "mae"]
LAYER_DECAY_RULES: tuple[str, ...] = get_args(LayerDecayRule)


def fused_adamw(device: torch.device) -> bool | None:
    """``fused=`` for AdamW on ``device``: True on CUDA and CPU, where torch has one fused kernel for the whole
    step, much faster than the per-tensor default (docs/benchmarks.md); None elsewhere."""
    return True if device.type in ("cuda", "cpu") else None


def with_initial_state(optimizer: torch.optim.AdamW) -> torch.optim.AdamW:
    """Give every parameter now the state AdamW gives it at its first update (step 0, zero moments): the updates
    are unchanged, and every checkpoint holds a state for every parameter, also for one not updated yet (the
    probe of a modality not trained yet), without which FSDP2 refuses to resume from it."""
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    for i, p in zip(ids, params):
        state["state"].setdefault(i, {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)})
    optimizer.load_state_dict(state)  # torch puts each value where the optimizer keeps it (fused: on the device)
    return optimizer


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and every norm parameter are 1-D; the mask token (1, D) and all weights are decayed."""
    return param.ndim <= 1 or name.endswith(".bias")


def layer_scale(layer: int, depth: int, decay: float, rule: LayerDecayRule = "official") -> float:
    """lr multiplier of a layer. The official rule gives every group one extra factor of ``decay`` compared
    with MAE's (the head gets ``decay``, not 1), so the two train at different speeds for the same lr."""
    check_value(rule in LAYER_DECAY_RULES, "layer_decay_rule", rule, f"must be one of {LAYER_DECAY_RULES}")
    top = depth + 2 if rule == "official" else depth + 1
    return decay ** (top - layer)


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    layer_decay: float | None = None,
    layer_of: Callable[[str], int] | None = None,
    depth: int | None = None,
    rule: LayerDecayRule = "official",
) -> list[dict]:
    """Named AdamW groups with an ``lr_scale`` each; names show in LearningRateMonitor.

    With ``layer_decay``, ``layer_of(name)`` gives a parameter's layer (0 = patch embedding, ``depth + 1`` = what
    follows the last block), e.g. :meth:`~omnimae_pl.models.encoder.VisionTransformerEncoder.layer_id`.
    """
    if layer_decay is not None and (layer_of is None or depth is None):
        raise ValueError("layer_decay needs layer_of and the encoder depth")
    groups: dict[str, dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p)
        scale, key = 1.0, "decay" if decay else "no_decay"
        if layer_decay is not None:
            layer = layer_of(name)
            scale = layer_scale(layer, depth, layer_decay, rule)
            key = f"layer_{layer}_{key}"
        group = groups.setdefault(
            key, {"name": key, "params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        )
        group["params"].append(p)
    return list(groups.values())


def warmup_cosine(
    step: int,
    total_steps: int,
    warmup_fraction: float,
    start_factor: float = 0.0,
    end_factor: float = 0.0,
    rebase_cosine: bool = True,
) -> float:
    """lr / peak at ``step``: linear warm-up from ``start_factor`` over the first ``warmup_fraction``, then
    cosine to ``end_factor``. With ``rebase_cosine=False`` (the official pretraining schedule) the cosine is
    evaluated on the global fraction of training, not restarted after warm-up, so lr jumps to about 0.994 x
    peak at the end of a 5 % warm-up and reaches ``end_factor`` at the last step."""
    where = min(step / max(total_steps, 1), 1.0)
    if where < warmup_fraction:
        return start_factor + (1.0 - start_factor) * where / warmup_fraction
    if rebase_cosine:
        where = (where - warmup_fraction) / max(1.0 - warmup_fraction, 1e-12)
    return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * where))
