"""Audio recipes: output shapes, padding, and the Kaldi fbank against hand computations."""
import math

import numpy as np
import pytest
import torch

from mmbalance.data.audio import (KALDI_EPS, RECIPES, ave_spectrogram, crema_d_spectrogram, kaldi_fbank,
                                  kaldi_mel_banks, kinetics_sounds_fbank, mel_scale, psd_spectrogram)


def sine(freq, seconds, sr, amp=0.5):
    t = np.arange(int(seconds * sr)) / sr
    return amp * np.sin(2 * np.pi * freq * t)


@pytest.mark.parametrize("seconds", [0.0, 0.3, 2.0, 12.0])
def test_recipe_shapes_any_length(seconds):
    """Every clip length (empty, short, long) gives the recipe's fixed shape: padded, never rejected."""
    expected = {"crema_d": (257, 188), "ave": (257, 1004), "kinetics_sounds": (1024, 128)}
    for name, recipe in RECIPES.items():
        out = recipe(sine(440, seconds, recipe.sample_rate))
        assert tuple(out.shape) == expected[name] == recipe.shape
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert RECIPES["crema_d"].sample_rate == RECIPES["ave"].sample_rate == 22050
    assert RECIPES["kinetics_sounds"].sample_rate == 16000


def test_crema_d_matches_hand_stft():
    """log(|STFT|+1e-7) with a periodic Hann window, centred reflect-padded frames, hop 353."""
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, 22050 * 3)
    out = crema_d_spectrogram(x).double().numpy()
    padded = np.pad(x, 256, mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)
    for k in (0, 1, 100, 187):
        frame = padded[k * 353: k * 353 + 512] * win
        ref = np.log(np.abs(np.fft.rfft(frame)) + 1e-7)
        np.testing.assert_allclose(out[:, k], ref, rtol=1e-4, atol=1e-4)


def test_crema_d_tiles_and_clips():
    """A 1.5 s clip is tiled (not zero-padded) to 3 s; values beyond [-1, 1] are clipped."""
    x = sine(300, 1.5, 22050, amp=0.4)
    tiled = np.concatenate([x, x])[: 3 * 22050]
    torch.testing.assert_close(crema_d_spectrogram(x), crema_d_spectrogram(tiled))
    torch.testing.assert_close(crema_d_spectrogram(3 * tiled), crema_d_spectrogram(np.clip(3 * tiled, -1, 1)))


def test_ave_psd_hand_frame_and_znorm():
    """scipy.signal.spectrogram defaults (Tukey .25, detrend, density, one-sided) by hand for one frame."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(160000) * 0.1
    psd = psd_spectrogram(torch.from_numpy(x), 22050.0, 512, 353).numpy()
    assert psd.shape == (257, 1004)
    m = 513  # periodic Tukey: symmetric window of 513 points, last dropped
    n = np.arange(m)
    width = int(np.floor(0.25 * (m - 1) / 2))
    w = np.ones(m)
    w[: width + 1] = 0.5 * (1 + np.cos(np.pi * (-1 + 2 * n[: width + 1] / 0.25 / (m - 1))))
    w[m - width - 1:] = 0.5 * (1 + np.cos(np.pi * (-2 / 0.25 + 1 + 2 * n[m - width - 1:] / 0.25 / (m - 1))))
    w = w[:-1]
    k = 500
    seg = x[k * 159: k * 159 + 512]
    spec = np.abs(np.fft.rfft((seg - seg.mean()) * w)) ** 2 / (22050 * np.sum(w ** 2))
    spec[1:-1] *= 2
    np.testing.assert_allclose(psd[:, k], spec, rtol=1e-10)
    z = ave_spectrogram(x[:50000])
    assert abs(z.mean().item()) < 1e-4 and abs(z.std(unbiased=False).item() - 1) < 1e-3


def test_ave_psd_matches_scipy_when_installed():
    signal = pytest.importorskip("scipy.signal")
    x = np.random.default_rng(2).standard_normal(160000) * 0.2
    _, _, ref = signal.spectrogram(x, 22050, nperseg=512, noverlap=353)
    np.testing.assert_allclose(psd_spectrogram(torch.from_numpy(x), 22050.0).numpy(), ref, rtol=1e-8, atol=1e-14)


def test_kaldi_mel_bank_hand_values():
    """One triangle over [20 Hz, 8 kHz]: weights are min(up, down) on the 1127 ln(1 + f/700) scale."""
    banks = kaldi_mel_banks(1, 512, 16000.0, 20.0, 0.0)
    assert banks.shape == (1, 257) and banks[0, 256] == 0  # Nyquist column is zero
    lo, hi = 1127 * math.log(1 + 20 / 700), 1127 * math.log(1 + 8000 / 700)
    c = (lo + hi) / 2
    for i in (0, 1, 40, 100, 255):
        mel = 1127 * math.log(1 + i * 31.25 / 700)
        want = max(0.0, min((mel - lo) / (c - lo), (hi - mel) / (hi - c)))
        assert banks[0, i].item() == pytest.approx(want, abs=1e-12)
    # 128 bins at 16 kHz with 512-point FFT: the lowest triangles hold no FFT bin (Kaldi errors here)
    b128 = kaldi_mel_banks(128, 512, 16000.0)
    assert (b128.sum(1) == 0).any() and (b128.sum(1) > 0).sum() > 100


def test_kaldi_fbank_single_frame_by_hand():
    """DC removal, pre-emphasis (w[0] -= .97 w[0]), Kaldi Hanning, zero pad to 512, power, banks, log."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, 400)
    out = kaldi_fbank(torch.from_numpy(x), 16000.0, 23, dtype=torch.float64).numpy()
    assert out.shape == (1, 23)
    f = x - x.mean()
    g = f.copy()
    for i in range(399, 0, -1):
        g[i] = f[i] - 0.97 * f[i - 1]
    g[0] = f[0] - 0.97 * f[0]
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)
    power = np.abs(np.fft.rfft(np.concatenate([g * win, np.zeros(112)]))) ** 2
    banks = kaldi_mel_banks(23, 512, 16000.0).numpy()
    ref = np.log(np.maximum(banks @ power, KALDI_EPS))
    np.testing.assert_allclose(out[0], ref, rtol=1e-10)


def test_kaldi_fbank_sine_lands_in_its_mel_bin():
    """A 1 kHz tone peaks in the bin whose centre frequency is nearest 1 kHz."""
    fb = kaldi_fbank(sine(1000.0, 1.0, 16000), 16000.0, 128)
    assert fb.shape == (1 + (16000 - 400) // 160, 128)
    lo, hi = mel_scale(20.0), mel_scale(8000.0)
    centres = lo + (np.arange(128) + 1) * (hi - lo) / 129
    expected = int(np.argmin(np.abs(centres - mel_scale(1000.0))))
    assert int(fb.mean(0).argmax()) == expected


def test_kaldi_fbank_silence_and_ks_padding():
    assert kaldi_fbank(np.zeros(399)).shape == (0, 128)  # shorter than one window: no frames
    silent = kaldi_fbank(np.zeros(16000))
    assert torch.all(silent == math.log(KALDI_EPS))
    ks = kinetics_sounds_fbank(sine(500.0, 2.0, 16000))
    n = 1 + (32000 - 400) // 160
    pad_value = (0 + 4.503877) / (2 * 5.141276)  # zero padding in the log domain, then normalised
    assert torch.allclose(ks[n:], torch.full_like(ks[n:], pad_value))
    assert not torch.allclose(ks[:n], torch.full_like(ks[:n], pad_value))
    raw = kaldi_fbank(torch.from_numpy(sine(500.0, 2.0, 16000)).float())
    torch.testing.assert_close(ks[:n], (raw + 4.503877) / (2 * 5.141276))
    long = kinetics_sounds_fbank(sine(500.0, 11.0, 16000))
    assert long.shape == (1024, 128)  # truncated


def test_kaldi_fbank_matches_torchaudio_when_installed():
    kaldi = pytest.importorskip("torchaudio.compliance.kaldi")
    x = torch.from_numpy(np.random.default_rng(4).uniform(-0.5, 0.5, 16000 * 2)).float()
    x = x - x.mean()
    ref = kaldi.fbank(x[None], htk_compat=True, sample_frequency=16000, use_energy=False, window_type="hanning",
                      num_mel_bins=128, dither=0.0, frame_shift=10)
    torch.testing.assert_close(kaldi_fbank(x), ref, rtol=1e-4, atol=1e-3)
