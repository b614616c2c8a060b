"""Reading fixed-length clips from video files.

A clip is ``num_frames`` frames at evenly spaced times inside a window of ``clip_duration`` seconds, as in the
paper (16 frames from a random 2.7 s window): the frame on screen at the middle of each of ``num_frames`` equal
slices of the window. Times are presentation timestamps, so any and even a variable frame rate works. A video
shorter than the window is spread over its own length, repeating frames.

Everything comes from the frames actually decoded, never from header frame counts: Matroska/WebM headers carry
none, and a truncated file decodes fewer frames (without raising) while its header still claims the full
duration. A file that yields no frame raises :class:`VideoDecodeError`, which datasets turn into a placeholder.

Readers return uint8 tensors laid out (K, T, H, W, 3): K windows, T frames, RGB last (the layout decoders
produce, which torchvision's fast resize path wants). They read a file's path or its encoded bytes (a record of
litdata shards, see ``data.litdata_store``), with the same frames either way.
"""

from __future__ import annotations

import bisect
import functools
import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import av
import numpy as np
import torch

from omnimae_pl.errors import ConfigError, check_value

# A Literal, so that the CLI refuses an unknown backend while parsing, naming the key and the accepted values.
VideoBackend = Literal["pyav", "torchcodec", "auto"]
VIDEO_BACKENDS: tuple[str, ...] = get_args(VideoBackend)
DEFAULT_NUM_FRAMES = 16
DEFAULT_CLIP_DURATION = 2.7
_EPS = 1e-4  # seconds; absorbs float noise in timestamps
# A video as the readers take it: the path of its file, or the file's bytes.
VideoSource = str | Path | bytes


class VideoDecodeError(RuntimeError):
    """A video file that cannot be opened or decodes to no frames; the message names the file."""


def window_starts(duration: float, clip_duration: float, positions: Sequence[float]) -> list[float]:
    """Window start times for ``positions`` in [0, 1]: 0 puts the window at the start of the video, 1 at its end.

    A video shorter than the window has a single possible window, starting at 0.
    """
    slack = max(duration - clip_duration, 0.0)
    return [min(max(p, 0.0), 1.0) * slack for p in positions]


def uniform_positions(num_clips: int) -> list[float]:
    """Positions of ``num_clips`` evenly spaced evaluation windows (one clip: the centre of the video)."""
    return [(k + 0.5) / num_clips for k in range(num_clips)]


def clip_times(
    duration: float, clip_duration: float, positions: Sequence[float], num_frames: int
) -> list[list[float]]:
    """For each window position, the ``num_frames`` sample times: the middles of equal slices of the window
    (of the whole video when it is shorter than ``clip_duration``)."""
    length = min(clip_duration, duration)
    return [
        [start + (i + 0.5) * length / num_frames for i in range(num_frames)]
        for start in window_starts(duration, clip_duration, positions)
    ]


def frames_shown_at(frame_times: Sequence[float], targets: Sequence[float]) -> list[int]:
    """Index of the frame on screen at each target time: the last frame that starts at or before it (the first
    frame for targets before it). ``frame_times`` must be sorted."""
    return [max(bisect.bisect_right(frame_times, t + _EPS) - 1, 0) for t in targets]


class VideoReader(ABC):
    """Decodes clips; subclasses implement :meth:`read_windows` for one decoding library."""

    @abstractmethod
    def read_windows(
        self, path: VideoSource, positions: Sequence[float], num_frames: int, clip_duration: float
    ) -> torch.Tensor:
        """Clips for windows at ``positions`` (see :func:`window_starts`) from ONE decode: uint8 (K, T, H, W, 3).

        Raises :class:`VideoDecodeError` for a file that cannot be opened or yields no frame.
        """

    def read_clip(
        self,
        path: VideoSource,
        num_frames: int = DEFAULT_NUM_FRAMES,
        clip_duration: float = DEFAULT_CLIP_DURATION,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One clip from a random window (uniform over all windows that fit the video): uint8 (T, H, W, 3)."""
        position = float(torch.rand((), generator=generator))
        return self.read_windows(path, [position], num_frames, clip_duration)[0]

    def read_uniform_clips(
        self,
        path: VideoSource,
        num_clips: int,
        num_frames: int = DEFAULT_NUM_FRAMES,
        clip_duration: float = DEFAULT_CLIP_DURATION,
    ) -> torch.Tensor:
        """``num_clips`` evenly spaced windows from one decode, for multi-clip testing: uint8 (K, T, H, W, 3)."""
        return self.read_windows(path, uniform_positions(num_clips), num_frames, clip_duration)


class PyAVReader(VideoReader):
    """PyAV backend, safe in DataLoader workers: one decoding thread, FFmpeg logging off, containers closed.

    Sample times come from the header's duration, so frames are picked while decoding: each frame is converted
    to RGB only if it is on screen at a sample time and is dropped at once otherwise (holding decoded frames
    would make the decoder allocate fresh buffers for every frame). Decoding starts with a seek when the first
    sample is more than ``seek_threshold`` seconds in, and stops at the first frame after the last sample. When
    the header has no duration or the decode disagrees with it (a truncated file), a first pass measures the
    real duration from the frames themselves.
    """

    def __init__(self, seek_threshold: float = 1.0) -> None:
        self.seek_threshold = seek_threshold

    def read_windows(
        self, path: VideoSource, positions: Sequence[float], num_frames: int, clip_duration: float
    ) -> torch.Tensor:
        name = _describe(path)
        av.logging.set_level(None)
        av.logging.set_libav_level(av.logging.PANIC)
        try:
            with _open(path) as container:
                stream = _video_stream(container, name)
                duration = _header_duration(container, stream)
                times = clip_times(duration, clip_duration, positions, num_frames) if duration else None
                frames = self._pick(container, stream, times) if times else None
            if frames is None:  # no usable header duration: measure it from the frames, then pick
                frames = self._pick_measured(path, positions, num_frames, clip_duration)
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
            raise VideoDecodeError(f"cannot decode video {name}: {err}") from err
        stacked = np.stack([frame for clip in frames for frame in clip])
        return torch.from_numpy(stacked).view(len(frames), num_frames, *stacked.shape[1:])

    def _pick(
        self, container: av.container.InputContainer, stream: av.VideoStream, targets: list[list[float]]
    ) -> list[list[np.ndarray]] | None:
        """Frames for ``targets`` (placed by the header's duration); None when the decode shows it was wrong."""
        first = min(t for clip in targets for t in clip)
        last = max(t for clip in targets for t in clip)
        picked = _pick_frames(container, stream, targets, seek=first if first > self.seek_threshold else None)
        tolerance = max(2 * picked.step, 0.25)
        if picked.first_time is None or picked.first_time > first + tolerance:
            return None  # no frame at all, or the seek landed after the window (a poor index)
        if picked.ended_at is not None and picked.ended_at < last - tolerance:
            return None  # the file stops well before the header says
        return picked.frames

    @staticmethod
    def _pick_measured(
        path: VideoSource, positions: Sequence[float], num_frames: int, clip_duration: float
    ) -> list[list[np.ndarray]]:
        """Two passes: the frames' own timestamps give the duration, then the picks are decoded from the start."""
        name = _describe(path)
        with _open(path) as container:
            times, step = _frame_times(container, _video_stream(container, name))
        if not times:
            raise VideoDecodeError(f"no frames decoded from video {name}")
        clips = clip_times(times[-1] - times[0] + step, clip_duration, positions, num_frames)
        with _open(path) as container:
            stream = _video_stream(container, name)
            return _pick_frames(container, stream, [[times[0] + t for t in clip] for clip in clips], seek=None).frames


@dataclass
class _Picked:
    """One decoding pass: the picked RGB frames per clip, the first frame's time, the nominal frame step, and
    where the last frame ended if the file ran out before the last sample time (else None)."""

    frames: list[list[np.ndarray]]
    first_time: float | None
    step: float
    ended_at: float | None = None


def _pick_frames(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    targets: list[list[float]],
    seek: float | None,
) -> _Picked:
    """Decode once, keeping as RGB only the frame on screen at each target time (times from the stream start).

    A packet that fails to decode ends the stream, as truncation does; samples after the last decoded frame
    get that frame.
    """
    origin, step = _origin_and_step(stream)
    order = sorted((t, k, i) for k, clip in enumerate(targets) for i, t in enumerate(clip))
    frames: list[list[np.ndarray | None]] = [[None] * len(clip) for clip in targets]
    if seek is not None:
        try:
            container.seek(int((seek + origin) / stream.time_base), stream=stream, backward=True)
        except av.error.FFmpegError:  # no index to seek with: decode from where we are
            pass
    convert = _RGBConverter()
    j, previous, previous_time, first_time = 0, None, -step, None
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                t = frame.time - origin if frame.pts is not None else previous_time + step
                if previous is not None and t <= previous_time:
                    continue  # a repeated or out-of-order timestamp
                if first_time is None:
                    first_time = t
                while j < len(order) and order[j][0] + _EPS < t:
                    _, k, i = order[j]
                    frames[k][i] = convert(previous if previous is not None else frame)
                    j += 1
                previous, previous_time = frame, t
                if j == len(order):
                    return _Picked(frames, first_time, step)
    except av.error.FFmpegError:
        pass
    if previous is None:
        return _Picked(frames, first_time, step)
    for _, k, i in order[j:]:
        frames[k][i] = convert(previous)
    return _Picked(frames, first_time, step, ended_at=previous_time + step)


def _frame_times(container: av.container.InputContainer, stream: av.VideoStream) -> tuple[list[float], float]:
    """Times of every decodable frame (from the stream start) and the frame step; frames are not kept."""
    origin, step = _origin_and_step(stream)
    times: list[float] = []
    try:
        for packet in container.demux(stream):
            for frame in packet.decode():
                t = frame.time - origin if frame.pts is not None else (times[-1] + step if times else 0.0)
                if not times or t > times[-1]:
                    times.append(t)
    except av.error.FFmpegError:
        pass
    if not step and len(times) > 1:
        step = float(np.median(np.diff(times)))
    return times, step


class _RGBConverter:
    """Frame -> RGB array, once per frame, at the size of the first frame converted (VP9 may change size)."""

    def __init__(self) -> None:
        self.reformatter = av.video.reformatter.VideoReformatter()
        self.size: tuple[int, int] | None = None
        self.last: tuple[av.VideoFrame, np.ndarray] | None = None

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        if self.last is not None and self.last[0] is frame:
            return self.last[1]
        if self.size is None:
            self.size = (frame.width, frame.height)
        width, height = self.size
        rgb = self.reformatter.reformat(frame, width=width, height=height, format="rgb24", threads=1).to_ndarray()
        self.last = (frame, rgb)
        return rgb


def _open(path: VideoSource) -> av.container.InputContainer:
    """A container on the file, or on the bytes (a fresh buffer for every pass, so each one starts at 0)."""
    return av.open(io.BytesIO(path)) if isinstance(path, bytes) else av.open(str(path))


def _describe(path: VideoSource) -> str:
    """The video in error messages: its path, or the size of its bytes (the dataset names the record)."""
    return f"of {len(path)} bytes" if isinstance(path, bytes) else str(path)


def _video_stream(container: av.container.InputContainer, path: str) -> av.VideoStream:
    if not container.streams.video:
        raise VideoDecodeError(f"no video stream in {path}")
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"
    stream.thread_count = 1
    return stream


def _origin_and_step(stream: av.VideoStream) -> tuple[float, float]:
    """Stream start time (seconds) and nominal frame step (0 when the rate is unknown)."""
    origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
    rate = stream.average_rate or stream.guessed_rate
    return origin, (1.0 / float(rate) if rate else 0.0)


def _header_duration(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    """Duration claimed by the header in seconds (may be wrong for damaged files), or None."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


@functools.cache
def torchcodec_available() -> bool:
    """True when torchcodec imports AND decodes a tiny clip: it needs system FFmpeg libraries (PyAV bundles its
    own) and a build matching torch, and it only finds out when the first decoder is made."""
    try:
        from torchcodec.decoders import VideoDecoder

        buffer = io.BytesIO()
        with av.open(buffer, "w", format="webm") as container:
            stream = container.add_stream("libvpx-vp9", rate=12)
            stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
            for packet in stream.encode(av.VideoFrame(16, 16, "yuv420p")):
                container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return VideoDecoder(buffer.getvalue(), num_ffmpeg_threads=1)[0].shape[-1] == 16
    except Exception:  # missing package or FFmpeg libraries, an ABI mismatch with torch, or a broken build
        return False


class TorchCodecReader(VideoReader):
    """torchcodec backend (optional): an exact-mode scan measures the duration from the packets actually present,
    then the frames on screen at the sample times are decoded, single-threaded. Same frames as PyAVReader."""

    def read_windows(
        self, path: VideoSource, positions: Sequence[float], num_frames: int, clip_duration: float
    ) -> torch.Tensor:
        from torchcodec.decoders import VideoDecoder

        source, path = (path if isinstance(path, bytes) else str(path)), _describe(path)
        try:
            decoder = VideoDecoder(source, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
            meta = decoder.metadata
            if not meta.num_frames:
                raise VideoDecodeError(f"no frames decoded from video {path}")
            begin = float(meta.begin_stream_seconds)
            clips = clip_times(float(meta.end_stream_seconds) - begin, clip_duration, positions, num_frames)
            frames = decoder.get_frames_played_at(seconds=[begin + t + _EPS for clip in clips for t in clip]).data
        except VideoDecodeError:
            raise
        except Exception as err:  # torchcodec raises RuntimeError / ValueError for unreadable files
            raise VideoDecodeError(f"cannot decode video {path}: {err}") from err
        return frames.reshape(len(clips), num_frames, *frames.shape[1:])


def make_reader(backend: VideoBackend = "pyav") -> VideoReader:
    """``"pyav"`` (default), ``"torchcodec"`` (error when not usable) or ``"auto"`` (torchcodec if usable).
    A backend that is unknown or not usable raises :class:`~omnimae_pl.errors.ConfigError` (key ``video_backend``)."""
    check_value(backend in VIDEO_BACKENDS, "video_backend", backend, f"must be one of {VIDEO_BACKENDS}")
    if backend == "pyav":
        return PyAVReader()
    if torchcodec_available():
        return TorchCodecReader()
    if backend == "torchcodec":
        raise ConfigError("video_backend='torchcodec': not usable here (the package or system FFmpeg libraries are "
                          "missing); use 'pyav' or 'auto'")
    return PyAVReader()
