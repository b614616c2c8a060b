"""Patch embedding, patchify order and the fixed positional table."""

from __future__ import annotations

import math

import pytest
import torch

from omnimae_pl.models import omnimae_classifier, omnimae_pretrain, patchify, unpatchify
from omnimae_pl.masking import token_grid
from omnimae_pl.models.patch import TubeletEmbed, to_video
from omnimae_pl.models.pos_embed import select_pos_embed, sinusoid_table

PATCH = (2, 4, 4)


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(
        img_size=16, num_frames=4, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2,
        decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
    )
    args.update(kw)
    return omnimae_pretrain("tiny", **args).eval()


# ---------------------------------------------------------------- patchify / unpatchify

def test_patchify_round_trip_video():
    x = torch.randn(2, 3, 6, 8, 12)
    p = patchify(x, PATCH)
    assert p.shape == (2, 3 * 2 * 3, 2 * 4 * 4 * 3)
    assert torch.equal(unpatchify(p, PATCH, (3, 2, 3)), x)


def test_patchify_round_trip_image_is_the_two_frame_repeat():
    x = torch.randn(2, 3, 8, 12)
    p = patchify(x, PATCH)
    assert p.shape == (2, 1 * 2 * 3, 96)
    back = unpatchify(p, PATCH, token_grid(x.shape[1:], PATCH))
    assert back.shape == (2, 3, 2, 8, 12)
    assert torch.equal(back, x.unsqueeze(2).repeat(1, 1, 2, 1, 1))


def test_patchify_voxel_order_is_t_h_w_c():
    pt, ph, pw = 2, 2, 3
    C, T, H, W = 3, 4, 4, 6
    # every value encodes its own coordinates
    c, t, h, w = torch.meshgrid(torch.arange(C), torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    x = (c + 10 * w + 100 * h + 1000 * t).float().unsqueeze(0)
    p = patchify(x, (pt, ph, pw))
    nt, nh, nw = T // pt, H // ph, W // pw
    assert p.shape == (1, nt * nh * nw, pt * ph * pw * C)
    for ti in range(nt):
        for hi in range(nh):
            for wi in range(nw):
                token = (ti * nh + hi) * nw + wi  # (t, h, w) raster order
                for a in range(pt):
                    for y in range(ph):
                        for z in range(pw):
                            for ci in range(C):
                                idx = ((a * ph + y) * pw + z) * C + ci  # channel last
                                tt, hh, ww = ti * pt + a, hi * ph + y, wi * pw + z
                                assert p[0, token, idx].item() == ci + 10 * ww + 100 * hh + 1000 * tt
    # spot checks by hand: token 1 is (t=0, h=0, w=1); its value 0 is pixel (c=0, t=0, h=0, w=3)
    assert p[0, 1, 0].item() == 30
    # value 1 of any token is channel 1 of the same voxel; value 3 is the next w
    assert p[0, 0, 1].item() == 1 and p[0, 0, 3].item() == 10
    # the second frame of a tubelet starts after ph*pw*C values
    assert p[0, 0, ph * pw * C].item() == 1000


def test_patch_embed_is_a_linear_map_of_patchify():
    """The Conv3d token order is (t, h, w) raster and matches patchify (used by targets and masks)."""
    torch.manual_seed(0)
    emb = TubeletEmbed(PATCH, 3, 8)
    x = torch.randn(2, 3, 4, 8, 12)
    w = emb.proj.weight.permute(0, 2, 3, 4, 1).reshape(8, -1)  # (D, pt*ph*pw*C) in (t, h, w, c) order
    ref = patchify(x, PATCH) @ w.T + emb.proj.bias
    torch.testing.assert_close(emb(x), ref, atol=1e-5, rtol=1e-5)


def test_image_is_repeated_not_zero_padded():
    torch.manual_seed(0)
    emb = TubeletEmbed(PATCH, 3, 8)
    img = torch.randn(1, 3, 8, 8)
    repeated = img.unsqueeze(2).repeat(1, 1, 2, 1, 1)
    torch.testing.assert_close(emb(img), emb(repeated))
    # images take the folded path (time taps summed); it equals the Conv3d over the repeated frames
    conv = torch.nn.functional.conv3d(repeated, emb.proj.weight, emb.proj.bias, stride=PATCH)
    torch.testing.assert_close(emb(img), conv.flatten(2).transpose(1, 2))
    zero = torch.cat([img.unsqueeze(2), torch.zeros_like(img).unsqueeze(2)], dim=2)
    assert not torch.allclose(emb(img), emb(zero))
    assert torch.equal(to_video(img, 2), repeated)
    clip = torch.randn(1, 3, 4, 8, 8)
    assert to_video(clip, 2) is clip
    with pytest.raises(ValueError):
        to_video(torch.randn(3, 8, 8), 2)


# ---------------------------------------------------------------- sinusoid table

def test_sinusoid_formula_by_hand():
    d = 16
    table = sinusoid_table(50, d)
    assert table.shape == (1, 50, d) and table.dtype == torch.float32
    assert table[0, 3, 0].item() == pytest.approx(math.sin(3.0), abs=1e-6)
    assert table[0, 3, 1].item() == pytest.approx(math.cos(3.0), abs=1e-6)
    # interleaved: channels 4 and 5 share the frequency 10000^(-4/16)
    assert table[0, 10, 4].item() == pytest.approx(math.sin(10 / 10000 ** (4 / 16)), abs=1e-6)
    assert table[0, 7, 5].item() == pytest.approx(math.cos(7 / 10000 ** (4 / 16)), abs=1e-6)
    assert table[0, 49, 15].item() == pytest.approx(math.cos(49 / 10000 ** (14 / 16)), abs=1e-6)
    # position 0: sin 0 = 0 on even channels, cos 0 = 1 on odd ones (not [sin | cos] halves)
    assert torch.equal(table[0, 0, 0::2], torch.zeros(8))
    assert torch.equal(table[0, 0, 1::2], torch.ones(8))


def test_encoder_table_is_the_sinusoid_of_its_width():
    model = _tiny(embed_dim=24, num_heads=2)
    pe = model.encoder.pos_embed
    assert pe.shape == (1, 32, 24)
    assert pe[0, 31, 23].item() == pytest.approx(math.cos(31 / 10000 ** (22 / 24)), abs=1e-6)
    assert pe[0, 17, 6].item() == pytest.approx(math.sin(17 / 10000 ** (6 / 24)), abs=1e-6)
    torch.testing.assert_close(pe, sinusoid_table(32, 24))


# ---------------------------------------------------------------- image / video positions

def test_image_tokens_use_the_first_time_slice():
    model = _tiny()
    enc = model.encoder
    assert enc.grid == (2, 4, 4)
    image = torch.randn(2, 3, 16, 16)
    assert torch.equal(enc.pos_embed_for(image), enc.pos_embed[:, :16])
    video = torch.randn(2, 3, 4, 16, 16)
    assert torch.equal(enc.pos_embed_for(video), enc.pos_embed)


def test_image_token_equals_video_token_at_t0():
    """An image and a clip whose first tubelet is that image get identical tokens at t = 0."""
    enc = _tiny().encoder
    image = torch.randn(1, 3, 16, 16)
    video = torch.cat([image.unsqueeze(2).repeat(1, 1, 2, 1, 1), torch.randn(1, 3, 2, 16, 16)], dim=2)
    torch.testing.assert_close(enc.prepare_tokens(image), enc.prepare_tokens(video)[:, :16])


def test_classifier_image_and_video_positions():
    torch.manual_seed(0)
    clf = omnimae_classifier(
        "tiny", num_classes=5, img_size=16, num_frames=4, patch_size=PATCH, embed_dim=32, depth=1, num_heads=2
    )
    assert torch.equal(clf.encoder.pos_embed_for(torch.randn(1, 3, 16, 16)), clf.encoder.pos_embed[:, :16])


@pytest.mark.parametrize("frames", [2, 6, 8])
def test_video_with_wrong_frame_count_is_a_clear_error(frames):
    model = _tiny()
    video = torch.randn(1, 3, frames, 16, 16)
    with pytest.raises(ValueError, match="num_frames"):
        model.encoder(video)
    n = token_grid(video.shape[1:], PATCH)
    mask = torch.zeros(1, math.prod(n), dtype=torch.bool)
    with pytest.raises(ValueError, match="num_frames"):
        model(video, mask)


def test_video_with_wrong_size_is_a_clear_error():
    model = _tiny()
    with pytest.raises(ValueError, match="img_size"):
        model.encoder(torch.randn(1, 3, 4, 24, 24))


def test_images_of_another_size_are_interpolated_from_the_first_slice():
    enc = _tiny().encoder
    pe = enc.pos_embed_for(torch.randn(1, 3, 24, 24))
    assert pe.shape == (1, 36, 32)
    # same-size interpolation is the identity; a different size is not a plain slice of the table
    same = select_pos_embed(enc.pos_embed, enc.grid, (1, 4, 4), is_image=True)
    assert torch.equal(same, enc.pos_embed[:, :16])
    assert enc(torch.randn(1, 3, 24, 24)).shape == (1, 36, 32)
