"""The demo corpus: real layouts and the official SSv2 schema, deterministic, reused, and loadable."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
from PIL import Image

from omnimae_pl.data import demo
from omnimae_pl.data.demo import MOTIONS, build_demo_data
from omnimae_pl.data.video_datasets import SSv2
from omnimae_pl.data.video_io import PyAVReader

SMALL = dict(train_images_per_class=3, val_images_per_class=1, num_videos=12, video_size=(64, 48))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, build_demo_data(root, **SMALL)


def test_imagenet_layout_with_real_world_oddities(built):
    _, paths = built
    wnids = sorted(p.name for p in paths["imagenet_train"].iterdir())
    assert wnids == [f"n{k:08d}" for k in range(10)]
    assert sorted(p.name for p in paths["imagenet_val"].iterdir()) == wnids
    train = sorted(paths["imagenet_train"].glob("*/*.JPEG"))
    assert len(train) == 10 * 3 and len(list(paths["imagenet_val"].glob("*/*.JPEG"))) == 10
    kinds = {(Image.open(p).format, Image.open(p).mode) for p in train}
    assert {("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB"), ("JPEG", "RGB")} <= kinds
    assert all(48 <= s <= 64 for p in train for s in Image.open(p).size)


def test_ssv2_files_follow_the_official_schema(built):
    _, paths = built
    labels = json.loads(paths["ssv2_labels"].read_text())
    assert labels == {demo.template(*m).replace("[", "").replace("]", ""): str(i) for i, m in enumerate(MOTIONS)}
    assert len(labels) == 12 and "Moving something from left to right slowly" in labels
    train, validation = (json.loads(paths[f"ssv2_{s}"].read_text()) for s in ("train", "validation"))
    test = json.loads(paths["ssv2_test"].read_text())
    for entry in train + validation:
        assert set(entry) == {"id", "label", "template", "placeholders"}
        assert entry["label"] == entry["template"].replace("[something]", entry["placeholders"][0])
        assert entry["template"].replace("[", "").replace("]", "") in labels
    assert all(set(entry) == {"id"} for entry in test)
    ids = [e["id"] for e in train + validation + test]
    assert len(ids) == len(set(ids)) == 12
    assert sorted(p.stem for p in paths["ssv2_videos"].glob("*.webm")) == sorted(ids)


def test_videos_decode_at_12_fps_for_1_to_1_7_seconds(built):
    _, paths = built
    reader = PyAVReader()
    for video in sorted(paths["ssv2_videos"].glob("*.webm"))[:4]:
        clip = reader.read_clip(video, num_frames=4)
        assert clip.shape == (4, 48, 64, 3)
        with av.open(str(video)) as container:
            frames = sum(1 for _ in container.decode(video=0))
        assert 12 <= frames <= 20


def test_ssv2_dataset_loads_the_demo(built):
    _, paths = built
    dataset = SSv2(paths["ssv2"], paths["ssv2_videos"], "train", num_frames=4, crop_size=32, short_side=48)
    assert dataset.num_classes == len(MOTIONS) and len(dataset) == int(12 * 0.7)
    assert all(bool(dataset[i]["valid"]) for i in range(len(dataset)))


def test_second_call_reuses_and_other_arguments_rebuild(built):
    root, paths = built
    stamp = paths["ssv2_labels"].stat().st_mtime_ns
    assert build_demo_data(root, **SMALL) == paths
    assert paths["ssv2_labels"].stat().st_mtime_ns == stamp
    rebuilt = build_demo_data(root, **{**SMALL, "num_videos": 8})
    assert len(list(rebuilt["ssv2_videos"].glob("*.webm"))) == 8
    build_demo_data(root, **SMALL)  # back, for the other tests of this module


def test_same_seed_same_bytes(built, tmp_path):
    root, paths = built
    again = build_demo_data(tmp_path, **SMALL)
    for key in ("ssv2_train", "ssv2_test"):
        assert again[key].read_bytes() == paths[key].read_bytes()
    for name in ("1.webm", "2.webm"):
        assert (again["ssv2_videos"] / name).read_bytes() == (paths["ssv2_videos"] / name).read_bytes()
    first_image = sorted(paths["imagenet_val"].glob("*/*.JPEG"))[0]
    assert (again["imagenet"] / first_image.relative_to(paths["imagenet"])).read_bytes() == first_image.read_bytes()


def test_refuses_to_overwrite_folders_it_did_not_make(tmp_path):
    (tmp_path / "imagenet").mkdir()
    with pytest.raises(FileExistsError, match="imagenet"):
        build_demo_data(tmp_path, **SMALL)


def test_command_line_prints_the_paths(built, capsys):
    root, paths = built
    demo.main(["--root", str(root), "--train-images-per-class", "3", "--val-images-per-class", "1",
               "--num-videos", "12", "--video-width", "64", "--video-height", "48"])
    out = capsys.readouterr().out
    assert f"ssv2_videos: {paths['ssv2_videos']}" in out and f"imagenet_train: {paths['imagenet_train']}" in out


def _motion(clip: np.ndarray) -> tuple[float, float, float]:
    """(dx, dy) of the digit's centre from the first frame to the last, as shares of the frame's width / height,
    and the ratio of its areas; the digit is what differs from the clip's most common colour."""
    colours, counts = np.unique(clip.reshape(-1, 3), axis=0, return_counts=True)
    assert counts.max() > 0.5 * clip.shape[0] * clip.shape[1] * clip.shape[2]  # one plain colour, coded exactly
    digit = np.abs(clip - colours[counts.argmax()]).max(axis=-1) > 24  # (T, H, W)
    ys, xs = np.mgrid[: clip.shape[1], : clip.shape[2]]
    first, last = digit[0], digit[-1]
    dx = (xs[last].mean() - xs[first].mean()) / clip.shape[2]
    dy = (ys[last].mean() - ys[first].mean()) / clip.shape[1]
    return dx, dy, last.sum() / max(first.sum(), 1)


def test_the_digit_moves_as_the_label_says_over_a_plain_background(built):
    _, paths = built
    reader = PyAVReader()
    rows = json.loads(paths["ssv2_train"].read_text()) + json.loads(paths["ssv2_validation"].read_text())
    assert {row["template"] for row in rows} <= {demo.template(*m) for m in MOTIONS}
    moved = {speed: {"shift": [], "growth": []} for speed in demo.SPEEDS}
    for row in rows:
        clip = reader.read_clip(paths["ssv2_videos"] / f"{row['id']}.webm", num_frames=8).numpy().astype(int)
        dx, dy, grows = _motion(clip)
        (direction, speed), = [m for m in MOTIONS if demo.template(*m) == row["template"]]
        shift = {"from left to right": dx, "from right to left": -dx, "up": -dy, "down": dy}.get(direction)
        if shift is None:  # side 0.55 -> 0.85 of the frame quickly (2.4x the area), 0.625 -> 0.775 slowly (1.5x)
            growth = np.log(grows if direction.startswith("towards") else 1 / grows)
            assert growth > np.log(1.3), (row, grows)
            moved[speed]["growth"].append(growth)
        else:  # the centre moves by a share of the frame, less where the edge cuts the digit
            assert shift > 0.1, (row, shift)
            moved[speed]["shift"].append(shift)
    # Quickly covers twice the path of slowly; the edge's cut makes the measured ratio a little smaller.
    for kind in ("shift", "growth"):
        quick, slow = np.mean(moved["quickly"][kind]), np.mean(moved["slowly"][kind])
        assert quick > 1.4 * slow, (kind, moved)
