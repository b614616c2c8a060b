"""Several CPU processes (gloo) equal one process with the same global batch per modality: per-step losses, final
weights, and the validation figures over an evaluation set that does not split evenly over the ranks, with
gradient clipping on. Launched as users launch them: Lightning's own launcher with the shipped DDP and FSDP2
configs, torchrun as two nodes on loopback, and the SLURM script's command with the variables srun sets."""

from __future__ import annotations

import json
import shlex
import socket
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import DEMO, REPO, run_config
from dist_helpers import run_cli_subprocess, run_together

STEPS = 20
# per rank on 2 processes / on one: the same global batch of 8 images, or 4 clips x 4 replicas
BATCHES = {2: ("4", "8"), 1: ("8", "16")}
# 7 evaluation items per source in batches of 3: one process runs 3, 3, 1; two run 3, 1 each, rank 1's last
# batch being one item of padding. Validation at every epoch end.
VALIDATION = ["--data.init_args.val_samples", "7", "--data.init_args.val_batch_size", "3"]
CLIP = ["--trainer.gradient_clip_val", "0.05"]  # small enough to clip every step of this run
DDP = ["--config", str(REPO / "configs" / "trainer" / "ddp.yaml")]
SBATCH = REPO / "scripts" / "slurm" / "fit.sbatch"


def _options(demo_root: Path, out: Path, world: int) -> list[str]:
    """What every run here adds to the demo config: test data and a tiny model, STEPS steps, the recorder."""
    out.mkdir()
    cfg = run_config(demo_root, out, max_steps=STEPS, limit_val_batches=None, val_check_interval=None,
                     check_val_every_n_epoch=1, logger=False,
                     callbacks=[{"class_path": "dist_helpers.GlobalStepRecorder", "init_args": {"out": str(out)}}])
    images, videos = BATCHES[world]
    return ["--config", str(cfg), *VALIDATION, *CLIP, "--trainer.accelerator", "cpu", "--trainer.precision",
            "32-true", "--data.init_args.image_batch_size", images, "--data.init_args.video_batch_size", videos]


def _results(out: Path) -> dict:
    return {"steps": json.loads((out / "steps.json").read_text()), "val": json.loads((out / "validation.json").read_text()),
            "ranks": json.loads((out / "ranks.json").read_text()), "weights": torch.load(out / "weights.pt")}


def _fit(demo_root, out: Path, world: int, extra: list[str]) -> dict:
    args = ["fit", "--config", DEMO, *extra, *_options(demo_root, out, world), "--trainer.devices", str(world)]
    result = run_cli_subprocess(args, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return {**_results(out), "stdout": result.stdout}


def _startup_processes(output: str) -> list[str]:
    """The processes line of every start-up summary in one process's output (rank 0 prints it, once)."""
    lines = output.splitlines()
    return [lines[i + 1].split(None, 1)[1] for i, line in enumerate(lines) if line == "Start-up summary:"]


@pytest.fixture(scope="module")
def one_process(demo_root, tmp_path_factory) -> dict:
    return _fit(demo_root, tmp_path_factory.mktemp("one") / "world1", 1, [])


def _assert_equal(many: dict, one: dict) -> None:
    assert [s["modality"] for s in many["steps"]] == [s["modality"] for s in one["steps"]]
    assert {s["modality"] for s in one["steps"]} == {"image", "video"} and len(one["steps"]) == STEPS
    for a, b in zip(many["steps"], one["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
        # the ranks' shards of a step are disjoint and together are the one process's batch
        assert sorted(a["index"]) == sorted(b["index"]), a["step"]
        if a["modality"] == "image":
            assert len(set(a["index"])) == len(a["index"]), a["step"]
    assert many["weights"].keys() == one["weights"].keys()
    assert any(k.startswith("probes.") for k in one["weights"])  # the online probes were on, as shipped
    for key in one["weights"]:
        torch.testing.assert_close(many["weights"][key], one["weights"][key], rtol=1e-5, atol=1e-6, msg=key)
    assert len(one["val"]) == len(many["val"]) >= 1  # the end of every epoch
    for a, b in zip(many["val"], one["val"]):
        assert {"val/loss_image", "val/loss_video", "val/probe_acc_image"} <= b.keys()
        assert a.keys() == b.keys()
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


GRAD_CKPT = ["--model.init_args.grad_checkpointing", "{image: true, video: true}"]


@pytest.mark.parametrize(
    ("strategy", "options"),
    [("ddp.yaml", []), ("fsdp2.yaml", GRAD_CKPT)],  # FSDP2 is the ViT-H path: with activation checkpointing
    ids=["ddp", "fsdp2-grad-ckpt"],
)
def test_two_processes_equal_one(demo_root, tmp_path, one_process, strategy, options):
    layer = ["--config", str(REPO / "configs" / "trainer" / strategy), *options]
    many = _fit(demo_root, tmp_path / "world2", 2, layer)
    _assert_equal(many, one_process)
    name = {"ddp.yaml": "DDPStrategy", "fsdp2.yaml": "FSDP2Strategy"}[strategy]
    # both ranks write to this output; only rank 0 prints the summary, with the global batch of the one process
    assert _startup_processes(many["stdout"]) == [f"2 = 1 node x 2 devices per node ({name}, precision 32-true)"]
    assert "  batch image      4 per rank x 2 ranks x 1 accumulated = 8 per optimizer step" in many["stdout"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbatch_command(config: str, nnodes: int, extra: list[str]) -> list[str]:
    """The script's ``srun omnimae-cli fit ...`` line, its variables filled in, without srun."""
    (line,) = [line for line in SBATCH.read_text().splitlines() if line.startswith("srun ")]
    words = []
    for word in shlex.split(line)[1:]:
        words.extend(extra if word == "$@" else [word.replace("$CONFIG", config).replace("$SLURM_NNODES", str(nnodes))])
    assert words[0] == "omnimae-cli"
    return [sys.executable, "-m", "omnimae_pl", *words[1:]]


def test_two_nodes_under_slurm_equal_one_process(demo_root, tmp_path, one_process):
    """The SLURM script's command in 2 processes with the variables srun gives 2 nodes of one task each:
    Lightning's SLURM environment takes ranks, nodes and world size from them (no SLURM here)."""
    out = tmp_path / "slurm"
    command = _sbatch_command(DEMO, 2, [*DDP, *_options(demo_root, out, 2), "--trainer.devices", "1"])
    common = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "omnimae", "SLURM_NTASKS": "2", "SLURM_NNODES": "2",
              "SLURM_NTASKS_PER_NODE": "1", "SLURM_NODELIST": "127.0.0.1", "SLURM_LOCALID": "0",
              "MASTER_PORT": str(_free_port())}
    envs = [{**common, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank)} for rank in range(2)]
    logs = run_together([command, command], envs, cwd=tmp_path)
    for code, log in logs:
        assert code == 0, log[-3000:]
    assert [_startup_processes(log) for _, log in logs] == [
        ["2 = 2 nodes x 1 device per node (DDPStrategy, precision 32-true)"], []]
    results = _results(out)
    assert results["ranks"] == [{"global_rank": r, "node_rank": r, "local_rank": 0, "world_size": 2, "num_nodes": 2,
                                 "environment": "SLURMEnvironment"} for r in range(2)]
    _assert_equal(results, one_process)


def test_two_nodes_with_torchrun_equal_one_process(demo_root, tmp_path, one_process):
    """README's multi-node torchrun command, once per node on this machine, rendezvous on loopback."""
    out = tmp_path / "torchrun"
    args = ["fit", "--config", DEMO, *DDP, "--trainer.num_nodes", "2", *_options(demo_root, out, 2),
            "--trainer.devices", "1"]
    port = _free_port()
    commands = [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(rank),
                 "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                 "-m", "omnimae_pl", *args] for rank in range(2)]
    logs = run_together(commands, [{}, {}], cwd=tmp_path)
    for code, log in logs:
        assert code == 0, log[-3000:]
    assert [_startup_processes(log) for _, log in logs] == [
        ["2 = 2 nodes x 1 device per node (DDPStrategy, precision 32-true)"], []]
    results = _results(out)
    assert results["ranks"] == [{"global_rank": r, "node_rank": r, "local_rank": 0, "world_size": 2, "num_nodes": 2,
                                 "environment": "TorchElasticEnvironment"} for r in range(2)]
    _assert_equal(results, one_process)
