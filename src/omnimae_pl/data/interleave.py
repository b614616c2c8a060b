"""OmniMAE's "use_one" mixing: every step takes one whole batch from one source, in a seeded random order.

Per epoch (all draws seeded by ``seed`` and the epoch, none by the rank, so every rank agrees):

* Source ``s`` has ``full_s = len(dataset) // (world_size * batch_size)`` full batches per pass over its data.
  A pass is a permutation of the whole dataset (seeded by seed, epoch, pass, source name); rank r takes every
  world_size-th index of it, so the ranks' shards are disjoint and change every epoch (as DistributedSampler).
* Steps: ``steps_s = full_s // replicas_s``. Replicated video (each clip is decoded once and augmented
  ``replicas`` times) thus covers as many video samples per epoch as the set has videos, as in OmniMAE.
* Weights, if given (for every source), keep the total ``sum(steps_s)`` and share it out in proportion to the
  weights (largest remainders, ties to the earlier source): ``steps_s ~= total * w_s / sum(w)``. A source given
  more steps than ``full_s`` starts a second, differently shuffled pass over its data within the epoch.
* The step schedule is a seeded permutation of ``[0] * steps_0 + [1] * steps_1 + ...``.

Each source has its own ``DataLoader`` with a batch sampler that the interleaver fills at the start of every
epoch, so ``num_workers``, ``persistent_workers``, ``prefetch_factor``, ``pin_memory`` and ``timeout`` all work.
Dataset keys are ``(index, epoch)``, so a worker's draws depend on nothing but (seed, epoch, index).

Resume: ``state_dict()`` holds the epoch and the number of batches already delivered (plus the bad-sample
counts); after ``load_state_dict()`` the next iteration recomputes the same schedule and gives every batch
sampler only the batches that remain, so skipped batches are never decoded. Under another layout (world size,
batch sizes) a position inside an epoch resumes at the next epoch. Only one iteration may be active
at a time (as with a DataLoader with persistent workers).

Lightning (2.6): return the interleaver from ``train_dataloader()``. Lightning wraps it in a ``CombinedLoader``
and, not being a ``DataLoader``, leaves it alone (``use_distributed_sampler`` is irrelevant to it); at every
epoch start the fit loop calls ``set_epoch`` on ``iterable.sampler``, which is this module's
``InterleaveSampler``; and the loop saves ``state_dict()`` of every stateful iterable under
``loops.fit_loop.state_dict.combined_loader`` in the checkpoint, loading it back before iterating on resume.
Lightning calls ``iter()`` before ``set_epoch``, so iteration reads the epoch only when the first batch is drawn.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from omnimae_pl.data.bad_samples import BadSampleTracker
from omnimae_pl.data.sample import collate_samples
from omnimae_pl.data.seeding import loader_generator, sample_generator
from omnimae_pl.data.workers import ignore_stop_signals, shutdown_workers
from omnimae_pl.errors import UserError


@dataclass
class Source:
    """One dataset in the mix. ``batch_size`` counts dataset items per rank and step (clips, for replicated
    video); ``replicas`` defaults to the dataset's ``replicas`` attribute, else 1; ``num_workers`` to the
    interleaver's."""

    name: str
    dataset: Dataset
    batch_size: int
    weight: float | None = None
    replicas: int | None = None
    num_workers: int | None = None


class InterleaveSampler:
    """The sampler of the interleaved stream: for an epoch, which source each step uses and which indices each
    of a source's batches holds on this rank. It also holds the epoch and the number of batches of that epoch
    already delivered (``step``), which Lightning moves on through ``set_epoch``."""

    def __init__(
        self,
        names: Sequence[str],
        lengths: Sequence[int],
        batch_sizes: Sequence[int],
        replicas: Sequence[int],
        weights: Sequence[float | None],
        seed: int,
        rank: int,
        world_size: int,
    ) -> None:
        self.names, self.lengths, self.batch_sizes = list(names), list(lengths), list(batch_sizes)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.full_batches = [n // (world_size * b) for n, b in zip(lengths, batch_sizes)]
        natural = [full // r for full, r in zip(self.full_batches, replicas)]
        for name, n, b, r, full, steps in zip(names, lengths, batch_sizes, replicas, self.full_batches, natural):
            if steps == 0:
                raise UserError(
                    f"source {name!r}: {n} items give {full} full batches of {b} x {world_size} ranks, "
                    f"fewer than its replicas={r}, so it would never be used; use a smaller batch size "
                    "(data.init_args.image_batch_size / video_batch_size / batch_size) or fewer replicas"
                )
        self.steps = _apportion(sum(natural), weights) if any(w is not None for w in weights) else natural
        self.epoch = 0
        self.step = 0

    def __len__(self) -> int:
        return sum(self.steps)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch``; the same epoch again keeps the position (Lightning re-sends it on resume)."""
        if epoch != self.epoch:
            self.epoch, self.step = epoch, 0

    def order(self, epoch: int) -> list[int]:
        """Source position for every step of the epoch; the same on every rank."""
        ids = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(self.steps)])
        return ids[torch.randperm(len(ids), generator=sample_generator(self.seed, epoch, 0, "schedule"))].tolist()

    def batches(self, source: int, epoch: int) -> list[list[int]]:
        """This rank's ``steps[source]`` batches of dataset indices for the epoch, in order."""
        name, length, batch = self.names[source], self.lengths[source], self.batch_sizes[source]
        used = self.full_batches[source] * batch * self.world_size
        out: list[list[int]] = []
        for pass_index in range(math.ceil(self.steps[source] / self.full_batches[source])):
            perm = torch.randperm(length, generator=sample_generator(self.seed, epoch, pass_index, "order", name))
            out.extend(perm[:used][self.rank :: self.world_size].view(-1, batch).tolist())
        return out[: self.steps[source]]

    def layout(self) -> dict[str, Any]:
        """What a saved position depends on."""
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "sources": [[n, ln, b, s] for n, ln, b, s in zip(self.names, self.lengths, self.batch_sizes, self.steps)],
        }


class ModalityInterleaver:
    """An iterable of collated single-source batches (see ``omnimae_pl.data.sample``), ``len()`` steps per epoch.

    ``rank`` / ``world_size`` default to torch.distributed's when it is initialised, else 0 / 1. DataLoader
    options apply to every source; ``num_workers`` can be set per source. Invalid samples are counted by
    ``bad_samples`` (a ``BadSampleTracker``) in the main process as batches pass.
    """

    def __init__(
        self,
        sources: Sequence[Source | tuple],
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = 2,
        timeout: float = 0.0,
        bad_samples: BadSampleTracker | None = None,
    ) -> None:
        self.sources = [s if isinstance(s, Source) else Source(*s) for s in sources]
        if not self.sources:
            raise ValueError("ModalityInterleaver needs at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.sampler = InterleaveSampler(
            names,
            [len(s.dataset) for s in self.sources],
            [s.batch_size for s in self.sources],
            [s.replicas or getattr(s.dataset, "replicas", 1) for s in self.sources],
            [s.weight for s in self.sources],
            seed,
            rank,
            world_size,
        )
        self.bad_samples = bad_samples if bad_samples is not None else BadSampleTracker()
        self._batch_lists = [_BatchList() for _ in self.sources]
        self._iterators: dict[int, Iterator] = {}
        self._skip_rest_of_epoch = False  # set by a resume under another layout
        self.loaders = []
        for source, batch_list in zip(self.sources, self._batch_lists):
            workers = num_workers if source.num_workers is None else source.num_workers
            self.bad_samples.add_source(source.name, getattr(source.dataset, "describe", str), len(source.dataset))
            self.loaders.append(
                DataLoader(
                    source.dataset,
                    batch_sampler=batch_list,
                    collate_fn=functools.partial(collate_samples, modality=source.dataset.modality, source=source.name),
                    num_workers=workers,
                    pin_memory=pin_memory,
                    persistent_workers=persistent_workers and workers > 0,
                    prefetch_factor=prefetch_factor if workers > 0 else None,
                    timeout=timeout if workers > 0 else 0.0,
                    generator=loader_generator(seed, "train", source.name),
                    worker_init_fn=ignore_stop_signals,
                )
            )

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def steps_per_source(self) -> dict[str, int]:
        return dict(zip(self.sampler.names, self.sampler.steps))

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A generator: nothing is read or started until the first batch is asked for, after set_epoch.
        return self._iterate()

    def _iterate(self) -> Iterator[dict[str, Any]]:
        sampler = self.sampler
        epoch = sampler.epoch
        if sampler.step >= len(sampler) and not self._skip_rest_of_epoch:  # a finished epoch again replays it
            sampler.step = 0
        self._skip_rest_of_epoch = False
        start = sampler.step
        order = sampler.order(epoch)
        iterators = self._iterators = {}
        for i, batch_list in enumerate(self._batch_lists):
            done = order[:start].count(i)
            batch_list.batches = [[(index, epoch) for index in b] for b in sampler.batches(i, epoch)[done:]]
            if batch_list.batches:  # start every source's workers now, so all of them prefetch
                iterators[i] = iter(self.loaders[i])
        for step in range(start, len(order)):
            batch = next(iterators[order[step]])
            sampler.step = step + 1
            self.bad_samples.update(batch)
            yield batch

    def shutdown(self) -> None:
        """End every source's loader workers now, persistent ones included (the next epoch starts new ones)."""
        for iterator in self._iterators.values():
            shutdown_workers(iterator)
        self._iterators = {}
        for loader in self.loaders:
            loader._iterator = None  # a persistent iterator whose workers are gone cannot be reused

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.sampler.epoch,
            "step": self.sampler.step,
            "layout": self.sampler.layout(),
            "bad_samples": self.bad_samples.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` was taken: exactly, with the same seed, world size, sources and batch sizes.
        Under another layout (e.g. another number of processes) an epoch boundary carries over exactly; a
        position inside an epoch ends that epoch, with a warning: training goes on from the next epoch, as a run
        started on the new layout would, and no sample of the interrupted epoch is seen twice."""
        step = int(state["step"])
        saved_len = sum(s[3] for s in state["layout"]["sources"])
        self.sampler.epoch = int(state["epoch"])
        if 0 < step < saved_len and state["layout"] != self.sampler.layout():
            warnings.warn(
                f"resuming epoch {state['epoch']} at step {step} of {saved_len} under another data layout "
                f"({state['layout']} -> {self.sampler.layout()}): the rest of that epoch is skipped, training goes "
                f"on from epoch {self.sampler.epoch + 1}",
                stacklevel=2,
            )
            step, self._skip_rest_of_epoch = saved_len, True
        self.sampler.step = len(self.sampler) if step >= saved_len else step
        self.bad_samples.load_state_dict(state.get("bad_samples", {}))


class _BatchList(Sampler[list[tuple[int, int]]]):
    """A batch sampler replaying the list of key batches it was last given (read in the main process each time
    the DataLoader starts an epoch, also with persistent workers)."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _apportion(total: int, weights: Sequence[float | None]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainders, ties to the first)."""
    w = [float(x) for x in weights if x is not None]
    if len(w) != len(weights) or any(x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"weights must all be given, non-negative and not all zero, got {list(weights)}")
    exact = [total * x / sum(w) for x in w]
    steps = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(w)), key=lambda i: (steps[i] - exact[i], i))
    for i in by_remainder[: total - sum(steps)]:
        steps[i] += 1
    return steps
