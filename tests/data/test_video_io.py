"""Clip reading from real files: which frames a clip holds (read back from the pixels), and damaged files."""

from __future__ import annotations

import pickle

import av
import numpy as np
import pytest
import torch
from video_helpers import cut_before_first_frame, read_frame_numbers, truncate_file, write_test_video

from omnimae_pl.data import video_io
from omnimae_pl.data.video_io import (
    PyAVReader,
    TorchCodecReader,
    VideoDecodeError,
    frames_shown_at,
    make_reader,
    torchcodec_available,
)
from omnimae_pl.errors import ConfigError

CLIP = 2.7


def expected_numbers(path, fps: int, position: float, count: int = 16) -> list[int]:
    """Frame numbers a clip should hold, from the file's own frame timestamps (WebM rounds them to 1 ms): the
    window starts at ``position`` of the free span and lasts 2.7 s (or the whole video, if shorter); sample k
    is the frame on screen at the middle of the k-th of ``count`` equal slices of it."""
    with av.open(str(path)) as container:
        stored = [frame.time for frame in container.decode(video=0)]
    duration = len(stored) / fps
    length = min(CLIP, duration)
    start = position * max(duration - CLIP, 0.0)
    targets = [start + (k + 0.5) * length / count for k in range(count)]
    return [max(n for n, time in enumerate(stored) if time <= t + 1e-4 or n == 0) for t in targets]


@pytest.mark.parametrize(
    ("fps", "num_frames", "suffix"),
    [(6, 30, ".webm"), (12, 45, ".webm"), (30, 100, ".webm"), (12, 40, ".mp4"), (30, 45, ".mkv"), (12, 10, ".avi")],
)
def test_frames_are_evenly_spaced_in_time_for_any_fps(tmp_path, fps, num_frames, suffix):
    path = write_test_video(tmp_path / f"v{suffix}", num_frames, fps)
    positions = [0.0, 0.3141, 1.0]
    clips = PyAVReader().read_windows(path, positions, 16, CLIP)
    assert clips.shape == (3, 16, 48, 64, 3) and clips.dtype == torch.uint8
    for clip, position in zip(clips, positions, strict=True):
        assert read_frame_numbers(clip) == expected_numbers(path, fps, position)


@pytest.mark.parametrize(("fps", "num_frames"), [(6, 10), (12, 12), (30, 15)])
def test_video_shorter_than_the_window_repeats_frames(tmp_path, fps, num_frames):
    path = write_test_video(tmp_path / "short.webm", num_frames, fps)
    numbers = read_frame_numbers(PyAVReader().read_clip(path, generator=torch.Generator().manual_seed(0)))
    assert numbers == expected_numbers(path, fps, 0.0)
    assert sorted(set(numbers)) == list(range(num_frames))  # every frame shown, some twice
    assert numbers == sorted(numbers)


def test_random_window_follows_the_generator(tmp_path):
    path = write_test_video(tmp_path / "v.webm", 60, 12)
    reader = PyAVReader()
    first = [read_frame_numbers(reader.read_clip(path, 8, CLIP, torch.Generator().manual_seed(s)))[0] for s in range(8)]
    again = [read_frame_numbers(reader.read_clip(path, 8, CLIP, torch.Generator().manual_seed(s)))[0] for s in range(8)]
    assert first == again
    assert len(set(first)) > 1  # windows start at different places
    assert all(0 <= f <= 60 - round(CLIP * 12) for f in first)


@pytest.mark.parametrize("suffix", [".webm", ".mp4"])
def test_seek_into_a_long_video_lands_on_the_right_frames(tmp_path, suffix):
    path = write_test_video(tmp_path / f"long{suffix}", 150, 12, keyframe_every=12)
    clips = PyAVReader(seek_threshold=1.0).read_windows(path, [0.8, 1.0], 16, CLIP)
    assert [read_frame_numbers(c) for c in clips] == [expected_numbers(path, 12, 0.8), expected_numbers(path, 12, 1.0)]


def test_uniform_clips_come_from_one_decode(tmp_path):
    path = write_test_video(tmp_path / "v.webm", 72, 12)
    clips = PyAVReader().read_uniform_clips(path, num_clips=5, num_frames=4)
    assert clips.shape == (5, 4, 48, 64, 3)
    firsts = [read_frame_numbers(c)[0] for c in clips]
    assert firsts == [expected_numbers(path, 12, (k + 0.5) / 5, 4)[0] for k in range(5)]
    assert firsts == sorted(firsts) and len(set(firsts)) == 5


def test_truncated_file_samples_from_the_frames_that_decoded(tmp_path):
    path = truncate_file(write_test_video(tmp_path / "cut.webm", 48, 12), 0.5)
    clips = PyAVReader().read_windows(path, [0.0, 1.0], 16, CLIP)
    numbers = [read_frame_numbers(c) for c in clips]
    decoded = max(numbers[1]) + 1  # the header still claims 48 frames (4 s); fewer decode
    assert 0 < decoded < 48
    for clip_numbers in numbers:
        assert clip_numbers == sorted(clip_numbers) and max(clip_numbers) < decoded
    assert numbers[0][0] == 0


@pytest.mark.parametrize("damage", ["random_bytes", "zero_bytes", "missing", "no_frames", "text"])
def test_unreadable_files_raise_video_decode_error_naming_the_file(tmp_path, damage):
    path = tmp_path / f"{damage}.webm"
    if damage == "random_bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif damage == "zero_bytes":
        path.write_bytes(b"")
    elif damage == "no_frames":
        cut_before_first_frame(write_test_video(path, 24, 12))
    elif damage == "text":
        path.write_text("not a video\n" * 50)
    with pytest.raises(VideoDecodeError, match=damage):
        PyAVReader().read_clip(path)


def test_frame_on_screen_with_a_variable_frame_rate():
    times = [0.1, 0.15, 0.2, 0.6, 1.0, 1.05, 1.9]
    assert frames_shown_at(times, [0.0, 0.1, 0.149, 0.5, 1.04, 1.5, 7.0]) == [0, 0, 0, 2, 4, 5, 6]


def test_backend_choice(monkeypatch):
    assert isinstance(make_reader("pyav"), PyAVReader)
    monkeypatch.setattr(video_io, "torchcodec_available", lambda: False)
    assert isinstance(make_reader("auto"), PyAVReader)
    with pytest.raises(ConfigError, match="video_backend='torchcodec': not usable here"):
        make_reader("torchcodec")
    with pytest.raises(ConfigError, match="video_backend='decord': must be one of"):
        make_reader("decord")


def test_auto_backend_reads_the_same_frames_as_pyav(tmp_path):
    """torchcodec where it works (it needs system FFmpeg libraries), PyAV otherwise; the same frames either way."""
    path = write_test_video(tmp_path / "v.webm", 45, 12)
    reader = make_reader("auto")
    assert isinstance(reader, TorchCodecReader if torchcodec_available() else PyAVReader)
    clips = reader.read_windows(path, [0.0, 0.5, 1.0], 16, CLIP)
    assert [read_frame_numbers(c) for c in clips] == [expected_numbers(path, 12, p) for p in (0.0, 0.5, 1.0)]
    with pytest.raises(VideoDecodeError, match="no_frames"):
        reader.read_clip(cut_before_first_frame(write_test_video(tmp_path / "no_frames.webm", 24, 12)))


def test_reader_pickles_for_dataloader_workers(tmp_path):
    path = write_test_video(tmp_path / "v.webm", 20, 12)
    reader = pickle.loads(pickle.dumps(PyAVReader()))
    assert reader.read_clip(path, 4).shape == (4, 48, 64, 3)
