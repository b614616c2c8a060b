"""Reading fixed-length clips from video files.

A clip is ``num_frames`` frames evenly spaced in time inside a window of ``clip_duration`` seconds, as in the
paper (16 frames from a random 2.7 s window). Everything is computed from the timestamps of the frames that were
actually decoded, never from header frame counts: Matroska/WebM headers carry none, and a truncated file decodes
fewer frames (without raising) while its header still claims the full duration. A video shorter than the window
gives repeated frames. A file that yields no frame raises :class:`VideoDecodeError`, which datasets turn into a
placeholder sample.

Readers return uint8 tensors laid out (K, T, H, W, 3): K windows, T frames, RGB last (the layout decoders
produce, so no copy is made before the spatial transforms).
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
import torch

DEFAULT_NUM_FRAMES = 16
DEFAULT_CLIP_DURATION = 2.7


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


def sample_frame_indices(times: Sequence[float], start: float, clip_duration: float, num_frames: int) -> list[int]:
    """Indices into the sorted frame ``times`` of ``num_frames`` frames evenly spaced in [start, start + clip).

    Targets are evenly spaced between the first and the last frame inside the window and each picks the latest
    frame shown at or before it, so at a constant frame rate this equals taking evenly spaced frame indices
    (PyTorchVideo's uniform subsampling), and it stays right for any or a variable frame rate. Fewer frames than
    ``num_frames`` in the window give repeated frames.
    """
    if not times:
        raise ValueError("no frame times to sample from")
    first = bisect.bisect_left(times, start - 1e-6)
    last = bisect.bisect_left(times, start + clip_duration - 1e-6) - 1
    if last < first:  # no frame inside the window: hold the frame shown at its start
        held = max(min(first, len(times)) - 1, 0)
        return [held] * num_frames
    t0, t1 = times[first], times[last]
    targets = np.linspace(t0, t1, num_frames) if num_frames > 1 else np.array([t0])
    return [min(max(bisect.bisect_right(times, t + 1e-6) - 1, first), last) for t in targets]


class VideoReader(ABC):
    """Decodes clips; subclasses implement :meth:`read_windows` for one decoding library."""

    @abstractmethod
    def read_windows(
        self, path: str | Path, positions: Sequence[float], num_frames: int, clip_duration: float
    ) -> torch.Tensor:
        """Clips for windows at ``positions`` (see :func:`window_starts`) from ONE decode: uint8 (K, T, H, W, 3).

        Raises :class:`VideoDecodeError` for a file that cannot be opened or yields no frame.
        """

    def read_clip(
        self,
        path: str | Path,
        num_frames: int = DEFAULT_NUM_FRAMES,
        clip_duration: float = DEFAULT_CLIP_DURATION,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One clip from a random window (uniform over all windows that fit the video): uint8 (T, H, W, 3)."""
        position = float(torch.rand((), generator=generator))
        return self.read_windows(path, [position], num_frames, clip_duration)[0]

    def read_uniform_clips(
        self,
        path: str | Path,
        num_clips: int,
        num_frames: int = DEFAULT_NUM_FRAMES,
        clip_duration: float = DEFAULT_CLIP_DURATION,
    ) -> torch.Tensor:
        """``num_clips`` evenly spaced windows from one decode, for multi-clip testing: uint8 (K, T, H, W, 3)."""
        return self.read_windows(path, uniform_positions(num_clips), num_frames, clip_duration)


class PyAVReader(VideoReader):
    """PyAV backend, safe in DataLoader workers: one decoding thread, FFmpeg logging off, containers closed.

    Only the frames that end up in a clip are converted to RGB; decoding starts at a seek to the first window
    (when it is more than ``seek_threshold`` seconds in) and stops after the last window ends.
    """

    def __init__(self, seek_threshold: float = 1.0) -> None:
        self.seek_threshold = seek_threshold

    def read_windows(
        self, path: str | Path, positions: Sequence[float], num_frames: int, clip_duration: float
    ) -> torch.Tensor:
        path = str(path)
        av.logging.set_level(None)
        av.logging.set_libav_level(av.logging.PANIC)
        try:
            frames = self._decode_windows(path, positions, clip_duration)
            if frames is None:  # header duration missing or wrong (e.g. a truncated file): use every frame
                frames = self._decode(path, 0.0, math.inf, seek=False)
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
            raise VideoDecodeError(f"cannot decode video {path}: {err}") from err
        times, kept, step = frames
        if not kept:
            raise VideoDecodeError(f"no frames decoded from video {path}")
        duration = times[-1] - times[0] + step
        starts = [times[0] + s for s in window_starts(duration, clip_duration, positions)]
        picks = [sample_frame_indices(times, s, clip_duration, num_frames) for s in starts]
        return _to_rgb(kept, picks)

    def _decode_windows(
        self, path: str, positions: Sequence[float], clip_duration: float
    ) -> tuple[list[float], list[av.VideoFrame], float] | None:
        """Decode only the span the windows need, trusting the header duration; None when that trust fails."""
        with av.open(path) as container:
            stream = _video_stream(container, path)
            duration = _header_duration(container, stream)
        if duration is None:
            return None
        starts = window_starts(duration, clip_duration, positions)
        lo, hi = min(starts), max(starts) + clip_duration
        times, kept, step, reached_end = self._decode_span(path, lo, hi, seek=lo > self.seek_threshold)
        tolerance = max(2 * step, 0.25)
        if not kept or times[0] > lo + tolerance:  # nothing decoded, or the seek overshot the window
            return None
        if reached_end and times[-1] + step < min(hi, duration) - tolerance:  # the file ends early
            return None
        return times, kept, step

    def _decode(self, path: str, lo: float, hi: float, seek: bool) -> tuple[list[float], list[av.VideoFrame], float]:
        times, kept, step, _ = self._decode_span(path, lo, hi, seek)
        return times, kept, step

    @staticmethod
    def _decode_span(
        path: str, lo: float, hi: float, seek: bool
    ) -> tuple[list[float], list[av.VideoFrame], float, bool]:
        """Frames (still YUV) shown in [lo, hi) seconds from the stream start, their times, the frame step, and
        whether the file ended before ``hi``. A packet that fails to decode ends the stream, as truncation does."""
        times: list[float] = []
        kept: list[av.VideoFrame] = []
        with av.open(path) as container:
            stream = _video_stream(container, path)
            origin = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            rate = stream.average_rate or stream.guessed_rate
            step = 1.0 / float(rate) if rate else 0.0
            if seek:
                container.seek(int((lo + origin) / stream.time_base), stream=stream, backward=True)
            reached_end = True
            last = -math.inf
            try:
                for packet in container.demux(stream):
                    for frame in packet.decode():
                        t = frame.time - origin if frame.pts is not None else last + step
                        last = t
                        if t >= hi - 1e-6:
                            reached_end = False
                            break
                        if t >= lo - 1e-6 and (not times or t > times[-1]):
                            times.append(t)
                            kept.append(frame)
                    if not reached_end:
                        break
            except av.error.FFmpegError:
                pass
        if not rate and len(times) > 1:
            step = float(np.median(np.diff(times)))
        return times, kept, step, reached_end


def _video_stream(container: av.container.InputContainer, path: str) -> av.VideoStream:
    if not container.streams.video:
        raise VideoDecodeError(f"no video stream in {path}")
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"
    stream.thread_count = 1
    return stream


def _header_duration(container: av.container.InputContainer, stream: av.VideoStream) -> float | None:
    """Duration claimed by the header in seconds (may be wrong for damaged files), or None."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _to_rgb(frames: list[av.VideoFrame], picks: list[list[int]]) -> torch.Tensor:
    """Convert the picked frames (each once) to RGB at the first picked frame's size: (K, T, H, W, 3) uint8."""
    reformatter = av.video.reformatter.VideoReformatter()
    first = frames[picks[0][0]]
    width, height = first.width, first.height
    rgb: dict[int, np.ndarray] = {}
    for i in sorted({i for window in picks for i in window}):
        out = reformatter.reformat(frames[i], width=width, height=height, format="rgb24", threads=1)
        rgb[i] = out.to_ndarray()
    return torch.from_numpy(np.stack([np.stack([rgb[i] for i in window]) for window in picks]))


def torchcodec_available() -> bool:
    """True when torchcodec imports AND its FFmpeg libraries load (it needs a system FFmpeg, unlike PyAV)."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception:  # missing package, missing FFmpeg libraries, or an ABI mismatch with torch
        return False
    return True


class TorchCodecReader(VideoReader):
    """torchcodec backend (optional, faster): an exact-mode scan gives every frame's timestamp from the packets
    actually present, then only the picked frames are decoded, single-threaded."""

    def read_windows(
        self, path: str | Path, positions: Sequence[float], num_frames: int, clip_duration: float
    ) -> torch.Tensor:
        from torchcodec.decoders import VideoDecoder

        path = str(path)
        try:
            decoder = VideoDecoder(path, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")
            meta = decoder.metadata
            count = len(decoder)
            if count == 0:
                raise VideoDecodeError(f"no frames decoded from video {path}")
            begin = float(meta.begin_stream_seconds)
            fps = float(meta.average_fps) if meta.average_fps else 0.0
            step = 1.0 / fps if fps else 0.0
            times = [j * step for j in range(count)]
            duration = float(meta.end_stream_seconds) - begin
            starts = window_starts(duration, clip_duration, positions)
            picks = [sample_frame_indices(times, s, clip_duration, num_frames) for s in starts]
            wanted = sorted({i for window in picks for i in window})
            batch = decoder.get_frames_at(indices=wanted).data
        except VideoDecodeError:
            raise
        except Exception as err:  # torchcodec raises RuntimeError/ValueError for unreadable files
            raise VideoDecodeError(f"cannot decode video {path}: {err}") from err
        row = {i: n for n, i in enumerate(wanted)}
        return torch.stack([batch[[row[i] for i in window]] for window in picks])


def make_reader(backend: str = "pyav") -> VideoReader:
    """``"pyav"`` (default), ``"torchcodec"`` (error when not usable) or ``"auto"`` (torchcodec if usable)."""
    if backend == "pyav":
        return PyAVReader()
    if backend in ("torchcodec", "auto"):
        if torchcodec_available():
            return TorchCodecReader()
        if backend == "torchcodec":
            raise ValueError("video backend 'torchcodec' is not usable here (package or FFmpeg libraries missing)")
        return PyAVReader()
    raise ValueError(f"unknown video backend {backend!r}; choose 'pyav', 'torchcodec' or 'auto'")
