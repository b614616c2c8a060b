"""omnimae-cli data-check on real files made here: every defect named with its reason, counts, the JSON report,
the exit code around max_invalid_fraction, the same report from 1 and 2 workers, and no hang on a worker that
dies or a file that never finishes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from video_helpers import cut_before_first_frame, truncate_file, write_test_video

from omnimae_pl.data import probe
from omnimae_pl.data.check import DataCheckFailed, main
from omnimae_pl.errors import EXIT_USER_ERROR, ConfigError

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")
TEMPLATES = ["Pushing something", "Pulling something"]
SMALL = {"img_size": 32, "num_frames": 4, "short_side": 36, "patch_size": [2, 8, 8], "num_workers": 0}


def write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libopus", rate=48000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


@pytest.fixture
def ssv2_root(tmp_path) -> Path:
    """SSv2 layout: train has 4 good clips and one of each video defect; validation an unknown template; one
    .webm is in no JSON file."""
    root, videos = tmp_path / "ssv2", tmp_path / "ssv2" / "videos"
    videos.mkdir(parents=True)
    (root / "something-something-v2-labels.json").write_text(json.dumps({t: str(i) for i, t in enumerate(TEMPLATES)}))
    rows = lambda ids, template="Pushing [something]": [{"id": i, "template": template, "label": "x"} for i in ids]
    train = rows(["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"])
    train[1]["template"] = "Pulling [something]"
    validation = rows(["1"]) + rows(["11"], "Juggling [something]")
    for split, entries in (("train", train), ("validation", validation), ("test", [{"id": "1"}])):
        (root / f"something-something-v2-{split}.json").write_text(json.dumps(entries))
    for video_id in ("1", "2", "3", "4", "11", "99"):
        write_test_video(videos / f"{video_id}.webm", 24)
    truncate_file(write_test_video(videos / "5.webm", 48), 0.5)
    cut_before_first_frame(write_test_video(videos / "6.webm", 24))
    write_test_video(videos / "7.webm", 3)  # fewer than num_frames 4; "8" has no file
    write_audio_only(videos / "9.webm")
    (videos / "10.webm").write_text("<html>404</html>")
    return root


def write_config(tmp_path: Path, sources: list[dict], **init_args) -> str:
    """A layer over configs/demo.yaml, as a user writes one."""
    path = tmp_path / f"layer{len(list(tmp_path.glob('layer*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"data": {"init_args": {"sources": sources, **SMALL, **init_args}}}))
    return str(path)


def run_check(tmp_path: Path, configs: list[str], *extra: str) -> tuple[dict, DataCheckFailed | None]:
    out = tmp_path / "report.json"
    argv = [a for c in configs for a in ("--config", c)] + ["--out", str(out), "--no-progress", *extra]
    try:
        main(argv)
        failure = None
    except DataCheckFailed as err:
        failure = err
    return json.loads(out.read_text()), failure


def split_of(report: dict, source: str, split: str) -> dict:
    return next(s for s in report["splits"] if (s["source"], s["split"]) == (source, split))


def without_timing(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "timing"}


def test_every_defect_is_named_and_counted(imagenet_root, ssv2_root, wnids, tmp_path):
    config = write_config(tmp_path, [
        {"name": "in1k", "kind": "imagenet", "root": str(imagenet_root), "val_split": "val"},
        {"name": "ssv2", "kind": "ssv2", "root": str(ssv2_root / "videos"), "annotations": str(ssv2_root),
         "val_split": "validation", "test_split": "test"},
    ])
    report, failure = run_check(tmp_path, [DEMO, config], "--workers", "1")
    assert (report["num_frames"], report["max_invalid_fraction"], report["ok"]) == (4, 0.1, False)

    images = split_of(report, "in1k", "train")
    reasons = {Path(f["path"]).name: (f["reason"], f["training"], f["class"]) for f in images["failures"]}
    assert reasons == {"empty.JPEG": ("empty", "placeholder", wnids[0]),
                       "truncated.JPEG": ("truncated", "placeholder", wnids[0]),
                       "text.JPEG": ("not_media", "placeholder", wnids[0])}
    assert (images["files"], images["unreadable"], images["stages"]) == (18, 3, ["train"])
    assert images["classes"]["per_class"] == {wnids[0]: 10, wnids[1]: 4, wnids[2]: 4}
    notes = {k: [Path(p).name for p in v] for k, v in images["images"]["notes"].items()}
    assert notes == {"cmyk": ["cmyk.JPEG"], "greyscale": ["grey.JPEG"], "other_mode": [],
                     "format_mismatch": ["png_inside.JPEG"]}
    assert images["images"]["format_mismatches"] == {"PNG named .JPEG": 1}
    assert images["images"]["modes"] == {"RGB": 14, "CMYK": 1, "L": 1}  # and two that did not open
    assert images["images"]["width"]["min"] >= 40 and images["images"]["width"]["max"] <= 90
    assert split_of(report, "in1k", "val")["unreadable"] == 0

    videos = split_of(report, "ssv2", "train")
    reasons = {Path(f["path"]).stem: (f["reason"], f["training"]) for f in videos["failures"]}
    assert reasons == {"5": ("truncated", "read"), "6": ("truncated", "placeholder"),
                       "7": ("too_few_frames", "read"), "8": ("missing", "placeholder"),
                       "9": ("no_video_stream", "placeholder"), "10": ("not_media", "placeholder")}
    assert (videos["files"], videos["unreadable"], videos["placeholders"]) == (10, 6, 4)
    assert videos["classes"]["per_class"] == {"Pushing something": 9, "Pulling something": 1}
    stats = videos["videos"]
    assert stats["fps"] == {"12.00": 6} and stats["resolutions"] == {"64x48": 6}  # those with decoded frames
    assert (stats["frames"]["min"], stats["frames"]["max"]) == (3, 24)  # the truncated clip decodes fewer than 48
    assert stats["seconds"]["max"] == 2.0

    validation = split_of(report, "ssv2", "validation")
    assert "Juggling something" in validation["error"] and validation["failed"]
    assert validation["annotation_problems"] == [
        {"entry": 1, "id": "11", "problem": "template 'Juggling something' not in labels"}]
    assert split_of(report, "ssv2", "test")["classes"]["per_class"] == {"<unlabelled>": 1}
    assert report["ssv2_videos_in_no_json"]["ssv2"] == {"count": 1, "files": ["99.webm"]}
    assert failure is not None and failure.exit_code == EXIT_USER_ERROR
    message = str(failure)
    assert "in1k/train: 3 of 18 files (16.7%) unreadable" in message and "ssv2/train: 6 of 10" in message
    assert "ssv2/validation" in message and "in1k/val" not in message and "ssv2/test" not in message

    two, _ = run_check(tmp_path, [DEMO, config], "--workers", "2")
    assert without_timing(two) == without_timing(report)
    assert two["timing"]["workers"] == 2 and two["timing"]["files"] == 18 + 12 + 10 + 2 + 1


def test_exit_code_follows_max_invalid_fraction(imagenet_root, tmp_path, capsys):
    sources = [{"name": "in1k", "kind": "imagenet", "root": str(imagenet_root)}]
    _, failure = run_check(tmp_path, [DEMO, write_config(tmp_path, sources)], "--workers", "1")
    assert "in1k/train: 3 of 18 files (16.7%) unreadable, more than max_invalid_fraction=0.1" in str(failure)
    report, failure = run_check(tmp_path, [DEMO, write_config(tmp_path, sources, max_invalid_fraction=0.2)])
    assert failure is None and report["ok"] and report["max_invalid_fraction"] == 0.2
    # the same through a command-line override after the configs, as with omnimae-cli fit
    _, failure = run_check(tmp_path, [DEMO, write_config(tmp_path, sources)], "--data.init_args.max_invalid_fraction",
                           "0.17")
    assert failure is None
    assert "OK: every split within max_invalid_fraction 0.17" in capsys.readouterr().out


def test_demo_config_passes(demo_root, tmp_path, capsys):
    sources = [
        {"name": "imagenet_demo", "kind": "imagenet", "root": str(demo_root / "imagenet"), "val_split": "val"},
        {"name": "ssv2_demo", "kind": "ssv2", "root": str(demo_root / "ssv2" / "videos"),
         "annotations": str(demo_root / "ssv2"), "val_split": "validation"},
    ]
    layer = tmp_path / "roots.yaml"
    layer.write_text(yaml.safe_dump({"data": {"init_args": {"sources": sources}}}))
    report, failure = run_check(tmp_path, [DEMO, str(layer)], "--workers", "2")
    assert failure is None and report["ok"] and report["num_frames"] == 8
    files = {(s["source"], s["split"]): (s["files"], s["unreadable"]) for s in report["splits"]}
    on_disk = lambda split: len(list((demo_root / "imagenet" / split).glob("*/*.JPEG")))
    in_json = lambda split: len(json.loads((demo_root / "ssv2" / f"something-something-v2-{split}.json").read_text()))
    assert files == {
        ("imagenet_demo", "train"): (on_disk("train"), 0), ("imagenet_demo", "val"): (on_disk("val"), 0),
        ("ssv2_demo", "train"): (in_json("train"), 0), ("ssv2_demo", "validation"): (in_json("validation"), 0),
    }
    out = capsys.readouterr().out
    assert "1 CMYK, 1 greyscale, 1 PNG named .JPEG" in out and "OK: every split" in out
    assert "imagenet_demo/train (imagenet, train)" in out and f"videos: fps 12.00 ({in_json('train')})" in out


def test_a_dying_worker_or_a_hanging_file_does_not_hang_the_check(imagenet_root, tmp_path, monkeypatch):
    real = probe.probe_image

    def sabotaged(path):  # the pool forks after this, so its workers run it
        if path.endswith("img_1.JPEG"):
            os._exit(1)  # as a decoder's segfault would
        if path.endswith("img_2.JPEG"):
            time.sleep(60)
        return real(path)

    monkeypatch.setattr(probe, "probe_image", sabotaged)
    sources = [{"name": "in1k", "kind": "imagenet", "root": str(imagenet_root), "val_split": "val"}]
    start = time.perf_counter()
    # one worker: train goes in chunks of 2 (a dead chunk is probed again file by file), val in chunks of 1
    report, failure = run_check(tmp_path, [DEMO, write_config(tmp_path, sources)], "--workers", "1",
                                "--timeout", "0.3")
    assert time.perf_counter() - start < 30
    for split, good in (("train", 12 + 3 - 6), ("val", 12 - 6)):
        s = split_of(report, "in1k", split)
        reasons = {}
        for f in s["failures"]:
            reasons.setdefault(f["reason"], []).append(Path(f["path"]).name)
        assert reasons.pop("crashed") == ["img_1.JPEG"] * 3 and reasons.pop("timeout") == ["img_2.JPEG"] * 3
        assert s["files"] - s["unreadable"] == good
    assert failure is not None


def test_classification_config_with_a_video_folder(tmp_path):
    for split, count in (("train", 2), ("val", 1)):
        for name in ("abseiling", "zumba"):
            (tmp_path / "k" / split / name).mkdir(parents=True)
            for n in range(count):
                write_test_video(tmp_path / "k" / split / name / f"{n}.mp4", 12)
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "class_path": "omnimae_pl.data.datamodule.ClassificationDataModule",
        "init_args": {"source": {"kind": "video_folder", "root": str(tmp_path / "k"), "val_split": "val"}, **SMALL},
    }}))
    report, failure = run_check(tmp_path, [str(config)], "--workers", "1")
    assert failure is None and report["datamodule"].endswith("ClassificationDataModule")
    per_class = {s["split"]: s["classes"]["per_class"] for s in report["splits"]}
    assert per_class == {"train": {"abseiling": 2, "zumba": 2}, "val": {"abseiling": 1, "zumba": 1}}
    assert split_of(report, "video_folder", "train")["videos"]["frames"] == {"min": 12, "median": 12, "max": 12}


def test_config_mistakes_are_one_line_errors(tmp_path, capsys):
    no_data = tmp_path / "trainer.yaml"
    no_data.write_text("trainer: {max_steps: 1}\n")
    with pytest.raises(ConfigError, match="no data: section"):
        main(["--config", str(no_data)])
    with pytest.raises(ConfigError, match=r"data.init_args.max_invalid_fraction=2.0: must be in \[0, 1\]"):
        main(["--config", DEMO, "--data.init_args.max_invalid_fraction", "2"])
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", DEMO, "--data.init_args.num_frames", "many"])
    assert exit_info.value.code == EXIT_USER_ERROR
    assert "num_frames" in capsys.readouterr().err
