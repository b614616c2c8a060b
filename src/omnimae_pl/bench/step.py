"""The timed training step: synthetic batches on the device, forward + loss of our model, one optimisation step,
the timing loop, peak memory, and the per-shape choice of attention backend (``--sdpa tune``)."""

from __future__ import annotations

import contextlib
import gc
import time

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel

from omnimae_pl.bench.rows import format_row, log, oom_row, row
from omnimae_pl.flops import flop_dims, token_counts, training_flops_per_sample
from omnimae_pl.masking import make_mask, token_grid
from omnimae_pl.optim import param_groups

SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def sample_shape(modality: str, img_size: int, num_frames: int) -> tuple[int, ...]:
    return (3, img_size, img_size) if modality == "image" else (3, num_frames, img_size, img_size)


def synthetic_batches(modality: str, batch: int, img: int, frames: int, patch, ratio: float, device,
                      count: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (x, mask) batches on ``device``: normalised-pixel-like noise and fixed-count random masks."""
    g = torch.Generator().manual_seed(seed)
    shape = sample_shape(modality, img, frames)
    grid = token_grid(shape, patch)
    out = []
    for _ in range(count):
        x = torch.randn((batch, *shape), generator=g)
        mask = torch.stack([make_mask(grid, ratio, "random", g) for _ in range(batch)])
        out.append((x.to(device), mask.to(device)))
    return out


def per_sample_counts(spec, args) -> tuple[dict[str, int], dict[str, int]]:
    """(training FLOPs, visible tokens) per sample of each modality, at the benchmark's mask ratios."""
    dims = flop_dims(spec)
    flops, n_visible = {}, {}
    for m, ratio in args.mask_ratios.items():
        flops[m] = training_flops_per_sample(spec, m, args.img_size, args.num_frames, ratio)
        n_visible[m] = token_counts(dims, m, args.img_size, args.num_frames, ratio)[1]
    return flops, n_visible


def adamw(model: torch.nn.Module, fused: bool | None) -> torch.optim.AdamW:
    """The pretraining optimiser: weight decay 0.05 except on biases and norms, betas (0.9, 0.95)."""
    groups = param_groups(model.named_parameters(), weight_decay=0.05)
    return torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), fused=fused)


def autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def sdpa_context(choice: str):
    """Restrict scaled_dot_product_attention to one backend; "auto" leaves PyTorch's choice."""
    return contextlib.nullcontext() if choice == "auto" else sdpa_kernel(SDPA_BACKENDS[choice])


class OursLoss:
    """Forward + loss of our model for one modality, with the visible count known statically (``n_visible``),
    so the step never reads the mask back to the host; ``sdpa`` picks a backend per (encoder|decoder, modality)."""

    def __init__(self, model, n_visible: dict[str, int], sdpa: dict | None = None) -> None:
        self.model, self.n_visible = model, n_visible
        self.sdpa = sdpa or {}
        self.compiled = None  # set by compile(); None while eager

    def eager(self, x, mask, ckpt: bool):
        m = self.model
        modality = "image" if x.ndim == 4 else "video"
        with sdpa_context(self.sdpa.get(("encoder", modality), "auto")):
            latent, ids = m.forward_encoder(x, mask, ckpt, self.n_visible[modality])
        with sdpa_context(self.sdpa.get(("decoder", modality), "auto")):
            pred = m.forward_decoder(latent, ids, x, ckpt)
        return m.forward_loss(x, pred, mask)

    @property
    def fastest(self):
        return self.compiled or self.eager

    def compile(self, scope: str, mode: str | None, backend: str = "inductor"):
        """``step``: the whole forward + loss as one graph; ``blocks``: every transformer block (one graph per
        block shape) and the loss, far shorter compile times for deep models. Two static shapes (dynamic=False).
        With CUDA graphs (``reduce-overhead``) every call starts a new cudagraph step first."""
        kwargs = {"dynamic": False, "backend": backend, **({"mode": mode} if mode else {})}
        if scope == "step":
            compiled = torch.compile(self.eager, **kwargs)
        else:
            for blk in [*self.model.encoder.blocks, *self.model.decoder.blocks]:
                blk.compile(**kwargs)
            self.model.forward_loss = torch.compile(self.model.forward_loss, **kwargs)
            compiled = self.eager
        if mode == "reduce-overhead":
            def compiled_step(x, mask, ckpt):
                # the previous step's graph outputs may be overwritten from here on: each call is one step
                torch.compiler.cudagraph_mark_step_begin()
                return compiled(x, mask, ckpt)

            self.compiled = compiled_step
        else:
            self.compiled = compiled
        return self.compiled


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def compile_settings(mode: str, backend: str, device: torch.device) -> tuple[str | None, str | None]:
    """(mode for torch.compile, None for its default; a note when the asked mode cannot apply). CUDA graphs
    exist only on CUDA, and modes are Inductor's: elsewhere the compile runs without them, and says so."""
    if mode == "default":
        return None, None
    if backend != "inductor":
        return None, f"--compile-mode {mode} is Inductor's; backend {backend} compiles without it"
    if mode == "reduce-overhead" and device.type != "cuda":
        return None, f"--compile-mode {mode}: CUDA graphs need a CUDA device; compiled without them on {device.type}"
    return mode, None


def train_step_fn(loss_fn, opt, device, precision: str, scaler=None):
    """One optimisation step: autocast forward, backward, optimiser step; returns the detached loss (no host read)."""

    def step(x, mask, ckpt):
        with autocast(device, precision):
            loss = loss_fn(x, mask, ckpt)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def ckpt_settings(grad_ckpt: str, modality: str) -> list[bool]:
    """Activation checkpointing of each timed run (``--grad-ckpt``): images are never checkpointed."""
    if modality == "image" or grad_ckpt == "none":
        return [False]
    return [True] if grad_ckpt == "video" else [False, True]


def default_ckpt(grad_ckpt: str, modality: str) -> bool:
    """Checkpointing of the untimed and end-to-end steps: on for video unless ``--grad-ckpt none``."""
    return modality == "video" and grad_ckpt != "none"


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unique_graphs() -> int:
    """Graphs torch.compile has built in this process (0 before any compile)."""
    return int(counters["stats"]["unique_graphs"])


def reset_mem(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_loop(step, batches, ckpt: bool, steps: int, warmup: int, repeats: int, device):
    """Warm up, then ``repeats`` windows of ``steps`` steps; returns (median seconds per step, mean loss of the
    last window, graphs compiled after warm-up)."""
    for i in range(warmup):
        step(*batches[i % len(batches)], ckpt)
    sync(device)
    graphs_after_warmup = unique_graphs()
    times = []
    for _ in range(repeats):
        sec, acc = _window(step, batches, ckpt, steps, device)
        times.append(sec)
    mean_loss = float(acc) / max(steps, 1)  # the only host read, after the timed windows
    times.sort()
    return times[len(times) // 2], mean_loss, unique_graphs() - graphs_after_warmup


def _window(step, batches, ckpt, steps, device) -> tuple[float, torch.Tensor]:
    """Seconds per step over one window (CUDA events on a GPU) and the losses summed on the device."""
    acc = torch.zeros((), device=device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            acc += step(*batches[i % len(batches)], ckpt)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps, acc
    t0 = time.perf_counter()
    for i in range(steps):
        acc += step(*batches[i % len(batches)], ckpt)
    return (time.perf_counter() - t0) / steps, acc


def measure(impl, step, opt, batches, ckpt, args, device, *, precision, compiled, flops, peak) -> dict:
    """Time ``step`` on ``batches`` and log the row; out of memory gives an "OOM" row and the run goes on."""
    modality = "image" if batches[0][0].ndim == 4 else "video"
    batch = batches[0][0].shape[0]
    reset_mem(device)
    try:
        sec, loss, recompiles = time_loop(step, batches, ckpt, args.steps, args.warmup, args.repeats, device)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        log(f"  {impl} {precision} {modality} batch {batch} ckpt={ckpt}: out of memory")
        return oom_row(impl, modality, batch, precision, compiled, ckpt)
    r = row(impl, modality, batch, precision, compiled, ckpt, sec, flops, peak, peak_mem(device), loss,
            recompiles if compiled else None)
    log(format_row(r))
    return r


def attention_shapes(spec, args, batches: dict[str, int]) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """(encoder|decoder, modality) -> (batch, heads, tokens, head_dim) of every attention call in a step (the
    decoder's padded head size under ``decoder_attn_head_pad_to``)."""
    dims = flop_dims(spec)
    decoder_head = max(spec.decoder_embed_dim // spec.decoder_num_heads, spec.decoder_attn_head_pad_to or 0)
    out = {}
    for m, b in batches.items():
        n_all, n_vis = token_counts(dims, m, args.img_size, args.num_frames, args.mask_ratios[m])
        out[("encoder", m)] = (b, spec.num_heads, n_vis, spec.embed_dim // spec.num_heads)
        out[("decoder", m)] = (b, spec.decoder_num_heads, n_all, decoder_head)
    return out


def tune_sdpa(device, shapes, choices=("flash", "efficient", "cudnn"), iters: int = 10):
    """Time SDPA forward + backward (bf16) per shape and backend; returns (best per key, all timings in ms)."""
    best, timings = {}, {}
    for key, shape in shapes.items():
        q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(shape, device=device, dtype=torch.bfloat16)
        timings[key] = {choice: _sdpa_ms(q, k, v, g, choice, iters) for choice in choices}
        ok = {c: t for c, t in timings[key].items() if t}
        best[key] = min(ok, key=ok.get) if ok else "auto"
        del q, k, v, g
    return best, timings


def _sdpa_ms(q, k, v, grad, choice: str, iters: int) -> float | None:
    """Milliseconds per SDPA forward + backward with one backend; None where it does not take the shape."""
    try:
        with sdpa_context(choice):
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v).backward(grad)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                F.scaled_dot_product_attention(q, k, v).backward(grad)
            end.record()
            end.synchronize()
    except RuntimeError:  # this backend does not take this shape / dtype
        return None
    return start.elapsed_time(end) / iters
