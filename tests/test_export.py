"""export_timm: our encoder (and head) as timm's image VisionTransformer, loaded strictly, same outputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from omnimae_pl.export import export_timm, load_timm, main
from omnimae_pl.models import omnimae_classifier, omnimae_pretrain

TINY = dict(embed_dim=64, depth=2, num_heads=2)


def _perturb(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _classifier(num_classes=5, img_size=32, patch=(2, 16, 16), num_frames=4):
    torch.manual_seed(0)
    model = omnimae_classifier("tiny", num_classes, img_size=img_size, num_frames=num_frames, patch_size=patch, **TINY)
    return _perturb(model)


def _lightning_ckpt(model, path, **hparams):
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hparams}, path)
    return path


def test_finetuned_checkpoint_round_trip(tmp_path, capsys):
    ours = _classifier()
    src = _lightning_ckpt(ours, tmp_path / "ft.ckpt", size="tiny", model_overrides=TINY, img_size=32, num_frames=4)
    kwargs = export_timm(src, tmp_path / "timm.pth")
    assert "fc_norm: copied" in capsys.readouterr().out
    assert kwargs["num_classes"] == 5 and kwargs["class_token"] is False and kwargs["global_pool"] == "avg"
    model = VisionTransformer(**kwargs)
    model.load_state_dict(torch.load(tmp_path / "timm.pth", weights_only=True), strict=True)
    model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True),
                              ours.forward_features(x), atol=1e-5)
        assert torch.allclose(model(x), ours(x), atol=1e-5)


def test_pretraining_source_gives_the_encoder_and_a_fresh_fc_norm(tmp_path, capsys):
    torch.manual_seed(0)
    pre = _perturb(omnimae_pretrain("tiny", img_size=32, num_frames=4, decoder_embed_dim=32, decoder_depth=1,
                                    decoder_num_heads=2, **TINY))
    src = _lightning_ckpt(pre, tmp_path / "pre.ckpt", size="tiny", model_overrides=TINY, img_size=32, num_frames=4)
    kwargs = export_timm(src, tmp_path / "timm.pth")
    report = capsys.readouterr().out
    assert "fresh" in report and "left" in report
    assert kwargs["num_classes"] == 0
    model = load_timm(tmp_path / "timm.pth", **kwargs)
    x = torch.randn(2, 3, 32, 32)
    pre.encoder.norm = torch.nn.Identity()  # the classifier pools the un-normed tokens
    with torch.no_grad():
        expected = torch.nn.functional.layer_norm(pre.encoder.forward_features(x).mean(1), (64,), eps=1e-6)
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_other_image_size_matches_our_interpolated_positions(tmp_path):
    ours = _classifier(img_size=32, patch=(2, 8, 8))
    kwargs = export_timm(ours, tmp_path / "timm.pth", img_size=48, verbose=False)
    assert kwargs["patch_size"] == 8 and kwargs["img_size"] == 48
    model = load_timm(tmp_path / "timm.pth", **kwargs)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), atol=1e-5)


def test_released_file_and_command_line(tmp_path, capsys):
    ours = _classifier(num_classes=7, img_size=64, num_frames=16)  # the layout is read from the table: 8 x 4 x 4
    official = {}
    for key, value in ours.state_dict().items():
        key = key.replace("encoder.patch_embed.proj.", "trunk.patch_embed.proj.1.").replace("encoder.", "trunk.")
        official[key.replace("fc_norm.", "trunk.norm.")] = value
    torch.save(official, tmp_path / "vit_ft.torch")
    kwargs = main([str(tmp_path / "vit_ft.torch"), str(tmp_path / "out" / "timm.pth"), "--num-heads", "2"])
    assert "VisionTransformer(" in capsys.readouterr().out
    assert kwargs["img_size"] == 64
    model = load_timm(tmp_path / "out" / "timm.pth", **kwargs)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), ours(x), atol=1e-5)


def test_format_hub_writes_a_folder_and_timm_stays_the_default(tmp_path, capsys):
    ours = _classifier()
    src = _lightning_ckpt(ours, tmp_path / "ft.ckpt", size="tiny", model_overrides=TINY, img_size=32, num_frames=4)
    timm_kwargs = main([str(src), str(tmp_path / "timm.pth")])
    assert (tmp_path / "timm.pth").is_file() and timm_kwargs["num_classes"] == 5
    config = main([str(src), str(tmp_path / "hub"), "--format", "hub", "--img-size", "48"])
    assert "export_hub" in capsys.readouterr().out
    assert config["model"]["head"]["num_classes"] == 5 and config["timm"]["model_args"]["img_size"] == 48
    from_folder = VisionTransformer(**config["timm"]["model_args"])
    from_folder.load_state_dict(load_file(tmp_path / "hub" / "timm" / "model.safetensors"), strict=True)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():  # the folder's timm part is the timm export at 48 px, from the same conversion
        exported = export_timm(src, tmp_path / "timm48.pth", img_size=48, verbose=False)
        assert exported == config["timm"]["model_args"]
        assert torch.equal(from_folder.eval()(x), load_timm(tmp_path / "timm48.pth", **exported)(x))
    with pytest.raises(SystemExit):
        main([str(src), str(tmp_path / "hub2"), "--format", "hub", "--num-heads", "2"])
    assert "--num-heads is for --format timm" in capsys.readouterr().err
