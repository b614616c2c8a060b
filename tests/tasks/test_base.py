"""What both tasks share (tasks/base.py): the schedule from the datamodule's public API and the trainer's
max_epochs / max_steps, FSDP2 units and compiled methods done once, and the patch size given once."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from omnimae_pl.tasks.base import model_kwargs
from omnimae_pl.tasks.finetune import OmniMAEFinetune
from omnimae_pl.tasks.pretrain import OmniMAEPretrain

TINY = dict(embed_dim=32, depth=2, num_heads=2)
DECODER = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)


class Data:
    """The two methods the schedule reads, nothing else."""

    def __init__(self, batches=10, sizes=None):
        self.batches, self.sizes, self.asked = batches, sizes or {"image": 8, "video": 2}, []

    def batch_sizes(self):
        return dict(self.sizes)

    def steps_per_epoch(self, world_size, rank):
        self.asked.append((world_size, rank))
        return self.batches


def _pretrain(**kw):
    return OmniMAEPretrain(size="tiny", model_overrides={**TINY, **DECODER}, img_size=32, num_frames=4,
                           patch_size=(2, 8, 8), linear_probe=False, **kw)


def _finetune(**kw):
    return OmniMAEFinetune(size="tiny", model_overrides=TINY, num_classes=3, img_size=32, num_frames=4,
                           patch_size=(2, 8, 8), **kw)


def _attach(module, datamodule=..., max_epochs=3, max_steps=-1, world_size=2, rank=1, accumulate=1, limit=1.0):
    module._trainer = SimpleNamespace(
        datamodule=Data() if datamodule is ... else datamodule, world_size=world_size, global_rank=rank,
        accumulate_grad_batches=accumulate, max_epochs=max_epochs, max_steps=max_steps, limit_train_batches=limit,
    )
    return module


@pytest.mark.parametrize("make", [_pretrain, _finetune])
def test_schedule_from_the_trainer_epochs_capped_by_max_steps(make):
    data = Data(batches=10)
    module = _attach(make(), data, max_epochs=3, accumulate=3)
    facts = module.schedule_facts()
    assert data.asked[-1] == (2, 1)  # per device and rank
    assert facts == {"batch_size": {"image": 8, "video": 2}, "global_batch": {"image": 48, "video": 12},
                     "steps_per_epoch": 4, "total_steps": 12}  # ceil(10 / 3) optimiser steps per epoch
    assert _attach(make(), max_epochs=3, max_steps=7).schedule_facts()["total_steps"] == 7  # the cap
    assert _attach(make(), max_epochs=3, max_steps=100).schedule_facts()["total_steps"] == 30
    for epochs in (-1, None):  # max_epochs off: max_steps alone
        assert _attach(make(), max_epochs=epochs, max_steps=25).schedule_facts()["total_steps"] == 25
    with pytest.raises(ValueError, match="max_epochs or trainer.max_steps"):
        _attach(make(), max_epochs=-1, max_steps=-1).schedule_facts()
    assert _attach(make(), limit=4).schedule_facts()["steps_per_epoch"] == 4  # limit_train_batches
    assert _attach(make(), limit=0.5).schedule_facts()["steps_per_epoch"] == 5


def test_max_epochs_is_the_trainers_only():
    for cls in (OmniMAEPretrain, OmniMAEFinetune):
        with pytest.raises(TypeError):
            cls(size="tiny", max_epochs=3)


@pytest.mark.parametrize("make", [_pretrain, _finetune])
def test_a_datamodule_without_the_schedule_api_is_a_clear_error(make):
    with pytest.raises(TypeError, match=r"steps_per_epoch.*no datamodule"):
        _attach(make(), datamodule=None).schedule_facts()

    class OnlyBatches:
        def batch_sizes(self):
            return {"image": 4}

    with pytest.raises(TypeError, match="OnlyBatches has no steps_per_epoch"):
        _attach(make(), datamodule=OnlyBatches()).schedule_facts()


def test_finetune_steps_per_epoch_override_and_lr():
    module = _attach(_finetune(steps_per_epoch=5, lr=None, base_lr=2e-3), Data(batches=99, sizes={"image": 16}))
    facts = module.schedule_facts()
    assert facts["steps_per_epoch"] == 5 and facts["total_steps"] == 15
    assert module.peak_lr(facts) == pytest.approx(2e-3 * 32 / 256)  # base lr per 256 samples, as pretraining
    assert _attach(_finetune(lr=0.1)).peak_lr(facts) == 0.1
    pre = _attach(_pretrain(base_lr=1e-3))
    assert pre.peak_lr(pre.schedule_facts()) == pytest.approx(1e-3 * 16 / 256)  # the larger modality's batch


def test_fsdp2_units_and_compile_targets_are_done_once(monkeypatch):
    import torch.distributed.fsdp as fsdp

    sharded, compiled = [], []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, mesh: sharded.append((module, mesh)))
    monkeypatch.setattr(torch, "compile", lambda fn, dynamic: compiled.append(fn) or fn)

    pre = _pretrain(compile=True)
    pre._device_mesh = {"data_parallel": "mesh"}
    for _ in range(2):
        pre.configure_model()
    m = pre.model
    assert [u for u, _ in sharded] == [*m.encoder.blocks, *m.decoder.blocks, m.encoder, m.decoder]
    assert {mesh for _, mesh in sharded} == {"mesh"}
    assert len(compiled) == 2 and compiled[0].__self__ is m.encoder and compiled[1].__self__ is m.decoder

    sharded.clear(), compiled.clear()
    ft = _finetune(compile=True)
    ft._device_mesh = {"data_parallel": "mesh"}
    for _ in range(2):
        ft.configure_model()
    assert [u for u, _ in sharded] == [*ft.model.encoder.blocks, ft.model]
    assert len(compiled) == 1 and compiled[0].__func__.__name__ == "forward_features"

    sharded.clear(), compiled.clear()
    plain = _finetune()  # no mesh, no compile: nothing happens
    plain.configure_model()
    assert not sharded and not compiled


def test_patch_size_is_given_once_and_kept_in_hparams():
    pre = _pretrain()
    assert pre.model.patch_size == (2, 8, 8) and tuple(pre.hparams.patch_size) == (2, 8, 8)
    assert "patch_size" not in pre.hparams.model_overrides
    ft = OmniMAEFinetune(size="tiny", model_overrides=TINY, num_classes=3, img_size=32, num_frames=4)
    assert ft.model.encoder.patch_size == (2, 16, 16) and ft.hparams.patch_size is None  # the size's own
    assert model_kwargs({"depth": 2, "patch_size": [2, 8, 8]}, None) == {"depth": 2, "patch_size": [2, 8, 8]}
    assert model_kwargs({"patch_size": [2, 8, 8]}, [2, 8, 8]) == {"patch_size": (2, 8, 8)}
    with pytest.raises(ValueError, match="give the patch once"):
        model_kwargs({"patch_size": [2, 16, 16]}, (2, 8, 8))
