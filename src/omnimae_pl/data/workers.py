"""What every DataLoader worker of the project does first, and how the main process ends them."""

from __future__ import annotations

import os
import signal

from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

# How long a worker keeps serving after the job's SIGTERM: enough for the main process to finish its step
# (SLURM and Kubernetes SIGKILL the job 30 s after SIGTERM by default). A worker that is never shut down then
# leaves by itself, so nothing can wait on it forever.
SIGTERM_GRACE_S = 20


def ignore_stop_signals(worker_id: int) -> None:
    """Leave the job's stop signals to the main process. SLURM (``scancel``, the pre-timeout SIGUSR1) and
    Kubernetes signal every process of the job: a worker killed by one would crash the main process (a worker
    death is an error to the DataLoader) before it saves. SIGUSR1 is ignored. SIGTERM is kept for
    ``SIGTERM_GRACE_S`` seconds: the main process saves at its step boundary and shuts its workers down
    (:func:`shutdown_workers`); a worker still alive then exits quietly (status 0, which the DataLoader does not
    report), and a second SIGTERM ends it at once."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_first_sigterm)


def _on_first_sigterm(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
    signal.alarm(SIGTERM_GRACE_S)


def shutdown_workers(iterator) -> None:
    """End the worker processes behind a DataLoader iterator now (what it does itself when collected): a run
    that stops must not leave its workers to the interpreter's exit, which terminates them with the very SIGTERM
    that they keep for a while."""
    if isinstance(iterator, _MultiProcessingDataLoaderIter):
        iterator._shutdown_workers()
