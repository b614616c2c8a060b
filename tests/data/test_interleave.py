from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from omnimae_pl.data.bad_samples import BadSampleTracker, TooManyInvalidSamplesError
from omnimae_pl.data.interleave import ModalityInterleaver, Source
from omnimae_pl.data.seeding import split_key


class FakeDataset(Dataset):
    """Samples that record their index and epoch; ``replicas > 1`` returns a list like replicated video."""

    def __init__(self, n: int, modality: str = "image", replicas: int = 1, bad: tuple[int, ...] = ()) -> None:
        self.n, self.modality, self.replicas, self.bad = n, modality, replicas, set(bad)
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    def describe(self, index: int) -> str:
        return f"/data/{self.modality}/{index}.file"

    def __getitem__(self, key):
        index, epoch = split_key(key, -1)
        self.calls += 1
        sample = {
            "input": torch.tensor([index, epoch], dtype=torch.float32),
            "label": torch.tensor(0),
            "valid": torch.tensor(index not in self.bad),
            "index": torch.tensor(index),
        }
        return [dict(sample) for _ in range(self.replicas)] if self.replicas > 1 else sample


def two_sources(**kwargs) -> list[Source]:
    """40 images in batches of 4 and 64 videos in batches of 2 clips x 2 replicas."""
    return [
        Source("images", FakeDataset(40), 4, **kwargs.get("images", {})),
        Source("videos", FakeDataset(64, "video", replicas=2), 2, **kwargs.get("videos", {})),
    ]


def run_epoch(interleaver: ModalityInterleaver, epoch: int) -> list[tuple[str, list[int]]]:
    interleaver.set_epoch(epoch)
    return [(b["source"], b["index"].tolist()) for b in interleaver]


def test_batches_are_single_source_and_carry_epoch_keys() -> None:
    interleaver = ModalityInterleaver(two_sources(), seed=3)
    interleaver.set_epoch(2)
    batches = list(interleaver)
    assert len(batches) == len(interleaver) == 10 + 16  # 40 // 4; (64 // 2) // 2 replicas
    for b in batches:
        assert b["modality"] == ("image" if b["source"] == "images" else "video")
        assert b["input"].shape[0] == 4  # 4 images, or 2 clips x 2 replicas
        assert torch.all(b["input"][:, 1] == 2)  # every key carried the epoch
        assert torch.equal(b["input"][:, 0].long(), b["index"])


def test_schedule_is_identical_across_ranks_shards_are_disjoint_and_epochs_differ() -> None:
    ranks = [ModalityInterleaver(two_sources(), seed=0, rank=r, world_size=2) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5 + 8  # 40 // 8; (64 // 4) // 2
    epochs = {}
    for epoch in (0, 1):
        runs = [run_epoch(il, epoch) for il in ranks]
        assert [s for s, _ in runs[0]] == [s for s, _ in runs[1]]
        for source in ("images", "videos"):
            seen = [[i for s, b in run if s == source for i in b] for run in runs]
            assert not set(seen[0]) & set(seen[1])
            assert len(set(seen[0])) * (2 if source == "videos" else 1) == len(seen[0])  # no repeats in a rank
        epochs[epoch] = runs[0]
    assert [s for s, _ in epochs[0]] != [s for s, _ in epochs[1]]
    assert epochs[0] != epochs[1]


def test_replication_divides_video_steps_and_weights_rescale_them() -> None:
    natural = ModalityInterleaver(two_sources())
    assert natural.steps_per_source == {"images": 10, "videos": 16}  # 40 // 4; (64 // 2) // 2
    weighted = ModalityInterleaver(two_sources(images={"weight": 3.0}, videos={"weight": 1.0}))
    assert weighted.steps_per_source == {"images": 20, "videos": 6}  # 26 steps shared 3:1 -> 19.5, 6.5
    run = run_epoch(weighted, 0)
    assert Counter(s for s, _ in run) == {"images": 20, "videos": 6}
    image_batches = [b for s, b in run if s == "images"]
    assert all(len(b) == 4 for b in image_batches)  # 20 steps > 10 batches: a second pass, all batches full
    assert Counter(i for b in image_batches for i in b) == {i: 2 for i in range(40)}


def test_bad_configurations_raise_one_line_errors() -> None:
    with pytest.raises(ValueError, match="'videos'.*never be used"):
        ModalityInterleaver([Source("videos", FakeDataset(6, "video", replicas=4), 2)])
    with pytest.raises(ValueError, match="weights must all be given"):
        ModalityInterleaver(two_sources(images={"weight": 1.0}))
    with pytest.raises(ValueError, match="unique"):
        ModalityInterleaver([Source("a", FakeDataset(8), 2), Source("a", FakeDataset(8), 2)])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_round_trip_continues_with_the_same_batches(num_workers: int, tmp_path: Path) -> None:
    kwargs = {"seed": 5, "num_workers": num_workers, "persistent_workers": num_workers > 0}
    reference = run_epoch(ModalityInterleaver(two_sources(), **kwargs), 1)

    interrupted = ModalityInterleaver(two_sources(), **kwargs)
    interrupted.set_epoch(1)
    stream = iter(interrupted)
    first = [(b["source"], b["index"].tolist()) for _, b in zip(range(7), stream)]
    torch.save(interrupted.state_dict(), tmp_path / "state.pt")
    assert first == reference[:7]

    sources = two_sources()
    resumed = ModalityInterleaver(sources, **kwargs)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    resumed.set_epoch(1)  # Lightning sends the same epoch again on resume: the position must survive it
    rest = [(b["source"], b["index"].tolist()) for b in resumed]
    assert rest == reference[7:]
    if num_workers == 0:  # skipped batches were never decoded
        assert sum(s.dataset.calls for s in sources) == sum(len(set(b)) for _, b in reference[7:])
    assert run_epoch(resumed, 2) == run_epoch(ModalityInterleaver(two_sources(), **kwargs), 2)


def test_resume_under_another_layout() -> None:
    interleaver = ModalityInterleaver(two_sources())
    run_epoch(interleaver, 0)
    state = interleaver.state_dict()
    assert (state["epoch"], state["step"]) == (0, len(interleaver))
    other_layout = ModalityInterleaver(two_sources(), world_size=2, rank=0)
    other_layout.load_state_dict(state)  # an epoch boundary carries over to another world size
    assert len(run_epoch(other_layout, 1)) == len(other_layout)
    state["step"] = 3  # mid-epoch under another layout: that epoch ends, with a warning, and the next is whole
    moved = ModalityInterleaver(two_sources(), world_size=2, rank=0)
    with pytest.warns(UserWarning, match="another data layout.*the rest of that epoch is skipped"):
        moved.load_state_dict(state)
    assert list(moved) == []
    assert run_epoch(moved, 1) == run_epoch(ModalityInterleaver(two_sources(), world_size=2, rank=0), 1)


def test_invalid_samples_are_counted_and_the_threshold_names_the_files() -> None:
    bad = (3, 7)
    sources = [Source("images", FakeDataset(40, bad=bad), 4)]
    interleaver = ModalityInterleaver(sources, bad_samples=BadSampleTracker(max_invalid_fraction=0.1, min_samples=8))
    run_epoch(interleaver, 0)
    counts = interleaver.bad_samples.counts()
    assert counts["images/invalid"] == 2 and counts["images/seen"] == 40
    assert interleaver.state_dict()["bad_samples"]["images"]["failures"] == {3: 1, 7: 1}

    strict = ModalityInterleaver(
        [Source("images", FakeDataset(40, bad=tuple(range(0, 40, 2))), 4)],
        bad_samples=BadSampleTracker(max_invalid_fraction=0.1, min_samples=8),
    )
    with pytest.raises(TooManyInvalidSamplesError, match=r"'images'.*/data/image/\d+\.file"):
        run_epoch(strict, 0)


class _Recorder:
    """What a training run saw: every batch (epoch, source, indices) and every set_epoch call."""

    def __init__(self, interleaver: ModalityInterleaver) -> None:
        self.batches: list[tuple[int, str, list[int]]] = []
        self.epochs_set: list[int] = []
        set_epoch = interleaver.sampler.set_epoch

        def recording_set_epoch(epoch: int) -> None:
            self.epochs_set.append(epoch)
            set_epoch(epoch)

        interleaver.sampler.set_epoch = recording_set_epoch


def _fit(interleaver: ModalityInterleaver, max_steps: int, tmp_path: Path, ckpt_path=None, save_at=None):
    import lightning.pytorch as pl

    recorder = _Recorder(interleaver)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            recorder.batches.append((self.current_epoch, batch["source"], batch["index"].tolist()))
            return (self.weight * batch["input"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def train_dataloader(self):
            return interleaver

    class SaveAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == save_at:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    trainer = pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SaveAt()] if save_at else [],
        default_root_dir=tmp_path,
    )
    trainer.fit(Module(), ckpt_path=ckpt_path)
    return recorder


def test_lightning_sets_the_epoch_and_checkpoints_the_position_mid_epoch(tmp_path: Path) -> None:
    def make() -> ModalityInterleaver:
        return ModalityInterleaver([Source("images", FakeDataset(24), 2), Source("videos", FakeDataset(16, "video", 2), 2)])

    steps = len(make())  # 12 + 4
    full = _fit(make(), 2 * steps + 5, tmp_path, save_at=steps + 6)
    assert sorted(set(full.epochs_set)) == [0, 1, 2]
    assert [e for e, _, _ in full.batches] == [0] * steps + [1] * steps + [2] * 5
    for epoch in (0, 1):
        expected = ModalityInterleaver([Source("images", FakeDataset(24), 2), Source("videos", FakeDataset(16, "video", 2), 2)])
        assert [(s, b) for e, s, b in full.batches if e == epoch] == run_epoch(expected, epoch)

    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert [(s["epoch"], s["step"]) for s in state] == [(1, 6)]

    resumed = _fit(make(), 2 * steps + 5, tmp_path, ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.epochs_set[0] == 1
    assert resumed.batches == full.batches[steps + 6 :]
