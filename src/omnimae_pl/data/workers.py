"""What every DataLoader worker of the project does first."""

from __future__ import annotations

import signal


def _first_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the next one (the main process ending us) terminates


def ignore_stop_signals(worker_id: int) -> None:
    """Leave the job's stop signals to the main process. Schedulers (``scancel``, SLURM's pre-timeout SIGUSR1,
    Kubernetes) signal every process of a job; a worker that died of it would crash the run before the main
    process reaches the step boundary where it saves. A worker ignores SIGUSR1 and its first SIGTERM only:
    the main process still ends its workers with SIGTERM on the way out."""
    signal.signal(signal.SIGTERM, _first_sigterm)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
