"""What every DataLoader worker of the project does first."""

from __future__ import annotations

import signal


def ignore_stop_signals(worker_id: int) -> None:
    """Leave SLURM's pre-timeout SIGUSR1 to the main process: SLURM signals every process of the job step, and a
    worker killed by it (SIGUSR1's default action) would crash the run before the main process saves. SIGTERM
    keeps its default: the main process ends its workers with it on the way out."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
