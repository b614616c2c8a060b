"""The light OmniMAE decoder and pixel head.

Unlike MAE, the mask token and the decoder's positional table live in the *encoder* width and are added
before ``decoder_embed``; decoder attention has no qkv bias; the pixel head predicts every token.
``attn_head_pad_to`` computes the attention at a larger head size (the same math and parameters:
:mod:`~omnimae_pl.models.padded_attention`).
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import Block
from torch import nn

from omnimae_pl.models.encoder import LayerNorm, init_weights, run_blocks
from omnimae_pl.models.padded_attention import pad_attention_heads
from omnimae_pl.models.pos_embed import select_pos_embed, sinusoid_table
from omnimae_pl.models.tokens import scatter_tokens


class MAEDecoder(nn.Module):
    def __init__(
        self,
        encoder_dim: int,
        grid: tuple[int, int, int],
        patch_size: tuple[int, int, int] = (2, 16, 16),
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        attn_head_pad_to: int | None = None,
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.mask_token = nn.Parameter(torch.zeros(1, encoder_dim))  # zeros, following iBOT
        self.register_buffer("pos_embed", sinusoid_table(math.prod(self.grid), encoder_dim))
        self.decoder_embed = nn.Linear(encoder_dim, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=False, norm_layer=LayerNorm) for _ in range(depth)
        )
        pad_attention_heads(self.blocks, attn_head_pad_to)  # reuses the blocks' parameters: no change to the init
        self.norm = LayerNorm(embed_dim)
        self.pred = nn.Linear(embed_dim, math.prod(patch_size) * in_chans)
        self.grad_checkpointing = False
        init_weights(self)
        nn.init.trunc_normal_(self.pred.weight, std=0.02)

    def forward(
        self,
        latent: torch.Tensor,
        ids_visible: torch.Tensor,
        grid: tuple[int, int, int],
        is_image: bool,
        use_checkpoint: bool | None = None,
    ) -> torch.Tensor:
        """latent (B, N_vis, D_enc) at ``ids_visible`` -> pixel predictions (B, N, pt*ph*pw*C) for all tokens."""
        n_tokens = math.prod(grid)
        x = scatter_tokens(latent, ids_visible, self.mask_token, n_tokens)
        x = x + select_pos_embed(self.pos_embed, self.grid, grid, is_image)
        x = self.decoder_embed(x)
        ckpt = self.grad_checkpointing if use_checkpoint is None else use_checkpoint
        x = self.norm(run_blocks(self.blocks, x, ckpt and self.training))
        return self.pred(x)
