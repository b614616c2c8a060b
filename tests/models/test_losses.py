"""The reconstruction loss: per-channel normalised (t, h, w, c) targets, masked-token batch mean."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from omnimae_pl.constants import IMAGENET_MEAN, IMAGENET_STD
from omnimae_pl.models.losses import masked_mse, norm_pix_targets
from omnimae_pl.models import omnimae_pretrain
from omnimae_pl.models.patch import patchify

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels (B, 3, T, H, W) -> ImageNet-normalised input, as the data pipeline feeds the model."""
    return (pixels - MEAN) / STD


# ---------------------------------------------------------------- masked_mse

def test_masked_mse_hand_computed():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, 1.0]], [[2.0, 2.0], [5.0, -1.0], [0.0, 4.0]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    # per-token mean of squares: (1+4)/2=2.5, (9+1)/2=5, and (0+16)/2=8 -> sum 15.5 over 3 masked tokens
    assert masked_mse(pred, target, mask).item() == pytest.approx(15.5 / 3)
    # a per-sample mean would give ((2.5+5)/2 + 8)/2 = 5.875: the loss is a batch mean over masked tokens
    assert masked_mse(pred, target, mask).item() != pytest.approx(5.875)


def test_masked_mse_ignores_visible_tokens():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 6, 12, generator=g)
    target = torch.randn(2, 6, 12, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 1, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    base = masked_mse(pred, target, mask)

    changed = pred.clone()
    changed[~mask] += 100.0  # every visible token
    assert torch.equal(masked_mse(changed, target, mask), base)

    changed = pred.clone()
    changed[1, 5, 3] += 1.0  # one value of one masked token
    assert masked_mse(changed, target, mask).item() != pytest.approx(base.item())


def test_masked_mse_no_masked_tokens_is_zero_not_nan():
    pred, target = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    loss = masked_mse(pred, target, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0


def test_masked_mse_is_fp32_for_half_predictions():
    pred = torch.randn(1, 4, 8).to(torch.bfloat16)
    target = torch.randn(1, 4, 8)
    loss = masked_mse(pred, target, torch.tensor([[True, False, True, True]]))
    assert loss.dtype == torch.float32


# ---------------------------------------------------------------- norm_pix_targets

def _reference_targets(pixels: torch.Tensor, patch, eps: float = 1e-6) -> torch.Tensor:
    """Plain-python reference: per token, per channel, unbiased variance, eps inside the sqrt, (t,h,w,c) order."""
    pt, ph, pw = patch
    b, c, t, h, w = pixels.shape
    nt, nh, nw = t // pt, h // ph, w // pw
    out = torch.zeros(b, nt * nh * nw, pt * ph * pw * c, dtype=torch.float64)
    for bi in range(b):
        for ti in range(nt):
            for hi in range(nh):
                for wi in range(nw):
                    tok = (ti * nh + hi) * nw + wi
                    for ci in range(c):
                        vox = [
                            float(pixels[bi, ci, ti * pt + a, hi * ph + y, wi * pw + x])
                            for a in range(pt) for y in range(ph) for x in range(pw)
                        ]
                        mu = statistics.fmean(vox)
                        sd = math.sqrt(statistics.variance(vox) + eps)
                        for k, (a, y, x) in enumerate(
                            (a, y, x) for a in range(pt) for y in range(ph) for x in range(pw)
                        ):
                            out[bi, tok, ((a * ph + y) * pw + x) * c + ci] = (vox[k] - mu) / sd
    return out.float()


def test_norm_pix_targets_match_hand_reference_on_video():
    g = torch.Generator().manual_seed(0)
    # channels of very different scale: per-channel normalisation must treat them separately
    pixels = torch.rand(2, 3, 4, 4, 6, generator=g) * torch.tensor([1.0, 0.1, 0.01]).view(1, 3, 1, 1, 1)
    patch = (2, 2, 3)
    got = norm_pix_targets(_normalise(pixels), patch)
    assert got.shape == (2, 2 * 2 * 2, 2 * 2 * 3 * 3)
    torch.testing.assert_close(got, _reference_targets(pixels, patch), atol=2e-4, rtol=1e-4)


def test_norm_pix_targets_eps_inside_sqrt_and_unbiased_variance():
    """A tiny patch with variance ~ eps tells eps-in-sqrt from eps-on-std, and unbiased from biased."""
    patch = (2, 1, 2)  # 4 voxels per channel
    vals = torch.tensor([0.500, 0.501, 0.502, 0.503])  # variance (unbiased) = 1.6667e-6
    # voxel order inside a patch: (t, h, w) -> pixels[c, t, 0, w]
    pixels = vals.view(1, 1, 2, 1, 2).expand(1, 3, 2, 1, 2).clone()
    got = norm_pix_targets(_normalise(pixels), patch)[0, 0].double()
    v = vals.double()
    mu = v.mean()
    var_unbiased = v.var(unbiased=True)
    expected = (v - mu) / torch.sqrt(var_unbiased + 1e-6)
    torch.testing.assert_close(got[0::3], expected, atol=2e-3, rtol=0)  # channel 0, (t,h,w) order
    torch.testing.assert_close(got[1::3], expected, atol=2e-3, rtol=0)
    wrong_eps = (v - mu) / (torch.sqrt(var_unbiased) + 1e-6)
    wrong_var = (v - mu) / torch.sqrt(v.var(unbiased=False) + 1e-6)
    assert (got[0::3] - wrong_eps).abs().max() > 0.1
    assert (got[0::3] - wrong_var).abs().max() > 0.05
    # by hand: (0.5 - 0.5015) / sqrt(1.6667e-6 + 1e-6)
    assert got[0].item() == pytest.approx(-0.0015 / math.sqrt(0.0000016667 + 1e-6), rel=2e-3)


def test_constant_patch_gives_zero_targets():
    pixels = torch.full((1, 3, 2, 4, 4), 0.3)
    got = norm_pix_targets(_normalise(pixels), (2, 4, 4))
    assert torch.all(got.abs() < 1e-2)
    assert torch.isfinite(got).all()


def test_per_channel_normalisation_gives_unit_variance_per_channel():
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(1, 3, 2, 8, 8, generator=g) * torch.tensor([0.9, 0.5, 0.3]).view(1, 3, 1, 1, 1)
    t = norm_pix_targets(_normalise(pixels), (2, 4, 4)).view(1, 4, 32, 3)
    torch.testing.assert_close(t.mean(dim=2), torch.zeros(1, 4, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(dim=2, unbiased=True), torch.ones(1, 4, 3), atol=1e-3, rtol=0)


def test_targets_follow_the_patchify_order():
    """Targets are patchify(pixels) normalised per channel: (B, N, V, C) -> normalise over V -> flatten."""
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(2, 3, 4, 8, 12, generator=g)
    patch = (2, 4, 4)
    p = patchify(pixels, patch).view(2, 2 * 2 * 3, 32, 3)
    ref = ((p - p.mean(2, keepdim=True)) / torch.sqrt(p.var(2, keepdim=True) + 1e-6)).flatten(2)
    torch.testing.assert_close(norm_pix_targets(_normalise(pixels), patch), ref, atol=1e-4, rtol=1e-4)


def test_image_targets_are_the_two_frame_repeat():
    g = torch.Generator().manual_seed(3)
    image = torch.randn(2, 3, 32, 32, generator=g)
    patch = (2, 16, 16)
    t_img = norm_pix_targets(image, patch)
    assert t_img.shape == (2, 4, 1536)  # 2*16*16*3 values per token for images too
    t_vid = norm_pix_targets(image.unsqueeze(2).repeat(1, 1, 2, 1, 1), patch)
    torch.testing.assert_close(t_img, t_vid)
    # t is the outermost voxel axis: the two frames are the two halves of each target, and they are equal
    torch.testing.assert_close(t_img[..., :768], t_img[..., 768:])


def test_targets_are_fp32_from_half_inputs():
    x = torch.randn(1, 3, 2, 4, 4).half()
    assert norm_pix_targets(x, (2, 2, 2)).dtype == torch.float32


# ---------------------------------------------------------------- OmniMAE.forward_loss

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return omnimae_pretrain(
        "tiny", img_size=16, num_frames=4, patch_size=(2, 4, 4), embed_dim=32, depth=1, num_heads=2,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
    ).eval()


def test_forward_loss_equals_masked_mse_of_norm_pix_targets(tiny_model):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 4, 16, 16, generator=g)
    mask = torch.stack([torch.randperm(32, generator=g) < 24 for _ in range(3)])
    with torch.no_grad():
        pred = tiny_model(x, mask)
    loss = tiny_model.forward_loss(x, pred, mask)
    target = norm_pix_targets(x, (2, 4, 4))
    ref = ((pred - target) ** 2).mean(-1)[mask].sum() / mask.sum()
    torch.testing.assert_close(loss, ref)
    assert torch.equal(tiny_model.forward_loss(x, pred, mask, target=target), loss)  # a target given: the same
    # visible tokens: no influence; masked tokens: influence
    pred2 = pred.clone()
    pred2[~mask] = 1e3
    assert torch.equal(tiny_model.forward_loss(x, pred2, mask), loss)
    pred3 = pred.clone()
    idx = mask[0].nonzero()[0, 0]
    pred3[0, idx] += 1.0
    assert tiny_model.forward_loss(x, pred3, mask).item() != pytest.approx(loss.item())


def test_forward_loss_accepts_grid_shaped_masks(tiny_model):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 16, 16, generator=g)  # image: grid (1, 4, 4)
    mask = torch.stack([torch.randperm(16, generator=g) < 12 for _ in range(2)])
    with torch.no_grad():
        pred = tiny_model(x, mask.view(2, 1, 4, 4))
        assert pred.shape == (2, 16, 2 * 4 * 4 * 3)
        torch.testing.assert_close(
            tiny_model.forward_loss(x, pred, mask.view(2, 1, 4, 4)), tiny_model.forward_loss(x, pred, mask)
        )


def test_invalid_samples_are_excluded(tiny_model):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 3, 4, 16, 16, generator=g)
    mask = torch.stack([torch.randperm(32, generator=g) < 24 for _ in range(3)])
    pred = torch.randn(3, 32, 96, generator=g)
    valid = torch.tensor([True, False, True])
    loss = tiny_model.forward_loss(x, pred, mask, valid)
    # equals the loss over the valid samples alone
    keep = valid.nonzero().flatten()
    torch.testing.assert_close(loss, tiny_model.forward_loss(x[keep], pred[keep], mask[keep]))
    # the invalid sample's predictions and pixels do not matter
    pred2, x2 = pred.clone(), x.clone()
    pred2[1] += 10.0
    x2[1] = torch.randn(3, 4, 16, 16, generator=g)
    assert torch.equal(tiny_model.forward_loss(x2, pred2, mask, valid), loss)
    # nothing valid: zero, not NaN
    none = tiny_model.forward_loss(x, pred, mask, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0
