"""DataLoader workers survive SLURM's pre-timeout SIGUSR1, sent to every process of the job."""

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
