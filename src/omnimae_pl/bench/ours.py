"""Our model's model-only benchmark: every (modality, checkpointing, batch) eager, then compiled."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from omnimae_pl.bench.rows import log
from omnimae_pl.bench.step import (
    OursLoss, adamw, attention_shapes, ckpt_settings, default_ckpt, measure, sdpa_context, sync, synthetic_batches,
    train_step_fn, tune_sdpa, unique_graphs,
)
from omnimae_pl.models import omnimae_pretrain
from omnimae_pl.optim import fused_adamw


@dataclass
class Ours:
    """Our model, its optimiser and loss, and the synthetic batches per (modality, batch), kept for the
    end-to-end and profiling runs that follow."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    loss_fn: OursLoss
    data: dict[tuple[str, int], list]


def bench_ours(args, device, precision, peak, flops, n_visible) -> tuple[list[dict], dict, Ours]:
    """Rows of every timed run, info (FLOPs, visible tokens, attention backends, compile figures), the state."""
    torch.manual_seed(args.seed)
    model = omnimae_pretrain(args.spec, img_size=args.img_size, num_frames=args.num_frames).to(device).train()
    sdpa = _tuned_sdpa(args, device) if args.sdpa == "tune" and device.type == "cuda" else {}
    data = {(m, b): synthetic_batches(m, b, args.img_size, args.num_frames, args.spec.patch_size,
                                      args.mask_ratios[m], device, seed=args.seed)
            for m in args.modalities for b in args.batches[m]}
    ours = Ours(model, adamw(model, fused_adamw(device)), OursLoss(model, n_visible, sdpa), data)
    rows: list[dict] = []
    if not (args.compile and args.no_eager):
        _time_all(rows, ours, ours.loss_fn.eager, False, args, device, precision, peak, flops)
    extra = _compiled(rows, ours, args, device, precision, peak, flops) if args.compile else {}
    info = {"flops_per_sample": flops, "n_visible": n_visible, "sdpa": {"/".join(k): v for k, v in sdpa.items()},
            "decoder_attn_head_pad_to": args.spec.decoder_attn_head_pad_to, **extra}
    return rows, info, ours


def _tuned_sdpa(args, device) -> dict[tuple[str, str], str]:
    shapes = attention_shapes(args.spec, args, {m: args.batches[m][0] for m in args.modalities})
    best, timings = tune_sdpa(device, shapes)
    for key, t in timings.items():
        log(f"  sdpa tune {key}: " + ", ".join(f"{k} {v:.3f} ms" if v else f"{k} n/a" for k, v in t.items())
            + f" -> {best[key]}")
    return best


def _time_all(rows, ours, fn, compiled, args, device, precision, peak, flops) -> None:
    """Append a row per (modality, checkpointing, batch) to ``rows`` as each is measured."""
    step = train_step_fn(fn, ours.opt, device, precision)
    with sdpa_context("auto" if args.sdpa == "tune" else args.sdpa):  # tuned backends are set per module
        for m in args.modalities:
            for ckpt in ckpt_settings(args.grad_ckpt, m):
                for b in args.batches[m]:
                    rows.append(measure("ours", step, ours.opt, ours.data[(m, b)], ckpt, args, device,
                                        precision=precision, compiled=compiled, flops=flops[m], peak=peak))


def _compiled(rows, ours, args, device, precision, peak, flops) -> dict:
    """Compiled rows (appended to ``rows``) and the compile figures; a failed compile is reported, not raised,
    so that the eager rows and the official comparison survive it."""
    t0 = time.perf_counter()
    try:
        fn = ours.loss_fn.compile(args.compile_scope, args.compile_mode_used, args.compile_backend)
        _time_all(rows, ours, fn, compile_label(args), args, device, precision, peak, flops)
        alternating = _graphs_when_alternating(ours, fn, args, device, precision)
    except RuntimeError as exc:  # what torch.compile and CUDA raise (BackendCompilerFailed, AcceleratorError)
        ours.loss_fn.compiled = None
        extra = {"compile_error": f"{type(exc).__name__}: {exc}"[:2000]}
        log(f"  compile failed: {extra['compile_error']}")
        return extra
    extra = {"compile_total_s": time.perf_counter() - t0, "recompiles_alternating": alternating,
             "compiled_graphs": unique_graphs(), "compile_mode": args.compile_mode_used or "default",
             "compile_backend": args.compile_backend}
    if args.compile_note:
        extra["compile_note"] = args.compile_note
    log(f"  compile: {extra}")
    return extra


def compile_label(args) -> str:
    """A compiled row's ``compiled`` field: the scope, and the mode when it is not the default."""
    return args.compile_scope + (f"+{args.compile_mode_used}" if args.compile_mode_used else "")


def _graphs_when_alternating(ours, fn, args, device, precision) -> int:
    """Graphs added by alternating the modalities after warm-up: a static-shape compile must add none."""
    before = unique_graphs()
    step = train_step_fn(fn, ours.opt, device, precision)
    for i in range(4):
        for m in args.modalities:
            step(*ours.data[(m, args.batches[m][0])][i % 2], default_ckpt(args.grad_ckpt, m))
    sync(device)
    return unique_graphs() - before
