"""The OmniMAE ViT trunk: tubelet embedding, fixed sinusoid positions, timm blocks on visible tokens only."""

from __future__ import annotations

import math
from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from omnimae_pl.masking import token_grid
from omnimae_pl.models.patch import PatchSize, TubeletEmbed
from omnimae_pl.models.pos_embed import select_pos_embed, sinusoid_table
from omnimae_pl.models.tokens import flatten_mask, gather_tokens, visible_indices

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    for blk in blocks:
        x = checkpoint(blk, x, use_reentrant=False) if use_checkpoint else blk(x)
    return x


def init_weights(module: nn.Module) -> None:
    """The released recipe's init with patch dropping: xavier-uniform linears, zero biases, unit LayerNorms,
    xavier on the tubelet conv viewed as (D, C*pt*ph*pw) (its bias keeps PyTorch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, TubeletEmbed):
            w = m.proj.weight
            nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))


class VisionTransformerEncoder(nn.Module):
    """No class token. ``final_norm`` is the encoder norm of pretraining; classifiers pool first and norm after."""

    def __init__(
        self,
        img_size: int = 224,
        num_frames: int = 16,
        patch_size: PatchSize = (2, 16, 16),
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        final_norm: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.embed_dim = embed_dim
        self.grid = token_grid((in_chans, num_frames, img_size, img_size), self.patch_size)
        self.patch_embed = TubeletEmbed(self.patch_size, in_chans, embed_dim)
        # Fixed buffer, saved in checkpoints as in the released files.
        self.register_buffer("pos_embed", sinusoid_table(math.prod(self.grid), embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear over depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=dpr[i], norm_layer=LayerNorm)
            for i in range(depth)
        )
        self.norm = LayerNorm(embed_dim) if final_norm else nn.Identity()
        self.grad_checkpointing = False
        init_weights(self)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def layer_id(self, name: str) -> int:
        """The layer of parameter ``name`` (relative to the encoder) for layer-wise lr decay, as timm's
        ``group_matcher``: 0 for the patch embedding and positions, i + 1 for ``blocks.i``, depth + 1 after."""
        if name.startswith(("patch_embed.", "pos_embed")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return len(self.blocks) + 1

    def pos_embed_for(self, x: torch.Tensor) -> torch.Tensor:
        grid = token_grid(x.shape[1:], self.patch_size)
        return select_pos_embed(self.pos_embed, self.grid, grid, is_image=x.ndim == 4)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Embed and add positions, before any token is dropped, so visible tokens keep their positions."""
        return self.patch_embed(x) + self.pos_embed_for(x)

    def forward_features(
        self, x: torch.Tensor, ids_visible: torch.Tensor | None = None, use_checkpoint: bool | None = None
    ) -> torch.Tensor:
        """(B, N_vis, D) features of the tokens at ``ids_visible`` (all tokens when None), after ``norm``."""
        tokens = self.prepare_tokens(x)
        if ids_visible is not None:
            tokens = gather_tokens(tokens, ids_visible)
        grad_ckpt = self.grad_checkpointing if use_checkpoint is None else use_checkpoint
        return self.norm(run_blocks(self.blocks, tokens, grad_ckpt and self.training))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        ids_visible: torch.Tensor | None = None,
        use_checkpoint: bool | None = None,
    ) -> torch.Tensor:
        """Features of the visible tokens: ``mask`` is (B, N) or (B, T', H', W') bool, True = masked, or
        ``ids_visible`` gives their indices directly. Callers go through here (not ``forward_features``) so
        that module hooks, e.g. FSDP2's parameter gathering, run."""
        if ids_visible is None and mask is not None:
            ids_visible = visible_indices(flatten_mask(mask))
        return self.forward_features(x, ids_visible, use_checkpoint)
