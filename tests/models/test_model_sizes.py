"""Model sizes: token counts at 224, parameter counts and checkpoint key counts per size.

The big models are never built for real: token counts come from narrow overrides that keep the patch and
the positional layout, parameter counts from a meta-device build when the code allows it, else from two
shallow builds extrapolated over depth (every block of a stack has the same parameters).
"""

from __future__ import annotations

import pytest
import torch

from omnimae_pl.masking import make_mask, token_grid
from omnimae_pl.models import SIZES, model_size, omnimae_classifier, omnimae_pretrain

NARROW = dict(embed_dim=32, num_heads=2, depth=1, decoder_embed_dim=16, decoder_num_heads=2, decoder_depth=1)

# size -> (patch, image tokens, video tokens, image grid, video grid)
TOKENS = {
    "base": ((2, 16, 16), 196, 1568, (1, 14, 14), (8, 14, 14)),
    "large": ((2, 16, 16), 196, 1568, (1, 14, 14), (8, 14, 14)),
    "huge": ((2, 14, 14), 256, 2048, (1, 16, 16), (8, 16, 16)),
}
# size -> (encoder incl. mask token + final norm, decoder, pixel head) in M, pretrain state_dict keys
PARAMS = {
    "base": (86.24, 7.39, 0.59, 201),
    "large": (303.89, 13.13, 0.79, 345),
    "huge": (631.19, 25.86, 0.60, 485),
}
ARCH = {  # embed dim, depth, heads, decoder dim, depth, heads, pixel head out
    "base": (768, 12, 12, 384, 4, 16, 1536),
    "large": (1024, 24, 16, 512, 4, 16, 1536),
    "huge": (1280, 32, 16, 512, 8, 16, 1176),
}


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_size_table(size):
    s = SIZES[size]
    d, depth, heads, dd, ddepth, dheads, out = ARCH[size]
    assert (s.embed_dim, s.depth, s.num_heads) == (d, depth, heads)
    assert (s.decoder_embed_dim, s.decoder_depth, s.decoder_num_heads) == (dd, ddepth, dheads)
    assert s.patch_size == TOKENS[size][0]
    assert s.mlp_ratio == 4.0
    assert 3 * s.patch_size[0] * s.patch_size[1] * s.patch_size[2] == out


def test_model_size_overrides_and_errors():
    s = model_size("huge", depth=1, patch_size=[2, 7, 7])
    assert s.depth == 1 and s.patch_size == (2, 7, 7) and s.embed_dim == 1280
    with pytest.raises(ValueError, match="unknown model size"):
        model_size("gigantic")


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_token_counts_at_224(size):
    patch, n_img, n_vid, g_img, g_vid = TOKENS[size]
    torch.manual_seed(0)
    model = omnimae_pretrain(size, **NARROW).eval()  # the patch of `size`, narrow and shallow
    assert model.encoder.patch_size == patch
    assert model.encoder.grid == g_vid
    assert model.encoder.pos_embed.shape == (1, n_vid, 32)
    assert model.decoder.pos_embed.shape == (1, n_vid, 32)
    assert token_grid((3, 224, 224), patch) == g_img
    assert token_grid((3, 16, 224, 224), patch) == g_vid

    image = torch.randn(1, 3, 224, 224)
    video = torch.randn(1, 3, 16, 224, 224)
    out_dim = 3 * patch[0] * patch[1] * patch[2]
    with torch.no_grad():
        assert model.encoder(image).shape == (1, n_img, 32)
        assert model.encoder(video).shape == (1, n_vid, 32)
        # paper ratios: 90 % image, 95 % video
        m_img = make_mask(g_img, 0.90, generator=torch.Generator().manual_seed(0)).unsqueeze(0)
        m_vid = make_mask(g_vid, 0.95, generator=torch.Generator().manual_seed(0)).unsqueeze(0)
        assert model.encoder(image, m_img).shape == (1, n_img - int(0.90 * n_img), 32)
        assert model.encoder(video, m_vid).shape == (1, n_vid - int(0.95 * n_vid), 32)
        assert model(image, m_img).shape == (1, n_img, out_dim)
        assert model(video, m_vid).shape == (1, n_vid, out_dim)


def test_paper_visible_token_counts():
    assert (196 - int(0.90 * 196), 1568 - int(0.95 * 1568)) == (20, 79)
    assert (256 - int(0.90 * 256), 2048 - int(0.95 * 2048)) == (26, 103)


# ---------------------------------------------------------------- parameter counts


def _counts(model) -> tuple[int, int, int, int]:
    enc = sum(p.numel() for p in model.encoder.parameters()) + model.decoder.mask_token.numel()
    dec = sum(
        p.numel() for n, p in model.decoder.named_parameters() if not n.startswith(("pred.", "mask_token"))
    )
    head = sum(p.numel() for p in model.decoder.pred.parameters())
    return enc, dec, head, len(model.state_dict())


@pytest.fixture
def no_init(monkeypatch):
    """Parameter counts do not depend on values: skip the (slow, CPU-bound) random initialisation."""
    for name in ("uniform_", "normal_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_"):
        monkeypatch.setattr(torch.nn.init, name, lambda t, *args, **kwargs: t)


def _size_counts(size: str) -> tuple[int, int, int, int]:
    try:
        with torch.device("meta"):
            return _counts(omnimae_pretrain(size))
    except NotImplementedError:  # code that reads values during construction cannot run on meta
        pass
    s = SIZES[size]
    # shallow builds: total(depth) = total(1) + (depth - 1) * (total(2) - total(1)), per stack
    one = _counts(omnimae_pretrain(size, depth=1, decoder_depth=1))
    two = _counts(omnimae_pretrain(size, depth=2, decoder_depth=2))
    enc_block = two[0] - one[0]
    dec_block = two[1] - one[1]
    enc_keys = 12  # norm1, qkv, proj, norm2, fc1, fc2: weight + bias each
    dec_keys = 11  # no qkv bias in the decoder
    assert two[3] - one[3] == enc_keys + dec_keys
    return (
        one[0] + (s.depth - 1) * enc_block,
        one[1] + (s.decoder_depth - 1) * dec_block,
        one[2],
        one[3] + (s.depth - 1) * enc_keys + (s.decoder_depth - 1) * dec_keys,
    )


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_parameter_and_key_counts(size, no_init):
    enc, dec, head, keys = _size_counts(size)
    exp_enc, exp_dec, exp_head, exp_keys = PARAMS[size]
    assert round(enc / 1e6, 2) == exp_enc
    assert round(dec / 1e6, 2) == exp_dec
    assert round(head / 1e6, 2) == exp_head
    assert keys == exp_keys


def test_base_counts_on_a_real_build(no_init):
    """One full build, so the extrapolation above is checked against the real thing once."""
    model = omnimae_pretrain("base")
    assert _counts(model) == (86_237_184, 7_389_312, 591_360, 201)


def test_models_build_on_the_meta_device():
    """Nothing reads tensor values during construction, so sizes can be checked without memory or time."""
    with torch.device("meta"):
        model = omnimae_pretrain("large")
        clf = omnimae_classifier("large")
    assert model.encoder.blocks[0].attn.qkv.weight.is_meta
    assert len(clf.encoder.blocks) == 24


def test_pos_embed_is_a_buffer_not_a_parameter():
    model = omnimae_pretrain("tiny", **NARROW)
    names = {n for n, _ in model.named_parameters()}
    assert "encoder.pos_embed" not in names and "decoder.pos_embed" not in names
    sd = model.state_dict()
    assert "encoder.pos_embed" in sd and "decoder.pos_embed" in sd
    assert not model.encoder.pos_embed.requires_grad
