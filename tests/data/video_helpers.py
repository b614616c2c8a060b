"""Writing small real video files for tests, with each frame's number readable back from its pixels."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch

# A frame's number n is painted as three flat bands, top to bottom its ones, tens and hundreds digits, each as
# the grey level LEVEL0 + digit * LEVEL_STEP, plus a gentle left-to-right ramp (zero on average over a row, so
# that crops at different places differ). Smooth areas survive lossy coding to well within half a step.
LEVEL0, LEVEL_STEP = 20, 22
MATROSKA_CLUSTER_ID = bytes.fromhex("1F43B675")
CODECS = {".webm": "libvpx-vp9", ".mp4": "libx264", ".mkv": "libvpx-vp9", ".avi": "mpeg4"}


def numbered_frame(n: int, width: int, height: int) -> np.ndarray:
    frame = np.empty((height, width, 3), dtype=np.int16)
    for band in range(3):
        frame[band * height // 3 : (band + 1) * height // 3] = LEVEL0 + (n // 10**band % 10) * LEVEL_STEP
    frame += np.linspace(-8, 8, width).round().astype(np.int16)[None, :, None]
    return frame.astype(np.uint8)


def read_frame_numbers(clip: torch.Tensor) -> list[int]:
    """Frame numbers of a decoded clip, uint8 (T, H, W, 3)."""
    height = clip.shape[1]
    numbers = torch.zeros(clip.shape[0], dtype=torch.long)
    for band in range(3):
        middle = clip[:, band * height // 3 + height // 12 : (band + 1) * height // 3 - height // 12]
        digit = ((middle.float().mean(dim=(1, 2, 3)) - LEVEL0) / LEVEL_STEP).round().long()
        numbers += digit * 10**band
    return numbers.tolist()


def write_test_video(
    path: str | Path, num_frames: int, fps: int = 12, width: int = 64, height: int = 48, keyframe_every: int = 0
) -> Path:
    """Write ``num_frames`` numbered frames at ``fps``; the codec follows the suffix. ``keyframe_every`` > 0
    forces that keyframe interval (so that seeking has somewhere to land)."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[path.suffix], rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if stream.codec_context.name == "libvpx-vp9":
            stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "10", "b:v": "0"}
        elif stream.codec_context.name == "libx264":
            stream.options = {"preset": "veryfast", "crf": "10"}  # with B-frames: decode order != display order
        else:
            stream.bit_rate = 2_000_000
        if keyframe_every:
            stream.codec_context.gop_size = keyframe_every
        for n in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(numbered_frame(n, width, height), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def truncate_file(path: str | Path, fraction: float = 0.5) -> Path:
    """Cut a file to ``fraction`` of its bytes, as an interrupted download would."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def cut_before_first_frame(path: str | Path) -> Path:
    """Cut a WebM just before its first Cluster: the headers still open (and claim a duration), no frame decodes."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: data.index(MATROSKA_CLUSTER_ID)])
    return path
