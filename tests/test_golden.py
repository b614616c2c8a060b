"""The first 30 steps of a fixed-seed tiny pretraining run (both modalities, demo-format data made at test time, no
loader workers, CPU fp32) against the curve stored in tests/golden/pretrain_30_steps.json: a change that alters the
numerics (data, masking, model, loss, optimiser, schedule) fails here, on purpose.

If the change is meant to alter them, regenerate the curve and commit it with the change:

    OMNIMAE_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import run_config
from lightning.pytorch import Callback
from reliability_helpers import fit_in_process

GOLDEN = Path(__file__).resolve().parent / "golden" / "pretrain_30_steps.json"
STEPS = 30


class Curve(Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({"step": trainer.global_step, "modality": batch["modality"], "loss": outputs["loss"].item()})


def test_the_first_30_steps_follow_the_golden_curve(demo_root, tmp_path):
    cfg = run_config(demo_root, tmp_path, max_steps=STEPS, limit_val_batches=0, val_check_interval=None, logger=False,
                     callbacks=[], enable_checkpointing=False)
    curve = Curve()
    fit_in_process(cfg, curve)
    if os.environ.get("OMNIMAE_REGENERATE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        rows = ",\n".join(f"  {json.dumps(step)}" for step in curve.steps)
        about = json.dumps(__doc__.split("\n\n")[0].replace("\n", " "))
        GOLDEN.write_text(f'{{\n "about": {about},\n "steps": [\n{rows}\n ]\n}}\n')
    golden = json.loads(GOLDEN.read_text())["steps"]
    assert {s["modality"] for s in golden} == {"image", "video"}
    assert [(s["step"], s["modality"]) for s in curve.steps] == [(s["step"], s["modality"]) for s in golden]
    assert [s["loss"] for s in curve.steps] == pytest.approx([s["loss"] for s in golden], rel=1e-4)
