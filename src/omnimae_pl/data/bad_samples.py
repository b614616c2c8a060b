"""Counting of placeholder samples (``valid=False``) per source, with a fail-fast threshold.

A dataset turns an unreadable file into a placeholder instead of raising, so one corrupt file cannot stop a
week-long run; this tracker keeps that from hiding a broken copy of a dataset. It sees every batch on its way
to the model, counts the invalid rows of each source, remembers which files failed (how often, and why: the
batch's ``errors``), and raises ``TooManyInvalidSamplesError`` naming them once a source's invalid fraction
exceeds ``max_invalid_fraction`` (judged only after ``min_samples`` rows, or the dataset's length if that is
smaller; :meth:`BadSampleTracker.check` judges what was seen however little, for the end of an evaluation).

Counts are per process (each rank counts its own batches).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from omnimae_pl.data.sample import PADDING_INDEX
from omnimae_pl.errors import UserError, check_value


class TooManyInvalidSamplesError(UserError):
    """A source yields more unreadable files than the configured fraction allows: fix or remove the files."""


@dataclass
class _SourceCounts:
    describe: Callable[[int], str]
    size: int
    seen: int = 0
    invalid: int = 0
    failures: Counter = field(default_factory=Counter)  # dataset index -> batches in which it failed
    reasons: dict[int, str] = field(default_factory=dict)  # dataset index -> why it failed, the last time
    unreported: set[int] = field(default_factory=set)  # failed since the last take_failed()
    cpu_decoded: int | None = None  # rows decoded on a CPU instead of the device; None: no device decoding


class BadSampleTracker:
    """Counts invalid samples per source from batches carrying ``source``, ``valid``, ``index`` (and ``errors``)."""

    def __init__(self, max_invalid_fraction: float = 0.1, min_samples: int = 100, show_worst: int = 5) -> None:
        check_value(0.0 <= max_invalid_fraction <= 1.0, "max_invalid_fraction", max_invalid_fraction,
                    "must be in [0, 1]")
        self.max_invalid_fraction = max_invalid_fraction
        self.min_samples = min_samples
        self.show_worst = show_worst
        self._sources: dict[str, _SourceCounts] = {}

    def add_source(self, name: str, describe: Callable[[int], str], size: int) -> None:
        """Register a source: ``describe(index)`` names a sample's file, ``size`` is the dataset's length."""
        self._sources[name] = _SourceCounts(describe, size)

    @property
    def sources(self) -> list[str]:
        return list(self._sources)

    def update(self, batch: Mapping[str, Any]) -> None:
        """Count one collated batch; raise ``TooManyInvalidSamplesError`` when its source crosses the threshold."""
        name = batch["source"]
        if name not in self._sources:
            raise KeyError(f"batch from source {name!r}, which was never registered with add_source")
        counts = self._sources[name]
        index = torch.as_tensor(batch["index"]).reshape(-1).cpu()
        real = index != PADDING_INDEX  # the padding of an evaluation shard is no sample
        invalid = ~torch.as_tensor(batch["valid"]).reshape(-1).bool().cpu() & real
        counts.seen += int(real.sum())
        if bool(invalid.any()):
            counts.invalid += int(invalid.sum())
            failed = set(index[invalid].tolist())
            counts.failures.update(failed)
            counts.unreported |= failed
            errors = batch.get("errors", {})
            counts.reasons.update({i: errors[i] for i in failed if i in errors})
        if counts.seen >= min(self.min_samples, counts.size):
            self._judge(name)

    def count_decoded(self, name: str, cpu_decoded: int, failed: Mapping[int, str]) -> None:
        """After a batch that :meth:`update` counted was decoded on the device (``data.device_decode``):
        ``cpu_decoded`` of its rows were decoded on a CPU instead, ``failed`` ({index: why}) became
        placeholders there; they count as the invalid rows of :meth:`update` do."""
        counts = self._sources[name]
        counts.cpu_decoded = (counts.cpu_decoded or 0) + cpu_decoded
        if failed:
            counts.invalid += len(failed)
            counts.failures.update(failed.keys())
            counts.unreported |= set(failed)
            counts.reasons.update(failed)
            if counts.seen >= min(self.min_samples, counts.size):
                self._judge(name)

    def check(self) -> None:
        """Judge every source on what it saw so far, however few samples (the end of an evaluation)."""
        for name, c in self._sources.items():
            if c.seen:
                self._judge(name)

    def reset(self) -> None:
        """Forget every count (an evaluation run starts afresh); sources stay registered."""
        for name, c in self._sources.items():
            self._sources[name] = _SourceCounts(c.describe, c.size)

    def counts(self) -> dict[str, float]:
        """``<source>/invalid``, ``<source>/seen`` and ``<source>/invalid_fraction`` for every source, for logging;
        ``<source>/cpu_decoded`` for those decoded on the device (:meth:`count_decoded`)."""
        out: dict[str, float] = {}
        for name, c in self._sources.items():
            out[f"{name}/invalid"] = float(c.invalid)
            out[f"{name}/seen"] = float(c.seen)
            out[f"{name}/invalid_fraction"] = c.invalid / c.seen if c.seen else 0.0
            if c.cpu_decoded is not None:
                out[f"{name}/cpu_decoded"] = float(c.cpu_decoded)
        return out

    def worst(self, name: str, k: int | None = None) -> list[tuple[str, int]]:
        """The ``k`` files of a source that failed most often, as (description, number of failures)."""
        counts = self._sources[name]
        return [(counts.describe(i), n) for i, n in counts.failures.most_common(k or self.show_worst)]

    def take_failed(self, name: str) -> list[tuple[str, str]]:
        """(file, why) of every file of a source that failed since the last call, in dataset order."""
        counts = self._sources[name]
        failed = [(counts.describe(i), counts.reasons.get(i, "")) for i in sorted(counts.unreported)]
        counts.unreported = set()
        return failed

    def state_dict(self) -> dict[str, Any]:
        return {
            name: {"seen": c.seen, "invalid": c.invalid, "failures": dict(c.failures), "reasons": dict(c.reasons),
                   "unreported": sorted(c.unreported),
                   **({} if c.cpu_decoded is None else {"cpu_decoded": c.cpu_decoded})}
            for name, c in self._sources.items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore counts of the registered sources; sources the state does not know start from zero."""
        for name, c in self._sources.items():
            saved = state.get(name, {})
            c.seen, c.invalid = int(saved.get("seen", 0)), int(saved.get("invalid", 0))
            c.failures = Counter({int(i): int(n) for i, n in saved.get("failures", {}).items()})
            c.reasons = {int(i): str(r) for i, r in saved.get("reasons", {}).items()}
            c.unreported = {int(i) for i in saved.get("unreported", [])}
            c.cpu_decoded = int(saved["cpu_decoded"]) if "cpu_decoded" in saved else None

    def _judge(self, name: str) -> None:
        c = self._sources[name]
        if c.invalid > self.max_invalid_fraction * c.seen:
            raise TooManyInvalidSamplesError(self._message(name))

    def _message(self, name: str) -> str:
        c = self._sources[name]
        files = ", ".join(
            f"{c.describe(i)} ({n}x{': ' + c.reasons[i] if i in c.reasons else ''})"
            for i, n in c.failures.most_common(self.show_worst)
        )
        return (
            f"source {name!r}: {c.invalid} of {c.seen} samples ({c.invalid / c.seen:.1%}) could not be read, more than "
            f"max_invalid_fraction={self.max_invalid_fraction:g}; worst files: {files}. Fix or remove those files, or "
            "raise data.init_args.max_invalid_fraction"
        )
