"""omnimae-pl: OmniMAE pretraining, fine-tuning and inspection with PyTorch Lightning."""

from omnimae_pl.models import OmniMAE, OmniViTClassifier, load_official, omnimae_classifier, omnimae_pretrain
from omnimae_pl.models.hub import load_pretrained

__version__ = "0.1.0"
__all__ = [
    "OmniMAE",
    "OmniMAEFinetune",
    "OmniMAEPretrain",
    "OmniViTClassifier",
    "load_official",
    "load_pretrained",
    "omnimae_classifier",
    "omnimae_pretrain",
]


def __getattr__(name: str):
    # The Lightning modules load lazily, so `import omnimae_pl` for the model alone stays light.
    if name == "OmniMAEPretrain":
        from omnimae_pl.tasks.pretrain import OmniMAEPretrain

        return OmniMAEPretrain
    if name == "OmniMAEFinetune":
        from omnimae_pl.tasks.finetune import OmniMAEFinetune

        return OmniMAEFinetune
    raise AttributeError(f"module 'omnimae_pl' has no attribute {name!r}")
