"""Gather visible tokens and scatter them back, keeping the raster order (no shuffle as in MAE)."""

from __future__ import annotations

import torch


def flatten_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T', H', W') or (B, N) -> (B, N) bool."""
    return mask.reshape(mask.shape[0], -1).bool()


def visible_indices(mask: torch.Tensor, num_visible: int | None = None) -> torch.Tensor:
    """(B, N) mask -> (B, N_vis) indices of the visible tokens in increasing (raster) order.

    Every row must hide the same number of tokens (fixed-count masking). When the caller knows N_vis
    (batches carry it from the CPU-side collate) nothing is read from the device; otherwise one host read
    checks the counts and fixes N_vis. Either way later shapes are static for a given modality.
    """
    order = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)  # visible (0) first, order kept
    if num_visible is not None:
        return order[:, :num_visible]
    counts = mask.sum(dim=1)
    lo, hi = torch.stack([counts.min(), counts.max()]).tolist()
    if lo != hi:
        raise ValueError(f"every sample must mask the same number of tokens; got counts from {lo} to {hi}")
    return order[:, : mask.shape[1] - lo]


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(visible: torch.Tensor, ids: torch.Tensor, fill: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Place ``visible`` (B, K, D) at ``ids`` in a (B, n_tokens, D) sequence whose other slots hold ``fill`` (1, D)."""
    b, _, d = visible.shape
    full = fill.to(visible.dtype).expand(b, n_tokens, d).clone()
    return full.scatter(1, ids.unsqueeze(-1).expand(-1, -1, d), visible)
