"""Multi-process runs in tests: ``omnimae-cli`` as a subprocess (Lightning re-launches the command for the other
ranks, which must not be pytest), and a callback that records what every rank agrees on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from reliability_helpers import subprocess_env


class GlobalStepRecorder(Callback):
    """Per step: the modality and the loss averaged over the ranks (what one process with the whole global batch
    computes), the epoch, the lr and every rank's sample indices; per validation, its figures; at the end, rank 0 writes them and the model's weights under ``out``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.steps: list[dict] = []
        self.validation: list[dict] = []

    def on_train_start(self, trainer, pl_module) -> None:
        me = {"global_rank": trainer.global_rank, "node_rank": trainer.node_rank, "local_rank": trainer.local_rank,
              "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
              "environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__}
        self.ranks = [me]
        if dist.is_available() and dist.is_initialized():
            self.ranks = [None] * dist.get_world_size()
            dist.all_gather_object(self.ranks, me)

    def on_validation_end(self, trainer, pl_module) -> None:
        # already reduced over the ranks by Lightning (sync_dist) or by the metric itself
        self.validation.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach().clone()
        modality = batch["modality"]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(loss)
            loss /= dist.get_world_size()
            seen: list = [None] * dist.get_world_size()
            dist.all_gather_object(seen, modality)
            assert len(set(seen)) == 1, f"ranks ran different modalities at step {trainer.global_step}: {seen}"
        index = batch["index"].tolist()
        if dist.is_available() and dist.is_initialized():
            every: list = [None] * dist.get_world_size()
            dist.all_gather_object(every, index)
            index = [i for rank in every for i in rank]
        self.steps.append({"step": trainer.global_step, "modality": modality, "loss": loss.item(),
                           "epoch": trainer.current_epoch, "source": batch["source"], "index": index,
                           "lr": trainer.optimizers[0].param_groups[0]["lr"]})

    def on_train_end(self, trainer, pl_module) -> None:
        # FSDP2 holds shards (DTensors): every rank takes part in gathering the full tensors
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().clone()
                 for k, v in pl_module.state_dict().items()}
        if trainer.is_global_zero:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "steps.json").write_text(json.dumps(self.steps))
            (self.out / "validation.json").write_text(json.dumps(self.validation))
            (self.out / "ranks.json").write_text(json.dumps(self.ranks))
            torch.save(state, self.out / "weights.pt")


def run_cli_subprocess(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """``python -m omnimae_pl <args>`` to its end (``env`` added to the test environment)."""
    return subprocess.run([sys.executable, "-m", "omnimae_pl", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**subprocess_env(), **(env or {})})


def run_together(commands: list[list[str]], envs: list[dict], cwd: Path, timeout: int = 600) -> list:
    """Start every command at once (the processes of one job, e.g. one per node) and wait for all of them:
    [(returncode, output)]. Output goes to files (a full pipe would stall a rank, and so every rank); all are
    killed if one overruns."""
    logs = [cwd / f"process{i}.log" for i in range(len(commands))]
    procs = []
    for cmd, env, log in zip(commands, envs, logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=cwd, env={**subprocess_env(), **env}, stdout=out,
                                          stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
        return [(p.returncode, log.read_text()) for p, log in zip(procs, logs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
