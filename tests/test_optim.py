"""Layer-wise lr decay and the fine-tuning schedule, as the optimiser sees them after configure_optimizers."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from lightning.pytorch import LightningDataModule, Trainer
from torch.utils.data import DataLoader, Dataset

from omnimae_pl.data.sample import collate_samples
from omnimae_pl.tasks.finetune import OmniMAEFinetune

TINY = dict(embed_dim=32, depth=2, num_heads=2)


class RandomImages(Dataset):
    def __init__(self, n: int = 10, classes: int = 3):
        self.n, self.classes = n, classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"input": torch.randn(3, 32, 32, generator=g), "label": torch.tensor(i % self.classes),
                "valid": torch.tensor(True), "index": torch.tensor(i)}


class RandomImagesData(LightningDataModule):
    """The schedule's API of the project's datamodules (``batch_sizes``, ``steps_per_epoch``) over RandomImages."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size, self.dataset = batch_size, RandomImages()

    def batch_sizes(self):
        return {"image": self.batch_size}

    def steps_per_epoch(self, world_size=1, rank=0):
        return math.ceil(len(self.dataset) / world_size / self.batch_size)

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=self.batch_size,
                          collate_fn=partial(collate_samples, modality="image", source="x"))


def _fit(module, max_epochs=2, max_steps=1, batch_size=4, accumulate=1):
    trainer = Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=max_epochs, max_steps=max_steps,
                      accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=RandomImagesData(batch_size))
    return trainer


def _module(**kw):
    args = dict(size="tiny", model_overrides=TINY, num_classes=3, img_size=32, num_frames=4, mixup_alpha=0.0,
                cutmix_alpha=0.0, layer_decay=0.5, lr=1e-3, weight_decay=0.05)
    args.update(kw)
    return OmniMAEFinetune(**args)


def _scale_of(optimizer, param):
    return next(g["lr_scale"] for g in optimizer.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize(
    "rule, expected",
    [
        # depth 2, decay 0.5. official: L = depth + 2 = 4 -> patch 0.5^4, block0 0.5^3, block1 0.5^2, head 0.5^1
        ("official", {"patch": 0.0625, "block0": 0.125, "block1": 0.25, "head": 0.5}),
        # MAE: one factor less everywhere -> the head trains at the full lr
        ("mae", {"patch": 0.125, "block0": 0.25, "block1": 0.5, "head": 1.0}),
    ],
)
def test_layer_scales_by_hand(rule, expected):
    module = _module(layer_decay_rule=rule)
    trainer = _fit(module)
    opt = trainer.optimizers[0]
    m = module.model
    params = {
        "patch": [m.encoder.patch_embed.proj.weight, m.encoder.patch_embed.proj.bias],
        "block0": [m.encoder.blocks[0].attn.qkv.weight, m.encoder.blocks[0].norm1.weight],
        "block1": [m.encoder.blocks[1].mlp.fc2.weight, m.encoder.blocks[1].mlp.fc2.bias],
        "head": [m.head.weight, m.head.bias, m.fc_norm.weight],
    }
    for name, ps in params.items():
        for p in ps:
            assert _scale_of(opt, p) == pytest.approx(expected[name]), name
    for g in opt.param_groups:  # per-group peak = lr x scale; decay only on >= 2-D weights
        assert g["initial_lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["weight_decay"] == (0.05 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))


def test_schedule_length_from_the_data_and_the_rescaled_cosine():
    module = _module(lr=None, base_lr=2e-3, warmup_fraction=0.25, warmup_start_lr=1e-6, min_lr=1e-6)
    trainer = _fit(module, max_epochs=2, max_steps=-1)
    facts = module.schedule_facts()
    assert facts == {"batch_size": {"image": 4}, "global_batch": {"image": 4}, "steps_per_epoch": 3,
                     "total_steps": 6}  # 10 -> 4+4+2
    peak = 2e-3 * 4 / 256
    fn = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert peak * fn(0) == pytest.approx(1e-6)
    assert fn(1) == pytest.approx(1e-6 / peak + (1 - 1e-6 / peak) * (1 / 6) / 0.25)  # linear warm-up
    assert fn(1.5) == pytest.approx(1.0)  # the cosine restarts at the end of the warm-up ("rescaled")
    assert peak * fn(6) == pytest.approx(1e-6)
    head_group = next(g for g in trainer.optimizers[0].param_groups if g["lr_scale"] == 0.5)
    assert head_group["lr"] == pytest.approx(0.5 * peak * fn(6))  # 6 steps taken
    trainer2 = _fit(_module(), max_epochs=2, max_steps=-1, accumulate=2)
    assert trainer2.lightning_module.schedule_facts()["total_steps"] == 4  # ceil(3 / 2) per epoch


def test_linear_probe_trains_the_head_only():
    module = _module(freeze_encoder=True)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = _fit(module, max_steps=2)
    groups = trainer.optimizers[0].param_groups
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in [*module.model.fc_norm.parameters(), *module.model.head.parameters()]}
    assert {g["lr_scale"] for g in groups} == {1.0}  # no layer decay for a probe
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    module.train()
    assert module.training and not module.model.encoder.training and module.model.head.training


def test_the_encoder_names_each_parameters_layer():
    module = _module()
    enc = module.model.encoder
    assert enc.layer_id("patch_embed.proj.weight") == 0 and enc.layer_id("pos_embed") == 0
    assert enc.layer_id("blocks.0.attn.qkv.weight") == 1 and enc.layer_id("blocks.1.norm2.bias") == 2
    assert enc.layer_id("norm.weight") == 3  # depth + 1
    layers = {name: module.layer_of(name) for name, _ in module.model.named_parameters()}
    # the classifier's mapping: the encoder's numbering under encoder., the top for fc_norm and the head
    assert {n for n, layer in layers.items() if layer == 0} == {"encoder.patch_embed.proj.weight",
                                                                 "encoder.patch_embed.proj.bias"}
    assert all(layer == int(n.split(".")[2]) + 1 for n, layer in layers.items() if n.startswith("encoder.blocks."))
    assert {n for n, layer in layers.items() if layer == 3} == {"fc_norm.weight", "fc_norm.bias", "head.weight",
                                                                 "head.bias"}
