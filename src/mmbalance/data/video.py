"""Decoding with PyAV: frames at 1 fps and mono audio at a target sample rate.

* :func:`extract_frames` keeps, for every whole second ``k`` of the clip, the first decoded
  frame whose timestamp is ``>= k`` seconds (what the field's OpenCV script does by keeping
  frame ``i`` when ``i % round(fps) == 0``), and writes them as ``00001.jpg``, ``00002.jpg``, ...
  A clip shorter than a second still gives one frame.
* :func:`decode_audio` decodes the first audio stream, resamples it with libswresample (PyAV's
  ``AudioResampler``, a windowed-sinc resampler) to float samples at the target rate keeping
  the channel layout, then averages the channels (librosa's ``mono=True``).
"""
from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np

__all__ = ["extract_frames", "decode_audio", "read_frames"]


def _frame_time(frame: av.VideoFrame, stream: av.video.stream.VideoStream, index: int) -> float:
    if frame.pts is not None and frame.time_base is not None:
        return float(frame.pts * frame.time_base)
    if frame.time is not None:
        return float(frame.time)
    rate = stream.average_rate or Fraction(25)
    return index / float(rate)


def read_frames(path: str, fps: float = 1.0, short_side: int | None = None) -> list:
    """Decode a video and return PIL images sampled at ``fps`` (first frame of each 1/fps interval).

    ``short_side`` resizes every kept frame so its shorter side has that many pixels (keeping
    the aspect ratio); ``None`` keeps the original size.
    """
    images = []
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = None
        next_t = 0.0
        for i, frame in enumerate(container.decode(stream)):
            t = _frame_time(frame, stream, i)
            if start is None:
                start = t
            t -= start
            if t + 1e-6 >= next_t:
                img = frame.to_image()
                if short_side:
                    w, h = img.size
                    s = short_side / min(w, h)
                    img = img.resize((max(1, round(w * s)), max(1, round(h * s))))
                images.append(img)
                while next_t <= t + 1e-6:
                    next_t += 1.0 / fps
    if not images:
        raise ValueError("no decodable video frames")
    return images


def extract_frames(path: str, out_dir: str, fps: float = 1.0, short_side: int | None = None,
                   quality: int = 95) -> int:
    """Write the 1-fps frames of ``path`` to ``out_dir/00001.jpg`` ...; returns the frame count."""
    images = read_frames(path, fps, short_side)
    os.makedirs(out_dir, exist_ok=True)
    for k, img in enumerate(images, start=1):
        img.convert("RGB").save(os.path.join(out_dir, f"{k:05d}.jpg"), quality=quality)
    return len(images)


def decode_audio(path: str, sample_rate: int) -> np.ndarray:
    """Decode the first audio stream of ``path`` to a mono float32 waveform at ``sample_rate``.

    Raises ``ValueError`` when the file has no audio stream.
    """
    chunks: list[np.ndarray] = []
    with av.open(path) as container:
        if not container.streams.audio:
            raise ValueError("no audio stream")
        stream = container.streams.audio[0]
        resampler = None
        for frame in container.decode(stream):
            if resampler is None:
                layout = frame.layout.name if frame.layout is not None else "mono"
                resampler = av.AudioResampler(format="fltp", layout=layout, rate=sample_rate)
            frame.pts = None  # let the resampler count samples itself (robust to bad timestamps)
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray())
        if resampler is not None:
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    wave = np.concatenate(chunks, axis=1)  # (channels, samples), planar float
    return wave.mean(axis=0).astype(np.float32)
