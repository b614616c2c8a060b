"""The end-of-run learning check: each validation loss against its baseline and the copy-nearest reference, and
the frozen linear probe of the encoder against random ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omnimae_pl.callbacks.learning_report import LearningReport, learning_report, stitched_report
from omnimae_pl.errors import ConfigError
from omnimae_pl.frozen_probe import fit_logistic, logistic_probe, random_encoder, report, token_features
from omnimae_pl.models import omnimae_pretrain

PASSING = {"val/loss_image": 0.54, "val/loss_image_baseline": 0.70,
           "val/loss_video": 0.45, "val/loss_video_baseline": 0.56, "val/loss_video_copy_nearest": 0.66}


def test_a_run_that_learnt_passes():
    lines, passed = learning_report(PASSING, 0.9)
    assert passed
    image, video = lines[1], lines[2]
    assert image.split()[:4] == ["image", "0.5400", "0.7000", "0.771"] and image.endswith("pass")
    assert video.split()[:5] == ["video", "0.4500", "0.5600", "0.804", "0.6600"] and video.endswith("pass")


@pytest.mark.parametrize("change", [
    {"val/loss_image": 0.64},               # 0.914 of the baseline
    {"val/loss_video": 0.5},                # 0.893 of the baseline, but
    {"val/loss_video_copy_nearest": 0.44},  # copying in time does better
])
def test_each_target_can_fail(change):
    metrics = dict(PASSING, **change)
    if "val/loss_video" in change:
        metrics["val/loss_video_copy_nearest"] = 0.49  # below the loss
    lines, passed = learning_report(metrics, 0.9)
    assert not passed and any(line.endswith("FAIL") for line in lines)


def test_nothing_validated_is_no_pass():
    assert learning_report({}, 0.9) == ([learning_report({}, 0.9)[0][0]], False)


STITCHED = {"val/pixel_error_image_stitched": 0.021, "val/pixel_error_image_stitched_blank": 0.034,
            "val/pixel_error_video_stitched": 0.016, "val/pixel_error_video_stitched_blank": 0.028}


def test_stitched_report_passes_a_prediction_that_carries_the_picture_and_fails_one_that_does_not():
    lines, passed = stitched_report({**PASSING, **STITCHED}, 0.9)
    assert passed and len(lines) == 3
    assert lines[1].split()[:4] == ["image", "0.0210", "0.0340", "0.618"] and lines[1].endswith("pass")
    lines, passed = stitched_report(dict(STITCHED, **{"val/pixel_error_video_stitched": 0.027}), 0.9)
    assert not passed and lines[2].endswith("FAIL")
    assert stitched_report(PASSING, 0.9) == ([], False)  # not logged: no table


def test_bad_ratio_is_a_config_error():
    with pytest.raises(ConfigError, match="max_ratio"):
        LearningReport(max_ratio=1.5)


def test_probe_separates_what_is_separable_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 4
    x = torch.randn(200, 16, generator=g) + 3 * nn.functional.one_hot(y, 16).float()
    yv = torch.arange(80) % 4
    xv = torch.randn(80, 16, generator=g) + 3 * nn.functional.one_hot(yv, 16).float()
    assert logistic_probe((x, y), (xv, yv), 4) > 0.9
    noise = torch.randn(200, 16, generator=g)
    assert logistic_probe((noise, y), (torch.randn(80, 16, generator=g), yv), 4) < 0.5


def test_probe_on_more_features_than_samples_is_the_full_width_probe():
    # A token map has more features than the demo has clips: the probe fits in their span, which must find what
    # the plain fit over every feature finds.
    g = torch.Generator().manual_seed(0)
    y, yv = torch.arange(60) % 3, torch.arange(30) % 3
    signal = torch.randn(3, 400, generator=g)
    x = torch.randn(60, 400, generator=g) + 0.15 * signal[y]
    xv = torch.randn(30, 400, generator=g) + 0.15 * signal[yv]

    mean, std = x.mean(dim=0), x.std(dim=0)
    head = fit_logistic(((x - mean) / std).double(), y, 3)
    with torch.no_grad():
        full = (head(((xv - mean) / std).double()).argmax(dim=1) == yv).double().mean().item()
    assert 0.5 < full < 1.0  # a probe with something to get right and something to get wrong
    assert logistic_probe((x, y), (xv, yv), 3) == pytest.approx(full)


def test_random_encoder_is_fresh_and_seeded():
    encoder = omnimae_pretrain("tiny", img_size=16, num_frames=4, patch_size=(2, 8, 8), depth=1).encoder
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(1.0)  # "trained"
    a, b = random_encoder(encoder, 0), random_encoder(encoder, 0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)
    assert torch.equal(a.pos_embed, encoder.pos_embed)  # the fixed table is no weight


def test_token_features_are_the_last_block_token_map_without_the_final_norm_or_placeholders():
    encoder = omnimae_pretrain("tiny", img_size=16, num_frames=4, patch_size=(2, 8, 8), depth=1).encoder.eval()
    x = torch.randn(3, 3, 16, 16)
    batch = {"input": x, "label": torch.tensor([0, 1, -1]), "valid": torch.tensor([True, False, True])}
    feats, labels = token_features(encoder, [batch])
    assert labels.tolist() == [0]
    with torch.no_grad():
        tokens = encoder.prepare_tokens(x[:1])
        for block in encoder.blocks:
            tokens = block(tokens)
    assert feats.shape == (1, 4 * encoder.embed_dim)  # 2 x 2 tokens of 8 px
    assert torch.allclose(feats, tokens.flatten(1), atol=1e-6)
    assert not isinstance(encoder.norm, nn.Identity)  # the encoder itself is left as it was


def test_probe_report_needs_the_pretrained_encoder_above_every_random_one():
    lines, passed = report({
        "image": {"pretrained": 0.4, "random 0": 0.3, "random 1": 0.35},
        "video": {"pretrained": 0.9, "random 0": 0.85, "random 1": 0.95},
    })
    assert not passed and lines[1].endswith("pass") and lines[2].endswith("FAIL")
    assert lines[1].split()[:4] == ["image", "0.400", "0.350", "+0.050"]  # margin over the best random encoder
