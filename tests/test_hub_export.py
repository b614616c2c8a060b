"""The hub folder (``omnimae-cli export --format hub``) of a real tiny pretraining run: the same model back, bit
for bit, from safetensors alone; config.json and the model card; timm's three ways in; refused folders."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import timm
import torch
import yaml
from cli_helpers import DEMO, cli, run_config
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

import omnimae_pl
from omnimae_pl.cli import main as cli_main
from omnimae_pl.data.datamodule import ClassificationDataModule
from omnimae_pl.data.sources import SourceConfig
from omnimae_pl.errors import EXIT_USER_ERROR, UserError
from omnimae_pl.export import export_hub, export_timm, timm_state_dict
from omnimae_pl.models import OmniMAE, OmniViTClassifier, omnimae_classifier, omnimae_pretrain
from omnimae_pl.models.checkpoints import CheckpointError, load_pretrain_model, read_weights
from omnimae_pl.models.hub import HubFolderError, load_pretrained
from omnimae_pl.tasks.finetune import OmniMAEFinetune

FILES = {"model.safetensors", "config.json", "README.md", "timm/model.safetensors", "timm/config.json"}


@pytest.fixture(scope="module")
def fitted(demo_root, tmp_path_factory) -> Path:
    """last.ckpt of 4 steps of configs/demo.yaml's pretraining (tiny, depth 2), validated at step 2."""
    out = tmp_path_factory.mktemp("fit")
    cli("fit", "--config", DEMO, "--config", str(run_config(demo_root, out)))
    return out / "ckpt" / "last.ckpt"


@pytest.fixture(scope="module")
def hub(fitted, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "omnimae-tiny"
    export_hub(fitted, out, verbose=False)
    return out


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def _masks(generator: torch.Generator, n_tokens: int, n_masked: int, batch: int = 2) -> torch.Tensor:
    order = torch.rand(batch, n_tokens, generator=generator).argsort(dim=1)
    return order < n_masked  # n_masked True per row


def test_pretraining_model_comes_back_bit_for_bit_without_torch_load(fitted, hub, monkeypatch):
    assert _files(hub) == FILES
    reference = load_pretrain_model(fitted)

    def no_torch_load(*args, **kwargs):
        raise AssertionError("load_pretrained called torch.load")

    monkeypatch.setattr(torch, "load", no_torch_load)
    model = load_pretrained(hub)
    assert isinstance(model, OmniMAE) and not model.training
    assert model.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    g = torch.Generator().manual_seed(0)
    image, video = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 4, 32, 32, generator=g)
    with torch.no_grad():
        for x, mask in ((image, _masks(g, 16, 12)), (video, _masks(g, 32, 28))):
            assert torch.equal(model(x, mask), reference(x, mask))
    # reconstruct reads the folder through load_pretrain_model, still without torch.load
    assert torch.equal(load_pretrain_model(hub).decoder.pred.weight, reference.decoder.pred.weight)


def test_config_json_records_the_architecture_the_training_and_the_figures(fitted, hub):
    config = json.loads((hub / "config.json").read_text())
    saved = torch.load(fitted, weights_only=True)  # the checkpoint stays weights_only-loadable with its record
    assert config["library_version"] == omnimae_pl.__version__
    assert config["model"] == {
        "type": "OmniMAE",
        "encoder": {"img_size": 32, "num_frames": 4, "patch_size": [2, 8, 8], "in_chans": 3, "embed_dim": 192,
                    "depth": 2, "num_heads": 3, "mlp_ratio": 4.0, "qkv_bias": True, "drop_path_rate": 0.0,
                    "final_norm": True},
        "decoder": {"in_chans": 3, "embed_dim": 128, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0},
    }
    training = config["training"]
    assert training["global_step"] == saved["global_step"] == 4
    assert training["task"] == "omnimae_pl.tasks.pretrain.OmniMAEPretrain"
    assert [(s["name"], s["kind"], s["split"]) for s in training["sources"]] == [
        ("imagenet_demo", "imagenet", "train"), ("ssv2_demo", "ssv2", "train")]
    demo = yaml.safe_load(Path(DEMO).read_text())["data"]["init_args"]
    assert training["masking"] == {"image": demo["image_masking"], "video": demo["video_masking"]}
    assert training["global_batch"] == {"image": 8, "video": 8}
    assert training["hyper_parameters"]["model_overrides"] == {"depth": 2}
    # the figures of the validation at step 2, as plain floats in the checkpoint
    figures = {"val/loss_image", "val/loss_video", "val/loss_image_baseline", "val/probe_acc_video"}
    assert figures <= set(saved["metrics"])
    assert all(type(v) is float for v in saved["metrics"].values())
    assert config["metrics"] == saved["metrics"]
    assert 0.5 < config["metrics"]["val/loss_image"] < 2.0


def test_model_card_says_what_how_trained_figures_and_how_to_load(hub):
    card = (hub / "README.md").read_text()
    metrics = json.loads((hub / "config.json").read_text())["metrics"]
    assert card.startswith("---\nlibrary_name: omnimae-pl\n")
    for name in ("val/loss_image", "val/loss_video_baseline", "val/probe_acc_image"):
        assert f"| `{name}` | {metrics[name]:.4g} |" in card
    video = json.loads((hub / "config.json").read_text())["training"]["masking"]["video"]
    for text in ("pretrained (masked autoencoder: encoder and decoder)", "optimiser steps: 4", "`imagenet_demo`",
                 f"video masking: {video['mask_type']}, ratio {video['ratio']:g}",
                 "from omnimae_pl import load_pretrained",
                 "omnimae-cli reconstruct --checkpoint", 'timm.create_model("local-dir:', "pretrained_cfg_overlay"):
        assert text in card, text


def test_timm_loads_the_encoder_strictly_from_the_file_the_folder_and_the_overlay(fitted, hub, tmp_path):
    timm_info = json.loads((hub / "config.json").read_text())["timm"]
    kwargs = timm_info["model_args"]
    # the existing conversion, unchanged: the same tensors as the timm export of the checkpoint
    expected, expected_kwargs = timm_state_dict(read_weights(fitted), 32, 3)
    assert kwargs == expected_kwargs and kwargs["num_classes"] == 0
    state = load_file(hub / "timm" / "model.safetensors")
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    strict = VisionTransformer(**kwargs)
    strict.load_state_dict(state, strict=True)
    routes = {
        "local-dir": timm.create_model(f"local-dir:{hub / 'timm'}", pretrained=True),
        "overlay": timm.create_model(timm_info["architecture"], pretrained=True, **kwargs, pretrained_cfg_overlay=dict(
            file=str(hub / "timm" / "model.safetensors"), num_classes=kwargs["num_classes"])),
    }
    image = torch.randn(2, 3, 32, 32)
    model = load_pretrain_model(fitted)
    with torch.no_grad():
        out = strict.eval()(image)
        for name, route in routes.items():
            assert torch.equal(route.eval()(image), out), name
        model.encoder.norm = torch.nn.Identity()  # timm pools the un-normed tokens, then its (fresh) fc_norm
        assert torch.allclose(out, torch.nn.functional.layer_norm(model.encoder(image).mean(1), (192,), eps=1e-6),
                              atol=1e-5)
    # a hub folder is also a source of the timm format
    assert export_timm(hub, tmp_path / "timm.pth", verbose=False) == kwargs
    assert all(torch.equal(v, state[k]) for k, v in torch.load(tmp_path / "timm.pth", weights_only=True).items())


def test_finetuned_checkpoint_gives_encoder_and_head(tmp_path):
    torch.manual_seed(0)
    tiny = dict(embed_dim=64, depth=2, num_heads=2, patch_size=(2, 8, 8))
    ours = omnimae_classifier("tiny", 5, img_size=32, num_frames=4, head_drop=0.1, **tiny)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = tmp_path / "ft.ckpt"
    hparams = {"size": "tiny", "model_overrides": {k: v for k, v in tiny.items() if k != "patch_size"},
               "patch_size": (2, 8, 8), "num_classes": 5, "img_size": 32, "num_frames": 4, "head_drop": 0.1}
    torch.save({"state_dict": {f"model.{k}": v for k, v in ours.state_dict().items()}, "hyper_parameters": hparams,
                "global_step": 7, "metrics": {"val/acc1": 0.4, "val/acc5": 1.0}}, ckpt)
    config = export_hub(ckpt, tmp_path / "hub", verbose=False)
    assert config["model"]["head"] == {"num_classes": 5, "head_drop": 0.1}
    assert config["model"]["encoder"]["final_norm"] is False and config["model"]["encoder"]["drop_path_rate"] == 0.1
    model = load_pretrained(tmp_path / "hub")
    assert isinstance(model, OmniViTClassifier) and not model.training
    assert set(load_file(tmp_path / "hub" / "model.safetensors")) == set(ours.state_dict())  # no decoder
    x = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ours.eval()(x))
    timm_model = timm.create_model(f"local-dir:{tmp_path / 'hub' / 'timm'}", pretrained=True).eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(timm_model(image), ours(image), atol=1e-5)  # head and fc_norm copied
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "fine-tuned" in card and "| `val/acc1` | 0.4 | top-1 accuracy |" in card
    with pytest.raises(CheckpointError, match="fine-tuned model: it has no decoder"):
        load_pretrain_model(tmp_path / "hub")


def test_a_model_in_memory_and_a_bare_state_dict(tmp_path):
    model = omnimae_classifier("tiny", 3, img_size=32, num_frames=4, depth=1, patch_size=(2, 8, 8)).eval()
    config = export_hub(model, tmp_path / "hub", verbose=False)
    assert config["model"]["encoder"]["depth"] == 1 and "metrics" not in config
    assert "Not recorded" in (tmp_path / "hub" / "README.md").read_text()
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError, match=r"bare.pth: no hyper_parameters\['size'\]"):
        export_hub(tmp_path / "bare.pth", tmp_path / "hub2")


def _break(folder: Path, how: str) -> Path:
    """A copy of a good folder, broken one way; returns the file the error must name."""
    config, weights = folder / "config.json", folder / "model.safetensors"
    if how == "no config.json":
        config.unlink()
        return config
    if how == "no model.safetensors":
        weights.unlink()
        return weights
    if how == "config.json not JSON":
        config.write_text('{"model": ')
        return config
    if how == "unknown model type":
        config.write_text(json.dumps({"model": {"type": "ResNet"}}))
        return config
    if how == "bad value":
        data = json.loads(config.read_text())
        data["model"]["encoder"]["depth"] = "two"
        config.write_text(json.dumps(data))
        return config
    if how == "config.json does not match the tensors":
        data = json.loads(config.read_text())
        data["model"]["encoder"]["depth"] = 3
        data["model"]["decoder"]["embed_dim"] = 64
        config.write_text(json.dumps(data))
        return weights
    if how == "tensors missing":
        state = load_file(weights)
        del state["decoder.pred.bias"]
        save_file(state, weights)
        return weights
    if how == "not safetensors":
        weights.write_bytes(b"\x80\x04not a safetensors file")
        return weights
    raise AssertionError(how)


BROKEN = ["no config.json", "no model.safetensors", "config.json not JSON", "unknown model type", "bad value",
          "config.json does not match the tensors", "tensors missing", "not safetensors"]


@pytest.mark.parametrize("how", BROKEN)
def test_a_broken_folder_is_one_line_naming_the_file(tmp_path, how):
    folder = tmp_path / "hub"
    model = omnimae_pretrain("tiny", img_size=32, num_frames=4, depth=2, decoder_depth=1, patch_size=(2, 8, 8))
    export_hub(model, folder, verbose=False)
    named = _break(folder, how)
    with pytest.raises(HubFolderError) as info:
        load_pretrained(folder)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message and message.startswith(str(named))
    if how == "config.json does not match the tensors":
        assert "config.json" in message and "encoder.blocks.2" in message and "shapes" in message


def test_not_a_folder(tmp_path):
    with pytest.raises(HubFolderError, match="no such folder"):
        load_pretrained(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(HubFolderError, match="not a folder"):
        load_pretrained(tmp_path / "file")


def test_command_line_export_hub_then_reconstruct_from_the_folder(fitted, demo_root, tmp_path, capsys):
    out = tmp_path / "hub"
    cli_main(["export", str(fitted), str(out), "--format", "hub"])
    printed = capsys.readouterr().out
    assert f"-> {out}: OmniMAE" in printed and "val/loss_image" in printed
    assert _files(out) == FILES
    image = next((demo_root / "imagenet" / "val").rglob("*.JPEG"))
    cli_main(["reconstruct", "--checkpoint", str(out), "--inputs", str(image), "--out-dir", str(tmp_path / "recon"),
              "--mask-ratios", "0.75", "--device", "cpu"])
    entries = json.loads((tmp_path / "recon" / "index.json").read_text())["entries"]
    assert [(e["kind"], e["num_masked"], e["num_tokens"]) for e in entries] == [("image", 12, 16)]

    (out / "config.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["reconstruct", "--checkpoint", str(out), "--inputs", str(image), "--out-dir", str(tmp_path / "r2")])
    assert exit_info.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err.strip() == (f"omnimae-cli: error: {out / 'config.json'}: no such file (a hub "
                                               "folder holds model.safetensors and config.json)")


def test_a_finetuning_checkpoint_records_its_source_and_global_batch(demo_root):
    """What ``on_save_checkpoint`` adds for the card, with the fine-tuning datamodule (one source, no masking)."""
    dm = ClassificationDataModule(SourceConfig(kind="imagenet", root=str(demo_root / "imagenet"), val_split="val"),
                                  batch_size=4, img_size=32, num_frames=4, patch_size=(2, 8, 8), short_side=32)
    module = OmniMAEFinetune(size="tiny", num_classes=3, img_size=32, num_frames=4, model_overrides={"depth": 1})
    module._trainer = SimpleNamespace(  # the trainer's attributes the hook reads: 2 devices x 3 accumulated
        callback_metrics={"val/acc1": torch.tensor(0.5), "train/loss": torch.tensor(1.0, requires_grad=True)},
        datamodule=dm, world_size=2, accumulate_grad_batches=3)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["metrics"] == {"val/acc1": 0.5}
    assert checkpoint["data"] == {"sources": [{"name": "imagenet", "kind": "imagenet", "split": "train",
                                               "weight": None}], "masking": {}, "global_batch": {"image": 24}}


def test_a_released_file_becomes_a_folder(tmp_path):
    torch.manual_seed(0)
    ours = omnimae_classifier("tiny", 7, img_size=64, num_frames=16, embed_dim=64, depth=2, num_heads=1).eval()
    official = {}  # the released fine-tuned layout; a released file stores no head count: 1 per 64 channels
    for key, value in ours.state_dict().items():
        key = key.replace("encoder.patch_embed.proj.", "trunk.patch_embed.proj.1.").replace("encoder.", "trunk.")
        official[key.replace("fc_norm.", "trunk.norm.")] = value
    torch.save(official, tmp_path / "vit_ft.torch")
    config = export_hub(tmp_path / "vit_ft.torch", tmp_path / "hub", verbose=False)
    assert config["training"] == {"origin": "the released OmniMAE file vit_ft.torch"}
    assert "Converted from the released OmniMAE file vit_ft.torch" in (tmp_path / "hub" / "README.md").read_text()
    x = torch.randn(1, 3, 16, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path / "hub")(x), ours(x))
