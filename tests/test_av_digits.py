"""av_digits: generated, cached, byte-identical for a seed, stratified fixed split, batch contract."""
import hashlib
import os

import numpy as np
import pytest
import torch

from mmbalance.data import build_dataset
from mmbalance.data.av_digits import build_av_digits
from mmbalance.registry import ConfigError

FILES = ("audio.npy", "visual.npy", "labels.npy", "split.npy", "voice.npy", "meta.json")
TINY = dict(size=40, progress=False)


def digest(folder):
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in FILES}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    a = build_av_digits(tmp_path_factory.mktemp("a"), **TINY)
    b = build_av_digits(tmp_path_factory.mktemp("b"), workers=2, **TINY)
    c = build_av_digits(tmp_path_factory.mktemp("c"), data_seed=1, **TINY)
    return a, b, c


def test_byte_identical_for_a_seed_and_different_for_another(built):
    a, b, c = built
    assert a.name == b.name != c.name  # folder named by the parameters' hash
    assert digest(a) == digest(b)
    da, dc = digest(a), digest(c)
    assert da["audio.npy"] != dc["audio.npy"] and da["visual.npy"] != dc["visual.npy"]


def test_contents(built):
    a = built[0]
    audio, visual = np.load(a / "audio.npy"), np.load(a / "visual.npy")
    labels, split = np.load(a / "labels.npy"), np.load(a / "split.npy")
    assert audio.shape == (40, 64, 64) and audio.dtype == np.float16 and np.isfinite(audio).all()
    assert visual.shape == (40, 32, 32) and visual.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [4] * 10
    # 60/20/20 stratified: every class in every split
    for code, per_class in ((0, 2), (1, 1), (2, 1)):
        assert np.bincount(labels[split == code], minlength=10).tolist() == [per_class] * 10
    # speech is present: spectrogram energy varies over time (not just stationary noise)
    assert float(np.std(audio.astype(np.float32).mean(axis=1), axis=1).mean()) > 0.05


def test_dataset_splits_and_contract(tmp_path):
    d = build_dataset("av_digits", root=str(tmp_path), **TINY)
    assert d.modalities == ["audio", "visual"] and d.num_classes == 10
    assert (len(d.train), len(d.val), len(d.test)) == (20, 10, 10)
    assert d.input_shapes == {"audio": (1, 64, 64), "visual": (3, 1, 32, 32)}
    assert d.default_encoders == {"audio": "resnet18_audio", "visual": "resnet18_visual"}
    assert d.encoder_options["audio"]["width"] == 16
    s = d.train[3]
    assert s["inputs"]["audio"].shape == (1, 64, 64) and s["inputs"]["visual"].shape == (3, 1, 32, 32)
    assert s["inputs"]["audio"].dtype == torch.float32 and int(s["index"]) == 3
    assert torch.equal(s["inputs"]["visual"][0], s["inputs"]["visual"][2])  # grey digit on 3 channels
    assert d.class_names[0] == "zero"
    v = build_dataset("av_digits", root=str(tmp_path), modalities=["visual"], **TINY)
    assert list(v.train[0]["inputs"]) == ["visual"] and v.input_shapes == {"visual": (3, 1, 32, 32)}


def test_cache_reused_and_env_var(tmp_path, monkeypatch):
    first = build_av_digits(tmp_path, **TINY)
    t = os.stat(first / "audio.npy").st_mtime_ns
    assert build_av_digits(tmp_path, **TINY) == first and os.stat(first / "audio.npy").st_mtime_ns == t
    monkeypatch.setenv("MMBALANCE_CACHE", str(tmp_path / "env"))
    assert build_av_digits(None, **TINY).parent == tmp_path / "env" / "av_digits"


def test_noise_option_changes_audio_only(tmp_path):
    a = build_av_digits(tmp_path, **TINY)
    b = build_av_digits(tmp_path, noise=0.0, **TINY)
    assert a != b
    assert np.array_equal(np.load(a / "visual.npy"), np.load(b / "visual.npy"))
    assert not np.array_equal(np.load(a / "audio.npy"), np.load(b / "audio.npy"))


def test_bad_options(tmp_path):
    with pytest.raises(ConfigError, match="modalities"):
        build_dataset("av_digits", root=str(tmp_path), modalities=["text"], **TINY)
    with pytest.raises(ConfigError, match="names a modality twice"):
        build_dataset("av_digits", root=str(tmp_path), modalities=["audio", "audio"], **TINY)
    with pytest.raises(ConfigError, match="image_size"):
        build_dataset("av_digits", root=str(tmp_path), image_size=40, **TINY)
    with pytest.raises(ConfigError, match="size"):
        build_dataset("av_digits", root=str(tmp_path), size=5, progress=False)
    for bad, msg in ((dict(modalities=["text"]), "'modalities' takes a list of one of 'audio', 'visual' or null, "
                                                 "got ['text']"),
                     (dict(size=5), "'size' takes an integer >= 20, got 5"),
                     (dict(image_size=40), "'image_size' takes an integer in [2, 28], got 40"),
                     (dict(noise=-1.0), "'noise' takes a number >= 0, got -1.0"),
                     (dict(image_noise=-0.5), "'image_noise' takes a number >= 0, got -0.5"),
                     (dict(data_seed=-1), "'data_seed' takes an integer >= 0, got -1"),
                     (dict(workers=0), "'workers' takes an integer >= 1 or null, got 0")):
        with pytest.raises(ConfigError) as e:
            build_dataset("av_digits", root=str(tmp_path), **{**TINY, **bad})
        assert str(e.value) == f"dataset 'av_digits' option {msg}"
    # building ahead of time (mmbalance build-data) checks the same declared ranges, before any work
    with pytest.raises(ConfigError, match=r"^dataset 'av_digits' option 'size' takes an integer >= 20, got 5$"):
        build_av_digits(tmp_path, size=5)
    with pytest.raises(ConfigError, match="'image_size' takes an integer in"):
        build_av_digits(tmp_path, image_size=1)
    assert not any(tmp_path.iterdir())
