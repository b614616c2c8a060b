"""What is wrong with one file: read it as the loaders do and name the failure, for ``omnimae-cli data-check``.

Images are opened with PIL and decoded in full (at the 1/8 JPEG draft scale the image loaders also use when they
shrink, which still decodes every byte, so truncation and corrupt data show). Videos are opened with PyAV, one
decoding thread, and every frame is decoded (``video_io``'s own helpers), so the frame count and the duration
are the decoded ones, never the header's.

A probe returns a row ``(reason, detail, placeholder, stats)``: ``reason`` is "" for a good file or one of
:data:`REASONS`; ``placeholder`` says whether training turns the file into a placeholder (the loader fails) or
still reads it; ``stats`` is ``(format, mode, width, height)`` for an image that opened, ``(fps, seconds, frames,
width, height)`` for a video with decoded frames, else None. :func:`probe_chunk` runs in the worker processes:
each file gets ``timeout`` seconds (SIGALRM) and a hard exit at twice that, so no file can hang the check.
"""

from __future__ import annotations

import faulthandler
import os
import signal
from pathlib import Path

import av
from PIL import Image, UnidentifiedImageError

from omnimae_pl.data.video_io import VideoDecodeError, _frame_times, _header_duration, _video_stream

REASONS = {
    "missing": "no such file",
    "empty": "zero bytes",
    "os_error": "the file cannot be read (permissions, I/O error)",
    "not_media": "not an image / video (e.g. text or HTML named .JPEG)",
    "truncated": "the data stops early (an interrupted copy)",
    "corrupt": "the decoder refuses the data",
    "no_video_stream": "a media file without a video stream",
    "too_few_frames": "fewer decoded frames than num_frames (training repeats frames)",
    "timeout": "decoding took longer than --timeout",
    "crashed": "the decoder killed its process",
}
# Magic bytes of the formats the loaders read: a file that starts with one but does not open is damaged, not foreign.
# (MP4 and MOV have "ftyp" at byte 4.)
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"BM", b"RIFF", b"\x1a\x45\xdf\xa3")
# PIL names a JPEG with several pictures (some cameras write them) MPO: still a JPEG.
_EXTENSION_FORMATS = {".jpeg": ("JPEG", "MPO"), ".jpg": ("JPEG", "MPO"), ".png": ("PNG",), ".bmp": ("BMP",),
                      ".webp": ("WEBP",)}

Row = tuple[str, str, bool, tuple | None]


class _Timeout(Exception):
    pass


def probe_image(path: str) -> Row:
    if problem := _file_problem(path):
        return problem
    stats = None
    try:
        with Image.open(path) as image:
            width, height = image.size
            stats = (image.format, image.mode, width, height)
            if image.format == "JPEG":
                image.draft(None, (max(width // 8, 1), max(height // 8, 1)))
            image.load()
    except UnidentifiedImageError as err:
        return (_foreign_or_corrupt(path), _why(err, path), True, None)
    except OSError as err:  # PIL's "image file is truncated", "broken data stream", ...
        return ("truncated" if "truncated" in str(err) else "corrupt", _why(err, path), True, stats)
    except (ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return ("corrupt", _why(err, path), True, stats)
    return ("", "", False, stats)


def probe_video(path: str, num_frames: int) -> Row:
    if problem := _file_problem(path):
        return problem
    try:
        with av.open(path) as container:
            stream = _video_stream(container, path)
            header = _header_duration(container, stream)
            rate = stream.average_rate or stream.guessed_rate
            width, height = stream.codec_context.width, stream.codec_context.height
            times, step = _frame_times(container, stream)
    except VideoDecodeError:
        return ("no_video_stream", "", True, None)
    except av.error.EOFError as err:  # the headers stop early (e.g. cut before the first frame)
        return ("truncated", _why(err, path), True, None)
    except av.error.FFmpegError as err:
        return (_foreign_or_corrupt(path), _why(err, path), True, None)
    decoded = times[-1] - times[0] + step if times else 0.0
    stats = (float(rate) if rate else 0.0, decoded, len(times), width, height) if times else None
    # The reader's own test: a decode that stops this far before the header's duration is a truncated file.
    if header and decoded < header - max(2 * step, 0.25):
        decodes = f"{len(times)} frames ({decoded:.2f} s) decode" if times else "no frame decodes"
        detail = f"{decodes}, the header says {header:.2f} s"
        return ("truncated", detail, not times, stats)
    if not times:
        return ("corrupt", "no frame decodes", True, None)
    if len(times) < num_frames:
        return ("too_few_frames", f"{len(times)} frames decode, num_frames is {num_frames}", False, stats)
    return ("", "", False, stats)


def _file_problem(path: str) -> Row | None:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return ("missing", "", True, None)
    except OSError as err:
        return ("os_error", _why(err, path), True, None)
    return ("empty", "", True, None) if size == 0 else None


def _foreign_or_corrupt(path: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return "os_error"
    known = head.startswith(_SIGNATURES) or head[4:8] == b"ftyp"
    return "corrupt" if known else "not_media"


def _why(err: BaseException, path: str) -> str:
    """The library's words without the path (the report has it) and without FFmpeg's error number."""
    text = err.strerror if isinstance(err, (av.error.FFmpegError, OSError)) and err.strerror else str(err)
    text = text.replace(f" '{path}'", "").replace(f": '{path}'", "").replace(path, "the file")
    return " ".join(text.split())[:200]


def format_mismatch(path: str, image_format: str | None) -> bool:
    """True when the bytes are another format than the name says (a PNG named .JPEG)."""
    expected = _EXTENSION_FORMATS.get(Path(path).suffix.lower())
    return expected is not None and image_format is not None and image_format not in expected


def _on_alarm(signum, frame) -> None:
    raise _Timeout


_started = None  # the queue that hears (chunk id, pid) when a worker starts a chunk; set by init_worker


def init_worker(started) -> None:
    """Pool initializer: Ctrl-C is the main process's to handle; FFmpeg stays quiet; SIGALRM ends a slow probe.
    ``started``: a SimpleQueue (written at once, no feeder thread), so the main process learns who holds which
    chunk even from a worker that dies just after."""
    global _started
    _started = started
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    av.logging.set_level(None)
    av.logging.set_libav_level(av.logging.PANIC)


def probe_one(path: str, modality: str, num_frames: int, timeout: float) -> Row:
    """One file under a time limit. SIGALRM interrupts Python-level loops (between packets); a decoder stuck
    inside one C call is ended by faulthandler's watchdog thread, which exits the process (see ``crashed``)."""
    faulthandler.dump_traceback_later(2 * timeout + 5, exit=True, file=2)  # fd 2: sys.stderr may be a wrapper
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return probe_image(path) if modality == "image" else probe_video(path, num_frames)
    except _Timeout:
        return ("timeout", f"more than {timeout:g} s", True, None)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()


def probe_chunk(task: tuple) -> tuple[int, list[tuple[int, Row]]]:
    """``(chunk id, modality, num_frames, timeout, [(index, path), ...])`` -> (chunk id, [(index, row), ...])."""
    chunk_id, modality, num_frames, timeout, items = task
    _started.put((chunk_id, os.getpid()))
    return chunk_id, [(i, probe_one(path, modality, num_frames, timeout)) for i, path in items]
