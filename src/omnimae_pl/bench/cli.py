"""``omnimae-cli bench`` / ``python -m omnimae_pl.bench``: options, defaults per device, the order of the runs,
the environment, the summary and the JSON."""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import timm
import torch
import yaml

from omnimae_pl.bench.end_to_end import bench_end_to_end
from omnimae_pl.bench.official import bench_official
from omnimae_pl.bench.ours import bench_ours
from omnimae_pl.bench.profile import profile_steps, report_backends
from omnimae_pl.bench.rows import format_row, log, speedups
from omnimae_pl.bench.step import COMPILE_MODES, compile_settings, per_sample_counts, reset_mem
from omnimae_pl.errors import ConfigError
from omnimae_pl.masking import PAPER_MASK_RATIO
from omnimae_pl.models import model_size

DESCRIPTION = "Training-step benchmark: samples/s, MFU, peak memory, eager vs torch.compile, optional official " \
              "side by side."
H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM (and H200: same tensor cores), dense bf16
GPU_IMAGE_BATCH = {"base": 256, "large": 256, "huge": 256}
GPU_VIDEO_BATCH = 32  # 8 clips x 4 replicas per GPU, as in the released recipe
# set from the options, not options themselves
DERIVED = ("batches", "modalities", "mask_ratios", "spec", "compile_mode_used", "compile_note")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omnimae-cli bench", description=DESCRIPTION)
    _model_options(p.add_argument_group("model and batches"))
    _timing_options(p.add_argument_group("timing"))
    _extra_options(p.add_argument_group("end to end, official model, profiles, output"))
    return p


def _model_options(p) -> None:
    p.add_argument("--size", default="base", help="tiny, small, base, large or huge")
    p.add_argument("--model-overrides", default="",
                   help="ModelSize fields as key=value, values in YAML, e.g. depth=2,patch_size=[2,8,8]")
    p.add_argument("--decoder-head-pad", type=int, default=None, metavar="N",
                   help="decoder attention computed at head size N (zero-padded, same math), e.g. 32 or 64")
    p.add_argument("--modality", choices=("image", "video", "both"), default="both")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=None, help="one batch size for both modalities")
    p.add_argument("--image-batch", default=None, help="image batch, or a comma list to sweep (GPU default 256)")
    p.add_argument("--video-batch", default=None, help="video batch in samples, or a comma list (GPU default 32)")
    p.add_argument("--image-mask-ratio", type=float, default=PAPER_MASK_RATIO["image"])
    p.add_argument("--video-mask-ratio", type=float, default=PAPER_MASK_RATIO["video"])
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--seed", type=int, default=0)


def _timing_options(p) -> None:
    p.add_argument("--steps", type=int, default=None, help="timed steps per repeat (GPU 20, CPU 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 5, CPU 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed windows; the median is reported (GPU 3)")
    p.add_argument("--compile", action="store_true", help="time torch.compile (after eager unless --no-eager)")
    p.add_argument("--no-eager", action="store_true", help="with --compile: skip the eager run")
    p.add_argument("--compile-scope", choices=("step", "blocks"), default="blocks")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile mode; reduce-overhead (CUDA graphs) compiles without them off CUDA")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend; aot_eager traces the same graphs without code generation (CPU smoke)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: by device name)")
    p.add_argument("--grad-ckpt", choices=("none", "video", "both"), default="none",
                   help="activation checkpointing: none, on video steps, or time both settings")
    p.add_argument("--sdpa", choices=("auto", "tune", "flash", "efficient", "cudnn", "math"), default="auto",
                   help="attention backend; tune: time flash / efficient / cudnn on each (encoder|decoder, "
                        "modality) attention shape first and use the fastest for each")


def _extra_options(p) -> None:
    p.add_argument("--end-to-end", action="store_true", help="also time through data loaders + interleaver")
    p.add_argument("--workers", type=int, default=None, help="loader workers per source for --end-to-end")
    p.add_argument("--e2e-data", choices=("project", "synthetic"), default="project",
                   help="project: demo corpus through PretrainDataModule + ModalityInterleaver; synthetic: a "
                        "DataLoader of ready tensors")
    p.add_argument("--data-root", default=None, help="where the demo corpus is built / reused")
    p.add_argument("--augment-on", choices=("worker", "device"), default=None,
                   help="PretrainDataModule's augment_on for --end-to-end; default: its own")
    p.add_argument("--image-decode", choices=("worker", "device"), default=None,
                   help="PretrainDataModule's image_decode for --end-to-end (device needs --augment-on device); "
                        "default: its own")
    p.add_argument("--official", default=None, metavar="PATH",
                   help="folder with the official omnivore snapshot (omnimae/, omnivision/) for a side by side")
    p.add_argument("--official-precision", default=None, help="comma list of fp16,bf16,fp32 (CUDA: fp16,bf16)")
    p.add_argument("--profile", action="store_true", help="top-10 CUDA kernels of a few steps per modality")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON here")
    p.add_argument("--out-dir", default=None, help="write profiles here")


def _ints(text) -> list[int]:
    return [int(v) for v in str(text).split(",") if v.strip()]


def _overrides(text: str) -> dict:
    """``key=value,...`` -> {key: value}; each value is YAML, and commas inside brackets belong to it."""
    out = {}
    for item in filter(None, (s.strip() for s in re.split(r",(?![^\[]*\])", text))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--model-overrides: {item!r} is not key=value (e.g. depth=2,patch_size=[2,8,8])")
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve(args, device: torch.device) -> None:
    """Fill in the device-dependent defaults and the settings derived from the options (``DERIVED``)."""
    on_gpu = device.type == "cuda"
    args.modalities = ("image", "video") if args.modality == "both" else (args.modality,)
    args.steps = args.steps or (20 if on_gpu else 2)
    args.warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    args.repeats = args.repeats or (3 if on_gpu else 1)
    args.workers_resolved = args.workers if args.workers is not None else (6 if on_gpu else 0)
    image_default = GPU_IMAGE_BATCH.get(args.size, 256) if on_gpu else 4
    video_default = GPU_VIDEO_BATCH if on_gpu else 2
    args.batches = {"image": _ints(args.image_batch or args.batch_size or image_default),
                    "video": _ints(args.video_batch or args.batch_size or video_default)}
    args.mask_ratios = {"image": args.image_mask_ratio, "video": args.video_mask_ratio}
    overrides = _overrides(args.model_overrides)
    if args.decoder_head_pad is not None:
        overrides["decoder_attn_head_pad_to"] = args.decoder_head_pad
    args.spec = model_size(args.size, **overrides)
    args.compile_mode_used, args.compile_note = compile_settings(args.compile_mode, args.compile_backend, device)


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


def environment(device) -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": str(device), "cpu_threads": torch.get_num_threads(), "timm": timm.__version__}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (``argv``: the options; None reads ``sys.argv[1:]``); returns what ``--json`` writes."""
    args = build_parser().parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    resolve(args, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only matters for --precision fp32
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    peak = peak_tflops_for(device, precision, args.peak_tflops)
    env = environment(device)
    log(f"omnimae-pl bench: size={args.size} modality={args.modality} precision={precision} "
        f"peak={peak} TFLOP/s batches={args.batches} steps={args.steps}x{args.repeats} warmup={args.warmup}")
    log("env: " + json.dumps(env))
    if args.compile and args.compile_note:
        log(f"  note: {args.compile_note}")
    backends = report_backends(args, device)
    flops, n_visible = per_sample_counts(args.spec, args)
    # the official run first: it is short, and a long compile of ours cannot starve it of time
    official_rows = bench_official(args, device, peak, flops) if args.official else []
    rows, info, ours = bench_ours(args, device, precision, peak, flops, n_visible)
    if args.end_to_end:
        rows += bench_end_to_end(args, device, precision, peak, ours, flops)
    profiles = profile_steps(args, device, precision, ours) if args.profile else {}
    del ours
    reset_mem(device)
    return _summary(args, env, peak, backends, info, rows + official_rows, profiles)


def _summary(args, env, peak, backends, info, rows, profiles) -> dict:
    """Print every row and speed-up, write ``--json``, print the one-line ``BENCH_JSON`` record; the result."""
    ratios = speedups(rows)
    log("== results")
    for r in rows:
        log(format_row(r))
    for k, v in ratios.items():
        log(f"  {k}: {v:.2f}x")
    result = {"args": {k: v for k, v in vars(args).items() if k not in DERIVED}, "batches": args.batches,
              "env": env, "peak_tflops": peak, "sdpa_kernels": backends, "info": info, "rows": rows,
              "ratios": ratios, "profiles": profiles}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    print("BENCH_JSON " + json.dumps({"rows": rows, "ratios": ratios, "info": info}, default=str), flush=True)
    return result
