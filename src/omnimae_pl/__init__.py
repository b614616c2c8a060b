"""omnimae-pl: OmniMAE pretraining, fine-tuning and inspection with PyTorch Lightning."""

from omnimae_pl.models import OmniMAE, OmniViTClassifier, load_official, omnimae_classifier, omnimae_pretrain

__version__ = "0.1.0"
__all__ = ["OmniMAE", "OmniViTClassifier", "load_official", "omnimae_classifier", "omnimae_pretrain"]
