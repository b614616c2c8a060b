"""Plain PyTorch OmniMAE models (no Lightning here)."""

from omnimae_pl.models.classifier import OmniViTClassifier
from omnimae_pl.models.decoder import MAEDecoder
from omnimae_pl.models.encoder import VisionTransformerEncoder
from omnimae_pl.models.factory import SIZES, ModelSize, model_size, omnimae_classifier, omnimae_pretrain
from omnimae_pl.models.omnimae import OmniMAE
from omnimae_pl.models.patch import patchify, unpatchify

__all__ = [
    "SIZES",
    "MAEDecoder",
    "ModelSize",
    "OmniMAE",
    "OmniViTClassifier",
    "VisionTransformerEncoder",
    "model_size",
    "omnimae_classifier",
    "omnimae_pretrain",
    "patchify",
    "unpatchify",
]

from omnimae_pl.models.checkpoints import load_official  # noqa: E402

__all__ += ["load_official"]
