"""Side by side with the official OmniMAE code (facebookresearch/omnivore), imported from a local snapshot kept
out of tree, timed with the same step, synthetic batches and loss as ours."""

from __future__ import annotations

import functools
import importlib
import sys
import types
import warnings
from pathlib import Path

import torch

from omnimae_pl.bench.rows import log
from omnimae_pl.bench.step import adamw, measure, reset_mem, synthetic_batches, train_step_fn
from omnimae_pl.models.losses import masked_mse, norm_pix_targets
from omnimae_pl.models.tokens import flatten_mask

OFFICIAL_BUILDERS = {"base": "vit_base_mae_pretraining", "large": "vit_large_mae_pretraining",
                     "huge": "vit_huge_mae_pretraining"}


def import_official(path: str):
    """Import the official ``omnimae.omni_mae_model`` from a local snapshot, out of tree.

    The model code imports ``hydra`` only for optional sub-configs; a stub stands in when it is missing.
    """
    root = Path(path).resolve()
    if not (root / "omnimae" / "omni_mae_model.py").exists():
        raise FileNotFoundError(f"{root} holds no omnimae/omni_mae_model.py")
    if importlib.util.find_spec("hydra") is None and "hydra" not in sys.modules:
        hydra = types.ModuleType("hydra")
        hydra.utils = types.SimpleNamespace(instantiate=_no_hydra)
        sys.modules["hydra"] = hydra
        sys.modules["hydra.utils"] = hydra.utils
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    with warnings.catch_warnings():  # the snapshot's deprecation warnings are not ours to fix
        warnings.simplefilter("ignore")
        return importlib.import_module("omnimae.omni_mae_model")


def _no_hydra(*args, **kwargs):
    raise RuntimeError("hydra is stubbed out for the benchmark")


def bench_official(args, device, peak, flops) -> list[dict]:
    """Rows of the official model at each ``--official-precision`` (default fp16 and bf16 on CUDA, fp32 on CPU)."""
    module = import_official(args.official)
    if args.size not in OFFICIAL_BUILDERS:
        log(f"  official: no builder for size {args.size!r}")
        return []
    precisions = args.official_precision or ("fp16,bf16" if device.type == "cuda" else "fp32")
    rows = []
    for precision in precisions.split(","):
        rows += _bench_precision(module, precision, args, device, peak, flops)
    reset_mem(device)
    return rows


def _bench_precision(module, precision, args, device, peak, flops) -> list[dict]:
    reset_mem(device)
    torch.manual_seed(args.seed)
    model = getattr(module, OFFICIAL_BUILDERS[args.size])(pretrained=False).to(device).train()
    patch = tuple(model.trunk.patch_embed.proj[1].kernel_size)
    opt = adamw(model, fused=None)  # the released trainer: torch's default (foreach) AdamW
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    step = train_step_fn(functools.partial(_official_loss, model, patch), opt, device, precision, scaler)
    rows = []
    for m in args.modalities:
        data = synthetic_batches(m, args.batches[m][0], args.img_size, args.num_frames, patch, args.mask_ratios[m],
                                 device, seed=args.seed)
        # the released recipe checkpoints video steps; time without first, as ours runs
        for ckpt in [False, True] if m == "video" else [False]:
            rows.append(measure("official", step, opt, data, ckpt, args, device, precision=precision,
                                compiled=False, flops=flops[m], peak=peak))
        del data  # before the next modality's batches: each row's peak memory holds its own only
    return rows


def _official_loss(model, patch, x, mask, ckpt):
    _, feats = model.trunk(x, mask=mask, use_checkpoint=ckpt)  # OmniMAE.forward is broken at HEAD
    return masked_mse(model.head(feats), norm_pix_targets(x, patch), flatten_mask(mask))
