"""Where the time goes: top-10 kernel tables of a few steps (``--profile``) and which SDPA kernels PyTorch picks
for each attention shape of a step."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from omnimae_pl.bench.rows import log
from omnimae_pl.bench.step import attention_shapes, default_ckpt, sdpa_context, sync, train_step_fn

# Words in the names of the kernels an attention call can run (fused attention, or softmax between two GEMMs).
ATTENTION_KERNEL_WORDS = ("flash", "fmha", "attention", "cudnn", "efficient", "sm90", "softmax", "bmm", "gemm")


def kernel_times(prof) -> dict[str, float]:
    """Device time (us) per kernel name, from the device-side events only (no double counting of ops)."""
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[e.name] = out.get(e.name, 0) + e.device_time_total
    return out


def report_backends(args, device) -> dict[str, str]:
    """Log and return the SDPA kernels of each (encoder|decoder, modality) shape under ``--sdpa`` (CUDA only;
    ``--sdpa tune`` reports its own choice)."""
    if device.type != "cuda" or args.sdpa == "tune":
        return {}
    shapes = attention_shapes(args.spec, args, {m: 8 for m in args.modalities})
    with sdpa_context(args.sdpa):
        backends = attention_backends(device, shapes)
    for k, v in backends.items():
        log(f"  sdpa {k}: {v}")
    return backends


def attention_backends(device, shapes) -> dict[str, str]:
    """Which SDPA kernels run (forward + backward, bf16) for each (module, modality) -> (batch, heads, tokens,
    head_dim) of ``shapes``."""
    found = {}
    for (module, modality), (b, h, n, d) in shapes.items():
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            F.scaled_dot_product_attention(q, k, v).sum().backward()
            torch.cuda.synchronize()
        names = {name[:90] for name in kernel_times(prof) if any(w in name.lower() for w in ATTENTION_KERNEL_WORDS)}
        found[f"{module} {modality} (h={h}, N={n}, head_dim={d})"] = "; ".join(sorted(names)[:4])
    return found


def profile_steps(args, device, precision, ours) -> dict[str, str]:
    """A kernel table per modality (written to ``--out-dir`` when given), of the compiled step if there is one."""
    step = train_step_fn(ours.loss_fn.fastest, ours.opt, device, precision)
    tables = {}
    for m in args.modalities:
        tables[m] = _profile_modality(step, m, args, device, ours)
        log(tables[m])
        if args.out_dir:
            Path(args.out_dir).mkdir(parents=True, exist_ok=True)
            Path(args.out_dir, f"profile_{args.size}_{m}.txt").write_text(tables[m])
    return tables


def _profile_modality(step, modality, args, device, ours) -> str:
    """Two untimed steps, then three under the profiler at the first batch size: a heading and the table."""
    b = args.batches[modality][0]
    data = ours.data[(modality, b)]
    ckpt = default_ckpt(args.grad_ckpt, modality)
    for i in range(2):
        step(*data[i % 2], ckpt)
    sync(device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t0 = time.perf_counter()
        for i in range(3):
            step(*data[i % 2], ckpt)
        sync(device)
        wall = time.perf_counter() - t0
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=10)
    busy = f", device busy {sum(kernel_times(prof).values()) / 1e6 / wall:.0%}" if cuda else ""
    variant = "compiled" if ours.loss_fn.compiled else "eager"
    return f"== profile {modality} batch {b} ({variant}), 3 steps, wall {wall * 1e3:.1f} ms{busy}\n{table}"
