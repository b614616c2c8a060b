"""DataLoader workers outlive the stop signals a scheduler sends to every process of the job, and end when the
main process shuts them down."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from omnimae_pl.data import workers
from omnimae_pl.data.workers import ignore_stop_signals


class _Slow(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> torch.Tensor:
        time.sleep(0.02)
        return torch.tensor(i)


def _loader(init) -> DataLoader:
    return DataLoader(_Slow(), batch_size=2, num_workers=1, worker_init_fn=init, timeout=3)


def _worker_pid(it) -> int:
    return it._workers[0].pid


def test_a_worker_outlives_the_jobs_sigusr1():
    it = iter(_loader(ignore_stop_signals))
    first = next(it)
    os.kill(_worker_pid(it), signal.SIGUSR1)
    time.sleep(0.3)
    rest = list(it)
    assert torch.cat([first, *rest]).tolist() == list(range(64))


def test_without_it_sigusr1_kills_the_run():
    it = iter(_loader(None))
    next(it)
    with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly"):
        os.kill(_worker_pid(it), signal.SIGUSR1)
        time.sleep(0.3)
        list(it)


def test_a_worker_keeps_serving_after_the_jobs_sigterm_and_a_second_one_ends_it():
    it = iter(_loader(ignore_stop_signals))
    first = next(it)
    worker = it._workers[0]
    os.kill(worker.pid, signal.SIGTERM)  # scancel: every process of the job gets one
    time.sleep(0.3)
    rest = list(it)  # the main process finishes its step with the worker's batches
    assert torch.cat([first, *rest]).tolist() == list(range(64))


def test_a_worker_left_alive_after_sigterm_leaves_quietly_after_the_grace(monkeypatch):
    monkeypatch.setattr(workers, "SIGTERM_GRACE_S", 1)  # the workers are forked: they see the patched value
    loader = DataLoader(_Slow(), batch_size=2, num_workers=1, worker_init_fn=ignore_stop_signals,
                        persistent_workers=True, timeout=3)
    it = iter(loader)
    next(it)
    worker = it._workers[0]
    os.kill(worker.pid, signal.SIGTERM)
    worker.join(timeout=10)
    assert worker.exitcode == 0  # a status the DataLoader does not report as a crash
    workers.shutdown_workers(it)


def test_shutdown_ends_persistent_workers_at_once():
    loader = DataLoader(_Slow(), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals,
                        persistent_workers=True, timeout=3)
    it = iter(loader)
    next(it)
    procs = list(it._workers)
    start = time.monotonic()
    workers.shutdown_workers(it)
    assert not any(p.is_alive() for p in procs)
    assert time.monotonic() - start < workers.SIGTERM_GRACE_S / 2
