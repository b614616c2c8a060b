"""Runs for the reliability tests (preemption, non-finite steps, checkpoints, the golden curve): the test config
with a ResumableCheckpoint, in-process fits with extra callbacks, and ``omnimae-cli fit`` subprocesses that a test
can signal while they run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from cli_helpers import DEMO, run_config
from lightning.pytorch import Callback

from omnimae_pl.cli import run_cli

TESTS = Path(__file__).resolve().parent


def checkpointed_config(demo_root: Path, tmp_path: Path, every_n_train_steps: int, patience: int = 5,
                        extra_callbacks: tuple = (), **trainer) -> Path:
    """The test config (tiny model, test data, no validation, no logger) writing to ``tmp_path/ckpt`` every
    ``every_n_train_steps``, keeping every file, and stopping at ``patience`` non-finite steps in a row."""
    callbacks = [
        {"class_path": "omnimae_pl.callbacks.ResumableCheckpoint",
         "init_args": {"dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": every_n_train_steps,
                       "save_top_k": -1, "filename": "step{step}"}},
        {"class_path": "omnimae_pl.callbacks.StopOnNonFinite", "init_args": {"patience": patience}},
        *extra_callbacks,
    ]
    options = {"limit_val_batches": 0, "val_check_interval": None, "logger": False, "callbacks": callbacks, **trainer}
    return run_config(demo_root, tmp_path, **options)


def fit_in_process(config: Path, *callbacks: Callback, ckpt_path: Path | None = None, args: tuple = ()):
    """``fit`` of ``configs/demo.yaml`` layered with ``config`` in this process, with ``callbacks`` first (they see
    each step before the checkpoint does); returns the CLI, so its trainer and model can be inspected."""
    cli = run_cli(["--config", DEMO, "--config", str(config), *args], run=False)
    cli.trainer.callbacks[:0] = list(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


class Poison(Callback):
    """One NaN pixel in the batch of each of ``steps`` (1-based, as ``global_step`` after the step), on every rank
    or on ``rank`` only."""

    def __init__(self, steps: list[int], rank: int | None = None) -> None:
        self.steps = set(steps)
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 in self.steps and self.rank in (None, trainer.global_rank):
            batch["input"][(0,) * batch["input"].ndim] = float("nan")


class StepLog(Callback):
    """Appends ``{"step", "modality", "loss"}`` to a JSON-lines file at the end of every step (rank 0), flushed at
    once: the loss curve of a run, and its progress while it runs."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            row = {"step": trainer.global_step, "modality": batch["modality"], "loss": outputs["loss"].item()}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def read_steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def subprocess_env() -> dict[str, str]:
    """The environment of an ``omnimae-cli`` subprocess: this folder importable (for the callbacks of the test
    helpers), one math thread, wandb offline and quiet."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def start_fit(args: list[str], cwd: Path, log: Path, new_session: bool = False) -> subprocess.Popen:
    """``python -m omnimae_pl fit <args>`` in the background, stdout and stderr to ``log``; ``new_session``: in a
    process group of its own, which a test can signal as a scheduler signals a job."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "omnimae_pl", "fit", *args], cwd=cwd, env=subprocess_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=new_session)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: the DDP ranks Lightning launched)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
        if parent == pid:
            children.append(int(stat.parent.name))
    return children
