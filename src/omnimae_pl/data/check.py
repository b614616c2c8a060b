"""``omnimae-cli data-check``: read every file a training config would use, before the run does.

Takes the ``data:`` section of the configs given to ``omnimae-cli fit`` (``--config a.yaml --config b.yaml``,
later ones win, ``--data.init_args.*`` overrides after them), builds the datamodule, lists each source's train,
val and test split with the datamodule's own datasets, and probes every file in ``--workers`` processes
(``omnimae_pl.data.probe``). Reports counts per split and class, unreadable files with their reasons, image mode
and size and video fps / duration / resolution / frame statistics, SSv2 annotation problems; a summary on the
terminal, everything in a JSON file (``--out``). Exit 0 when every split's share of unreadable files is within
the config's ``max_invalid_fraction``; 2 (``EXIT_USER_ERROR``) naming the splits otherwise, or when a split
cannot even be listed (training would stop at the start). See docs/data_check.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from lightning.pytorch import LightningDataModule
from tqdm import tqdm

from omnimae_pl.config_parser import OneLineErrorParser
from omnimae_pl.data.check_report import SplitCheck, print_report, reasons_help
from omnimae_pl.data.probe import init_worker, probe_chunk
from omnimae_pl.data.sources import SourceConfig
from omnimae_pl.data.video_datasets import SSV2_SPLITS, _read_json
from omnimae_pl.errors import ConfigError, DatasetError, UserError, find_user_error

STAGES = (("train", "split"), ("val", "val_split"), ("test", "test_split"))
UNKNOWN_TEMPLATE = "<template not in labels.json>"  # the class of SSv2 entries the datamodule refuses


class DataCheckFailed(UserError):
    """Some split has more unreadable files than ``max_invalid_fraction`` allows, or cannot be listed (exit 2)."""


@dataclass
class Listing:
    """The files of one source and split: ``describe(i)`` names file i, ``labels[i]`` indexes ``classes``."""

    source: SourceConfig
    split: str
    stages: list[str]
    size: int = 0
    describe: Callable[[int], str] | None = None
    labels: np.ndarray | None = None
    classes: tuple[str, ...] = ()
    error: str = ""  # why the datamodule refuses this split (training would stop at the start)
    skipped: str = ""  # why data-check does not read this split
    annotation_problems: tuple[dict, ...] = ()  # SSv2 entries with no id or an unknown template


def read_datamodule(configs: list[str], overrides: list[str]) -> LightningDataModule:
    """The datamodule of the ``data:`` sections of ``configs`` composed as LightningCLI does, then ``overrides``."""
    parser = OneLineErrorParser(prog="omnimae-cli data-check")
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
    args = []
    for config in configs:
        try:
            document = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"--config {config}: cannot read it ({err})") from None
        if "data" in document:
            args += ["--data", yaml.safe_dump(document["data"])]
    if not args:
        raise ConfigError(f"--config {' '.join(configs)}: no data: section in any of them")
    namespace = parser.parse_args(args + overrides)
    try:
        return parser.instantiate(namespace).data
    except Exception as err:  # jsonargparse wraps the datamodule's own checks
        mistake = find_user_error(err)
        raise (mistake or err) from None


def list_splits(dm: LightningDataModule) -> list[Listing]:
    """One listing per source and distinct split of the datamodule, in config order."""
    sources = dm.sources if hasattr(dm, "sources") else [dm.source]
    listings = []
    for cfg in sources:
        splits: dict[str, list[str]] = {}
        for stage, field in STAGES:
            if getattr(cfg, field) is not None:
                splits.setdefault(getattr(cfg, field), []).append(stage)
        listings += [_list_split(dm, cfg, split, stages) for split, stages in splits.items()]
    return listings


def _list_split(dm: LightningDataModule, cfg: SourceConfig, split: str, stages: list[str]) -> Listing:
    listing = Listing(cfg, split, stages)
    if cfg.kind not in ("imagenet", "ssv2", "video_folder"):  # e.g. litdata shards, checked when they were written
        listing.skipped = f"kind {cfg.kind!r}: data-check reads the files of imagenet, ssv2 and video_folder sources"
        return listing
    try:  # the datamodule's own dataset: its folder and annotation checks, errors naming the config key
        dataset = dm._dataset(cfg, split, False, None)
    except UserError as err:
        dataset, listing.error = None, str(err)
    if cfg.kind == "ssv2":  # listed again here, so that every entry is seen, not only up to the first bad one
        try:
            paths, labels, listing.classes, listing.annotation_problems = _ssv2_entries(cfg, split)
        except UserError as err:
            listing.error = listing.error or str(err)
            return listing
        listing.size, listing.describe, listing.labels = len(paths), paths.__getitem__, labels
    elif dataset is not None:
        listing.size, listing.describe = len(dataset), dataset.describe
        listing.labels, listing.classes = np.asarray(dataset.labels), tuple(dataset.classes)
    return listing


def _ssv2_entries(cfg: SourceConfig, split: str) -> tuple[list[str], np.ndarray, tuple[str, ...], tuple[dict, ...]]:
    """Paths, labels and class names of an SSv2 split as ``SSv2`` lists them, and every entry it would refuse."""
    folder = Path(cfg.annotations)
    templates = _read_json(folder / "something-something-v2-labels.json")
    entries = _read_json(folder / f"something-something-v2-{split}.json")
    if not isinstance(templates, dict) or not isinstance(entries, list):
        raise DatasetError(f"{folder}: the labels file must map templates to indices, the split file list videos")
    index = {template: int(i) for template, i in templates.items()}
    classes = [""] * (max(index.values()) + 1)
    for template, i in index.items():
        classes[i] = template
    unknown = len(classes)
    paths, labels, problems = [], [], []
    for n, entry in enumerate(entries):
        video_id = entry.get("id") if isinstance(entry, dict) else None
        if video_id is None:
            problems.append({"entry": n, "problem": "no id"})
            continue
        label = -1
        if split != "test":
            template = str(entry.get("template", "")).replace("[", "").replace("]", "")
            label = index.get(template, unknown)
            if label == unknown:
                problems.append({"entry": n, "id": str(video_id), "problem": f"template {template!r} not in labels"})
        paths.append(str(Path(cfg.root) / f"{video_id}.webm"))
        labels.append(label)
    return paths, np.asarray(labels, dtype=np.int64), (*classes, UNKNOWN_TEMPLATE), tuple(problems)


def ssv2_orphans(cfg: SourceConfig) -> list[str]:
    """``.webm`` files under ``cfg.root`` that no SSv2 split file lists."""
    ids = set()
    for split in SSV2_SPLITS:
        path = Path(cfg.annotations) / f"something-something-v2-{split}.json"
        try:
            ids |= {str(e["id"]) for e in _read_json(path) if isinstance(e, dict) and "id" in e}
        except (UserError, TypeError):
            continue  # a missing or broken split file is reported for the split that uses it
    return sorted(e.name for e in os.scandir(cfg.root) if e.name.endswith(".webm") and e.name[:-5] not in ids)


def probe_all(
    listings: list[Listing], num_frames: int, workers: int, timeout: float, progress: bool
) -> tuple[dict[tuple[str, str], SplitCheck], float]:
    """Every file of every listing, in a pool of ``workers`` processes; a file whose worker dies is ``crashed``.
    Also returns the CPU seconds the workers used (a rate per CPU second holds on a loaded machine too)."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    started = ctx.SimpleQueue()
    checks = {}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with ctx.Pool(workers, initializer=init_worker, initargs=(started,)) as pool:  # before tqdm starts a thread
        for listing in listings:
            check = SplitCheck(listing, listing.source.modality)
            checks[listing.source.name, listing.split] = check
            if not listing.size:
                continue
            items = ((i, listing.describe(i)) for i in range(listing.size))
            chunk = max(1, min(32, listing.size // (workers * 8)))
            run = _Run(pool, started, listing.source.modality, num_frames, timeout, chunk)
            with tqdm(total=listing.size, desc=f"{listing.source.name}/{listing.split}", unit="file",
                      disable=not progress, file=sys.stderr) as bar:
                lost = run.chunks(_batched(items, chunk), check, bar)
                alone = [batch for batch in lost if len(batch) == 1]
                again = ([item] for batch in lost if len(batch) > 1 for item in batch)  # to find the one that kills
                for (index, path), in alone + run.chunks(again, check, bar):
                    check.add(index, ("crashed", "its worker process died", True, None), path)
                    bar.update(1)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the pool's workers have been joined
    return checks, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Run:
    """Chunks through ``imap_unordered``, watching for chunks whose worker died (Pool would wait for them forever).
    Chunk ids are unique in the process, so a late message about an earlier run's chunk is never taken for one
    of this run's."""

    ids = itertools.count()

    def __init__(self, pool, started, modality: str, num_frames: int, timeout: float, chunk: int) -> None:
        self.pool, self.started = pool, started
        self.options = (modality, num_frames, timeout)
        # No result for longer than a chunk can take (every file ended by the watchdog): its worker is gone.
        self.stall = chunk * (2 * timeout + 5) + 10

    def chunks(self, batches: Iterator[list], check: SplitCheck, bar: tqdm) -> list[list[tuple[int, str]]]:
        """Probe ``batches``, adding rows to ``check``; returns the chunks whose worker died."""
        pending: dict[int, list] = {}
        submitted = {"all": False}

        def tasks():
            for chunk_id, batch in zip(self.ids, batches):
                pending[chunk_id] = batch
                yield (chunk_id, *self.options, batch)
            submitted["all"] = True

        results = self.pool.imap_unordered(probe_chunk, tasks())
        holders: dict[int, int] = {}  # pid -> the chunk it started last
        lost: set[int] = set()
        last = time.monotonic()
        while not submitted["all"] or len(pending) > len(lost):  # len(): the task thread adds to pending
            while not self.started.empty():
                chunk_id, pid = self.started.get()
                holders[pid] = chunk_id
            try:
                chunk_id, rows = results.next(timeout=0.2)  # how soon a dead worker is noticed
            except StopIteration:
                break
            except mp.TimeoutError:
                lost |= {c for pid, c in holders.items() if c in pending and not _alive(pid)}
                if time.monotonic() - last > self.stall:  # a worker killed between chunks (OOM killer)
                    lost |= set(pending.copy())
                continue
            last = time.monotonic()
            lost.discard(chunk_id)
            paths = dict(pending.pop(chunk_id))
            for index, row in rows:
                check.add(index, row, paths[index])
            bar.update(len(rows))
        return [pending[c] for c in sorted(lost)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="omnimae-cli data-check", description="Read every file a training config would use and report.",
        epilog="options --data.init_args.* after the configs override them, as with omnimae-cli fit\n\n"
        f"reasons a file is unreadable:\n{reasons_help()}\n\nexit 0: every split within the config's "
        "max_invalid_fraction; 2: not, or a split the datamodule refuses",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", action="append", required=True, help="a fit config (repeat: later wins)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument("--workers", type=int, default=cpus, help=f"probing processes (default: the {cpus} CPUs here)")
    parser.add_argument("--out", default="data_check.json", help="the JSON report (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one file may take (default 60)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args, rest = parser.parse_known_args(argv)
    if unknown := [a for a in rest if a.startswith("-") and not a.startswith("--data.")]:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.workers < 1 or args.timeout <= 0:
        parser.error("--workers must be >= 1 and --timeout > 0")
    t0 = time.perf_counter()
    dm = read_datamodule(args.config, rest)
    listings = list_splits(dm)
    ssv2 = {x.source.name: x.source for x in listings if x.source.kind == "ssv2" and Path(x.source.root).is_dir()}
    orphans = {name: ssv2_orphans(cfg) for name, cfg in ssv2.items()}
    t1 = time.perf_counter()
    checks, cpu = probe_all(listings, dm.num_frames, args.workers, args.timeout, not args.no_progress)
    t2 = time.perf_counter()
    limit = dm.bad_samples.max_invalid_fraction
    files = sum(c.size for c in checks.values())
    report = {
        "configs": args.config,
        "datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}",
        "max_invalid_fraction": limit,
        "num_frames": dm.num_frames,
        "splits": [c.to_json(limit) for c in checks.values()],
        "ssv2_videos_in_no_json": {name: {"count": len(o), "files": o} for name, o in orphans.items()},
        "timing": {"workers": args.workers, "files": files, "listing_s": round(t1 - t0, 3),
                   "probing_s": round(t2 - t1, 3), "files_per_s": round(files / max(t2 - t1, 1e-9), 1),
                   "files_per_s_per_worker": round(files / max(t2 - t1, 1e-9) / args.workers, 1),
                   "workers_cpu_s": round(cpu, 3), "files_per_cpu_s": round(files / max(cpu, 1e-9), 1)},
    }
    failed = [s["failed"] for s in report["splits"] if s["failed"]]
    report["ok"] = not failed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_report(report, args.out)
    if failed:
        raise DataCheckFailed(f"data-check: {'; '.join(failed)} (report: {args.out})")


if __name__ == "__main__":  # python -m omnimae_pl.data.check: the exit code and one line of omnimae-cli
    try:
        main()
    except UserError as err:
        print(f"omnimae-cli: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
