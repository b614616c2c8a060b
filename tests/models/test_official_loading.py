"""load_official: state dicts in the released key layout, written here from our own models.

``to_official`` is written independently of ``omnimae_pl.models.official``: it maps our keys onto the
official names and shapes of the released files, and fails on any key of ours that has no official counterpart.
"""

from __future__ import annotations

import pathlib
import re

import pytest
import torch

from omnimae_pl.models import OmniMAE, OmniViTClassifier, load_official, omnimae_classifier, omnimae_pretrain
from omnimae_pl.models.checkpoints import CheckpointError
from omnimae_pl.models.official import infer_official_size

_BLOCK = r"(norm1\.(weight|bias)|attn\.qkv\.(weight|bias)|attn\.proj\.(weight|bias)|norm2\.(weight|bias)|mlp\.fc[12]\.(weight|bias))"
_DEC_BLOCK = r"(norm1\.(weight|bias)|attn\.qkv\.weight|attn\.proj\.(weight|bias)|norm2\.(weight|bias)|mlp\.fc[12]\.(weight|bias))"
_COMMON = [
    (r"encoder\.patch_embed\.proj\.(weight|bias)", r"trunk.patch_embed.proj.1.\1"),
    (r"encoder\.pos_embed", "trunk.pos_embed"),
    (rf"encoder\.blocks\.(\d+)\.{_BLOCK}", r"trunk.blocks.\1.\2"),
]
_PRETRAIN = _COMMON + [
    (r"encoder\.norm\.(weight|bias)", r"trunk.norm.\1"),
    (r"decoder\.mask_token", "trunk.mask_token"),
    (r"decoder\.pos_embed", "trunk.decoder.pos_embed"),
    (r"decoder\.decoder_embed\.(weight|bias)", r"trunk.decoder.decoder_embed.\1"),
    (rf"decoder\.blocks\.(\d+)\.{_DEC_BLOCK}", r"trunk.decoder.decoder_blocks.\1.\2"),
    (r"decoder\.norm\.(weight|bias)", r"trunk.decoder.norm.\1"),
    (r"decoder\.pred\.(weight|bias)", r"head.\1"),
]
_FINETUNE = _COMMON + [
    (r"fc_norm\.(weight|bias)", r"trunk.norm.\1"),  # post-pool norm in the released fine-tuned files
    (r"head\.(weight|bias)", r"head.\1"),
]


def to_official(model, clone: bool = True) -> dict[str, torch.Tensor]:
    rules = _PRETRAIN if isinstance(model, OmniMAE) else _FINETUNE
    out = {}
    for key, value in model.state_dict().items():
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value.detach().clone() if clone else value
                break
        else:
            raise AssertionError(f"{key} has no counterpart in the official layout")
    assert len(out) == len(model.state_dict())
    return out


def _perturb(model):
    """Random values everywhere (norms, mask token, biases) so a wrong mapping cannot go unnoticed."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _pretrain(**kw):
    torch.manual_seed(0)
    args = dict(
        img_size=12, num_frames=4, patch_size=(2, 4, 4), embed_dim=64, depth=2, num_heads=1,
        decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=16,
    )
    args.update(kw)
    return _perturb(omnimae_pretrain("tiny", **args))


def _classifier(num_classes=7, **kw):
    torch.manual_seed(0)
    args = dict(img_size=12, num_frames=4, patch_size=(2, 4, 4), embed_dim=64, depth=2, num_heads=1)
    args.update(kw)
    return _perturb(omnimae_classifier("tiny", num_classes, **args))


def _inputs(model, batch=2):
    t, h, w = model.encoder.grid
    pt, ph, pw = model.encoder.patch_size
    g = torch.Generator().manual_seed(0)
    image = torch.randn(batch, 3, h * ph, w * pw, generator=g)
    video = torch.randn(batch, 3, t * pt, h * ph, w * pw, generator=g)
    return (image, (1, h, w)), (video, (t, h, w))


def _mask(grid, batch=2, ratio=0.75):
    n = grid[0] * grid[1] * grid[2]
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randperm(n, generator=g) < int(ratio * n) for _ in range(batch)])


def _assert_same_pretrain(src, loaded):
    assert isinstance(loaded, OmniMAE) and not loaded.training
    got = loaded.state_dict()
    assert got.keys() == src.state_dict().keys()
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k
    with torch.no_grad():
        for x, grid in _inputs(src):
            m = _mask(grid)
            assert torch.equal(loaded(x, m), src(x, m))


def _assert_same_classifier(src, loaded):
    assert isinstance(loaded, OmniViTClassifier) and not loaded.training
    assert loaded.num_classes == src.num_classes
    got = loaded.state_dict()
    for k, v in src.state_dict().items():
        assert torch.equal(got[k], v), k
    with torch.no_grad():
        for x, _ in _inputs(src):
            assert torch.equal(loaded(x), src(x))


# ---------------------------------------------------------------- the official layout itself

def test_official_layout_names_and_shapes():
    src = _pretrain()
    sd = to_official(src)
    d, dd, n = 64, 32, 18
    assert sd["trunk.patch_embed.proj.1.weight"].shape == (d, 3, 2, 4, 4)
    assert sd["trunk.patch_embed.proj.1.bias"].shape == (d,)
    assert sd["trunk.pos_embed"].shape == (1, n, d)
    assert sd["trunk.mask_token"].shape == (1, d)
    assert sd["trunk.decoder.pos_embed"].shape == (1, n, d)  # encoder width
    assert sd["trunk.decoder.decoder_embed.weight"].shape == (dd, d)
    assert sd["trunk.blocks.1.attn.qkv.weight"].shape == (3 * d, d)
    assert "trunk.blocks.1.attn.qkv.bias" in sd
    assert "trunk.decoder.decoder_blocks.1.attn.qkv.weight" in sd
    assert "trunk.decoder.decoder_blocks.1.attn.qkv.bias" not in sd
    assert sd["head.weight"].shape == (2 * 4 * 4 * 3, dd)
    assert sd["trunk.norm.weight"].shape == (d,)
    ft = to_official(_classifier())
    assert ft["trunk.norm.weight"].shape == (d,) and ft["head.weight"].shape == (7, d)
    assert not any(k.startswith(("trunk.decoder", "trunk.mask_token")) for k in ft)


# ---------------------------------------------------------------- round trips

def test_pretrain_round_trip_from_file(tmp_path):
    src = _pretrain()
    path = tmp_path / "vitt_pretrain.torch"
    torch.save(to_official(src), path)
    _assert_same_pretrain(src, load_official(path))
    _assert_same_pretrain(src, load_official(str(path)))


def test_finetune_round_trip_from_file(tmp_path):
    src = _classifier(num_classes=7)
    path = tmp_path / "vitt_in1k_ft.torch"
    torch.save(to_official(src), path)
    loaded = load_official(path)
    _assert_same_classifier(src, loaded)
    # the released post-pool norm lands in fc_norm
    assert torch.equal(loaded.fc_norm.weight, src.fc_norm.weight)


def test_load_from_a_state_dict_in_memory():
    src = _classifier(num_classes=3)
    _assert_same_classifier(src, load_official(to_official(src)))


# ---------------------------------------------------------------- size inference

@pytest.mark.parametrize(
    ("kw", "grid", "frames", "img"),
    [
        # 16 frames: 8 x 4 x 4 rows
        (dict(img_size=16, num_frames=16, embed_dim=128, num_heads=2, depth=3, decoder_embed_dim=32,
              decoder_depth=1, decoder_num_heads=16), (8, 4, 4), 16, 16),
        # a ViT-H-like tiny: patch 14, 4 frames of 42 x 42 -> 2 x 3 x 3 = 18 rows
        (dict(img_size=42, num_frames=4, patch_size=(2, 14, 14), embed_dim=128, num_heads=2, depth=1,
              decoder_embed_dim=48, decoder_depth=3, decoder_num_heads=16), (2, 3, 3), 4, 42),
    ],
)
def test_size_inference(tmp_path, kw, grid, frames, img):
    src = _pretrain(**kw)
    path = tmp_path / "ckpt.torch"
    torch.save(to_official(src), path)
    loaded = load_official(path)
    enc, dec = loaded.encoder, loaded.decoder
    assert enc.grid == grid == src.encoder.grid
    assert enc.patch_size == src.encoder.patch_size
    assert enc.embed_dim == kw["embed_dim"] and len(enc.blocks) == kw["depth"]
    assert enc.blocks[0].attn.num_heads == kw["num_heads"]
    assert dec.decoder_embed.out_features == kw["decoder_embed_dim"] and len(dec.blocks) == kw["decoder_depth"]
    assert dec.blocks[0].attn.num_heads == 16
    assert dec.pred.out_features == 3 * src.encoder.patch_size[0] * src.encoder.patch_size[1] * src.encoder.patch_size[2]
    size, num_frames, img_size, is_pretrain = infer_official_size(torch.load(path, weights_only=True))
    assert (num_frames, img_size, is_pretrain) == (frames, img, True)
    assert size.patch_size == src.encoder.patch_size
    _assert_same_pretrain(src, loaded)


def test_finetune_size_inference_patch14(tmp_path):
    src = _classifier(num_classes=11, img_size=28, num_frames=16, patch_size=(2, 14, 14), embed_dim=128, num_heads=2, depth=2)
    path = tmp_path / "ft.torch"
    torch.save(to_official(src), path)
    loaded = load_official(path)
    assert loaded.encoder.grid == (8, 2, 2) and loaded.encoder.patch_size == (2, 14, 14)
    _assert_same_classifier(src, loaded)


@pytest.fixture
def no_init(monkeypatch):
    """Building ViT-B twice on 2 CPU cores: skip the random init (values are not compared here)."""
    for name in ("uniform_", "normal_", "kaiming_uniform_", "xavier_uniform_", "trunc_normal_"):
        monkeypatch.setattr(torch.nn.init, name, lambda t, *args, **kwargs: t)


def test_base_size_inference(no_init):
    src = omnimae_pretrain("base")
    sd = to_official(src, clone=False)
    assert len(sd) == 201
    assert sd["trunk.pos_embed"].shape == (1, 1568, 768)
    loaded = load_official(sd)
    assert isinstance(loaded, OmniMAE)
    enc, dec = loaded.encoder, loaded.decoder
    assert (enc.embed_dim, len(enc.blocks), enc.blocks[0].attn.num_heads) == (768, 12, 12)
    assert (dec.decoder_embed.out_features, len(dec.blocks), dec.blocks[0].attn.num_heads) == (384, 4, 16)
    assert enc.grid == (8, 14, 14) and enc.patch_size == (2, 16, 16)
    assert dec.pred.out_features == 1536
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in src.state_dict().items() if "pos_embed" in k)
    assert loaded.state_dict().keys() == src.state_dict().keys()


# ---------------------------------------------------------------- trainer checkpoints

@pytest.mark.parametrize("head_prefix", ["heads.0.projector."])
def test_trainer_pretrain_checkpoint(tmp_path, head_prefix):
    src = _pretrain()
    model = {(head_prefix + k[5:] if k.startswith("head.") else k): v for k, v in to_official(src).items()}
    assert f"{head_prefix}weight" in model
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model, "optimizer": {"state": {}}, "epoch": 3, "loss": {}, "steps": {"train": 10}}, path)
    _assert_same_pretrain(src, load_official(path))


@pytest.mark.parametrize("head_prefix", ["heads.0.", "heads.0.0."])
def test_trainer_finetune_checkpoint(tmp_path, head_prefix):
    src = _classifier(num_classes=5)
    model = {(head_prefix + k[5:] if k.startswith("head.") else k): v for k, v in to_official(src).items()}
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": model, "epoch": 1}, path)
    _assert_same_classifier(src, load_official(path))


# ---------------------------------------------------------------- refusals

def test_foreign_checkpoint_gives_one_error_listing_keys(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    path = tmp_path / "timm_vit.pth"
    torch.save(vit.state_dict(), path)
    with pytest.raises(ValueError) as err:
        load_official(path)
    msg = str(err.value)
    assert "missing" in msg and "unexpected" in msg
    assert "trunk.patch_embed.proj.1.weight" in msg  # a missing official key
    unexpected = msg.split("unexpected keys:")[1]
    assert "blocks.0.attn.qkv.weight" in unexpected  # foreign keys are listed
    assert f"({len(vit.state_dict()) - 2} in all)" in unexpected  # all but head.weight/bias, counted


def test_partly_wrong_checkpoint_lists_missing_and_unexpected(tmp_path):
    sd = to_official(_pretrain())
    del sd["trunk.blocks.1.mlp.fc2.bias"]
    sd["trunk.decoder.decoder_blocks.0.attn.qkv.bias"] = torch.zeros(96)  # the public yaml's decoder bias
    path = tmp_path / "bad.torch"
    torch.save(sd, path)
    with pytest.raises(ValueError) as err:
        load_official(path)
    msg = str(err.value)
    assert "missing" in msg and "unexpected" in msg
    assert "fc2.bias" in msg and "qkv.bias" in msg


def test_non_sinusoid_positions_are_refused():
    sd = to_official(_pretrain())
    sd["trunk.pos_embed"] = torch.randn_like(sd["trunk.pos_embed"])
    with pytest.raises(ValueError, match="pos_embed"):
        load_official(sd)


class _Payload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_objects_are_refused(tmp_path):
    marker = tmp_path / "executed"
    sd = to_official(_pretrain())
    sd["payload"] = _Payload(marker)
    path = tmp_path / "evil.torch"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="refused: it holds Python objects other than tensors"):
        load_official(path)
    assert not marker.exists()
