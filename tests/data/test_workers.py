"""DataLoader workers survive the stop signal a scheduler sends to the whole job, and still end with the run."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

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


def test_a_worker_outlives_the_jobs_sigterm_and_sigusr1():
    it = iter(_loader(ignore_stop_signals))
    first = next(it)
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        os.kill(_worker_pid(it), signum)
    time.sleep(0.3)
    rest = list(it)
    assert torch.cat([first, *rest]).tolist() == list(range(64))


def test_without_it_the_jobs_sigterm_kills_the_run():
    it = iter(_loader(None))
    next(it)
    with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly"):
        os.kill(_worker_pid(it), signal.SIGTERM)
        time.sleep(0.3)
        list(it)


def test_a_second_sigterm_ends_the_worker():
    it = iter(_loader(ignore_stop_signals))
    next(it)
    worker = it._workers[0]
    os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly"):
        os.kill(worker.pid, signal.SIGTERM)  # torch's SIGCHLD handler may raise as soon as the worker dies
        time.sleep(0.3)
        list(it)
    assert worker.exitcode == -signal.SIGTERM
