"""What ends a run on purpose, and the exit code each gives (README "When things go wrong").

A user's mistake (a bad config value, a refused or unreadable file) is a :class:`UserError`: ``omnimae-cli``
prints its one-line message, no traceback, and exits with its code. A run that stops on purpose once its state
is safe (:class:`Preempted`, :class:`Diverged`) raises a :class:`RunStopped`, a ``SystemExit`` with its code.
Anything else is a bug and keeps its traceback (exit 1).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2  # fix the config or the file, then run again
EXIT_DIVERGED = 3  # the loss or the gradients stayed non-finite: lower the lr or look at the data
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint of the last step was saved; requeue with --ckpt_path last


class UserError(ValueError):
    """A mistake the user can fix; its message names the key or file and what is accepted."""

    exit_code = EXIT_USER_ERROR


def find_user_error(err: BaseException | None) -> UserError | None:
    """The :class:`UserError` behind ``err``, also when a library (jsonargparse building a class) wrapped it."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__ or err.__context__
    return None


class RunStopped(SystemExit):
    """A run ended on purpose once its state was safe. A ``SystemExit`` (as Lightning's own ``SIGTERMException``),
    so the process exits with :attr:`exit_code` however ``fit`` was started, and ``except Exception`` in a caller
    does not swallow it. Rank 0 prints the one line that says why (:meth:`announce`) before it is raised."""

    exit_code: int

    def __init__(self, message: str) -> None:
        super().__init__(self.exit_code)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def announce(self) -> None:
        print(f"omnimae-pl: {self.message}", file=sys.stderr, flush=True)


class Preempted(RunStopped):
    """SIGTERM, SIGUSR1 or SIGINT: ``last.ckpt`` holds the step the run stopped at."""

    exit_code = EXIT_PREEMPTED


class Diverged(RunStopped):
    """Too many steps in a row had a non-finite loss or gradient norm, or the weights stopped being finite."""

    exit_code = EXIT_DIVERGED


class ConfigError(UserError):
    """A config value that is not accepted: ``<full key>=<value>: <what is accepted>``, e.g.
    ``data.init_args.replicas=0: must be an integer >= 1``."""


def check_value(ok: bool, key: str, value: object, accepted: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``ok``; ``accepted`` says what would be ("must be ...")."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {accepted}")


class DatasetError(UserError):
    """A dataset folder or annotation file that is missing, empty or inconsistent; the message names the path."""


@contextmanager
def config_prefix(prefix: str) -> Iterator[None]:
    """Inside, a :class:`ConfigError` gets ``prefix`` before its key (``model.init_args`` + ``size``): for a part
    that checks its own arguments without knowing where they sit in the config."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{prefix}.{err}") from err
