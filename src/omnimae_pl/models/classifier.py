"""The fine-tuning model of the released checkpoints: encoder -> mean over all tokens -> LayerNorm -> Linear."""

from __future__ import annotations

import torch
from torch import nn

from omnimae_pl.models.encoder import LayerNorm, VisionTransformerEncoder


class OmniViTClassifier(nn.Module):
    """``model(x)`` -> logits for images (B, 3, H, W) and videos (B, 3, T, H, W) alike.

    The norm comes after pooling (MAE's fc_norm placement); it starts fresh when initialised from a
    pretraining checkpoint, whose encoder norm belongs before pooling.
    """

    def __init__(
        self, encoder: VisionTransformerEncoder, num_classes: int, head_init_std: float = 2e-5, head_drop: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(encoder.norm, nn.Identity):
            raise ValueError("the classifier's encoder must be built with final_norm=False (it norms after pooling)")
        self.encoder = encoder
        self.num_classes = num_classes
        self.fc_norm = LayerNorm(encoder.embed_dim)
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled and normed features."""
        return self.fc_norm(self.encoder(x).mean(dim=1))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
