"""The shipped DDP and FSDP2 configs on 2 CPU processes (gloo) equal one process with the same global batch per
modality: per-step losses, final weights, and the validation figures over an evaluation set that does not split
evenly over the ranks, with gradient clipping on."""

from __future__ import annotations

import json

import pytest
import torch
from cli_helpers import DEMO, REPO, run_config
from dist_helpers import run_cli_subprocess

STEPS = 20
# per rank on 2 processes / on one: the same global batch of 8 images, or 4 clips x 4 replicas
BATCHES = {2: ("4", "8"), 1: ("8", "16")}
# 7 evaluation items per source in batches of 3: one process runs 3, 3, 1; two run 3, 1 each, rank 1's last
# batch being one item of padding. Validation at every epoch end.
VALIDATION = ["--data.init_args.val_samples", "7", "--data.init_args.val_batch_size", "3"]
CLIP = ["--trainer.gradient_clip_val", "0.05"]  # small enough to clip every step of this run


def _run(demo_root, tmp_path, world: int, layers: list[str], options: list[str]):
    """``fit`` of the demo config with test data for STEPS steps on ``world`` processes; (steps, weights)."""
    out = tmp_path / f"world{world}"
    out.mkdir()
    cfg = run_config(demo_root, out, max_steps=STEPS, limit_val_batches=None, val_check_interval=None,
                     check_val_every_n_epoch=1, logger=False,
                     callbacks=[{"class_path": "dist_helpers.GlobalStepRecorder", "init_args": {"out": str(out)}}])
    images, videos = BATCHES[world]
    args = ["fit", "--config", DEMO, *layers, "--config", str(cfg), *VALIDATION, *CLIP, *options,
            "--trainer.accelerator", "cpu",
            "--trainer.devices", str(world), "--trainer.precision", "32-true",
            "--data.init_args.image_batch_size", images, "--data.init_args.video_batch_size", videos]
    result = run_cli_subprocess(args, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return (json.loads((out / "steps.json").read_text()), json.loads((out / "validation.json").read_text()),
            torch.load(out / "weights.pt"))


GRAD_CKPT = ["--model.init_args.grad_checkpointing", "{image: true, video: true}"]


@pytest.mark.parametrize(
    ("strategy", "options"),
    [("ddp.yaml", []), ("fsdp2.yaml", GRAD_CKPT)],  # FSDP2 is the ViT-H path: with activation checkpointing
    ids=["ddp", "fsdp2-grad-ckpt"],
)
def test_two_processes_equal_one(demo_root, tmp_path, strategy, options):
    layer = ["--config", str(REPO / "configs" / "trainer" / strategy)]
    two_steps, two_val, two_weights = _run(demo_root, tmp_path, 2, layer, options)
    one_steps, one_val, one_weights = _run(demo_root, tmp_path, 1, [], options)
    assert [s["modality"] for s in two_steps] == [s["modality"] for s in one_steps]
    assert {s["modality"] for s in one_steps} == {"image", "video"} and len(one_steps) == STEPS
    for two, one in zip(two_steps, one_steps):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5), two["step"]
    assert two_weights.keys() == one_weights.keys()
    assert any(k.startswith("probes.") for k in one_weights)  # the online probes were on, as shipped
    for key in one_weights:
        torch.testing.assert_close(two_weights[key], one_weights[key], rtol=1e-5, atol=1e-6, msg=key)
    assert len(one_val) == len(two_val) >= 1  # the end of every epoch
    for two, one in zip(two_val, one_val):
        assert {"val/loss_image", "val/loss_video", "val/probe_acc_image"} <= one.keys()
        assert two.keys() == one.keys()
        for key in one:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
