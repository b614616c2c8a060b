"""End to end: the timed step fed by data loaders (workers, pinned memory, non-blocking copies) and the modality
interleave, either the project's pipeline over the demo corpus or, with ``--e2e-data synthetic``, a DataLoader
of ready tensors in the same sample contract (``omnimae_pl.data.sample``)."""

from __future__ import annotations

import functools
import itertools
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from omnimae_pl.bench.ours import compile_label
from omnimae_pl.bench.rows import format_row, log, row
from omnimae_pl.bench.step import default_ckpt, peak_mem, reset_mem, sample_shape, sync, train_step_fn
from omnimae_pl.data.datamodule import PretrainDataModule, SourceConfig
from omnimae_pl.data.demo import build_demo_data, demo_paths
from omnimae_pl.data.sample import collate_samples, make_sample
from omnimae_pl.masking import MaskingConfig

# The released mix: 626 image steps to 82 video steps per epoch (IN1K : SSv2 / 4 replicas).
RELEASED_MIX = {"image": 626.0, "video": 82.0}

# Where the host's time goes in the timed steps, to tell which one limits an end-to-end rate: waiting for the
# loaders; copies and the datamodule's device-side work (its kernel launches, or a sync inside); the step (its
# launches, and waiting on the device once the launch queue is full: a device-bound run spends its time here
# and in the final sync).
HOST_PARTS = {"data_wait": "waiting for data", "to_device": "to device + on_after_batch_transfer",
              "step": "step", "final_sync": "final sync"}


def bench_end_to_end(args, device, precision, peak, ours, flops) -> list[dict]:
    """One row: ``--steps x --repeats`` steps after ``--warmup + 2``, of the modalities the loaders yield."""
    batches = {m: args.batches[m][0] for m in ("image", "video")}
    make_stream = _project_stream if args.e2e_data == "project" else _synthetic_stream
    stream, how, after_transfer = make_stream(args, batches, device)
    log(f"  end-to-end data: {how}")
    step = train_step_fn(ours.loss_fn.fastest, ours.opt, device, precision)
    to_device = functools.partial(_to_device, device=device, after_transfer=after_transfer)
    _warm_up(step, stream, to_device, ours.loss_fn.n_visible, args)
    sync(device)
    reset_mem(device)
    n = args.steps * args.repeats
    sec, counts, flops_total, loss_sum, host = _timed(step, stream, to_device, n, flops, args, device)
    samples = sum(counts.values())
    compiled = compile_label(args) if ours.loss_fn.compiled else False
    r = row("ours-e2e", "+".join(m for m, c in counts.items() if c), batches, precision, compiled,
            args.grad_ckpt != "none", sec / n, flops_total / samples, peak, peak_mem(device), float(loss_sum) / n,
            None, samples_per_step=samples / n)
    r.update(samples=counts, data=how, host_ms_per_step={k: v / n * 1e3 for k, v in host.items()})
    log(format_row(r))
    log("  host per step: " + ", ".join(f"{HOST_PARTS[k]} {v:.1f} ms" for k, v in r["host_ms_per_step"].items()))
    return [r]


def _to_device(batch: dict, device, after_transfer) -> tuple[str, torch.Tensor, torch.Tensor, int]:
    """Every tensor of the batch to the device, then what Lightning runs next (the datamodule's
    ``on_after_batch_transfer``: device-side augmentation where the datamodule has it)."""
    batch = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    batch = after_transfer(batch)
    return batch["modality"], batch["input"], batch["mask"], batch["num_visible"]


def _warm_up(step, stream, to_device, n_visible: dict[str, int], args) -> None:
    """Untimed steps, which also check that the loader's masks leave the count visible that the step assumes."""
    for _ in range(args.warmup + 2):
        m, x, mask, visible = to_device(next(stream))
        if visible != n_visible[m]:
            raise ValueError(f"{m} masks leave {visible} tokens visible; the benchmark assumes {n_visible[m]}")
        step(x, mask, default_ckpt(args.grad_ckpt, m))


def _timed(step, stream, to_device, n: int, flops, args, device):
    """(seconds, samples per modality, FLOPs, summed loss on the device, host seconds per part of
    ``HOST_PARTS``) of ``n`` steps, loading included."""
    counts = {"image": 0, "video": 0}
    flops_total = 0.0
    loss_sum = torch.zeros((), device=device)
    host = dict.fromkeys(HOST_PARTS, 0.0)
    t0 = clock = time.perf_counter()
    for _ in range(n):
        batch = next(stream)
        clock = _lap(host, "data_wait", clock)
        m, x, mask, _ = to_device(batch)
        clock = _lap(host, "to_device", clock)
        loss_sum += step(x, mask, default_ckpt(args.grad_ckpt, m))
        clock = _lap(host, "step", clock)
        counts[m] += x.shape[0]
        flops_total += x.shape[0] * flops[m]
    sync(device)
    _lap(host, "final_sync", clock)
    return time.perf_counter() - t0, counts, flops_total, loss_sum, host


def _lap(host: dict[str, float], part: str, since: float) -> float:
    now = time.perf_counter()
    host[part] += now - since
    return now


def _project_stream(args, batches, device):
    """The demo corpus on disk (``build_demo_data`` under ``--data-root`` unless one is there, of any size)
    through ``PretrainDataModule`` (JPEG / VP9 decode, crops, masks in workers) and its ModalityInterleaver."""
    root = Path(args.data_root or Path(tempfile.gettempdir(), "omnimae_bench_demo"))
    paths = demo_paths(root)
    if not all(p.exists() for p in paths.values()):
        paths = build_demo_data(root)
    workers = args.workers_resolved
    dm = PretrainDataModule(
        _demo_sources(paths, args.modalities), image_batch_size=batches["image"],
        video_batch_size=batches["video"], replicas=4 if batches["video"] % 4 == 0 else 1,
        image_masking=MaskingConfig("random", args.image_mask_ratio),
        video_masking=MaskingConfig("random", args.video_mask_ratio),
        img_size=args.img_size, num_frames=args.num_frames, patch_size=tuple(args.spec.patch_size),
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0, seed=args.seed,
        **_device_options(args),
    )
    dm.setup("fit")
    interleaver = dm.train_dataloader()
    if len(interleaver) == 0:
        raise ValueError(f"the demo corpus at {root} fills no batch of {batches}: use smaller batches")

    def epochs():
        for epoch in itertools.count():
            interleaver.set_epoch(epoch)
            yield from interleaver

    augment = "".join(f", {k} {v}" for k, v in _device_options(args).items())
    how = (f"project pipeline: demo corpus at {root}, PretrainDataModule + ModalityInterleaver (steps per epoch "
           f"{interleaver.steps_per_source}), {workers} workers per source{augment}")
    return epochs(), how, functools.partial(dm.on_after_batch_transfer, dataloader_idx=0)


def _device_options(args) -> dict:
    """The datamodule's ``augment_on`` / ``image_decode`` where the command line sets them (else its defaults)."""
    options = {"augment_on": args.augment_on, "image_decode": args.image_decode}
    return {k: v for k, v in options.items() if v is not None}


def _demo_sources(paths, modalities) -> list[SourceConfig]:
    both = len(modalities) == 2
    sources = []
    if "image" in modalities:
        sources.append(SourceConfig(kind="imagenet", root=str(paths["imagenet"]), name="in1k",
                                    weight=RELEASED_MIX["image"] if both else None))
    if "video" in modalities:
        sources.append(SourceConfig(kind="ssv2", root=str(paths["ssv2_videos"]), annotations=str(paths["ssv2"]),
                                    name="ssv2", weight=RELEASED_MIX["video"] if both else None))
    return sources


class _SyntheticSource(Dataset):
    """Stands in for decoded data: a fixed normalised tensor (copied) and a fresh fixed-count mask per item."""

    def __init__(self, shape, masking: MaskingConfig, patch_size, length: int = 10**6) -> None:
        self.shape, self.masking, self.patch_size, self.length = shape, masking, tuple(patch_size), length
        self.base = None  # made on first use, in the worker

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if self.base is None:
            self.base = torch.randn(self.shape, generator=torch.Generator().manual_seed(0))
        return make_sample(self.base.clone(), -1, True, i, self.masking, self.patch_size,
                           torch.Generator().manual_seed(i))


def _synthetic_stream(args, batches, device):
    workers = args.workers_resolved
    loaders = {}
    for m in args.modalities:
        source = _SyntheticSource(sample_shape(m, args.img_size, args.num_frames),
                                  MaskingConfig("random", args.mask_ratios[m]), args.spec.patch_size)
        loaders[m] = iter(DataLoader(
            source, batch_size=batches[m], num_workers=workers, pin_memory=device.type == "cuda", shuffle=True,
            collate_fn=functools.partial(collate_samples, modality=m, source=m), persistent_workers=workers > 0,
            drop_last=True, prefetch_factor=4 if workers > 0 else None))
    how = f"synthetic dataset, DataLoader x{workers} workers/modality, pinned, interleaved"
    return _released_mix(loaders, args.seed), how, lambda batch: batch


def _released_mix(loaders: dict, seed: int):
    """Batches from one loader per modality; with both, a random draw per step at the released mix."""
    g = torch.Generator().manual_seed(seed)
    video_share = RELEASED_MIX["video"] / sum(RELEASED_MIX.values())
    while True:
        if len(loaders) == 2:
            m = "video" if torch.rand((), generator=g) < video_share else "image"
        else:
            (m,) = loaders
        yield next(loaders[m])
