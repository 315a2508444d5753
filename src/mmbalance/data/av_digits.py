"""``av_digits``: real handwritten digits paired by label with synthetic spoken digits.

Real images, synthetic speech. A small audio-visual dataset that runs the same code path as
the field's audio-visual benchmarks (waveform -> spectrogram -> ResNet-18; frames -> ResNet-18)
on a CPU budget, in the spirit of AV-MNIST:

* **visual**: a real MNIST digit (8,000 shipped in ``_embedded/mnist_subset.npz``, CC BY-SA 3.0,
  see ``ATTRIBUTION-mnist.md``), reduced to ``image_size`` pixels (area averaging, so detail is
  lost) and enlarged back to 32 x 32 (bilinear), plus Gaussian pixel noise ``image_noise``.
  Input per sample ``(3, 1, 32, 32)``: three identical channels, one frame.
* **audio**: the digit's English word synthesised offline with eSpeak NG (``espeakng-loader``),
  with a random accent (8 English variants), voice (24 eSpeak voice variants), speed
  (120-260 words/min), pitch and pitch range; trimmed of silence, placed at a random offset in
  a 1 s clip at 22.05 kHz (longer words are cut), plus white noise of RMS ``noise`` times the
  speech RMS; log-mel spectrogram (64 Kaldi mel bins, n_fft 512, hop 345), standardised per
  clip. Input per sample ``(1, 64, 64)`` (mel x time).

Pairing is by label only, so the two modalities carry independent evidence about the class.
The defaults (``noise=1.0``, i.e. 0 dB SNR, ``image_size=7``, ``image_noise=0.5``) make audio the stronger
but imperfect modality and visual clearly weaker; see ``docs/datasets.md`` for measured
accuracies. Everything is drawn from ``data_seed``: the dataset is byte-identical for a given
seed and options, and the train/val/test split (60/20/20, stratified) is fixed.

The dataset is generated on first use into ``<cache>/<params-hash>/`` with a progress bar,
where ``<cache>`` is ``root`` if given, else ``$MMBALANCE_CACHE/av_digits``, else
``~/.cache/mmbalance/av_digits``; :func:`build_av_digits` builds it ahead of time. The default
encoders are ResNet-18s of base width 16 (``encoder_options``), so CPU training is feasible;
pass ``--encoder_options``-style overrides for the real width 64.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..options import Annotated, Interval, Literal, validate_options
from ..registry import ConfigError
from . import register_dataset
from .audio import log_mel_spectrogram
from .base import DataSplits, stratified_split

__all__ = ["build_av_digits", "av_digits", "AVDigitsDataset", "cache_dir"]

FORMAT_VERSION = 1
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# English accents shipped with eSpeak NG (en-Shaw, a spelling reform, is left out).
ACCENTS = ["en", "en-us", "en-us-nyc", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
           "en-gb-x-gbcwmd", "en-029"]
# Voice variants without a "breath" setting: those (f2, f3, f5, whisper, ...) are not
# reproducible across processes in eSpeak NG 1.52.
VARIANTS = ["m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f4", "klatt", "klatt2", "klatt3",
            "klatt4", "croak", "Alex", "Andy", "Annie", "benjamin", "david", "edward", "linda",
            "max", "steph", "grandma"]
SAMPLE_RATE = 22050
CLIP_SAMPLES = 22050  # 1 s
N_FFT, HOP, N_MELS = 512, 345, 64  # 1 + 22050 // 345 = 64 frames
DISPLAY = 32
CHUNK = 500  # clips per eSpeak process; fixed, so the output does not depend on the worker count
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_EMBEDDED = Path(__file__).parent / "_embedded" / "mnist_subset.npz"
_WORKER = Path(__file__).parent / "_espeak_worker.py"


def _params(size: int, noise: float, image_size: int, image_noise: float, data_seed: int) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "size": int(size), "noise": float(noise), "image_size": int(image_size),
            "image_noise": float(image_noise), "data_seed": int(data_seed)}


def cache_dir(params: dict[str, Any], root: str | os.PathLike | None = None) -> Path:
    """Folder where the dataset with these generation parameters lives."""
    if root is None:
        base = os.environ.get("MMBALANCE_CACHE")
        root = Path(base) / "av_digits" if base else Path.home() / ".cache" / "mmbalance" / "av_digits"
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(root).expanduser() / digest


def _check(**options: Any) -> dict[str, Any]:
    """Generation parameters checked (and coerced) against the types and ranges :func:`av_digits`
    declares, so ``build_av_digits`` (``mmbalance build-data``, direct calls) validates them in
    the same one place as the dataset options."""
    return validate_options("dataset", "av_digits", av_digits, options)


def _synthesise(items: list[list[Any]], workers: int, progress, tmpdir: Path) -> list[np.ndarray]:
    """Run eSpeak over ``items`` in chunks of ``CHUNK``, each chunk in a fresh process."""
    chunks = [items[i:i + CHUNK] for i in range(0, len(items), CHUNK)]
    waves: list[np.ndarray] = []
    running: list[tuple[int, subprocess.Popen, Path]] = []
    next_chunk = 0
    while next_chunk < len(chunks) or running:
        while next_chunk < len(chunks) and len(running) < workers:
            out_path = tmpdir / f"speech-{next_chunk}.bin"
            with open(out_path, "wb") as fout:
                proc = subprocess.Popen([sys.executable, "-I", str(_WORKER)], stdin=subprocess.PIPE, stdout=fout)
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(chunks[next_chunk]).encode())
                proc.stdin.close()
            running.append((next_chunk, proc, out_path))
            next_chunk += 1
        k, proc, out_path = running.pop(0)  # chunks are collected in order
        if proc.wait() != 0:
            raise RuntimeError(f"eSpeak worker failed (exit {proc.returncode})")
        out = out_path.read_bytes()
        out_path.unlink()
        rate = struct.unpack_from("<i", out, 0)[0]
        if rate != SAMPLE_RATE:
            raise RuntimeError(f"eSpeak runs at {rate} Hz, expected {SAMPLE_RATE}")
        pos = 4
        for _ in chunks[k]:
            n = struct.unpack_from("<i", out, pos)[0]
            pos += 4
            waves.append(np.frombuffer(out, dtype="<i2", count=n, offset=pos).copy())
            pos += 2 * n
        progress.update(len(chunks[k]))
    return waves


def _place(wave: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Trim silence, place at a random offset in a 1 s clip (cutting what does not fit); returns (clip, speech)."""
    x = wave.astype(np.float64) / 32768.0
    loud = np.flatnonzero(np.abs(x) > 0.02 * max(np.abs(x).max(), 1e-9))
    x = x[loud[0]:loud[-1] + 1] if len(loud) else x
    x = x[:CLIP_SAMPLES]
    clip = np.zeros(CLIP_SAMPLES)
    start = int(rng.integers(0, CLIP_SAMPLES - len(x) + 1))
    clip[start:start + len(x)] = x
    return clip, x


def build_av_digits(root: str | os.PathLike | None = None, size: int = 3000, noise: float = 1.0,
                    image_size: int = 7, image_noise: float = 0.5, data_seed: int = 0,
                    workers: int | None = None, progress: bool = True, force: bool = False) -> Path:
    """Generate the ``av_digits`` dataset (if not already built) and return its folder.

    Writes ``audio.npy`` (N, 64, 64) float16 log-mel, ``visual.npy`` (N, 32, 32) uint8,
    ``labels.npy`` (N,) int64, ``split.npy`` (N,) int8 (0 train, 1 val, 2 test), ``voice.npy``
    (N, 5) int16 (accent, variant, rate, pitch, range) and ``meta.json``; atomically (a temp
    folder renamed at the end). Byte-identical for the same parameters. ``workers`` eSpeak
    processes run at once (default: up to 2).
    """
    checked = _check(size=size, noise=noise, image_size=image_size, image_noise=image_noise, data_seed=data_seed,
                     workers=workers)
    size, noise, image_size, image_noise, data_seed, workers = (
        checked[k] for k in ("size", "noise", "image_size", "image_noise", "data_seed", "workers"))
    params = _params(size, noise, image_size, image_noise, data_seed)
    out = cache_dir(params, root)
    if (out / "meta.json").is_file() and not force:
        return out
    import importlib.util

    from tqdm.auto import tqdm

    if importlib.util.find_spec("espeakng_loader") is None:
        raise ConfigError("av_digits needs the espeakng-loader package to synthesise speech: pip install espeakng-loader")
    t0 = time.time()
    workers = max(1, int(workers or min(2, os.cpu_count() or 1)))
    rng = np.random.default_rng([data_seed, 0])
    per_class = size // 10
    labels = rng.permutation(np.repeat(np.arange(10), per_class))
    labels = np.concatenate([labels, rng.integers(0, 10, size - len(labels))]).astype(np.int64)
    n = len(labels)
    split = np.zeros(n, dtype=np.int8)
    for code, idx in enumerate(stratified_split(labels, [0.6, 0.2, 0.2], seed=0)):
        split[idx] = code

    # per-sample draws, each from its own seeded stream (independent of chunking)
    voice = np.zeros((n, 5), dtype=np.int16)
    items = []
    for i in range(n):
        r = np.random.default_rng([data_seed, 1, i])
        a, v = int(r.integers(len(ACCENTS))), int(r.integers(len(VARIANTS)))
        rate, pitch, prange = int(r.integers(120, 261)), int(r.integers(15, 86)), int(r.integers(10, 91))
        voice[i] = (a, v, rate, pitch, prange)
        items.append([WORDS[labels[i]], f"{ACCENTS[a]}+{VARIANTS[v]}", rate, pitch, prange])

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tqdm(total=2 * n, desc="av_digits: speech", disable=None if progress else True, unit="clip") as bar:
        waves = _synthesise(items, workers, bar, tmp)
        bar.set_description("av_digits: spectrograms")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny per-clip ops: threading only adds contention
        try:
            audio = np.zeros((n, N_MELS, 1 + CLIP_SAMPLES // HOP), dtype=np.float16)
            for i, w in enumerate(waves):
                r = np.random.default_rng([data_seed, 2, i])
                clip, speech = _place(w, r)
                rms = float(np.sqrt(np.mean(speech ** 2))) if len(speech) else 0.0
                clip = clip + r.standard_normal(CLIP_SAMPLES) * noise * max(rms, 1e-4)
                spec = log_mel_spectrogram(clip, SAMPLE_RATE, N_FFT, HOP, N_MELS, eps=1e-8).numpy()
                audio[i] = ((spec - spec.mean()) / (spec.std() + 1e-6)).astype(np.float16)
                bar.update(1)
        finally:
            torch.set_num_threads(threads)

    with np.load(_EMBEDDED) as z:
        mnist, mnist_labels = z["images"], z["labels"].astype(np.int64)
    visual = np.zeros((n, DISPLAY, DISPLAY), dtype=np.uint8)
    pools = {c: np.random.default_rng([data_seed, 3, c]).permutation(np.flatnonzero(mnist_labels == c))
             for c in range(10)}
    used = {c: 0 for c in range(10)}
    picks = np.zeros(n, dtype=np.int64)
    for i, c in enumerate(labels):
        pool = pools[int(c)]
        picks[i] = pool[used[int(c)] % len(pool)]
        used[int(c)] += 1
    imgs = torch.from_numpy(mnist[picks].astype(np.float64) / 255.0).unsqueeze(1)
    small = torch.nn.functional.adaptive_avg_pool2d(imgs, image_size)
    big = torch.nn.functional.interpolate(small, size=(DISPLAY, DISPLAY), mode="bilinear", align_corners=False)
    noise_rng = np.random.default_rng([data_seed, 4])
    big = big.squeeze(1).numpy() + noise_rng.standard_normal((n, DISPLAY, DISPLAY)) * image_noise
    visual[:] = np.clip(np.round(big * 255.0), 0, 255).astype(np.uint8)

    np.save(tmp / "audio.npy", audio)
    np.save(tmp / "visual.npy", visual)
    np.save(tmp / "labels.npy", labels)
    np.save(tmp / "split.npy", split)
    np.save(tmp / "voice.npy", voice)
    meta = {"params": params, "n": n, "modalities": ["audio", "visual"], "classes": WORDS,
            "accents": ACCENTS, "variants": VARIANTS, "audio": {"sample_rate": SAMPLE_RATE, "n_fft": N_FFT,
                                                                 "hop": HOP, "n_mels": N_MELS}}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    if progress:
        print(f"av_digits: built {n} samples in {time.time() - t0:.1f}s at {out}", file=sys.stderr)
    return out


class AVDigitsDataset(Dataset):
    """One split of ``av_digits``; samples follow the batch contract.

    ``audio``: ``(1, 64, 64)`` standardised log-mel; ``visual``: ``(3, 1, 32, 32)`` normalised with
    MNIST's mean and std (three identical channels, one frame).
    """

    def __init__(self, audio: np.ndarray, visual: np.ndarray, labels: np.ndarray, modalities: Sequence[str]):
        self.audio = torch.from_numpy(audio.astype(np.float32)).unsqueeze(1)
        v = (torch.from_numpy(visual.astype(np.float32)) / 255.0 - MNIST_MEAN) / MNIST_STD
        self.visual = v.unsqueeze(1).unsqueeze(1).expand(-1, 3, 1, -1, -1)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.modalities = list(modalities)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        inputs = {m: (self.audio[i] if m == "audio" else self.visual[i].contiguous()) for m in self.modalities}
        return {"inputs": inputs, "label": self.labels[i], "index": torch.tensor(i, dtype=torch.long),
                "present": {m: torch.tensor(True) for m in self.modalities}}


@register_dataset("av_digits", summary="generated audio-visual digits: real MNIST images + synthetic eSpeak speech (10 classes)")
def av_digits(root: str | None = None, modalities: list[Literal["audio", "visual"]] | None = None,
              size: Annotated[int, Interval(20, None)] = 3000, noise: Annotated[float, Interval(0, None)] = 1.0,
              image_size: Annotated[int, Interval(2, 28)] = 7, image_noise: Annotated[float, Interval(0, None)] = 0.5,
              data_seed: Annotated[int, Interval(0, None)] = 0, workers: Annotated[int, Interval(1, None)] | None = None,
              progress: bool = True) -> DataSplits:
    """Load (building on first use) the audio-visual digits dataset; see the module docstring.

    Options:
        root: cache folder (default None = ``$MMBALANCE_CACHE/av_digits`` or ``~/.cache/mmbalance/av_digits``).
        modalities: which of ``audio``, ``visual`` to load (default both).
        size: number of samples, at least 20 (2 per class and split; default 3000).
        noise: white-noise RMS relative to the speech RMS (default 1.0, i.e. 0 dB SNR).
        image_size: side in pixels the digit image is reduced to before enlarging to 32 (2-28; default 7).
        image_noise: standard deviation of the Gaussian pixel noise (default 0.5).
        data_seed: seed of everything the generation draws (default 0).
        workers: eSpeak processes run at once when building (default None = up to 2).
        progress: show a progress bar while building (default True).
    """
    mods = list(modalities) if modalities else ["audio", "visual"]
    if len(set(mods)) != len(mods):  # repeated names: not expressible as a type
        raise ConfigError(f"av_digits option 'modalities' names a modality twice: {modalities!r}")
    folder = build_av_digits(root, size, noise, image_size, image_noise, data_seed, workers, progress)
    try:
        audio = np.load(folder / "audio.npy")
        visual = np.load(folder / "visual.npy")
        labels = np.load(folder / "labels.npy")
        split = np.load(folder / "split.npy")
    except (OSError, ValueError) as e:
        raise ConfigError(f"av_digits cache {folder} is damaged ({e}); delete the folder to rebuild it") from None
    parts = [AVDigitsDataset(audio[split == k], visual[split == k], labels[split == k], mods) for k in range(3)]
    shapes = {"audio": (1, N_MELS, 1 + CLIP_SAMPLES // HOP), "visual": (3, 1, DISPLAY, DISPLAY)}
    return DataSplits(
        train=parts[0], val=parts[1], test=parts[2], modalities=mods, num_classes=10,
        input_shapes={m: shapes[m] for m in mods},
        default_encoders={m: f"resnet18_{m}" for m in mods},
        encoder_options={m: {"width": 16} for m in mods},
        class_names=list(WORDS),
        info={"root": str(folder), "source": "real MNIST images, synthetic eSpeak NG speech",
              "noise": noise, "image_size": image_size, "image_noise": image_noise, "data_seed": data_seed},
    )
