"""The analytic training-FLOP counter, against hand-derived counts and against FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from omnimae_pl.flops import (
    decoder_share,
    flop_dims,
    forward_flops_breakdown,
    token_counts,
    training_flops_per_sample,
)
from omnimae_pl.masking import make_mask
from omnimae_pl.models import model_size, omnimae_pretrain


def hand_count(n_all, n_vis, k, d, depth, dd, ddepth, modality):
    """Written out once here, independently of the module: 2 FLOPs per multiply-add, MLP ratio 4.

    per block on t tokens of width w: qkv 6 t w^2 + proj 2 t w^2 + MLP 16 t w^2 = 24 t w^2, attention 4 t^2 w.
    An image's two identical frames meet the Conv3d with its time taps summed: its patch embed reads K / 2.
    Training = 3 x forward, minus the patch embed's input gradient (pixels need none): 3 F - patch.
    """
    patch = 2 * n_all * (k // 2 if modality == "image" else k) * d
    enc = depth * (24 * n_vis * d * d + 4 * n_vis * n_vis * d)
    dec_embed = 2 * n_all * d * dd
    dec = ddepth * (24 * n_all * dd * dd + 4 * n_all * n_all * dd)
    head = 2 * n_all * dd * k
    return 3 * (patch + enc + dec_embed + dec + head) - patch


# Token counts at the paper's masking: images keep 10 %, videos 5 % (masked = int(ratio * N), as in the code).
#   B/L, patch 2x16x16: image N = 196, masked 176, visible 20; video N = 8*14*14 = 1568, masked 1489, visible 79.
#   H/14, patch 2x14x14: image N = 256, masked 230, visible 26; video N = 8*16*16 = 2048, masked 1945, visible 103.
# K = 3 * 2 * 16 * 16 = 1536 (B, L), 3 * 2 * 14 * 14 = 1176 (H).
HAND = {
    # ViT-B image: patch 2*196*768*768 = 231,211,008; encoder 12*(24*20*768^2 + 4*20^2*768)
    # = 12*(283,115,520 + 1,228,800) = 3,412,131,840; decoder_embed 2*196*768*384 = 115,605,504;
    # decoder 4*(24*196*384^2 + 4*196^2*384) = 4*(693,633,024 + 59,006,976) = 3,010,560,000;
    # head 2*196*384*1536 = 231,211,008; forward F = 7,000,719,360; training 3F - patch = 20,770,947,072.
    ("base", "image"): 20_770_947_072,
    # ViT-B video: patch 2*1568*1536*768 = 3,699,376,128; encoder 12*(24*79*768^2 + 4*79^2*768)
    # = 13,650,161,664; decoder_embed 2*1568*768*384 = 924,844,032; decoder 4*(24*1568*384^2 + 4*1568^2*384)
    # = 37,302,042,624; head 2*1568*384*1536 = 1,849,688,064; F = 57,426,112,512; 3F - patch = 168,577,708,032.
    ("base", "video"): 168_577_708_032,
    # ViT-L image: patch 2*196*768*1024 = 308,281,344; encoder 24*(24*20*1024^2 + 4*20^2*1024)
    # = 12,079,595,520 + 39,321,600; decoder_embed 2*196*1024*512 = 205,520,896; decoder 4*(24*196*512^2
    # + 4*196^2*512) = 4,932,501,504 + 314,703,872; head 2*196*512*1536 = 308,281,344; F = 18,188,206,080.
    ("large", "image"): 54_256_336_896,
    # ViT-L video: patch 4,932,501,504; encoder 24*(24*79*1024^2 + 4*79^2*1024) = 47,714,402,304 + 613,515,264;
    # decoder_embed 1,644,167,168; decoder 4*(24*1568*512^2 + 4*1568^2*512) = 39,460,012,032 + 20,141,047,808;
    # head 2,466,250,752; F = 116,971,896,832.
    ("large", "video"): 345_983_188_992,
    # ViT-H/14 image: patch 2*256*588*1280 = 385,351,680; encoder 32*(24*26*1280^2 + 4*26^2*1280)
    # = 32,715,571,200 + 110,755,840; decoder_embed 2*256*1280*512 = 335,544,320; decoder 8*(24*256*512^2
    # + 4*256^2*512) = 12,884,901,888 + 1,073,741,824; head 2*256*512*1176 = 308,281,344; F = 47,814,148,096.
    ("huge", "image"): 143_057_092_608,
    # ViT-H/14 video: patch 6,165,626,880; encoder 32*(24*103*1280^2 + 4*103^2*1280) = 129,603,993,600
    # + 1,738,178,560; decoder_embed 2,684,354,560; decoder 8*(24*2048*512^2 + 4*2048^2*512) = 103,079,215,104
    # + 68,719,476,736; head 2,466,250,752; F = 314,457,096,192.
    ("huge", "video"): 937_205_661_696,
}
DIMS = {  # (K, D, depth, Dd, decoder depth)
    "base": (1536, 768, 12, 384, 4),
    "large": (1536, 1024, 24, 512, 4),
    "huge": (1176, 1280, 32, 512, 8),
}
TOKENS = {("base", "image"): (196, 20), ("base", "video"): (1568, 79), ("huge", "image"): (256, 26),
          ("huge", "video"): (2048, 103)}
TOKENS[("large", "image")] = TOKENS[("base", "image")]
TOKENS[("large", "video")] = TOKENS[("base", "video")]

# design.md section 5, training GFLOPs per sample at the paper's masking.
DESIGN_GFLOPS = {
    ("base", "image"): 21.4, ("base", "video"): 169.0,
    ("large", "image"): 54.9, ("large", "video"): 344.0,
    ("huge", "image"): 144.0, ("huge", "video"): 932.0,
}


@pytest.mark.parametrize("size,modality", sorted(HAND))
def test_matches_hand_derived_counts(size, modality):
    n_all, n_vis = TOKENS[(size, modality)]
    assert hand_count(n_all, n_vis, *DIMS[size], modality) == HAND[(size, modality)]
    assert token_counts(flop_dims(size), modality) == (n_all, n_vis)
    assert training_flops_per_sample(size, modality) == HAND[(size, modality)]


@pytest.mark.parametrize("size,modality", sorted(DESIGN_GFLOPS))
def test_close_to_design_figures(size, modality):
    """Our counts agree with design.md's figures within 3 % (B -2.9/-0.2 %, L -1.2/+0.6 %, H -0.7/+0.6 %).

    Images differ most: design.md charges the image patch embedding over both repeated frames, ours sums the
    Conv3d's time taps first (half its FLOPs: 0.46 GFLOP for ViT-B).

    The design figures are rounded to three digits and their exact bookkeeping is not stated. The residual
    differences are of the size of one visible token in the encoder (e.g. ViT-L video: 24 blocks x 24 x 1024^2
    x 3 = 1.8 GFLOPs per visible token, which is the whole 344 vs 346 gap if the design took N_vis =
    floor(0.05 * 1568) = 78 rather than the code's 1568 - int(0.95 * 1568) = 79), plus whether the patch
    embedding's backward is charged 1x (weight gradient only, as autograd runs it; ours) or 2x (0.2-2 % of the
    total). Norms, softmax and GELU would add well under 1 %.
    """
    ours = training_flops_per_sample(size, modality) / 1e9
    assert ours == pytest.approx(DESIGN_GFLOPS[(size, modality)], rel=0.03)


def test_decoder_dominates_base_video():
    # design.md: "at 95 % masking the decoder is most of the work (70 % for ViT-B video)"
    assert decoder_share("base", "video") == pytest.approx(0.70, abs=0.01)
    assert decoder_share("base", "image") < 0.5


def test_model_and_name_agree_and_mask_ratio():
    model = omnimae_pretrain(model_size("tiny", depth=2), img_size=32, num_frames=4)
    by_model = training_flops_per_sample(model, "video", img_size=32, num_frames=4, mask_ratio=0.5)
    by_spec = training_flops_per_sample(model_size("tiny", depth=2), "video", img_size=32, num_frames=4,
                                        mask_ratio=0.5)
    assert by_model == by_spec
    # fewer visible tokens -> fewer encoder FLOPs, decoder unchanged
    hi = forward_flops_breakdown("base", "image", mask_ratio=0.75)
    lo = forward_flops_breakdown("base", "image")
    assert hi["encoder_linear"] > lo["encoder_linear"] and hi["decoder_linear"] == lo["decoder_linear"]
    with pytest.raises(ValueError):
        training_flops_per_sample("base", "audio")


@pytest.mark.parametrize("modality", ["image", "video"])
def test_agrees_with_flop_counter_mode(modality):
    """One real forward + backward of a small model through FlopCounterMode (math SDPA, so attention shows up
    as counted batched matmuls on CPU) equals the analytic count."""
    torch.manual_seed(0)
    spec = model_size("tiny", embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
                      decoder_num_heads=4)
    img, frames, ratio, b = 64, 4, 0.75, 2
    model = omnimae_pretrain(spec, img_size=img, num_frames=frames)
    x = torch.randn(b, 3, img, img) if modality == "image" else torch.randn(b, 3, frames, img, img)
    grid = (1, 4, 4) if modality == "image" else (2, 4, 4)
    mask = torch.stack([make_mask(grid, ratio) for _ in range(b)])
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        pred = model(x, mask)
        model.forward_loss(x, pred, mask).backward()
    expected = b * training_flops_per_sample(model, modality, img_size=img, num_frames=frames, mask_ratio=ratio)
    assert counter.get_total_flops() == expected
