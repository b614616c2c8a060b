"""Attention with each head zero-padded to a kernel-friendly size: the same math, other kernels.

The released decoders run 16 heads of 24 (ViT-B) or 32 (ViT-L/H) channels, where fused attention kernels run
far below their peak (docs/benchmarks.md). Zero channels appended to q and k leave every q.k product unchanged,
zero channels of v give zero outputs that are sliced off, and the softmax scale stays 1/sqrt(true head size):
outputs and gradients equal timm's ``Attention`` up to float rounding. The module holds the block's own
``qkv`` and ``proj`` (same parameters, same state-dict keys), so released weights load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn


class PaddedHeadAttention(nn.Module):
    """timm's ``Attention`` (no qk norm, no gate) computed at head size ``head_pad_to`` >= its own."""

    def __init__(self, attn: Attention, head_pad_to: int) -> None:
        super().__init__()
        for name in ("q_norm", "k_norm", "norm"):
            if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
                raise ValueError(f"PaddedHeadAttention: attention with {name} is not supported")
        if getattr(attn, "gate", None) is not None:
            raise ValueError("PaddedHeadAttention: gated attention is not supported")
        if head_pad_to < attn.head_dim:
            raise ValueError(f"head_pad_to={head_pad_to} is below the head size {attn.head_dim}")
        self.num_heads, self.head_dim, self.head_pad_to = attn.num_heads, attn.head_dim, int(head_pad_to)
        # timm's own child modules, under their own names: the state dict is timm's
        for name, child in attn.named_children():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b, n, _ = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(b, n, 3, h, d)
        qkv = F.pad(qkv, (0, self.head_pad_to - d))  # zeros after each head's channels
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal, scale=d**-0.5,
        )
        out = out[..., :d].transpose(1, 2).reshape(b, n, h * d)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, head_pad_to={self.head_pad_to}"


def pad_attention_heads(blocks: nn.ModuleList, head_pad_to: int | None) -> None:
    """Give every block's ``attn`` a head size of ``head_pad_to`` in place (None, or a head already that large:
    unchanged). The parameters stay the same tensors, so an optimizer built before still holds them."""
    if head_pad_to is None:
        return
    for blk in blocks:
        if isinstance(blk.attn, Attention) and blk.attn.head_dim < head_pad_to:
            blk.attn = PaddedHeadAttention(blk.attn, head_pad_to)
