"""Encoder on visible tokens only, decoder layout and order."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from omnimae_pl.models import omnimae_classifier, omnimae_pretrain
from omnimae_pl.models.tokens import flatten_mask, gather_tokens, scatter_tokens, visible_indices

PATCH = (2, 4, 4)
D_ENC, D_DEC = 32, 24


def _tiny(**kw):
    torch.manual_seed(0)
    args = dict(
        img_size=16, num_frames=4, patch_size=PATCH, embed_dim=D_ENC, depth=2, num_heads=2,
        decoder_embed_dim=D_DEC, decoder_depth=1, decoder_num_heads=2,
    )
    args.update(kw)
    model = omnimae_pretrain("tiny", **args).eval()
    with torch.no_grad():  # non-trivial mask token, norms and biases, so nothing cancels by accident
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _masks(batch: int, n: int, n_masked: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g) < n_masked for _ in range(batch)])


def _token_region(x: torch.Tensor, token: int, grid, patch=PATCH):
    """Index tuple of the pixels of one token (for a 4-D image the token covers the whole image patch)."""
    _, gh, gw = grid
    t, rem = divmod(token, gh * gw)
    h, w = divmod(rem, gw)
    pt, ph, pw = patch
    sp = (slice(h * ph, (h + 1) * ph), slice(w * pw, (w + 1) * pw))
    if x.ndim == 4:
        return (slice(None), slice(None), *sp)
    return (slice(None), slice(None), slice(t * pt, (t + 1) * pt), *sp)


@pytest.fixture(scope="module")
def model():
    return _tiny()


CASES = [("image", (2, 3, 16, 16), (1, 4, 4)), ("video", (2, 3, 4, 16, 16), (2, 4, 4))]


# ---------------------------------------------------------------- encoder never sees masked patches

@pytest.mark.parametrize(("kind", "shape", "grid"), CASES)
def test_masked_pixels_do_not_reach_the_encoder(model, kind, shape, grid):
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(shape)
    mask = _masks(shape[0], n, int(0.75 * n))
    with torch.no_grad():
        latent = model.encoder(x, mask)
        pred = model(x, mask)
        assert latent.shape == (shape[0], n - int(0.75 * n), D_ENC)

        # overwrite every masked patch of sample 0 and one of sample 1 with garbage
        x2 = x.clone()
        for tok in mask[0].nonzero().flatten().tolist():
            x2[(0, *_token_region(x, tok, grid)[1:])] = 1e3 * torch.randn_like(x2[(0, *_token_region(x, tok, grid)[1:])])
        tok1 = mask[1].nonzero()[0, 0].item()
        x2[(1, *_token_region(x, tok1, grid)[1:])] = -50.0
        torch.testing.assert_close(model.encoder(x2, mask), latent, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x2, mask), pred, atol=1e-6, rtol=0)  # nor the decoder

        # a visible patch does change the output
        x3 = x.clone()
        vis = (~mask[0]).nonzero()[0, 0].item()
        x3[(0, *_token_region(x, vis, grid)[1:])] += 1.0
        assert not torch.allclose(model.encoder(x3, mask)[0], latent[0], atol=1e-4)
        torch.testing.assert_close(model.encoder(x3, mask)[1], latent[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("kind", "shape", "grid"), CASES)
def test_visible_tokens_keep_raster_order(model, kind, shape, grid):
    """Reference: the official boolean gather tokens[~mask] (raster order), then blocks and norm."""
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(shape)
    mask = _masks(shape[0], n, n // 2, seed=3)
    enc = model.encoder
    with torch.no_grad():
        tokens = enc.prepare_tokens(x)
        vis = tokens[~mask].view(shape[0], -1, D_ENC)
        for blk in enc.blocks:
            vis = blk(vis)
        ref = enc.norm(vis)
        torch.testing.assert_close(enc(x, mask), ref, atol=1e-5, rtol=1e-5)
        # grid-shaped masks are the same thing
        torch.testing.assert_close(enc(x, mask.view(shape[0], *grid)), ref, atol=1e-5, rtol=1e-5)
        latent, ids = model.forward_encoder(x, mask)
        assert torch.equal(ids, torch.stack([(~m).nonzero().flatten() for m in mask]))
        assert torch.all(ids[:, 1:] > ids[:, :-1])


def test_no_mask_means_all_tokens(model):
    x = torch.randn(2, 3, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), model.encoder(x, torch.zeros(2, 32, dtype=torch.bool)))


def test_unequal_mask_counts_are_refused(model):
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, :6] = True
    with pytest.raises(ValueError, match="same number"):
        model.encoder(torch.randn(2, 3, 4, 16, 16), mask)


def test_token_helpers():
    mask = torch.tensor([[False, True, False, True, False], [True, True, False, False, False]])
    ids = visible_indices(mask)
    assert ids.tolist() == [[0, 2, 4], [2, 3, 4]]
    x = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)
    vis = gather_tokens(x, ids)
    assert torch.equal(vis, torch.stack([x[0, [0, 2, 4]], x[1, [2, 3, 4]]]))
    fill = torch.tensor([[-1.0, -2.0]])
    full = scatter_tokens(vis, ids, fill, 5)
    assert torch.equal(full[~mask], x[~mask])
    assert torch.equal(full[mask], fill.expand(int(mask.sum()), 2))
    assert flatten_mask(mask.view(2, 1, 1, 5)).shape == (2, 5)


# ---------------------------------------------------------------- decoder layout

def test_decoder_widths_and_biases():
    model = omnimae_pretrain(
        "tiny", img_size=16, num_frames=4, patch_size=PATCH, embed_dim=D_ENC, depth=2, num_heads=2,
        decoder_embed_dim=D_DEC, decoder_depth=2, decoder_num_heads=2,
    )
    dec, enc = model.decoder, model.encoder
    assert dec.mask_token.shape == (1, D_ENC)  # encoder width, 2-D as in the checkpoints
    assert torch.equal(dec.mask_token, torch.zeros(1, D_ENC))  # zeros ("following iBOT")
    assert dec.pos_embed.shape == (1, 32, D_ENC)
    assert torch.equal(dec.pos_embed, enc.pos_embed)
    assert isinstance(dec.decoder_embed, nn.Linear)
    assert (dec.decoder_embed.in_features, dec.decoder_embed.out_features) == (D_ENC, D_DEC)
    assert dec.decoder_embed.bias is not None
    for blk in dec.blocks:
        assert blk.attn.qkv.bias is None
        assert blk.attn.qkv.weight.shape == (3 * D_DEC, D_DEC)
    for blk in enc.blocks:
        assert blk.attn.qkv.bias is not None
    assert dec.norm.eps == 1e-6 and enc.norm.eps == 1e-6
    assert enc.blocks[0].norm1.eps == 1e-6
    assert isinstance(enc.blocks[0].mlp.act, nn.GELU) and enc.blocks[0].mlp.act.approximate == "none"
    assert dec.pred.weight.shape == (2 * 4 * 4 * 3, D_DEC)
    # init: xavier linears with zero bias, unit LayerNorms, pixel head std 0.02 with zero bias
    assert torch.equal(enc.blocks[0].attn.qkv.bias, torch.zeros(3 * D_ENC))
    assert torch.equal(dec.decoder_embed.bias, torch.zeros(D_DEC))
    assert torch.equal(dec.norm.weight, torch.ones(D_DEC))
    assert torch.equal(dec.pred.bias, torch.zeros(dec.pred.out_features))
    assert 0.015 < dec.pred.weight.std().item() < 0.025


@pytest.mark.parametrize(("kind", "shape", "grid"), CASES)
def test_pixel_head_predicts_every_token(model, kind, shape, grid):
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(shape)
    mask = _masks(shape[0], n, int(0.75 * n))
    with torch.no_grad():
        pred = model(x, mask)
    assert pred.shape == (shape[0], n, 96)
    assert torch.isfinite(pred).all()


@pytest.mark.parametrize(("kind", "shape", "grid"), CASES)
def test_mask_token_and_positions_are_added_before_decoder_embed(model, kind, shape, grid):
    """The input of decoder_embed: latent + PE at visible slots, mask_token + PE at masked slots."""
    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(shape)
    mask = _masks(shape[0], n, int(0.75 * n), seed=1)
    seen = {}
    handle = model.decoder.decoder_embed.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    try:
        with torch.no_grad():
            latent, ids = model.forward_encoder(x, mask)
            model.forward_decoder(latent, ids, x)
    finally:
        handle.remove()
    got = seen["x"]
    assert got.shape == (shape[0], n, D_ENC)
    pe = model.decoder.pos_embed[0, :n]  # first time slice for images
    expected = model.decoder.mask_token.expand(shape[0], n, D_ENC) + pe
    expected = expected.clone()
    expected[~mask] = (latent + pe[ids]).reshape(-1, D_ENC)
    torch.testing.assert_close(got, expected)


def test_decoder_depends_on_masked_positions_only_through_pe(model):
    """Masked slots hold the same token; only their positions tell them apart."""
    x = torch.randn(1, 3, 4, 16, 16)
    mask = _masks(1, 32, 24, seed=2)
    with torch.no_grad():
        saved = model.decoder.pos_embed.clone()
        try:
            model.decoder.pos_embed.zero_()
            pred = model(x, mask)
        finally:
            model.decoder.pos_embed.copy_(saved)
    masked = pred[0, mask[0]]
    assert torch.allclose(masked, masked[:1].expand_as(masked), atol=1e-5)


# ---------------------------------------------------------------- classifier

def test_classifier_pools_then_norms():
    torch.manual_seed(0)
    clf = omnimae_classifier(
        "tiny", num_classes=5, img_size=16, num_frames=4, patch_size=PATCH, embed_dim=D_ENC, depth=3, num_heads=2
    ).eval()
    assert isinstance(clf.encoder.norm, nn.Identity)
    assert [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in clf.encoder.blocks] == (
        pytest.approx([0.0, 0.05, 0.1])
    )
    assert clf.head.weight.std().item() < 1e-4  # trunc_normal std 2e-5
    with torch.no_grad():
        for p in clf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for x in (torch.randn(2, 3, 16, 16), torch.randn(2, 3, 4, 16, 16)):
            tokens = clf.encoder.prepare_tokens(x)
            for blk in clf.encoder.blocks:
                tokens = blk(tokens)
            ref = clf.head(clf.fc_norm(tokens.mean(dim=1)))
            out = clf(x)
            assert out.shape == (2, 5)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
