"""SSv2 and VideoFolder on real files: labels, sample contract, replication, seeding, damaged files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from video_helpers import cut_before_first_frame, truncate_file, write_test_video

from omnimae_pl.data.sample import collate_samples
from omnimae_pl.data.video_datasets import SSv2, VideoFolder
from omnimae_pl.errors import ConfigError, DatasetError
from omnimae_pl.masking import MaskingConfig

TEMPLATES = ["Moving [something] from left to right", "Moving [something] from right to left", "Moving [something] up"]
SMALL = dict(num_frames=4, clip_duration=1.0, crop_size=32, short_side=40, patch_size=(2, 16, 16))
MASKING = MaskingConfig("random", 0.75)


@pytest.fixture(scope="module")
def ssv2_dir(tmp_path_factory):
    """Official SSv2 file layout. Label sentences fill in the objects ("a right shoe ... from right to left"), so
    only the template identifies the class."""
    root = tmp_path_factory.mktemp("ssv2")
    videos = root / "videos"
    videos.mkdir()
    labels = {t.replace("[", "").replace("]", ""): str(i) for i, t in enumerate(TEMPLATES)}
    (root / "something-something-v2-labels.json").write_text(json.dumps(labels))
    train = [
        {"id": "11", "label": "Moving pen from left to right", "template": TEMPLATES[0], "placeholders": ["pen"]},
        {"id": "12", "label": "Moving cup up", "template": TEMPLATES[2], "placeholders": ["cup"]},
        {"id": "13", "label": "Moving a right shoe from right to left", "template": TEMPLATES[1],
         "placeholders": ["a right shoe"]},
    ]
    validation = [{"id": "21", "label": "Moving box up", "template": TEMPLATES[2], "placeholders": ["box"]}]
    for split, rows in (("train", train), ("validation", validation), ("test", [{"id": "31"}, {"id": "32"}])):
        (root / f"something-something-v2-{split}.json").write_text(json.dumps(rows))
    for video_id, frames in (("11", 24), ("12", 18), ("13", 30), ("21", 20), ("31", 12), ("32", 15)):
        write_test_video(videos / f"{video_id}.webm", frames, 12, 64, 48)
    return root


@pytest.fixture(scope="module")
def folder_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinetics")
    for name, suffixes in (("zumba", (".mp4", ".webm")), ("abseiling", (".avi", ".mkv"))):
        (root / name).mkdir()
        for n, suffix in enumerate(suffixes):
            write_test_video(root / name / f"clip{n}{suffix}", 20, 12, 64, 48)
        (root / name / "notes.txt").write_text("not a video")
    return root


def ssv2(root, split="train", **kwargs):
    return SSv2(root, root / "videos", split, **{**SMALL, **kwargs})


class CountingReader:
    """Wraps a reader and counts decodes."""

    def __init__(self, reader):
        self.reader, self.calls = reader, 0

    def read_clip(self, *args, **kwargs):
        self.calls += 1
        return self.reader.read_clip(*args, **kwargs)


def test_ssv2_classes_come_from_templates_not_label_sentences(ssv2_dir):
    train = ssv2(ssv2_dir)
    assert (len(train), train.num_classes, train.modality) == (3, 3, "video")
    assert [label for _, label in train.videos] == [0, 2, 1]
    assert train.describe(2) == str(ssv2_dir / "videos" / "13.webm")
    assert int(train[2]["label"]) == 1
    assert [label for _, label in ssv2(ssv2_dir, "validation").videos] == [2]
    test = ssv2(ssv2_dir, "test")
    assert [label for _, label in test.videos] == [-1, -1] and int(test[0]["label"]) == -1


def test_video_folder_classes_are_sorted_folder_names(folder_dir):
    dataset = VideoFolder(folder_dir, **SMALL)
    assert dataset.classes == ["abseiling", "zumba"] and dataset.num_classes == 2
    assert [(p.name, label) for p, label in dataset.videos] == [
        ("clip0.avi", 0), ("clip1.mkv", 0), ("clip0.mp4", 1), ("clip1.webm", 1)
    ]
    assert all(bool(dataset[i]["valid"]) for i in range(len(dataset)))


def test_sample_follows_the_contract(ssv2_dir):
    sample = ssv2(ssv2_dir, masking=MASKING)[0]
    assert sample["input"].shape == (3, 4, 32, 32) and sample["input"].dtype == torch.float32
    assert sample["mask"].shape == (2, 2, 2) and sample["mask"].dtype == torch.bool
    assert int(sample["mask"].sum()) == 6  # int(0.75 * 8)
    assert bool(sample["valid"]) and int(sample["index"]) == 0
    assert -2.2 < float(sample["input"].min()) and float(sample["input"].max()) < 2.7  # ImageNet-normalised
    assert "mask" not in ssv2(ssv2_dir)[0]  # fine-tuning: no masking


def test_replicas_share_one_decode_but_not_crop_or_mask(ssv2_dir):
    dataset = ssv2(ssv2_dir, masking=MASKING, replicas=4, crop_size=64, short_side=64)
    dataset.reader = counter = CountingReader(dataset.reader)
    replicas = dataset[1]
    assert counter.calls == 1 and len(replicas) == 4
    assert all(int(r["index"]) == 1 and int(r["label"]) == 2 for r in replicas)
    inputs = [r["input"] for r in replicas]
    masks = [r["mask"] for r in replicas]
    assert all(not torch.equal(inputs[i], inputs[j]) for i in range(4) for j in range(i + 1, 4))
    assert all(not torch.equal(masks[i], masks[j]) for i in range(4) for j in range(i + 1, 4))
    batch = collate_samples([replicas, dataset[0]], "video", "ssv2")
    assert batch["input"].shape == (8, 3, 4, 64, 64) and batch["index"].tolist() == [1] * 4 + [0] * 4


def test_draws_follow_seed_epoch_and_index(ssv2_dir):
    dataset = ssv2(ssv2_dir, masking=MASKING, replicas=2)
    a, b = dataset[(2, 5)], ssv2(ssv2_dir, masking=MASKING, replicas=2)[(2, 5)]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input"], y["input"]) and torch.equal(x["mask"], y["mask"])
    other_epoch = dataset[(2, 6)]
    assert not torch.equal(a[0]["input"], other_epoch[0]["input"])
    dataset.set_epoch(5)
    assert torch.equal(dataset[2][0]["input"], a[0]["input"])
    other_seed = ssv2(ssv2_dir, masking=MASKING, replicas=2, seed=1)[(2, 5)]
    assert not torch.equal(a[0]["input"], other_seed[0]["input"])


def test_evaluation_views_are_fixed(ssv2_dir):
    dataset = ssv2(ssv2_dir, "validation", train=False, num_clips=2, num_crops=3, masking=MASKING, replicas=4)
    views = dataset[(0, 1)]
    assert len(views) == 6 and all(v["input"].shape == (3, 4, 32, 32) for v in views)
    assert not torch.equal(views[0]["input"], views[1]["input"])  # left vs centre crop
    for x, y in zip(views, dataset[(0, 7)], strict=True):
        assert torch.equal(x["input"], y["input"]) and torch.equal(x["mask"], y["mask"])


def test_damaged_files_become_placeholders_of_the_same_shape(tmp_path):
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    write_test_video(root / "a" / "0_good.webm", 24, 12)
    truncate_file(write_test_video(root / "a" / "1_half.webm", 36, 12), 0.5)
    cut_before_first_frame(write_test_video(root / "a" / "2_no_frames.webm", 24, 12))
    (root / "a" / "3_random.webm").write_bytes(torch.randint(0, 256, (3000,), dtype=torch.uint8).numpy().tobytes())
    (root / "a" / "4_empty.mp4").write_bytes(b"")
    dataset = VideoFolder(root, **SMALL, masking=MASKING, replicas=2)
    dataset.videos.append((root / "a" / "5_deleted.webm", 0))  # listed, then gone
    good = dataset[0]
    for index in range(len(dataset)):
        replicas = dataset[index]
        assert [r["input"].shape for r in replicas] == [good[0]["input"].shape] * 2
        assert [r["mask"].shape for r in replicas] == [good[0]["mask"].shape] * 2
        assert [bool(r["valid"]) for r in replicas] == [index < 2] * 2, dataset.describe(index)
        if index >= 2:  # a constant input: a normalised mid-grey
            assert replicas[0]["input"].amax(dim=(1, 2, 3)).allclose(replicas[0]["input"].amin(dim=(1, 2, 3)))
    batch = collate_samples([dataset[i] for i in range(len(dataset))], "video", "folder")
    assert batch["valid"].tolist() == [True] * 4 + [False] * 8


def raises_one_line(error: type[Exception], match: str, build) -> None:
    with pytest.raises(error, match=match) as info:
        build()
    assert "\n" not in str(info.value)


def test_construction_errors_name_the_path(tmp_path, ssv2_dir):
    raises_one_line(DatasetError, "nowhere", lambda: VideoFolder(tmp_path / "nowhere"))
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    raises_one_line(DatasetError, "empty", lambda: VideoFolder(tmp_path / "empty"))
    raises_one_line(DatasetError, "no_videos", lambda: SSv2(ssv2_dir, tmp_path / "no_videos"))
    no_labels = tmp_path / "no_labels"
    raises_one_line(DatasetError, "annotations folder not found", lambda: SSv2(no_labels, ssv2_dir / "videos"))
    raises_one_line(DatasetError, "v2-labels.json", lambda: SSv2(tmp_path, ssv2_dir / "videos"))
    raises_one_line(ConfigError, "split='val': must be one of", lambda: SSv2(ssv2_dir, ssv2_dir / "videos", "val"))
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "something-something-v2-labels.json").write_text(json.dumps({"Moving something up": "0"}))
    raises_one_line(DatasetError, "v2-validation.json", lambda: SSv2(bare, ssv2_dir / "videos", "validation"))
    (bare / "something-something-v2-train.json").write_text("[]")
    raises_one_line(DatasetError, "v2-train.json", lambda: SSv2(bare, ssv2_dir / "videos"))
    (bare / "something-something-v2-train.json").write_text(json.dumps([{"id": "1", "template": "Dropping [x]"}]))
    raises_one_line(DatasetError, "Dropping x", lambda: SSv2(bare, ssv2_dir / "videos"))
    (bare / "something-something-v2-train.json").write_text("[{")
    raises_one_line(DatasetError, "not valid JSON", lambda: SSv2(bare, ssv2_dir / "videos"))


def test_dataset_pickles_for_dataloader_workers(ssv2_dir):
    dataset = pickle.loads(pickle.dumps(ssv2(ssv2_dir, masking=MASKING, replicas=2)))
    assert len(dataset[(0, 0)]) == 2
