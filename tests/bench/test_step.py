"""The timed step computes the model's own loss, from the statically known visible count, with the project's
optimiser groups."""

from __future__ import annotations

import argparse

import pytest
import torch

from omnimae_pl.bench.step import (
    OursLoss, adamw, ckpt_settings, per_sample_counts, synthetic_batches, time_loop, train_step_fn,
)
from omnimae_pl.masking import PAPER_MASK_RATIO, token_grid
from omnimae_pl.models import model_size, omnimae_pretrain
from omnimae_pl.models.tokens import flatten_mask, visible_indices

SPEC = model_size("tiny", embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                  decoder_num_heads=4)
ARGS = argparse.Namespace(img_size=32, num_frames=4, mask_ratios=dict(PAPER_MASK_RATIO))


@pytest.mark.parametrize("modality", ["image", "video"])
def test_static_visible_count_matches_the_masks(modality):
    _, n_visible = per_sample_counts(SPEC, ARGS)
    (x, mask), = synthetic_batches(modality, 3, 32, 4, SPEC.patch_size, PAPER_MASK_RATIO[modality], "cpu", count=1)
    assert mask.shape[1:] == token_grid(x.shape[1:], SPEC.patch_size)
    flat = flatten_mask(mask)
    assert torch.equal(visible_indices(flat, n_visible[modality]), visible_indices(flat))  # no host read, same ids


@pytest.mark.parametrize("modality", ["image", "video"])
def test_step_loss_is_the_models_loss(modality):
    torch.manual_seed(0)
    model = omnimae_pretrain(SPEC, img_size=32, num_frames=4).train()
    _, n_visible = per_sample_counts(SPEC, ARGS)
    (x, mask), = synthetic_batches(modality, 2, 32, 4, SPEC.patch_size, PAPER_MASK_RATIO[modality], "cpu", count=1)
    expected = model.forward_loss(x, model(x, mask), mask)
    assert torch.allclose(OursLoss(model, n_visible).eager(x, mask, False), expected)


def test_adamw_uses_the_project_groups():
    model = omnimae_pretrain(SPEC, img_size=32, num_frames=4)
    opt = adamw(model, fused=True)
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"decay": 0.05, "no_decay": 0.0} and opt.defaults["fused"]
    biases = {id(p) for n, p in model.named_parameters() if n.endswith(".bias")}
    no_decay = next(g for g in opt.param_groups if g["name"] == "no_decay")
    assert biases <= {id(p) for p in no_decay["params"]}


def test_checkpointing_settings():
    assert ckpt_settings("none", "video") == [False]
    assert ckpt_settings("video", "image") == [False] and ckpt_settings("video", "video") == [True]
    assert ckpt_settings("both", "image") == [False] and ckpt_settings("both", "video") == [False, True]


def test_time_loop_reports_the_mean_loss():
    model = omnimae_pretrain(SPEC, img_size=32, num_frames=4).train()
    _, n_visible = per_sample_counts(SPEC, ARGS)
    step = train_step_fn(OursLoss(model, n_visible).eager, adamw(model, fused=True), torch.device("cpu"), "fp32")
    data = synthetic_batches("image", 2, 32, 4, SPEC.patch_size, 0.9, "cpu")
    sec, loss, recompiles = time_loop(step, data, False, steps=2, warmup=1, repeats=3, device=torch.device("cpu"))
    assert sec > 0 and torch.isfinite(torch.tensor(loss)) and recompiles == 0
