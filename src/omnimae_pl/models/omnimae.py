"""The OmniMAE pretraining model: one encoder for images and videos, a light decoder, a pixel head."""

from __future__ import annotations

import torch
from torch import nn

from omnimae_pl.masking import token_grid
from omnimae_pl.models.decoder import MAEDecoder
from omnimae_pl.models.encoder import VisionTransformerEncoder
from omnimae_pl.models.losses import masked_mse, norm_pix_targets
from omnimae_pl.models.tokens import flatten_mask, visible_indices


class OmniMAE(nn.Module):
    """``model(x, mask)`` -> pixel predictions (B, N, pt*ph*pw*3) for every token.

    ``x`` is (B, 3, H, W) or (B, 3, T, H, W), ImageNet-normalised; ``mask`` is bool (B, N) or
    (B, T', H', W'), True = masked, with the same count in every sample.
    """

    def __init__(self, encoder: VisionTransformerEncoder, decoder: MAEDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.patch_size = encoder.patch_size

    def forward_encoder(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        use_checkpoint: bool | None = None,
        num_visible: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode the visible tokens only: (latent (B, N_vis, D), their raster indices (B, N_vis)).
        ``num_visible``, when known, spares a read of the mask from the device."""
        ids = visible_indices(flatten_mask(mask), num_visible)
        return self.encoder(x, ids_visible=ids, use_checkpoint=use_checkpoint), ids

    def forward_decoder(
        self, latent: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, use_checkpoint: bool | None = None
    ) -> torch.Tensor:
        return self.decoder(latent, ids, token_grid(x.shape[1:], self.patch_size), x.ndim == 4, use_checkpoint)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        use_checkpoint: bool | None = None,
        num_visible: int | None = None,
    ) -> torch.Tensor:
        latent, ids = self.forward_encoder(x, mask, use_checkpoint, num_visible)
        return self.forward_decoder(latent, ids, x, use_checkpoint)

    def forward_target(self, x: torch.Tensor) -> torch.Tensor:
        return norm_pix_targets(x, self.patch_size)

    def forward_loss(
        self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Masked-token MSE against per-channel normalised pixels; samples with ``valid`` False are left out.
        ``target``: ``forward_target(x)`` when the caller already has it (it scores several predictions)."""
        mask = flatten_mask(mask)
        if valid is not None:
            mask = mask & valid.view(-1, 1).bool()
        return masked_mse(pred, self.forward_target(x) if target is None else target, mask)
