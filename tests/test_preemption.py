"""SIGTERM, SIGUSR1 or SIGINT during a fit: every rank saves last.ckpt at the end of the step under way, rank 0
says where in one line, the process exits 75, and ``fit --ckpt_path last`` goes on bit-identically to a run that
was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import stat
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import DEMO, REPO
from lightning.pytorch import Callback
from reliability_helpers import checkpointed_config, child_pids, fit_in_process, read_steps, start_fit

from omnimae_pl.data.workers import SIGTERM_GRACE_S
from omnimae_pl.errors import EXIT_PREEMPTED

STEPS = 16
SEED = 15  # picks the step each signal is sent at


def _config(demo_root: Path, out: Path, *extra_callbacks) -> Path:
    log = {"class_path": "reliability_helpers.StepLog", "init_args": {"path": str(out / "steps.jsonl")}}
    return checkpointed_config(demo_root, out, every_n_train_steps=5, max_steps=STEPS,
                               extra_callbacks=(log, *extra_callbacks))


def _signal_at(proc, steps: Path, at: int, signum: int, log: Path, pid: int | None = None) -> None:
    """Waits until the run has logged step ``at``, then sends ``signum`` (to ``pid``, default the run itself)."""
    deadline = time.monotonic() + 240
    while len(read_steps(steps)) < at:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the run did not reach the step"
        time.sleep(0.01)
    os.kill(pid or proc.pid, signum)


def _rank_pid(parent: int, rank: int) -> int | None:
    """The child of ``parent`` that Lightning launched as DDP rank ``rank`` (its environment says so), not a
    short-lived helper process the parent ran meanwhile (signalling one of those raised ProcessLookupError)."""
    for pid in child_pids(parent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if f"LOCAL_RANK={rank}".encode() in environ:
            return pid
    return None


def _stop_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("omnimae-pl:")]


def _assert_identical(a, b, where: str = "") -> None:
    """Nested dicts / lists of tensors and numbers, equal to the last bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: max abs diff {(a.float() - b.float()).abs().max().item()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def uninterrupted(demo_root, tmp_path_factory) -> tuple[list[dict], dict]:
    """The same fit, never signalled: its per-step losses and its final last.ckpt."""
    out = tmp_path_factory.mktemp("uninterrupted")
    proc = start_fit(["--config", DEMO, "--config", str(_config(demo_root, out))], out, out / "fit.log")
    assert proc.wait(timeout=300) == 0, (out / "fit.log").read_text()[-3000:]
    return read_steps(out / "steps.jsonl"), torch.load(out / "ckpt" / "last.ckpt", weights_only=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=lambda s: s.name)
def test_a_signal_at_a_random_step_saves_exits_75_and_resumes_bit_identically(demo_root, tmp_path, uninterrupted,
                                                                              signum):
    """SIGUSR1 outside SLURM would kill the process by default; SIGTERM would stop it, under Lightning, without a
    checkpoint."""
    cfg, steps, log = _config(demo_root, tmp_path), tmp_path / "steps.jsonl", tmp_path / "fit.log"
    args = ["--config", DEMO, "--config", str(cfg)]
    at = random.Random(SEED + signum).randint(3, STEPS - 6)
    proc = start_fit(args, tmp_path, log)
    _signal_at(proc, steps, at, signum, log)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-3000:]

    saved = read_steps(steps)[-1]["step"]  # the step under way when the signal came
    last = tmp_path / "ckpt" / "last.ckpt"
    assert at <= saved < STEPS
    assert torch.load(last, weights_only=True)["global_step"] == saved
    assert _stop_lines(log) == [f"omnimae-pl: {signum.name} at step {saved}: saved {last.resolve()}; "
                                "resume with fit --ckpt_path last"]

    resumed = start_fit([*args, "--ckpt_path", "last"], tmp_path, tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    reference_steps, reference = uninterrupted
    assert read_steps(steps) == reference_steps  # steps 1..saved, then saved+1..STEPS: same modalities, same losses
    final = torch.load(last, weights_only=True)
    for key in ("global_step", "state_dict", "optimizer_states", "lr_schedulers", "skipped_steps"):
        _assert_identical(final[key], reference[key], key)


class SendSignal(Callback):
    """Sends this process ``count`` x ``signum`` as step ``step`` starts."""

    def __init__(self, step: int, signum: int, count: int = 1) -> None:
        self.step, self.signum, self.count = step, signum, count

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.step:
            for _ in range(self.count):
                os.kill(os.getpid(), self.signum)


def test_ctrl_c_saves_and_exits_75_a_second_one_interrupts_at_once(demo_root, tmp_path, capsys):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    cfg = checkpointed_config(demo_root, tmp_path, every_n_train_steps=100, max_steps=8)
    with pytest.raises(SystemExit) as stop:
        fit_in_process(cfg, SendSignal(step=3, signum=signal.SIGINT))
    assert stop.value.code == EXIT_PREEMPTED
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert "omnimae-pl: SIGINT at step 3: saved" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # fit put the process's own handlers back

    (tmp_path / "ckpt" / "last.ckpt").unlink()
    with pytest.raises(SystemExit) as stop:
        fit_in_process(cfg, SendSignal(step=3, signum=signal.SIGINT, count=2))
    assert stop.value.code == 1  # Lightning's KeyboardInterrupt exit
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()


def test_sigusr1_under_slurm_saves_and_requeues_the_job(demo_root, tmp_path, monkeypatch, capsys):
    """Lightning's own SLURM handler (which this one replaces) requeues the job on SIGUSR1: so does this one,
    after the save. ``scontrol`` is a script here that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "omnimae", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    cfg = checkpointed_config(demo_root, tmp_path, every_n_train_steps=100, max_steps=8)
    with pytest.raises(SystemExit) as stop:
        fit_in_process(cfg, SendSignal(step=2, signum=signal.SIGUSR1))
    assert stop.value.code == EXIT_PREEMPTED
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert (f"omnimae-pl: SIGUSR1 at step 2: saved {last.resolve()}; resume with fit --ckpt_path last; "
            "SLURM job 4242 requeued") in capsys.readouterr().err


def test_a_signal_to_one_ddp_rank_stops_every_rank_at_the_same_step(demo_root, tmp_path):
    """Two CPU processes (gloo): SIGTERM to rank 1 only, the rank that writes nothing. Rank 0 learns of it at the
    step's end, both save that step, one line is printed, rank 0 exits 75 and rank 1 ends too. A NaN batch on rank
    1 at step 2 is skipped on both ranks."""
    poison = {"class_path": "reliability_helpers.Poison", "init_args": {"steps": [2], "rank": 1}}
    cfg, steps, log = _config(demo_root, tmp_path, poison), tmp_path / "steps.jsonl", tmp_path / "fit.log"
    args = ["--config", DEMO, "--config", str(REPO / "configs" / "trainer" / "ddp.yaml"), "--config", str(cfg),
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.precision", "32-true",
            "--data.init_args.image_batch_size", "4", "--data.init_args.video_batch_size", "8",
            "--model.init_args.linear_probe", "false"]  # per-modality probes are unused on the other's steps
    proc = start_fit(args, tmp_path, log)
    at = random.Random(SEED).randint(3, STEPS - 6)
    deadline = time.monotonic() + 240
    while not (rank1 := _rank_pid(proc.pid, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    _signal_at(proc, steps, at, signal.SIGTERM, log, pid=rank1)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-3000:]

    saved = read_steps(steps)[-1]["step"]
    last = tmp_path / "ckpt" / "last.ckpt"
    assert at <= saved < STEPS
    assert _stop_lines(log) == [f"omnimae-pl: a signal to another rank at step {saved}: saved {last.resolve()}; "
                                "resume with fit --ckpt_path last"]
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == saved and ckpt["skipped_steps"] == 1
    deadline = time.monotonic() + 60
    while Path(f"/proc/{rank1}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{rank1}").exists(), "rank 1 is still running"


@pytest.mark.parametrize(("signum", "whole_job"), [(signal.SIGUSR1, True), (signal.SIGTERM, True),
                                               (signal.SIGTERM, False)], ids=["sigusr1-job", "scancel", "sigterm-main"])
def test_a_signal_with_loader_workers_saves_and_ends_every_process(demo_root, tmp_path, signum, whole_job):
    """SLURM's pre-timeout SIGUSR1 and scancel's SIGTERM reach every process of the job step, DataLoader workers
    included: the workers leave them to the main process, which saves at the step boundary and shuts its
    (persistent) workers down before it exits; with the main process alone signalled, nothing waits on them."""
    cfg, steps, log = _config(demo_root, tmp_path), tmp_path / "steps.jsonl", tmp_path / "fit.log"
    workers = ["--data.init_args.num_workers", "2", "--data.init_args.persistent_workers", "true"]
    proc = start_fit(["--config", DEMO, "--config", str(cfg), *workers], tmp_path, log, new_session=True)
    _signal_at(proc, steps, 3, signum, log, pid=-proc.pid if whole_job else proc.pid)  # -pid: the process group
    signalled = time.monotonic()
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, log.read_text()[-3000:]
    assert time.monotonic() - signalled < SIGTERM_GRACE_S, "the exit waited for the workers' grace"
    saved = read_steps(steps)[-1]["step"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == saved
    assert len(_stop_lines(log)) == 1
    with pytest.raises(ProcessLookupError):  # no process is left in the run's group: no worker outlived it
        os.killpg(proc.pid, 0)
