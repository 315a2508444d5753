"""Tiny raw audio-visual fixtures for the preprocessing and loader tests (written with PyAV).

Every fixture is generated into a pytest ``tmp_path``: videos a few seconds long at 32 x 24
pixels and 10 fps with a sine-tone audio track, laid out as each dataset's raw distribution
(see ``docs/datasets.md``), plus a corrupt file where a test asks for one.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

FPS = 10
SIZE = (32, 24)  # width, height
AUDIO_RATE = 16000


def write_video(path: str | Path, seconds: float, *, fps: int = FPS, audio: bool = True,
                audio_rate: int = AUDIO_RATE, tone_hz: float = 440.0, seed: int = 0,
                container_format: str | None = None) -> Path:
    """Write a small video (moving colour gradient) with an optional sine-tone audio track.

    The video codec is mpeg4 (or flv1 for ``.flv``), the audio AAC (or pcm_s16le in ``.wav``
    files, see :func:`write_wav`). Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_frames = max(1, int(round(seconds * fps)))
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    is_flv = path.suffix == ".flv"
    with av.open(str(path), "w", format=container_format) as out:
        vs = out.add_stream("flv" if is_flv else "mpeg4", rate=fps)
        vs.width, vs.height = SIZE
        vs.pix_fmt = "yuv420p"
        as_ = None
        if audio:
            as_ = out.add_stream("aac" if not is_flv else "aac", rate=audio_rate)
            as_.layout = "mono"
        yy, xx = np.mgrid[0:SIZE[1], 0:SIZE[0]]
        for i in range(n_frames):
            img = np.zeros((SIZE[1], SIZE[0], 3), dtype=np.uint8)
            for c in range(3):
                img[..., c] = (base[c] + 8 * i + 3 * xx + 2 * yy) % 256
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in vs.encode(frame):
                out.mux(packet)
        for packet in vs.encode():
            out.mux(packet)
        if as_ is not None:
            total = int(seconds * audio_rate)
            t = np.arange(total) / audio_rate
            wave = (0.3 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            _encode_audio(out, as_, wave, audio_rate, "flt", 1024)
    return path


def _encode_audio(out, stream, wave: np.ndarray, rate: int, fmt: str, step: int) -> None:
    """Encode a mono waveform into ``stream`` of container ``out`` in chunks of ``step`` samples."""
    for k in range(0, len(wave), step):
        frame = av.AudioFrame.from_ndarray(wave[None, k:k + step], format=fmt, layout="mono")
        frame.sample_rate = rate
        frame.pts = k
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)


def write_wav(path: str | Path, seconds: float, rate: int = 44100, tone_hz: float = 440.0) -> Path:
    """Write a 16-bit PCM mono WAV file with a sine tone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    total = int(seconds * rate)
    t = np.arange(total) / rate
    wave = (0.3 * np.sin(2 * np.pi * tone_hz * t) * 32767).astype(np.int16)
    with av.open(str(path), "w") as out:
        s = out.add_stream("pcm_s16le", rate=rate)
        s.layout = "mono"
        _encode_audio(out, s, wave, rate, "s16", 4096)
    return path


def write_corrupt(path: str | Path) -> Path:
    """Write a file with a video extension whose bytes are not a video."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a video file" * 10)
    return path


CREMA_EMOTIONS = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


def make_crema_d(root: str | Path, actors: tuple[int, ...] = (1001, 1002, 1003, 1004, 1005),
                 sentences: tuple[str, ...] = ("DFA", "IEO"), seconds: float = 2.2,
                 short: str | None = None, corrupt: str | None = None, wav: bool = True) -> list[str]:
    """CREMA-D raw layout: ``VideoFlash/<clip>.flv`` and ``AudioWAV/<clip>.wav``.

    One clip per (actor, sentence, emotion): ``<actor>_<sentence>_<EMO>_XX``. ``short`` names a
    clip made 0.4 s long; ``corrupt`` names a clip whose video is garbage. Returns clip names.
    """
    root = Path(root)
    clips = []
    i = 0
    for a in actors:
        for s in sentences:
            for e in CREMA_EMOTIONS:
                clip = f"{a}_{s}_{e}_XX"
                secs = 0.4 if clip == short else seconds
                if clip == corrupt:
                    write_corrupt(root / "VideoFlash" / f"{clip}.flv")
                else:
                    write_video(root / "VideoFlash" / f"{clip}.flv", secs, audio=False, seed=i)
                if wav:
                    write_wav(root / "AudioWAV" / f"{clip}.wav", secs, tone_hz=200 + 50 * CREMA_EMOTIONS.index(e))
                clips.append(clip)
                i += 1
    return clips


def make_kinetics_sounds(root: str | Path, classes: tuple[str, ...] = ("playing drums", "singing", "chopping wood"),
                         per_class: dict[str, int] | None = None, seconds: float = 3.0,
                         short: str | None = None) -> list[str]:
    """Kinetics layout: ``<split>/<class>/<clip>.mp4`` with split folders ``train`` and ``val``."""
    root = Path(root)
    per_class = per_class or {"train": 2, "val": 1}
    clips = []
    i = 0
    for split, n in per_class.items():
        for c in classes:
            for k in range(n):
                clip = f"{c.replace(' ', '_')}_{split}{k}"
                secs = 0.6 if clip == short else seconds
                write_video(root / split / c / f"{clip}.mp4", secs, seed=i, tone_hz=300 + 100 * classes.index(c))
                clips.append(clip)
                i += 1
    return clips


def make_ave(root: str | Path, classes: tuple[str, ...] = ("Church bell", "Dog", "Guitar"),
             splits: dict[str, int] | None = None, seconds: float = 4.0) -> list[str]:
    """AVE layout: ``AVE/<id>.mp4``, ``Annotations.txt`` and ``{train,val,test}Set.txt``.

    Annotation lines are ``Category&VideoID&Quality&StartTime&EndTime`` after a header line.
    """
    root = Path(root)
    splits = splits or {"train": 2, "val": 1, "test": 1}
    lines_all = []
    ids = []
    i = 0
    for split, n in splits.items():
        lines = []
        for c in classes:
            for k in range(n):
                vid = f"vid{i:04d}{split[:2]}"
                write_video(root / "AVE" / f"{vid}.mp4", seconds, seed=i, tone_hz=250 + 120 * classes.index(c))
                lines.append(f"{c}&{vid}&good&0&{int(seconds)}")
                ids.append(vid)
                i += 1
        (root / f"{split}Set.txt").write_text("\n".join(lines) + "\n")
        lines_all += lines
    (root / "Annotations.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(lines_all) + "\n")
    return ids


def count_files(folder: str | Path, suffix: str) -> int:
    """Number of files ending in ``suffix`` directly inside ``folder``."""
    return sum(1 for f in os.listdir(folder) if f.endswith(suffix))


def preprocess(dataset: str, source: str | Path, output: str | Path, workers: int = 1,
               classes: str | None = None) -> int:
    """Run ``mmbalance preprocess`` in-process (quiet); returns its exit code."""
    import argparse

    from mmbalance.data.preprocess import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = [dataset, "--source", str(source), "--output", str(output), "--workers", str(workers), "--no-progress"]
    if classes:
        argv += ["--classes", classes]
    return run(parser.parse_args(argv))
