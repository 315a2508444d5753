"""Audio recipes of the field's audio-visual benchmarks, in torch/numpy (no librosa, scipy, torchaudio).

Each recipe takes a mono float waveform (values in [-1, 1]) at the recipe's sample rate and
returns the spectrogram the field's public code feeds to its audio ResNet-18:

==================  ==========  =====================================================  ===========
recipe              rate        steps                                                  output
==================  ==========  =====================================================  ===========
``crema_d``         22,050 Hz   tile to 3 s (66,150 samples), clip to [-1, 1], STFT     257 x 188
                                n_fft 512 hop 353 (Hann, centred, reflect pad),
                                ``log(|X| + 1e-7)`` (OGM-GE ``CramedDataset``)
``ave``             22,050 Hz   tile to 160,000 samples, clip, the equivalent of         257 x 1004
                                ``scipy.signal.spectrogram(nperseg=512, noverlap=353)``
                                (Tukey 0.25 window, constant detrend, one-sided PSD),
                                ``log(S + 1e-7)``, per-clip z-norm (PMR preprocessing)
``kinetics_sounds`` 16,000 Hz   remove the mean, Kaldi fbank (128 mel bins, 25 ms /      1024 x 128
                                10 ms, Hanning, dither 0, pre-emphasis 0.97), pad or
                                cut to 1,024 frames, ``(x + 4.503877) / (2 * 5.141276)``
                                (OGM-GE ``process_audio.py``; time x frequency)
==================  ==========  =====================================================  ===========

Short clips are tiled (CREMA-D, AVE) or zero-padded (Kinetics-Sounds) to the fixed length,
never rejected; an empty waveform gives the spectrogram of silence. CREMA-D deviates from the
field only for clips shorter than 1 s, which the field's ``tile(x, 3)`` would leave short: they
are tiled until 3 s is reached.

Decoding and resampling are done with PyAV (libswresample) in :mod:`mmbalance.data.video`.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

__all__ = [
    "RECIPES", "Recipe", "crema_d_spectrogram", "ave_spectrogram", "kinetics_sounds_fbank",
    "kaldi_fbank", "kaldi_mel_banks", "mel_scale", "log_mel_spectrogram", "tile_to_length",
    "KALDI_EPS",
]

#: Kaldi/torchaudio floor for the log: ``torch.finfo(torch.float32).eps``.
KALDI_EPS = float(torch.finfo(torch.float32).eps)
KS_NORM_MEAN = -4.503877  # AudioSet statistics used by the field (AST)
KS_NORM_STD = 5.141276


def _as_tensor(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave)
    if t.dim() != 1:
        raise ValueError(f"expected a mono 1-d waveform, got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def tile_to_length(wave: np.ndarray | torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a waveform end to end until it has ``length`` samples, then cut (silence if empty)."""
    w = _as_tensor(wave)
    if w.numel() == 0:
        return torch.zeros(length, dtype=torch.float64)
    reps = math.ceil(length / w.numel())
    return w.repeat(reps)[:length]


# ----------------------------------------------------------------------------- CREMA-D

def crema_d_spectrogram(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """CREMA-D log-magnitude STFT (OGM-GE): 22.05 kHz waveform -> ``(257, 188)`` float32.

    ``librosa.stft(x, n_fft=512, hop_length=353)`` on the waveform tiled to 3 s and clipped to
    [-1, 1], then ``log(|X| + 1e-7)``. librosa's STFT is a periodic Hann window of 512, centred
    frames with reflect padding (librosa < 0.10, the version of the field's code), no scaling.
    """
    w = tile_to_length(wave, 22050 * 3).clamp(-1.0, 1.0)
    spec = torch.stft(w, n_fft=512, hop_length=353, win_length=512,
                      window=torch.hann_window(512, periodic=True, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True)
    return torch.log(spec.abs() + 1e-7).to(torch.float32)


# ----------------------------------------------------------------------------- AVE

def _tukey_periodic(n: int, alpha: float = 0.25) -> torch.Tensor:
    """``scipy.signal.get_window(('tukey', alpha), n)`` (periodic: symmetric of n + 1, last dropped)."""
    m = n + 1
    k = np.arange(m, dtype=np.float64)
    width = int(np.floor(alpha * (m - 1) / 2.0))
    w = np.ones(m)
    left = k[: width + 1]
    w[: width + 1] = 0.5 * (1 + np.cos(np.pi * (-1 + 2.0 * left / alpha / (m - 1))))
    right = k[m - width - 1:]
    w[m - width - 1:] = 0.5 * (1 + np.cos(np.pi * (-2.0 / alpha + 1 + 2.0 * right / alpha / (m - 1))))
    return torch.from_numpy(w[:-1].copy())


def psd_spectrogram(wave: torch.Tensor, fs: float, nperseg: int = 512, noverlap: int = 353) -> torch.Tensor:
    """The default ``scipy.signal.spectrogram`` (Tukey 0.25, detrend 'constant', one-sided PSD).

    Frames are taken without padding (``(len - nperseg) // step + 1`` of them); each frame's
    mean is removed, it is windowed, and ``|rfft|^2 / (fs * sum(win^2))`` is doubled for every
    bin except DC and Nyquist. Returns ``(nperseg // 2 + 1, frames)`` float64.
    """
    step = nperseg - noverlap
    frames = wave.unfold(0, nperseg, step)  # (n_frames, nperseg)
    frames = frames - frames.mean(dim=1, keepdim=True)
    win = _tukey_periodic(nperseg).to(wave.dtype)
    spec = torch.fft.rfft(frames * win, n=nperseg).abs() ** 2 / (fs * (win ** 2).sum())
    spec[:, 1:] *= 2.0
    if nperseg % 2 == 0:
        spec[:, -1] /= 2.0
    return spec.T


def ave_spectrogram(wave: np.ndarray | torch.Tensor) -> torch.Tensor:
    """AVE / "10 s clip" spectrogram (PMR): 22.05 kHz waveform -> ``(257, 1004)`` float32.

    Tile to 160,000 samples (the field's constant: 7.26 s at 22.05 kHz), clip to [-1, 1],
    PSD spectrogram (nperseg 512, noverlap 353), ``log(S + 1e-7)``, then z-normalise with the
    clip's own mean and standard deviation (``+ 1e-9``).
    """
    w = tile_to_length(wave, 160000).clamp(-1.0, 1.0)
    spec = torch.log(psd_spectrogram(w, 22050.0, 512, 353) + 1e-7)
    spec = (spec - spec.mean()) / (spec.std(unbiased=False) + 1e-9)
    return spec.to(torch.float32)


# ----------------------------------------------------------------------------- Kaldi fbank

def mel_scale(freq: float | np.ndarray | torch.Tensor):
    """Kaldi/HTK mel scale: ``1127 * ln(1 + f / 700)``."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


def kaldi_mel_banks(num_bins: int, padded_window_size: int, sample_frequency: float,
                    low_freq: float = 20.0, high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel filters (``MelBanks``), ``(num_bins, padded_window_size // 2 + 1)``.

    Triangles are equally spaced on the mel scale between ``low_freq`` and ``high_freq``
    (``<= 0`` means Nyquist + high_freq); FFT bin ``i`` sits at ``i * fs / padded_window_size``.
    The Nyquist column is zero, as in Kaldi/torchaudio. A triangle that holds no FFT bin is
    an all-zero row (its log energy is then the floor), where Kaldi itself would error.
    """
    num_fft_bins = padded_window_size // 2
    nyquist = 0.5 * sample_frequency
    if high_freq <= 0.0:
        high_freq += nyquist
    if not (0.0 <= low_freq < nyquist and 0.0 < high_freq <= nyquist and low_freq < high_freq):
        raise ValueError(f"bad mel band edges low_freq={low_freq} high_freq={high_freq} for fs={sample_frequency}")
    fft_bin_width = sample_frequency / padded_window_size
    mel_low, mel_high = float(mel_scale(low_freq)), float(mel_scale(high_freq))
    delta = (mel_high - mel_low) / (num_bins + 1)
    b = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left = mel_low + b * delta
    center = mel_low + (b + 1.0) * delta
    right = mel_low + (b + 2.0) * delta
    mel = mel_scale(fft_bin_width * torch.arange(num_fft_bins, dtype=torch.float64)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)
    return torch.nn.functional.pad(banks, (0, 1))


def kaldi_fbank(wave: np.ndarray | torch.Tensor, sample_frequency: float = 16000.0, num_mel_bins: int = 128,
                frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
                preemphasis_coefficient: float = 0.97, low_freq: float = 20.0, high_freq: float = 0.0,
                remove_dc_offset: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kaldi log mel filterbank, as ``torchaudio.compliance.kaldi.fbank`` computes it.

    Fixed to the settings the field uses: ``dither=0``, ``window_type='hanning'`` (Kaldi's
    symmetric Hann, ``0.5 - 0.5 cos(2 pi n / (N - 1))``), ``snip_edges=True``,
    ``round_to_power_of_two=True``, power spectrum, ``use_energy=False`` (so ``htk_compat``
    changes nothing), log with floor ``KALDI_EPS``. Steps per frame: remove the frame mean
    (DC), pre-emphasis ``w[i] -= c * w[i-1]`` with ``w[0] -= c * w[0]``, window, zero-pad to the
    next power of two, ``|rfft|^2``, mel banks, ``log(max(e, eps))``.

    Returns ``(num_frames, num_mel_bins)``; ``num_frames = 1 + (len - win) // shift`` (0 when the
    clip is shorter than one window).
    """
    w = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave).to(dtype)
    if w.dim() != 1:
        raise ValueError(f"expected a mono 1-d waveform, got shape {tuple(w.shape)}")
    win_len = int(sample_frequency * frame_length_ms * 0.001)
    shift = int(sample_frequency * frame_shift_ms * 0.001)
    padded = 1 << (win_len - 1).bit_length()
    if w.numel() < win_len:
        return torch.empty(0, num_mel_bins, dtype=dtype)
    frames = w.unfold(0, win_len, shift)  # (n, win_len), snip_edges=True
    if remove_dc_offset:
        frames = frames - frames.mean(dim=1, keepdim=True)
    if preemphasis_coefficient != 0.0:
        prev = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
        frames = frames - preemphasis_coefficient * prev
    window = torch.hann_window(win_len, periodic=False, dtype=dtype)
    frames = torch.nn.functional.pad(frames * window, (0, padded - win_len))
    power = torch.fft.rfft(frames).abs().pow(2.0)
    banks = kaldi_mel_banks(num_mel_bins, padded, sample_frequency, low_freq, high_freq).to(dtype)
    energies = power @ banks.T
    return torch.clamp(energies, min=KALDI_EPS).log()


def kinetics_sounds_fbank(wave: np.ndarray | torch.Tensor, target_frames: int = 1024) -> torch.Tensor:
    """Kinetics-Sounds fbank (OGM-GE ``process_audio.py``): 16 kHz waveform -> ``(1024, 128)`` float32.

    Subtract the clip mean, :func:`kaldi_fbank` (128 bins, 10 ms shift), zero-pad or cut to
    ``target_frames`` frames (padding in the log domain, as the field does), then
    ``(x + 4.503877) / (2 * 5.141276)``.
    """
    w = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave).to(torch.float32)
    if w.numel():
        w = w - w.mean()
    fb = kaldi_fbank(w, 16000.0, 128)
    n = fb.shape[0]
    if n < target_frames:
        fb = torch.nn.functional.pad(fb, (0, 0, 0, target_frames - n))
    else:
        fb = fb[:target_frames]
    return ((fb - KS_NORM_MEAN) / (2.0 * KS_NORM_STD)).to(torch.float32)


# ----------------------------------------------------------------------------- generic log-mel

def log_mel_spectrogram(wave: np.ndarray | torch.Tensor, sample_rate: int, n_fft: int = 512, hop: int = 256,
                        n_mels: int = 64, low_freq: float = 20.0, high_freq: float = 0.0,
                        eps: float = 1e-6) -> torch.Tensor:
    """Log mel power spectrogram ``(n_mels, frames)`` float64 with Kaldi-style mel banks.

    Periodic Hann window of ``n_fft``, centred frames (reflect padding), so
    ``frames = 1 + len // hop``; ``log(mel_power + eps)``. Used by ``av_digits``.
    """
    w = _as_tensor(wave)
    spec = torch.stft(w, n_fft=n_fft, hop_length=hop, window=torch.hann_window(n_fft, periodic=True, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True).abs() ** 2
    banks = kaldi_mel_banks(n_mels, n_fft, float(sample_rate), low_freq, high_freq)
    return torch.log(banks @ spec + eps)


# ----------------------------------------------------------------------------- registry of recipes

class Recipe:
    """A dataset's audio recipe: the sample rate to decode at and the waveform -> spectrogram map."""

    def __init__(self, name: str, sample_rate: int, fn: Callable[[torch.Tensor], torch.Tensor],
                 shape: tuple[int, int]):
        self.name, self.sample_rate, self.fn, self.shape = name, sample_rate, fn, shape

    def __call__(self, wave: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.fn(wave)

    def __repr__(self) -> str:
        return f"Recipe({self.name!r}, sample_rate={self.sample_rate}, shape={self.shape})"


RECIPES: dict[str, Recipe] = {
    "crema_d": Recipe("crema_d", 22050, crema_d_spectrogram, (257, 188)),
    "ave": Recipe("ave", 22050, ave_spectrogram, (257, 1004)),
    "kinetics_sounds": Recipe("kinetics_sounds", 16000, kinetics_sounds_fbank, (1024, 128)),
}
