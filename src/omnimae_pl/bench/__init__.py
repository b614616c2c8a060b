"""Training-step benchmark: samples/s, MFU, peak memory, eager vs torch.compile, optional official side by side.

Run ``omnimae-cli bench --size base`` on a GPU (bf16 autocast), or
``python -m omnimae_pl.bench --size tiny --img-size 32 --num-frames 4`` on a CPU (fp32) as a smoke test.
Figures and the commands behind them: docs/benchmarks.md.

The timed step is a real pretraining step (``step``): autocast forward, fp32 loss, backward, fused AdamW (CUDA
and CPU), ``zero_grad(set_to_none=True)``. Nothing reads the device inside the timed loop: losses are summed on
the device and read once at the end, and the visible-token indices come from the mask with the statically known
count. Model-only runs (``ours``) use synthetic batches that already sit on the device; ``end_to_end`` feeds the
same step through data loaders; ``official`` times the official model with the same step; ``profile`` tables
the kernels.

Compilation (``--compile``) keeps exactly two static shapes per compiled region, image and video
(``dynamic=False``); after warm-up the number of compiled graphs must not grow (reported as ``recompiles``).
"""

from omnimae_pl.bench.cli import main

__all__ = ["main"]
