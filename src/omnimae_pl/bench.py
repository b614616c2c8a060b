"""Training-step benchmark: samples/s, MFU, peak memory, eager vs torch.compile, optional official side by side.

Run ``python -m omnimae_pl.bench --size base`` on a GPU (bf16 autocast), or
``python -m omnimae_pl.bench --size tiny --img-size 32 --num-frames 4`` on a CPU (fp32) as a smoke test.

The timed step is a real pretraining step: autocast forward, fp32 loss, backward, fused AdamW (CUDA and CPU),
``zero_grad(set_to_none=True)``. Nothing reads the device inside the timed loop: losses are summed on the
device and read once at the end. Model-only runs use synthetic batches that already sit on the device.

The visible-token indices are computed *inside* the step from the mask with a statically known count
(``argsort`` of the mask, first ``n_visible``), so the step never waits on the host. ``--ids model`` instead
calls ``model(x, mask)``, whose ``visible_indices`` reads the per-sample counts back to the host every step
(the behaviour before the proposed model change; see docs/benchmarks.md).

Compilation (``--compile``) keeps exactly two static shapes per compiled region, image and video
(``dynamic=False``); after warm-up the number of compiled graphs must not grow (reported as
``recompiles``). ``--compile-scope step`` compiles the whole forward + loss; ``blocks`` compiles each
transformer block and the loss separately (regional compilation: one graph per block shape, far shorter
compile times for deep models).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import platform
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from omnimae_pl.flops import PAPER_MASK_RATIO, flop_dims, token_counts, training_flops_per_sample
from omnimae_pl.models.losses import masked_mse, norm_pix_targets
from omnimae_pl.masking import make_mask
from omnimae_pl.models import model_size, omnimae_pretrain
from omnimae_pl.optim import fused_adamw

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM (and H200: same tensor cores), dense bf16
FIELDS = (
    "impl", "modality", "batch", "precision", "compiled", "grad_ckpt", "samples_per_s", "steps_per_s", "step_ms",
    "gflops_per_sample", "tflops_per_s", "mfu", "peak_mem_gib", "loss", "recompiles",
)
GPU_IMAGE_BATCH = {"base": 256, "large": 256, "huge": 256}
GPU_VIDEO_BATCH = 32  # 8 clips x 4 replicas per GPU, as in the released recipe
OFFICIAL_BUILDERS = {"base": "vit_base_mae_pretraining", "large": "vit_large_mae_pretraining",
                     "huge": "vit_huge_mae_pretraining"}


# ---------------------------------------------------------------------------------------------- options
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m omnimae_pl.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base", help="tiny, small, base, large or huge")
    p.add_argument("--model-overrides", default="", help="e.g. depth=2,embed_dim=64 (ModelSize fields)")
    p.add_argument("--modality", choices=("image", "video", "both"), default="both")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=None, help="one batch size for both modalities")
    p.add_argument("--image-batch", default=None, help="image batch, or a comma list to sweep (GPU default 256)")
    p.add_argument("--video-batch", default=None, help="video batch in samples, or a comma list (GPU default 32)")
    p.add_argument("--image-mask-ratio", type=float, default=PAPER_MASK_RATIO["image"])
    p.add_argument("--video-mask-ratio", type=float, default=PAPER_MASK_RATIO["video"])
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (GPU 20, CPU 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 5, CPU 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows; the median is reported (GPU 3)")
    p.add_argument("--compile", action="store_true", help="time torch.compile (after eager unless --no-eager)")
    p.add_argument("--no-eager", action="store_true", help="with --compile: skip the eager run")
    p.add_argument("--compile-scope", choices=("step", "blocks"), default="blocks")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by device name)")
    p.add_argument("--grad-ckpt", choices=("none", "video", "both"), default="none",
                   help="activation checkpointing: none, on video steps, or time both settings")
    p.add_argument("--sdpa", choices=("auto", "tune", "flash", "efficient", "cudnn", "math"), default="auto",
                   help="attention backend; tune: time flash / efficient / cudnn on each (encoder|decoder, "
                        "modality) attention shape first and use the fastest for each")
    p.add_argument("--patch-embed", choices=("model", "conv"), default="model",
                   help="conv: force the Conv3d patch embedding (the 'before' of the matmul rewrite)")
    p.add_argument("--ids", choices=("static", "model"), default="static",
                   help="static: visible ids from a known count, no host sync; model: model(x, mask)")
    p.add_argument("--end-to-end", action="store_true", help="also time through data loaders + interleaver")
    p.add_argument("--workers", type=int, default=None, help="loader workers per source for --end-to-end")
    p.add_argument("--e2e-data", choices=("project", "synthetic"), default="project",
                   help="project: demo corpus through OmniMAEDataModule + ModalityInterleaver (falls back to "
                        "synthetic when unavailable); synthetic: a DataLoader of ready tensors")
    p.add_argument("--data-root", default=None, help="where the demo corpus is built / reused")
    p.add_argument("--official", default=None, metavar="PATH",
                   help="folder with the official omnivore snapshot (omnimae/, omnivision/) for a side by side")
    p.add_argument("--official-precision", default=None, help="comma list of fp16,bf16,fp32 (CUDA: fp16,bf16)")
    p.add_argument("--profile", action="store_true", help="top-10 CUDA kernels of a few steps per modality")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON here")
    p.add_argument("--out-dir", default=None, help="write profiles here")
    return p


def _ints(text) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _overrides(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = float(value) if "." in value else int(value)
    return out


def peak_tflops_for(device: torch.device, precision: str, override: float | None) -> float | None:
    """Dense peak for MFU: H100/H200 989 TFLOP/s bf16 (494.5 tf32, 67 fp32 vector); None if unknown."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name or "H200" in name:
        scale = 756.0 / 989.0 if "PCIe" in name else 1.0  # H100 PCIe runs lower clocks and fewer SMs
        return (H100_BF16_DENSE_TFLOPS if precision == "bf16" else 494.5) * scale
    return None


# ---------------------------------------------------------------------------------------------- data
def synthetic_batches(modality: str, batch: int, img: int, frames: int, patch, ratio: float, device,
                      count: int = 2, seed: int = 0):
    """``count`` (x, mask) batches on ``device``: normalised-pixel-like noise and fixed-count random masks."""
    g = torch.Generator().manual_seed(seed)
    pt, ph, pw = patch
    grid = (1 if modality == "image" else max(frames // pt, 1), img // ph, img // pw)
    out = []
    for _ in range(count):
        shape = (batch, 3, img, img) if modality == "image" else (batch, 3, frames, img, img)
        x = torch.randn(shape, generator=g)
        mask = torch.stack([make_mask(grid, ratio, "random", g) for _ in range(batch)])
        out.append((x.to(device), mask.to(device)))
    return out


def visible_ids(mask: torch.Tensor, n_visible: int) -> torch.Tensor:
    """Raster-ordered indices of the visible tokens when every row keeps ``n_visible``; no host read."""
    flat = mask.reshape(mask.shape[0], -1)
    return torch.argsort(flat.to(torch.uint8), dim=1, stable=True)[:, :n_visible]


# ---------------------------------------------------------------------------------------------- steps
def _autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def _sdpa_context(choice: str):
    if choice == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[choice]
    return sdpa_kernel(backend)


def make_optimizer(model: torch.nn.Module, device: torch.device, fused: bool | None = None):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or n.endswith(".bias"))]
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    if fused is None:
        fused = bool(fused_adamw(device))
    kwargs = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=1.5e-4, betas=(0.9, 0.95), **kwargs)


class OursLoss:
    """Forward + loss of our model for one modality; ``compiled`` selects the compiled variant."""

    def __init__(self, model, n_visible: dict[str, int], ids_mode: str, sdpa: dict | None = None) -> None:
        self.model, self.n_visible, self.ids_mode = model, n_visible, ids_mode
        self.sdpa = sdpa or {}  # (encoder|decoder, modality) -> backend
        self._compiled = None

    def eager(self, x, mask, ckpt: bool):
        m = self.model
        if self.ids_mode == "model":
            pred = m(x, mask, use_checkpoint=ckpt)
            return m.forward_loss(x, pred, mask)
        modality = "image" if x.ndim == 4 else "video"
        ids = visible_ids(mask, self.n_visible[modality])
        with _sdpa_context(self.sdpa.get(("encoder", modality), "auto")):
            latent = m.encoder.forward_features(x, ids, ckpt)
        with _sdpa_context(self.sdpa.get(("decoder", modality), "auto")):
            pred = m.decoder(latent, ids, _grid(x, m.patch_size), x.ndim == 4, ckpt)
        return m.forward_loss(x, pred, mask)

    def compile(self, scope: str, mode: str | None):
        kwargs = {"dynamic": False}
        if mode:
            kwargs["mode"] = mode
        if scope == "step":
            self._compiled = torch.compile(self.eager, **kwargs)
        else:  # regional: every block (same code, one graph per shape) and the loss
            for blk in [*self.model.encoder.blocks, *self.model.decoder.blocks]:
                blk.compile(**kwargs)
            self.model.forward_loss = torch.compile(self.model.forward_loss, **kwargs)
            self._compiled = self.eager
        return self._compiled


def _grid(x: torch.Tensor, patch) -> tuple[int, int, int]:
    pt, ph, pw = patch
    t = x.shape[2] if x.ndim == 5 else pt
    return max(t // pt, 1), x.shape[-2] // ph, x.shape[-1] // pw


def train_step_fn(loss_fn, opt, device, precision: str, scaler=None):
    """One optimisation step; returns the detached loss (no host read)."""

    def step(x, mask, ckpt):
        with _autocast(device, precision):
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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unique_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # pragma: no cover - dynamo missing
        return 0


def time_loop(step, batches, ckpt: bool, steps: int, warmup: int, repeats: int, device):
    """Warm up, then ``repeats`` windows of ``steps`` steps; returns (median seconds per step, last loss)."""
    acc = None
    for i in range(warmup):
        step(*batches[i % len(batches)], ckpt)
    _sync(device)
    graphs_after_warmup = _unique_graphs()
    times = []
    for _ in range(repeats):
        acc = torch.zeros((), device=device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(steps):
                acc += step(*batches[i % len(batches)], ckpt)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            t0 = time.perf_counter()
            for i in range(steps):
                acc += step(*batches[i % len(batches)], ckpt)
            times.append((time.perf_counter() - t0) / steps)
    mean_loss = float(acc) / max(steps, 1)  # the only host read, after the timed windows
    times.sort()
    return times[len(times) // 2], mean_loss, _unique_graphs() - graphs_after_warmup


def _row(impl, modality, batch, precision, compiled, ckpt, sec, flops, peak, mem, loss, recompiles):
    sps = batch / sec
    tflops = sps * flops / 1e12
    return {
        "impl": impl, "modality": modality, "batch": batch, "precision": precision, "compiled": compiled,
        "grad_ckpt": ckpt, "samples_per_s": sps, "steps_per_s": 1.0 / sec, "step_ms": sec * 1e3,
        "gflops_per_sample": flops / 1e9, "tflops_per_s": tflops,
        "mfu": (tflops / peak) if peak else None, "peak_mem_gib": mem, "loss": loss, "recompiles": recompiles,
    }


def _reset_mem(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mem(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------- ours
@contextlib.contextmanager
def conv_patch_embed(enabled: bool = True):
    """The 'before' of the patch-embedding rewrite: TubeletEmbed runs through its Conv3d (cuDNN) inside."""
    from omnimae_pl.models import patch

    original = patch.TubeletEmbed.forward

    def conv_forward(self, x):
        x = self.proj(patch.to_video(x, self.patch_size[0]))
        return x.flatten(2).transpose(1, 2)

    if enabled:
        patch.TubeletEmbed.forward = conv_forward
    try:
        yield
    finally:
        patch.TubeletEmbed.forward = original


def attention_shapes(spec, args, batches: dict[str, int]) -> dict[tuple[str, str], tuple[int, int, int, int]]:
    """(module, modality) -> (batch, heads, tokens, head_dim) of every attention call in a step."""
    dims = flop_dims(spec)
    out = {}
    for m, b in batches.items():
        ratio = args.image_mask_ratio if m == "image" else args.video_mask_ratio
        n_all, n_vis = token_counts(dims, m, args.img_size, args.num_frames, ratio)
        out[("encoder", m)] = (b, spec.num_heads, n_vis, spec.embed_dim // spec.num_heads)
        out[("decoder", m)] = (b, spec.decoder_num_heads, n_all, spec.decoder_embed_dim // spec.decoder_num_heads)
    return out


def tune_sdpa(device, shapes, choices=("flash", "efficient", "cudnn"), iters: int = 10):
    """Time SDPA forward + backward (bf16) per shape and backend; returns (best per key, all timings in ms)."""
    best, timings = {}, {}
    for key, (b, h, n, d) in shapes.items():
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16)
        timings[key] = {}
        for choice in choices:
            try:
                with _sdpa_context(choice):
                    for _ in range(3):
                        F.scaled_dot_product_attention(q, k, v).backward(g)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(iters):
                        F.scaled_dot_product_attention(q, k, v).backward(g)
                    end.record()
                    end.synchronize()
                timings[key][choice] = start.elapsed_time(end) / iters
            except RuntimeError:  # backend does not take this shape / dtype
                timings[key][choice] = None
        ok = {c: t for c, t in timings[key].items() if t}
        best[key] = min(ok, key=ok.get) if ok else "auto"
        del q, k, v, g
    return best, timings


def bench_ours(args, device, precision, peak, log) -> tuple[list[dict], dict, dict]:
    spec = model_size(args.size, **_overrides(args.model_overrides))
    torch.manual_seed(args.seed)
    model = omnimae_pretrain(spec, img_size=args.img_size, num_frames=args.num_frames).to(device).train()
    opt = make_optimizer(model, device)
    dims = flop_dims(model)
    ratios = {"image": args.image_mask_ratio, "video": args.video_mask_ratio}
    n_vis = {m: token_counts(dims, m, args.img_size, args.num_frames, ratios[m])[1] for m in ("image", "video")}
    flops = {m: training_flops_per_sample(model, m, args.img_size, args.num_frames, ratios[m])
             for m in ("image", "video")}
    sdpa = {}
    if args.sdpa == "tune" and device.type == "cuda":
        shapes = attention_shapes(spec, args, {m: args.batches[m][0] for m in args.modalities})
        sdpa, timings = tune_sdpa(device, shapes)
        for key, t in timings.items():
            log(f"  sdpa tune {key}: " + ", ".join(f"{k} {v:.3f} ms" if v else f"{k} n/a" for k, v in t.items())
                + f" -> {sdpa[key]}")
    loss_fn = OursLoss(model, n_vis, args.ids, sdpa)
    rows, data = [], {}
    for m in args.modalities:
        for b in args.batches[m]:
            data[(m, b)] = synthetic_batches(m, b, args.img_size, args.num_frames, spec.patch_size, ratios[m],
                                             device, seed=args.seed)
    ckpt_settings = {"none": [False], "video": [None], "both": [False, None]}[args.grad_ckpt]

    def run(tag, fn, compiled):
        step = train_step_fn(fn, opt, device, precision)
        for m in args.modalities:
            for ck in ckpt_settings:
                ckpt = (m == "video") if ck is None else ck
                if ck is None and m == "image" and len(ckpt_settings) > 1:
                    continue  # images are never checkpointed; one row is enough
                for b in args.batches[m]:
                    _reset_mem(device)
                    try:
                        with _sdpa_context("auto" if args.sdpa == "tune" else args.sdpa):
                            sec, loss, rec = time_loop(step, data[(m, b)], ckpt, args.steps, args.warmup,
                                                       args.repeats, device)
                    except torch.OutOfMemoryError:
                        opt.zero_grad(set_to_none=True)
                        log(f"  {tag} {m} batch {b} ckpt={ckpt}: out of memory")
                        rows.append({"impl": tag, "modality": m, "batch": b, "error": "OOM", "grad_ckpt": ckpt,
                                     "compiled": compiled, "precision": precision})
                        continue
                    row = _row(tag, m, b, precision, compiled, ckpt, sec, flops[m], peak, _peak_mem(device), loss,
                               rec if compiled else None)
                    rows.append(row)
                    log(format_row(row))

    if not (args.compile and args.no_eager):
        run("ours", loss_fn.eager, False)
    extra = {}
    if args.compile:
        try:
            extra = _run_compiled(args, run, loss_fn, opt, data, device, precision, log)
        except Exception as exc:  # noqa: BLE001 - keep the eager numbers and the official comparison
            loss_fn._compiled = None
            extra = {"compile_error": f"{type(exc).__name__}: {exc}"[:2000]}
            log(f"  compile failed: {extra['compile_error']}")
    info = {"flops_per_sample": flops, "n_visible": n_vis, "sdpa": {"/".join(k): v for k, v in sdpa.items()},
            **extra}
    state = {"model": model, "opt": opt, "loss_fn": loss_fn, "data": data, "ckpt": ckpt_settings}
    return rows, info, state


def _run_compiled(args, run, loss_fn, opt, data, device, precision, log) -> dict:
    t0 = time.perf_counter()
    cfn = loss_fn.compile(args.compile_scope, args.compile_mode)
    run("ours", cfn, f"{args.compile_scope}")
    # alternate the two shapes after warm-up: a static-shape compile must not recompile
    before = _unique_graphs()
    step = train_step_fn(cfn, opt, device, precision)
    for i in range(4):
        for m in args.modalities:
            step(*data[(m, args.batches[m][0])][i % 2], m == "video" and args.grad_ckpt != "none")
    _sync(device)
    extra = {"compile_total_s": time.perf_counter() - t0, "recompiles_alternating": _unique_graphs() - before,
             "compiled_graphs": _unique_graphs()}
    log(f"  compile: {extra}")
    return extra


# ---------------------------------------------------------------------------------------------- official
def import_official(path: str):
    """Import the official ``omnimae.omni_mae_model`` from a local snapshot, out of tree.

    The model code imports ``hydra`` only for optional sub-configs; a stub stands in when it is missing.
    """
    root = Path(path).resolve()
    if not (root / "omnimae" / "omni_mae_model.py").exists():
        raise FileNotFoundError(f"{root} holds no omnimae/omni_mae_model.py")
    if importlib.util.find_spec("hydra") is None and "hydra" not in sys.modules:
        hydra = types.ModuleType("hydra")
        hydra.utils = types.SimpleNamespace(instantiate=lambda *a, **k: (_ for _ in ()).throw(
            RuntimeError("hydra is stubbed out for the benchmark")))
        sys.modules["hydra"] = hydra
        sys.modules["hydra.utils"] = hydra.utils
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("omnimae.omni_mae_model")


def bench_official(args, device, peak, flops, log) -> list[dict]:
    mod = import_official(args.official)
    if args.size not in OFFICIAL_BUILDERS:
        log(f"  official: no builder for size {args.size!r}")
        return []
    precisions = args.official_precision or ("fp16,bf16" if device.type == "cuda" else "fp32")
    ratios = {"image": args.image_mask_ratio, "video": args.video_mask_ratio}
    rows = []
    for precision in precisions.split(","):
        _reset_mem(device)
        torch.manual_seed(args.seed)
        model = getattr(mod, OFFICIAL_BUILDERS[args.size])(pretrained=False).to(device).train()
        patch = tuple(model.trunk.patch_embed.proj[1].kernel_size)
        opt = make_optimizer(model, device, fused=False)  # the released trainer: plain (foreach) AdamW
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

        def loss_fn(x, mask, ckpt, model=model, patch=patch):
            _, feats = model.trunk(x, mask=mask, use_checkpoint=ckpt)  # OmniMAE.forward is broken at HEAD
            pred = model.head(feats)
            return masked_mse(pred, norm_pix_targets(x, patch), mask.reshape(mask.shape[0], -1))

        step = train_step_fn(loss_fn, opt, device, precision, scaler)
        for m in args.modalities:
            b = args.batches[m][0]
            data = synthetic_batches(m, b, args.img_size, args.num_frames, patch, ratios[m], device, seed=args.seed)
            # the released recipe checkpoints video steps; try without first where ours ran without
            for ckpt in ([False, True] if m == "video" else [False]):
                _reset_mem(device)
                try:
                    sec, loss, _ = time_loop(step, data, ckpt, args.steps, args.warmup, args.repeats, device)
                except torch.OutOfMemoryError:
                    opt.zero_grad(set_to_none=True)
                    log(f"  official {precision} {m} batch {b} ckpt={ckpt}: out of memory")
                    rows.append({"impl": "official", "modality": m, "batch": b, "precision": precision,
                                 "grad_ckpt": ckpt, "error": "OOM", "compiled": False})
                    continue
                row = _row("official", m, b, precision, False, ckpt, sec, flops[m], peak, _peak_mem(device), loss,
                           None)
                rows.append(row)
                log(format_row(row))
            del data
        del model, opt, step
    return rows


# ---------------------------------------------------------------------------------------------- end to end
class _SyntheticSource(torch.utils.data.Dataset):
    """Stands in for decoded data: a fixed normalised tensor (copied) and a fresh fixed-count mask per item,
    in the sample contract of ``omnimae_pl.data.sample``."""

    def __init__(self, shape, grid, ratio, length):
        self.shape, self.grid, self.ratio, self.length = shape, grid, ratio, length
        self.base = None

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if self.base is None:
            self.base = torch.randn(self.shape, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(i)
        return {"input": self.base.clone(), "mask": make_mask(self.grid, self.ratio, "random", g),
                "label": torch.tensor(-1), "valid": torch.tensor(True), "index": torch.tensor(i)}


def _collate_for(modality):
    def collate(items):
        try:
            from omnimae_pl.data.sample import collate_samples

            return collate_samples(items, modality, modality)
        except ImportError:  # pragma: no cover
            batch = {k: torch.stack([s[k] for s in items]) for k in items[0]}
            batch["modality"] = modality
            return batch

    return collate


def _project_loaders(args, batches, patch_size, device):
    """The project's pipeline: demo corpus on disk (``build_demo_data``) -> ``OmniMAEDataModule`` datasets
    (JPEG / VP9 decode, crops, masks in workers) -> ``ModalityInterleaver``. Returns (iterable, note) or
    (None, why not); any API mismatch falls back to the synthetic loader instead of failing the benchmark."""
    try:
        from omnimae_pl.data.datamodule import OmniMAEDataModule, SourceConfig
        from omnimae_pl.data.demo import build_demo_data, demo_paths
    except Exception as exc:  # noqa: BLE001 - optional, written by others (needs PyAV)
        return None, f"project loaders not importable ({type(exc).__name__}: {exc})"
    try:
        root = Path(args.data_root or Path(tempfile_dir(), "omnimae_bench_demo"))
        paths = demo_paths(root)
        if not all(p.exists() for p in paths.values()):  # reuse a corpus of any size; else build the default
            paths = build_demo_data(root)
        # the released mix: 626 image steps to 82 video steps per epoch (IN1K : SSv2 / 4 replicas)
        sources = []
        if "image" in args.modalities:
            sources.append(SourceConfig(kind="imagenet", root=str(paths["imagenet"]), name="in1k",
                                        weight=626.0 if len(args.modalities) == 2 else None))
        if "video" in args.modalities:
            sources.append(SourceConfig(kind="ssv2", root=str(paths["ssv2_videos"]), annotations=str(paths["ssv2"]),
                                        name="ssv2", weight=82.0 if len(args.modalities) == 2 else None))
        replicas = 4 if batches["video"] % 4 == 0 else 1
        dm = OmniMAEDataModule(
            sources, image_batch_size=batches["image"], video_batch_size=batches["video"], replicas=replicas,
            img_size=args.img_size, num_frames=args.num_frames, patch_size=tuple(patch_size),
            num_workers=args.workers_resolved, pin_memory=device.type == "cuda",
            persistent_workers=args.workers_resolved > 0, seed=args.seed,
        )
        if not hasattr(dm, "_trainer"):  # used outside a Trainer: its rank lookup expects this attribute
            dm._trainer = getattr(dm, "trainer", None)
        dm.setup("fit")
        inter = dm.train_dataloader()

        def endless():
            epoch = 0
            while True:
                inter.set_epoch(epoch)
                n = 0
                for batch in inter:
                    n += 1
                    yield batch
                if n == 0:
                    raise RuntimeError("the interleaver yielded no batch (batch larger than the demo data?)")
                epoch += 1

        steps = getattr(inter, "steps_per_source", {})
        return endless(), f"project pipeline: demo corpus at {root}, OmniMAEDataModule + ModalityInterleaver " \
                          f"(steps per epoch {steps}), {args.workers_resolved} workers per source"
    except Exception as exc:  # noqa: BLE001
        return None, f"project pipeline failed ({type(exc).__name__}: {exc})"


def tempfile_dir() -> str:
    import tempfile

    return tempfile.gettempdir()


def bench_end_to_end(args, device, precision, peak, state, flops, log) -> list[dict]:
    """Loaders (workers, pinned memory, non-blocking copies) + the modality interleave + the same step."""
    opt, loss_fn = state["opt"], state["loss_fn"]
    fn = loss_fn._compiled or loss_fn.eager
    step = train_step_fn(fn, opt, device, precision)
    b = {m: args.batches[m][0] for m in ("image", "video")}
    spec = model_size(args.size, **_overrides(args.model_overrides))
    pt, ph, pw = spec.patch_size
    ratios = {"image": args.image_mask_ratio, "video": args.video_mask_ratio}
    workers = args.workers if args.workers is not None else (6 if device.type == "cuda" else 0)
    args.workers_resolved = workers
    source, how = (None, "synthetic loader requested") if args.e2e_data == "synthetic" else \
        _project_loaders(args, b, spec.patch_size, device)
    log(f"  end-to-end data: {how}")
    if source is None:
        loaders = {}
        for m in args.modalities:
            shape = (3, args.img_size, args.img_size) if m == "image" else (3, args.num_frames, args.img_size,
                                                                            args.img_size)
            grid = (1 if m == "image" else max(args.num_frames // pt, 1), args.img_size // ph, args.img_size // pw)
            ds = _SyntheticSource(shape, grid, ratios[m], length=10**6)
            loaders[m] = iter(torch.utils.data.DataLoader(
                ds, batch_size=b[m], num_workers=workers, pin_memory=device.type == "cuda", shuffle=True,
                collate_fn=_collate_for(m), persistent_workers=workers > 0, drop_last=True,
                prefetch_factor=4 if workers > 0 else None))
        # the released mix: about 88 % image steps when both modalities run (626 image : 82 video per epoch)
        g = torch.Generator().manual_seed(args.seed)
        if len(args.modalities) == 2:
            order = ["video" if torch.rand((), generator=g) < 82 / 708 else "image" for _ in range(10**4)]
        else:
            order = [args.modalities[0]] * 10**4

        def batches():
            for m in order:
                yield next(loaders[m])

        it = batches()
        how = f"synthetic dataset, DataLoader x{workers} workers/modality, pinned, interleaved"
        log(f"  end-to-end data: {how}")
    else:
        it = iter(source)

    def next_on_device():
        batch = next(it)
        m = batch["modality"]
        x = batch["input"].to(device, non_blocking=True)
        mask = batch["mask"].to(device, non_blocking=True)
        return m, x, mask

    ckpt_video = args.grad_ckpt != "none"
    counts = {"image": 0, "video": 0}
    n_total = args.steps * args.repeats
    for _ in range(args.warmup + 2):
        m, x, mask = next_on_device()
        # outside the timed loop: the loader's masks must hide the count the step assumes
        hidden = mask.reshape(mask.shape[0], -1).sum(1)
        expected = hidden.new_full(hidden.shape, mask[0].numel() - loss_fn.n_visible[m])
        if not torch.equal(hidden, expected):
            raise ValueError(f"{m} masks hide {hidden.tolist()} tokens; the benchmark assumes "
                             f"{int(expected[0])} (set --{m}-mask-ratio to the loader's ratio)")
        step(x, mask, m == "video" and ckpt_video)
    _sync(device)
    _reset_mem(device)
    acc = torch.zeros((), device=device)
    flops_total = 0.0
    t0 = time.perf_counter()
    for _ in range(n_total):
        m, x, mask = next_on_device()
        acc += step(x, mask, m == "video" and ckpt_video)
        counts[m] += x.shape[0]
        flops_total += x.shape[0] * flops[m]
    _sync(device)
    sec = time.perf_counter() - t0
    samples = counts["image"] + counts["video"]
    tflops = flops_total / sec / 1e12
    row = {"impl": "ours-e2e", "modality": "+".join(k for k, v in counts.items() if v), "batch": b,
           "precision": precision, "compiled": args.compile_scope if loss_fn._compiled else False,
           "grad_ckpt": ckpt_video,
           "samples_per_s": samples / sec, "steps_per_s": n_total / sec, "step_ms": sec / n_total * 1e3,
           "gflops_per_sample": flops_total / max(samples, 1) / 1e9, "tflops_per_s": tflops,
           "mfu": tflops / peak if peak else None, "peak_mem_gib": _peak_mem(device),
           "loss": float(acc) / n_total, "recompiles": None, "samples": counts, "data": how}
    log(format_row(row))
    return [row]


# ---------------------------------------------------------------------------------------------- profiling
def _kernel_times(prof):
    """Device time (us) per kernel name, from the device-side events only (no double counting of ops)."""
    out = {}
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            t = e.device_time_total
            out[e.name] = out.get(e.name, 0) + t
    return out


def attention_backends(device, shapes) -> dict[str, str]:
    """Which SDPA kernels run (fwd + bwd, bf16) for each (name, batch, heads, tokens, head_dim)."""
    if device.type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    found = {}
    for name, b, h, n, d in shapes:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, k, v).sum().backward()
            torch.cuda.synchronize()
        names = [k for k in _kernel_times(prof) if any(s in k.lower() for s in (
            "flash", "fmha", "attention", "cudnn", "efficient", "sm90", "softmax", "bmm", "gemm"))]
        found[f"{name} (h={h}, N={n}, head_dim={d})"] = "; ".join(sorted(set(n[:90] for n in names))[:4])
    return found


def profile_steps(args, device, precision, state, log) -> dict[str, str]:
    from torch.profiler import ProfilerActivity, profile

    loss_fn, opt = state["loss_fn"], state["opt"]
    fn = loss_fn._compiled or loss_fn.eager
    step = train_step_fn(fn, opt, device, precision)
    tables = {}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for m in args.modalities:
        b = args.batches[m][0]
        data = state["data"][(m, b)]
        ckpt = m == "video" and args.grad_ckpt != "none"
        for i in range(2):
            step(*data[i % 2], ckpt)
        _sync(device)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for i in range(3):
                step(*data[i % 2], ckpt)
            _sync(device)
            wall = time.perf_counter() - t0
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=10)
        except Exception:  # noqa: BLE001 - key renamed across versions
            table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=10)
        kt = _kernel_times(prof) if device.type == "cuda" else {}
        busy = sum(kt.values()) / 1e6 / wall if kt else None
        head = f"== profile {m} batch {b} ({'compiled' if loss_fn._compiled else 'eager'}), 3 steps, " \
               f"wall {wall * 1e3:.1f} ms" + (f", device busy {busy:.0%}" if busy is not None else "")
        tables[m] = head + "\n" + table
        log(tables[m])
        if args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            Path(args.out_dir, f"profile_{args.size}_{m}.txt").write_text(tables[m])
    return tables


# ---------------------------------------------------------------------------------------------- report
def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['impl']:<9} {r['modality']:<6} b={r['batch']} {r.get('precision')} {r['error']}"
    mfu = f"{r['mfu'] * 100:5.1f}%" if r.get("mfu") is not None else "   n/a"
    mem = f"{r['peak_mem_gib']:6.1f}" if r.get("peak_mem_gib") is not None else "   n/a"
    comp = r["compiled"] if r["compiled"] else "eager"
    b = r["batch"] if isinstance(r["batch"], int) else "/".join(str(v) for v in r["batch"].values())
    ckpt = int(bool(r["grad_ckpt"]))
    return (f"{r['impl']:<9} {r['modality']:<11} b={b:<7} {r['precision']:<4} {comp!s:<6} ckpt={ckpt} "
            f"{r['samples_per_s']:9.1f} samples/s {r['steps_per_s']:7.2f} steps/s {r['step_ms']:8.1f} ms "
            f"{r['gflops_per_sample']:8.2f} GFLOP/sample {r['tflops_per_s']:7.1f} TFLOP/s MFU {mfu} "
            f"mem {mem} GiB loss {r['loss']:.4f}" + (f" recompiles {r['recompiles']}" if r.get("recompiles")
                                                        is not None else ""))


def _ratios(rows):
    """ours (best of eager / compiled at each modality's first batch) over each official precision."""
    out = {}
    ok = [r for r in rows if "error" not in r and not isinstance(r["batch"], dict)]
    for m in ("image", "video"):
        ours = [r for r in ok if r["impl"] == "ours" and r["modality"] == m]
        off = [r for r in ok if r["impl"] == "official" and r["modality"] == m]
        if not ours or not off:
            continue
        b = off[0]["batch"]
        ours_b = [r for r in ours if r["batch"] == b] or ours
        best = max(r["samples_per_s"] for r in ours_b)
        eager = max((r["samples_per_s"] for r in ours_b if not r["compiled"]), default=None)
        for prec in sorted({r["precision"] for r in off}):
            theirs = max(r["samples_per_s"] for r in off if r["precision"] == prec)
            out[f"{m}: ours best / official {prec}"] = best / theirs
            if eager:
                out[f"{m}: ours eager / official {prec}"] = eager / theirs
    for m in ("image", "video"):
        eager = {r["batch"]: r["samples_per_s"] for r in ok if r["impl"] == "ours" and r["modality"] == m
                 and not r["compiled"] and not r["grad_ckpt"]}
        comp = {r["batch"]: r["samples_per_s"] for r in ok if r["impl"] == "ours" and r["modality"] == m
                and r["compiled"] and not r["grad_ckpt"]}
        for b in sorted(set(eager) & set(comp)):
            out[f"{m} b={b}: compiled / eager"] = comp[b] / eager[b]
    return out


def environment(device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": str(device), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    with conv_patch_embed(args.patch_embed == "conv"):
        return _main(args)


def _main(args) -> dict:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    args.modalities = ("image", "video") if args.modality == "both" else (args.modality,)
    args.steps = args.steps or (20 if on_gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.repeats = args.repeats or (3 if on_gpu else 1)
    img_default = GPU_IMAGE_BATCH.get(args.size, 256) if on_gpu else 4
    vid_default = GPU_VIDEO_BATCH if on_gpu else 2
    args.batches = {
        "image": _ints(args.image_batch or args.batch_size or img_default),
        "video": _ints(args.video_batch or args.batch_size or vid_default),
    }
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # only matters for --precision fp32
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    peak = peak_tflops_for(device, precision, args.peak_tflops)
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        print(msg, flush=True)

    env = environment(device)
    log(f"omnimae-pl bench: size={args.size} modality={args.modality} precision={precision} "
        f"peak={peak} TFLOP/s batches={args.batches} steps={args.steps}x{args.repeats} warmup={args.warmup}")
    log("env: " + json.dumps(env))
    spec = model_size(args.size, **_overrides(args.model_overrides))
    if on_gpu and args.sdpa != "tune":
        dims = flop_dims(spec)
        shapes = []
        for m in args.modalities:
            n_all, n_vis = token_counts(dims, m, args.img_size, args.num_frames,
                                        args.image_mask_ratio if m == "image" else args.video_mask_ratio)
            shapes.append((f"encoder {m}", 8, spec.num_heads, n_vis, spec.embed_dim // spec.num_heads))
            shapes.append((f"decoder {m}", 8, spec.decoder_num_heads, n_all,
                           spec.decoder_embed_dim // spec.decoder_num_heads))
        with _sdpa_context(args.sdpa):
            backends = attention_backends(device, shapes)
        for k, v in backends.items():
            log(f"  sdpa {k}: {v}")
    else:
        backends = {}
    official_rows = []
    if args.official:  # first: it is short, and a long compile below cannot starve it of time
        ratios_ = {"image": args.image_mask_ratio, "video": args.video_mask_ratio}
        flops = {m: training_flops_per_sample(spec, m, args.img_size, args.num_frames, ratios_[m])
                 for m in ("image", "video")}
        try:
            official_rows = bench_official(args, device, peak, flops, log)
        except Exception as exc:  # noqa: BLE001 - report and keep our numbers
            log(f"  official: failed ({type(exc).__name__}: {exc})")
        _reset_mem(device)
    rows, info, state = bench_ours(args, device, precision, peak, log)
    if args.end_to_end:
        rows += bench_end_to_end(args, device, precision, peak, state, info["flops_per_sample"], log)
    profiles = profile_steps(args, device, precision, state, log) if args.profile else {}
    del state
    _reset_mem(device)
    rows += official_rows
    ratios = _ratios(rows)
    log("== results")
    for r in rows:
        log(format_row(r))
    for k, v in ratios.items():
        log(f"  {k}: {v:.2f}x")
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("batches", "modalities")},
              "batches": args.batches, "env": env, "peak_tflops": peak, "sdpa_kernels": backends,
              "info": info, "rows": rows, "ratios": ratios, "profiles": profiles}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print("BENCH_JSON " + json.dumps({"rows": rows, "ratios": ratios, "info": info}, default=str), flush=True)
    return result


if __name__ == "__main__":
    main()
