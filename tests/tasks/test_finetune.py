"""OmniMAEFinetune: init_from (our checkpoints and released files), multi-view evaluation by hand, and a few
fine-tuning steps through a Lightning Trainer on real JPEG and WebM files."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from omnimae_pl.data.datamodule import ClassificationDataModule, SourceConfig
from omnimae_pl.data.demo import write_webm
from omnimae_pl.data.sample import collate_samples
from omnimae_pl.data.video_augment import ImageFinetuneTransform, VideoFinetuneTransform
from omnimae_pl.models import omnimae_classifier, omnimae_pretrain
from omnimae_pl.models.checkpoints import CheckpointError
from omnimae_pl.tasks.finetune import OmniMAEFinetune

TINY = dict(embed_dim=32, depth=2, num_heads=2)
DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


def _perturb(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _module(num_classes=3, img_size=64, num_frames=16, **kw):
    return OmniMAEFinetune(size="tiny", model_overrides=TINY, num_classes=num_classes, img_size=img_size,
                           num_frames=num_frames, **kw)


def _trainer(**kw):
    args = dict(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                num_sanity_val_steps=0)
    args.update(kw)
    return Trainer(**args)


def _official(model) -> dict[str, torch.Tensor]:
    """Our names -> the released layout, written here independently of models.official."""
    rules = [
        ("encoder.patch_embed.proj.", "trunk.patch_embed.proj.1."),
        ("encoder.", "trunk."),
        ("decoder.mask_token", "trunk.mask_token"),
        ("decoder.pred.", "head."),
        ("decoder.blocks.", "trunk.decoder.decoder_blocks."),
        ("decoder.", "trunk.decoder."),
        ("fc_norm.", "trunk.norm."),
        ("head.", "head."),
    ]
    out = {}
    for key, value in model.state_dict().items():
        new = next(new + key[len(old):] for old, new in rules if key.startswith(old))
        out[new] = value.clone()
    return out


# ---------------------------------------------------------------------------------------------- init_from


def test_init_from_our_pretraining_checkpoint(tmp_path):
    pre = _perturb(omnimae_pretrain("tiny", img_size=64, num_frames=16, **TINY, **DECODER))
    state = {f"model.{k}": v for k, v in pre.state_dict().items()}
    state["probes.image.weight"] = torch.zeros(3, 32)
    hparams = dict(size="tiny", model_overrides=TINY, img_size=64, num_frames=16)  # weights_only-loadable
    torch.save({"state_dict": state, "hyper_parameters": hparams, "epoch": 3}, tmp_path / "pre.ckpt")

    module = _module(init_from=str(tmp_path / "pre.ckpt"), num_frames=8)  # another clip length: table rebuilt
    report = module.init_report
    ours = module.model
    for key, value in pre.encoder.state_dict().items():
        if key.startswith(("blocks.", "patch_embed.")):
            assert torch.equal(ours.encoder.state_dict()[key], value), key
    assert torch.equal(ours.fc_norm.weight, torch.ones(32)) and torch.equal(ours.fc_norm.bias, torch.zeros(32))
    assert ours.head.weight.abs().max() < 1e-3  # the fresh trunc-normal(2e-5) head
    assert len(report.taken) == len([k for k in pre.encoder.state_dict() if k.startswith(("blocks.", "patch_embed."))])
    assert report.left["encoder.norm.weight"].startswith("the encoder's final norm")
    assert report.left["decoder.mask_token"] == "mask token"
    assert report.left["decoder.pred.weight"] == "pixel head"
    assert report.left["probes.image.weight"] == "online probe"
    assert "rebuilt" in report.left["encoder.pos_embed"]
    assert set(report.fresh) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    summary = report.summary()
    assert "took 26 tensors" in summary and "decoder" in summary and "fresh: fc_norm.* (2), head.* (2)" in summary


def test_init_from_released_files(tmp_path):
    pre = _perturb(omnimae_pretrain("tiny", img_size=64, num_frames=16, **TINY, **DECODER))
    torch.save(_official(pre), tmp_path / "vit_pretrain.torch")
    module = _module(init_from=str(tmp_path / "vit_pretrain.torch"))
    assert torch.equal(module.model.encoder.blocks[1].attn.qkv.weight, pre.encoder.blocks[1].attn.qkv.weight)
    assert "encoder.norm.weight" in module.init_report.left and "head.weight" in module.init_report.fresh

    ft = _perturb(omnimae_classifier("tiny", 3, img_size=64, num_frames=16, **TINY))
    torch.save(_official(ft), tmp_path / "vit_ft.torch")
    module = _module(init_from=str(tmp_path / "vit_ft.torch")).eval()
    assert {"fc_norm.weight", "head.weight"} <= set(module.init_report.taken) and not module.init_report.fresh
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(module(x), ft.eval()(x), atol=1e-6)

    other = _module(num_classes=5, init_from=str(tmp_path / "vit_ft.torch"))  # other classes: a fresh head
    assert "3 classes in the file, 5 in the model" in other.init_report.left["head.weight"]
    assert torch.equal(other.model.encoder.blocks[0].mlp.fc1.weight, ft.encoder.blocks[0].mlp.fc1.weight)
    assert torch.equal(other.model.fc_norm.weight, torch.ones(32))


def test_init_from_refuses_another_size(tmp_path):
    pre = omnimae_pretrain("tiny", img_size=64, num_frames=16, **TINY, **DECODER)
    torch.save({"state_dict": {f"model.{k}": v for k, v in pre.state_dict().items()}}, tmp_path / "pre.ckpt")
    with pytest.raises(ValueError, match="model.size"):
        OmniMAEFinetune(size="tiny", model_overrides=dict(embed_dim=64, depth=2, num_heads=2), num_classes=3,
                        img_size=64, init_from=str(tmp_path / "pre.ckpt"))
    with pytest.raises(CheckpointError, match="no such file"):
        _module(init_from=str(tmp_path / "missing.ckpt"))


# ------------------------------------------------------------------------------------- multi-view by hand


class Views(Dataset):
    """Items are lists of views (as the video datasets return them); each view's input IS its logits."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        index, label, rows = self.items[i]
        return [{"input": torch.tensor(r).view(3, 1, 1, 1), "label": torch.tensor(label), "valid": torch.tensor(True),
                 "index": torch.tensor(index)} for r in rows]


def test_multiview_logits_are_averaged_per_video_and_duplicates_count_once():
    v5 = (5, 0, [[3.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0]])  # views vote class 1; the mean logits say class 0
    v9 = (9, 2, [[0, 0, 1.0], [0, 0, 1.0], [5.0, 0, 0]])  # views vote class 2; the mean logits say class 0
    # v9 again in a later batch, as a DistributedSampler pads the last batch with already-seen samples
    loader = DataLoader(Views([v5, v9, v9]), batch_size=2, collate_fn=partial(collate_samples, modality="video", source="x"))
    module = _module()
    module.forward = lambda x: x.flatten(1)[:, :3]
    metrics = _trainer().validate(module, loader, verbose=False)[0]
    assert metrics["val/acc1"] == pytest.approx(0.5)  # v5 right, v9 wrong: 1/2 (1/3 if v9 were counted twice)
    assert metrics["val/acc5"] == pytest.approx(1.0)
    ce5 = -F.log_softmax(torch.tensor([1.0, 2 / 3, 0.0]), 0)[0]
    ce9 = -F.log_softmax(torch.tensor([5 / 3, 0.0, 2 / 3]), 0)[2]
    assert metrics["val/loss"] == pytest.approx(float((ce5 + 2 * ce9) / 3), rel=1e-5)  # the loss is per batch


# ------------------------------------------------------------------------- real files through a Trainer


def _smooth(rng, width, height):
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def _image_tree(root: Path, per_class=4) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(3):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_smooth(rng, int(rng.integers(40, 70)), int(rng.integers(40, 70)))).save(
                    folder / f"{i}.JPEG", quality=90)
    return root


def _video_tree(root: Path, per_class=2) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(2):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                frames = np.stack([np.roll(_smooth(rng, 64, 48), (2 * t) * (1 if c else -1), axis=1) for t in range(24)])
                write_webm(folder / f"{i}.webm", frames)
    return root


def _changed(before, module):
    after = module.model.state_dict()
    return [k for k in before if not torch.equal(before[k], after[k])]


def test_image_finetuning_steps_on_jpegs(tmp_path):
    dm = ClassificationDataModule(
        SourceConfig(kind="imagenet", root=str(_image_tree(tmp_path / "in")), val_split="val"),
        batch_size=4, eval_batch_size=3, train_transform=ImageFinetuneTransform(size=32), img_size=32,
        num_workers=0, persistent_workers=False, pin_memory=False,
    )
    module = OmniMAEFinetune(size="tiny", model_overrides=TINY, num_classes=dm.num_classes, img_size=32,
                             num_frames=16, base_lr=1e-2, warmup_fraction=0.3)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = _trainer(max_epochs=2, log_every_n_steps=1)
    trainer.fit(module, dm)
    assert trainer.global_step == 6  # 12 images / 4 per step x 2 epochs
    assert module.schedule_facts()["total_steps"] == 6
    m = trainer.callback_metrics
    assert math.isfinite(m["train/loss"]) and "train/acc1" not in m  # mixup on: no train accuracy
    assert 0.0 <= m["val/acc1"] <= m["val/acc5"] <= 1.0 and math.isfinite(m["val/loss"])
    changed = _changed(before, module)
    assert "head.weight" in changed and "encoder.patch_embed.proj.weight" in changed
    assert trainer.optimizers[0].defaults["fused"]  # one fused AdamW kernel on the CPU too


def test_video_finetuning_steps_on_webm_and_fifteen_view_validation(tmp_path):
    root = _video_tree(tmp_path / "videos")
    dm = ClassificationDataModule(
        SourceConfig(kind="video_folder", root=str(root), val_split="val"),
        batch_size=2, eval_batch_size=2, img_size=32, num_frames=4, clip_duration=1.0, short_side=40,
        train_transform=VideoFinetuneTransform(crop_size=32, short_side=40), eval_num_clips=5, eval_num_crops=3,
        eval_short_side=32, num_workers=0, persistent_workers=False, pin_memory=False,
    )
    module = OmniMAEFinetune(size="tiny", model_overrides=TINY, num_classes=dm.num_classes, img_size=32,
                             num_frames=4, lr=1e-3, layer_decay=0.75, warmup_fraction=0.125, eval_chunk=8)
    seen = []
    original = module.evaluate
    module.evaluate = lambda batch: seen.append(batch["input"].shape) or original(batch)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = _trainer(max_steps=3, log_every_n_steps=1)
    trainer.fit(module, dm)
    assert trainer.global_step == 3
    assert seen and seen[0] == (30, 3, 4, 32, 32)  # 2 videos x 15 views per validation batch
    m = trainer.callback_metrics
    assert math.isfinite(m["train/loss"]) and math.isfinite(m["val/loss"]) and 0 <= m["val/acc1"] <= 1
    assert "encoder.blocks.1.mlp.fc2.weight" in _changed(before, module)


def test_validation_interval_does_not_change_training(tmp_path):
    """Validating every epoch or only at the end trains the same weights: no loader draws from the global RNG
    that drop path and Mixup use (each new loader iterator used to take one draw from it)."""
    root = _image_tree(tmp_path / "in")

    def weights(every):
        torch.manual_seed(0)
        dm = ClassificationDataModule(
            SourceConfig(kind="imagenet", root=str(root), val_split="val"), batch_size=4, eval_batch_size=3,
            train_transform=ImageFinetuneTransform(size=32), img_size=32, num_workers=0, persistent_workers=False,
            pin_memory=False,
        )
        module = OmniMAEFinetune(size="tiny", model_overrides=TINY, num_classes=dm.num_classes, img_size=32,
                                 num_frames=16, drop_path_rate=0.5, warmup_fraction=0.3)
        _trainer(max_epochs=3, check_val_every_n_epoch=every).fit(module, dm)
        return module.model.state_dict()

    every_epoch, at_end = weights(1), weights(3)
    assert all(torch.equal(every_epoch[k], at_end[k]) for k in every_epoch)


def test_our_finetuned_checkpoint_round_trip(tmp_path):
    module = _module()
    _perturb(module.model, seed=3)
    trainer = _trainer()
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "ft.ckpt")
    again = _module(init_from=str(tmp_path / "ft.ckpt")).eval()
    assert not again.init_report.fresh and again.init_report.description.startswith("fine-tuned Lightning")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(again(x), module.eval()(x))


# ------------------------------------------------------------------------------------------------- CLI

REPO = Path(__file__).resolve().parents[2]


def _cli_layer(tmp_path: Path, data_root: Path, **model) -> Path:
    import yaml

    cfg = {
        "model": {"init_args": {"model_overrides": {"depth": 2}, **model}},
        "data": {"init_args": {
            "patch_size": [2, 8, 8],  # linked into the model
            "source": {"name": "tiny_in", "kind": "imagenet", "root": str(data_root), "annotations": None,
                       "val_split": "val", "test_split": "val"},
            "batch_size": 4, "eval_batch_size": 6, "img_size": 32, "num_workers": 0, "persistent_workers": False,
            "train_transform": {"class_path": "omnimae_pl.data.video_augment.ImageFinetuneTransform",
                                "init_args": {"size": 32}},
        }},
        "trainer": {
            "max_epochs": None, "log_every_n_steps": 1, "enable_progress_bar": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}],
        },
    }
    path = tmp_path / "layer.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_demo_config_fits_then_validates_a_released_file(tmp_path):
    from omnimae_pl.cli import run_cli as main  # main() with the CLI object returned

    data = _image_tree(tmp_path / "in")
    pre = _perturb(omnimae_pretrain("tiny", img_size=32, num_frames=8, depth=2, patch_size=(2, 8, 8), **DECODER))
    torch.save({"state_dict": {f"model.{k}": v for k, v in pre.state_dict().items()},
                "hyper_parameters": {"size": "tiny", "img_size": 32, "num_frames": 8}}, tmp_path / "pre.ckpt")
    demo = str(REPO / "configs" / "finetune" / "demo.yaml")
    layer = str(_cli_layer(tmp_path, data, init_from=str(tmp_path / "pre.ckpt")))
    cli = main(["fit", "--config", demo, "--config", layer, "--trainer.max_steps", "3"])
    assert cli.trainer.global_step == 3
    assert cli.model.hparams.num_classes == 3 and cli.model.hparams.img_size == 32  # linked from the data
    assert "encoder.blocks.0.attn.qkv.weight" in cli.model.init_report.taken
    assert "val/acc1" in cli.trainer.callback_metrics and (tmp_path / "ckpt" / "last.ckpt").is_file()

    released = _perturb(omnimae_classifier("tiny", 3, img_size=32, num_frames=8, depth=2, patch_size=(2, 8, 8)), seed=5)
    torch.save(_official(released), tmp_path / "tiny_ft.torch")
    cli = main(["validate", "--config", demo, "--config", layer, "--model.init_from", str(tmp_path / "tiny_ft.torch")])
    assert torch.equal(cli.model.model.head.weight, released.head.weight)
    assert not cli.model.init_report.fresh
    assert 0.0 <= float(cli.trainer.callback_metrics["val/acc1"]) <= 1.0
