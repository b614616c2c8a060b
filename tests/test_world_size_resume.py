"""A checkpoint written by 2 processes resumes on 2 and on 1 (DDP and FSDP2): the step count and the lr schedule
go on; on 2 the data goes on exactly mid-epoch (the same losses as the run that was never stopped), on 1 the
interrupted epoch ends and the next is whole, no sample seen twice. FSDP2 writes one full-state file, the same
checkpoint DDP writes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from cli_helpers import DEMO, REPO
from dist_helpers import run_cli_subprocess
from reliability_helpers import checkpointed_config

STEPS, SAVED = 10, 5  # the 2-process run saves at step 5, inside the first epoch
BATCHES = {2: ("4", "8"), 1: ("8", "16")}  # the same global batch of images / clips on 2 processes and on 1
STRATEGIES = {"ddp": "ddp.yaml", "fsdp2": "fsdp2.yaml"}


def _fit(demo_root, out: Path, world: int, strategy: str, ckpt: Path | None = None) -> list[dict]:
    out.mkdir()
    recorder = {"class_path": "dist_helpers.GlobalStepRecorder", "init_args": {"out": str(out)}}
    cfg = checkpointed_config(demo_root, out, every_n_train_steps=SAVED, max_steps=STEPS, extra_callbacks=(recorder,))
    images, videos = BATCHES[world]
    layer = ["--config", str(REPO / "configs" / "trainer" / STRATEGIES[strategy])] if world > 1 else []
    args = ["fit", "--config", DEMO, *layer, "--config", str(cfg), "--trainer.accelerator", "cpu",
            "--trainer.devices", str(world), "--trainer.precision", "32-true",
            "--data.init_args.image_batch_size", images, "--data.init_args.video_batch_size", videos,
            *(["--ckpt_path", str(ckpt)] if ckpt else [])]
    result = run_cli_subprocess(args, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "steps.json").read_text())


@pytest.fixture(scope="module")
def two_process_runs(demo_root, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("world_size")
    return {name: (_fit(demo_root, root / name, 2, name), root / name / "ckpt" / f"stepstep={SAVED}.ckpt")
            for name in STRATEGIES}


def test_fsdp2_writes_the_checkpoint_ddp_writes(two_process_runs):
    ddp, fsdp2 = (torch.load(two_process_runs[name][1], weights_only=True) for name in ("ddp", "fsdp2"))
    assert fsdp2["global_step"] == ddp["global_step"] == SAVED
    assert fsdp2["state_dict"].keys() == ddp["state_dict"].keys()
    for key, value in ddp["state_dict"].items():
        torch.testing.assert_close(fsdp2["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    (a,), (b,) = ddp["optimizer_states"], fsdp2["optimizer_states"]
    # ids may differ (FSDP keys them by the model's parameter order); each group lists its parameters in the
    # optimizer's order, which is what a plain optimizer maps them back by
    assert [len(g["params"]) for g in a["param_groups"]] == [len(g["params"]) for g in b["param_groups"]]
    for group_a, group_b in zip(a["param_groups"], b["param_groups"]):
        for i, j in zip(group_a["params"], group_b["params"]):  # AdamW's moments, parameter by parameter
            assert (i in a["state"]) == (j in b["state"])  # a probe not stepped yet has none
            for name in ("exp_avg", "exp_avg_sq") if i in a["state"] else ():
                torch.testing.assert_close(b["state"][j][name], a["state"][i][name], rtol=1e-5, atol=1e-7,
                                           msg=f"{i}.{name}")


def test_resume_on_the_same_world_size_continues_exactly(demo_root, tmp_path, two_process_runs):
    steps, ckpt = two_process_runs["fsdp2"]
    assert steps[SAVED - 1]["epoch"] == steps[SAVED]["epoch"]  # the checkpoint is inside an epoch
    resumed = _fit(demo_root, tmp_path / "again", 2, "fsdp2", ckpt)
    assert [s["step"] for s in resumed] == list(range(SAVED + 1, STEPS + 1))
    for got, want in zip(resumed, steps[SAVED:]):
        assert (got["source"], got["index"], got["lr"]) == (want["source"], want["index"], want["lr"])
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6), got["step"]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_resume_on_one_process_goes_on_from_the_next_epoch(demo_root, tmp_path, two_process_runs, strategy):
    steps, ckpt = two_process_runs[strategy]
    resumed = _fit(demo_root, tmp_path / "one", 1, strategy, ckpt)
    assert [s["step"] for s in resumed] == list(range(SAVED + 1, STEPS + 1))
    # the same global batch: the same schedule, step for step
    assert [s["lr"] for s in resumed] == pytest.approx([s["lr"] for s in steps[SAVED:]], rel=1e-6)
    interrupted = steps[SAVED - 1]["epoch"]
    assert {s["epoch"] for s in resumed} == {interrupted + 1}
    seen = Counter((s["source"], i) for s in resumed for i in s["index"])
    replicas = {s["source"]: Counter(s["index"]).most_common(1)[0][1] for s in resumed}  # a clip's replicas
    assert all(n == replicas[source] for (source, _), n in seen.items()), "a sample was seen twice in the epoch"
