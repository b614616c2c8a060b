"""OmniMAEPretrain's evaluation metrics, on a tiny model and batches built by the data pipeline's own collate."""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from omnimae_pl.data.sample import collate_samples, make_sample
from omnimae_pl.masking import token_grid
from omnimae_pl.models.losses import norm_pix_targets, patch_pixels
from omnimae_pl.models.stitch import stitched_errors
from omnimae_pl.masking import MaskingConfig
from omnimae_pl.tasks.pretrain import OmniMAEPretrain

PATCH = (2, 8, 8)


def _batch(modality: str, n: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (3, 32, 32) if modality == "image" else (3, 4, 32, 32)
    masking = MaskingConfig("random", 0.75)
    # sample 1 is an invalid placeholder: flat, so its targets are zeros and counting it would lower the baseline
    inputs = [torch.zeros(shape) if i == 1 else torch.randn(shape, generator=g) for i in range(n)]
    samples = [make_sample(x, 0, i != 1, i, masking, PATCH, g) for i, x in enumerate(inputs)]
    return collate_samples(samples, modality, modality)


def test_validation_logs_the_mean_prediction_baseline():
    torch.manual_seed(0)
    module = OmniMAEPretrain(size="tiny", model_overrides={"depth": 1}, img_size=32, num_frames=4, patch_size=PATCH,
                             linear_probe=False)
    batches = [_batch("image"), _batch("video")]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.validate(module, DataLoader(batches, batch_size=None))
    logged = trainer.callback_metrics
    for batch in batches:
        modality = batch["modality"]
        # the loss of predicting zero: the squared normalised targets over the hidden patches of valid samples
        # (a little under 1: the per-patch variance is unbiased)
        hidden = batch["mask"].flatten(1) & batch["valid"].view(-1, 1)
        expected = norm_pix_targets(batch["input"], PATCH).pow(2).mean(-1)[hidden].mean()
        torch.testing.assert_close(logged[f"val/loss_{modality}_baseline"], expected)
        # the untrained decoder's loss is its own, not the baseline's
        assert abs(logged[f"val/loss_{modality}"] - expected) > 1e-3


def test_validation_logs_the_stitched_pixel_errors_of_readable_samples_when_asked():
    torch.manual_seed(0)
    batches = [_batch("image"), _batch("video")]
    logged = {}
    for stitched_error in (False, True):
        module = OmniMAEPretrain(size="tiny", model_overrides={"depth": 1}, img_size=32, num_frames=4,
                                 patch_size=PATCH, linear_probe=False, stitched_error=stitched_error)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.validate(module, DataLoader(batches, batch_size=None))
        logged[stitched_error] = trainer.callback_metrics
    assert not any(k.startswith("val/pixel_error_") for k in logged[False])
    module.eval()
    for batch in batches:
        modality, x, mask, valid = batch["modality"], batch["input"], batch["mask"], batch["valid"]
        with torch.no_grad():
            pred = module.model(x, mask)
        errors = stitched_errors(pred, patch_pixels(x, PATCH), mask, token_grid(x.shape[1:], PATCH), PATCH)
        for name, error in zip(("stitched", "stitched_blank"), errors):
            torch.testing.assert_close(logged[True][f"val/pixel_error_{modality}_{name}"], error[valid].mean())


def test_placeholders_do_not_count_in_the_validation_loss():
    """A validation batch of placeholders adds nothing to the epoch's loss (it used to add a 0.0 at full weight)."""
    torch.manual_seed(0)
    module = OmniMAEPretrain(size="tiny", model_overrides={"depth": 1}, img_size=32, num_frames=4, patch_size=PATCH,
                             linear_probe=False)
    readable = _batch("image")
    placeholders = {**readable, "valid": torch.zeros_like(readable["valid"])}
    logged = []
    for batches in ([readable], [readable, placeholders]):
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.validate(module, DataLoader(batches, batch_size=None))
        logged.append(trainer.callback_metrics["val/loss_image"])
    torch.testing.assert_close(logged[1], logged[0])
