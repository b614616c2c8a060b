"""One fused finiteness check over many tensors, for the training step and for checkpoint writes."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


def nonfinite_flag(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """1.0 if some value in ``tensors`` is NaN or infinite, else 0.0: a 0-dim tensor on their device, not read
    here, so the caller decides when the device is synchronised. A ``DTensor`` is checked on this rank's shard:
    all-reduce the flag to join the ranks. A norm beyond float32's range counts as not finite."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    if not local:
        return torch.zeros(())
    # a sum is finite only if every term is: one norm kernel per dtype and device, one sum, one test
    norms = torch._foreach_norm(local)
    return (~torch.isfinite(torch.stack([n.float() for n in norms]).sum())).float()
