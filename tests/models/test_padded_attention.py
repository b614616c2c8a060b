"""Decoder attention padded to a larger head size: the same outputs, gradients, parameters and state dict."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Attention, Block

from omnimae_pl.errors import ConfigError
from omnimae_pl.masking import make_mask, token_grid
from omnimae_pl.models import omnimae_pretrain
from omnimae_pl.models.padded_attention import PaddedHeadAttention, pad_attention_heads

# decoder of width 48 with 2 heads: head size 24, as ViT-B's released decoder (384 / 16)
TINY = dict(img_size=16, num_frames=4, patch_size=(2, 4, 4), embed_dim=32, depth=1, num_heads=2,
            decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=2)


def _model(pad: int | None):
    torch.manual_seed(0)
    return omnimae_pretrain("tiny", decoder_attn_head_pad_to=pad, **TINY).double()


def _batch(modality: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 16, 16) if modality == "image" else (3, 4, 16, 16)
    x = torch.randn((2, *shape), generator=g, dtype=torch.float64)
    grid = token_grid(shape, (2, 4, 4))
    mask = torch.stack([make_mask(grid, 0.75, "random", g) for _ in range(2)])
    return x, mask


def _loss_and_grads(model, x, mask):
    model.zero_grad()
    loss = model.forward_loss(x, model(x, mask), mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("pad", [32, 64])
@pytest.mark.parametrize("modality", ["image", "video"])
def test_outputs_and_gradients_equal_the_unpadded_decoder(modality, pad):
    plain, padded = _model(None), _model(pad)
    assert all(isinstance(b.attn, PaddedHeadAttention) for b in padded.decoder.blocks)
    assert type(plain.decoder.blocks[0].attn) is Attention
    x, mask = _batch(modality)
    with torch.no_grad():
        torch.testing.assert_close(padded(x, mask), plain(x, mask), rtol=0, atol=1e-10)
    loss, grads = _loss_and_grads(plain, x, mask)
    padded_loss, padded_grads = _loss_and_grads(padded, x, mask)
    torch.testing.assert_close(padded_loss, loss, rtol=0, atol=1e-12)
    assert padded_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(padded_grads[name], g, rtol=1e-6, atol=1e-10, msg=name)


def test_float32_outputs_within_1e6():
    plain, padded = _model(None).float(), _model(64).float()
    x, mask = _batch("video")
    with torch.no_grad():
        torch.testing.assert_close(padded(x.float(), mask), plain(x.float(), mask), rtol=0, atol=1e-6)


def test_state_dicts_are_the_same_and_load_into_each_other():
    plain, padded = _model(None), _model(64)
    assert list(padded.state_dict()) == list(plain.state_dict())
    for (name, a), b in zip(plain.state_dict().items(), padded.state_dict().values()):
        assert torch.equal(a, b), name  # the same init: padding builds no new parameters
    torch.manual_seed(5)
    trained = _model(None)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, mask = _batch("image")
    padded.load_state_dict(trained.state_dict(), strict=True)
    back = _model(None)
    back.load_state_dict(padded.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(padded(x, mask), trained(x, mask), rtol=0, atol=1e-10)
        torch.testing.assert_close(back(x, mask), trained(x, mask), rtol=0, atol=0)


def test_padding_keeps_the_blocks_parameters_and_the_block_class():
    torch.manual_seed(0)
    block = Block(48, 2, qkv_bias=False)
    params = list(block.parameters())
    pad_attention_heads([block], 32)
    assert isinstance(block, Block) and isinstance(block.attn, PaddedHeadAttention)  # FSDP1 wraps Block
    assert all(a is b for a, b in zip(block.parameters(), params))
    assert "head_pad_to=32" in repr(block.attn)
    pad_attention_heads([block], None)
    unchanged = Block(64, 2)  # head size 32 already
    pad_attention_heads([unchanged], 32)
    assert type(unchanged.attn) is Attention


def test_padded_attention_with_an_attention_mask():
    torch.manual_seed(0)
    attn = Attention(48, 2).double()
    x = torch.randn(2, 5, 48, dtype=torch.float64)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 24).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1) / 24**0.5).masked_fill(~causal, float("-inf"))
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 48))
    out = PaddedHeadAttention(attn, 64)(x, attn_mask=causal)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="q_norm"):
        PaddedHeadAttention(Attention(48, 2, qk_norm=True, norm_layer=torch.nn.LayerNorm), 32)
    with pytest.raises(ValueError, match="below the head size 24"):
        PaddedHeadAttention(Attention(48, 2), 16)
    with pytest.raises(ConfigError, match="decoder_attn_head_pad_to"):
        omnimae_pretrain("tiny", decoder_attn_head_pad_to=16, **TINY)
