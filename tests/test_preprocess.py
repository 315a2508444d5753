"""``mmbalance preprocess`` on tiny raw fixtures written with PyAV (see tests/av_fixtures.py)."""
import json
import os

import numpy as np
import pytest

from av_fixtures import count_files, make_ave, make_crema_d, make_kinetics_sounds, preprocess
from mmbalance.registry import ConfigError

SHORT, CORRUPT = "1002_DFA_SAD_XX", "1003_DFA_HAP_XX"


@pytest.fixture(scope="module")
def crema(tmp_path_factory):
    root = tmp_path_factory.mktemp("crema")
    clips = make_crema_d(root / "raw", actors=(1001, 1002, 1003), sentences=("DFA",), seconds=2.2,
                         short=SHORT, corrupt=CORRUPT)
    code = preprocess("crema_d", root / "raw", root / "out", workers=1)
    return root, clips, code


def _lists(out):
    rows = {}
    for s in ("train", "val", "test"):
        p = out / f"{s}.txt"
        if p.exists():
            rows[s] = [ln.split(",") for ln in p.read_text().splitlines()]
    return rows


def test_crema_d_layout_shapes_and_frames(crema):
    root, clips, code = crema
    out = root / "out"
    assert code == 0
    assert (out / "classes.txt").read_text().split() == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    assert json.loads((out / "meta.json").read_text())["audio_shape"] == [257, 188]
    good = [c for c in clips if c != CORRUPT]
    for c in good:
        spec = np.load(out / "audio" / f"{c}.npy")
        assert spec.shape == (257, 188) and spec.dtype == np.float32
        n = count_files(out / "visual" / c, ".jpg")
        assert n == (1 if c == SHORT else 3)  # 2.2 s at 1 fps -> t = 0, 1, 2; 0.4 s -> padded to one frame
    assert sorted(os.listdir(out / "visual" / good[0])) == ["00001.jpg", "00002.jpg", "00003.jpg"]
    # the short clip's audio was tiled, not left short or rejected
    short = np.load(out / "audio" / f"{SHORT}.npy")
    assert np.isfinite(short).all() and short[:, -1].max() > -10


def test_crema_d_corrupt_file_skipped_and_reported(crema):
    root, clips, _ = crema
    out = root / "out"
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(CORRUPT + "\t")
    assert not (out / "audio" / f"{CORRUPT}.npy").exists() and not (out / "visual" / CORRUPT).exists()
    listed = [c for rows in _lists(out).values() for c, _ in rows]
    assert sorted(listed) == sorted(c for c in clips if c != CORRUPT)  # every good clip in exactly one split
    labels = {c: lab for rows in _lists(out).values() for c, lab in rows}
    assert all(c.split("_")[2] == lab for c, lab in labels.items())
    assert set(_lists(out)) == {"train", "test"} and len(_lists(out)["test"]) >= 5  # a test clip per class


def test_rerun_skips_finished_items(crema, capsys):
    root, clips, _ = crema
    out = root / "out"
    before = {c: os.stat(out / "audio" / f"{c}.npy").st_mtime_ns for c in clips if c != CORRUPT}
    redo = next(iter(before))
    os.remove(out / "audio" / f"{redo}.npy")  # an interrupted item: frames written, spectrogram not
    assert preprocess("crema_d", root / "raw", out) == 0
    err = capsys.readouterr().err
    assert "1 processed" in err and f"{len(before) - 1} already done" in err
    for c, t in before.items():
        if c != redo:
            assert os.stat(out / "audio" / f"{c}.npy").st_mtime_ns == t
    assert np.load(out / "audio" / f"{redo}.npy").shape == (257, 188)


def test_kinetics_sounds_parallel_fbank_and_class_file(tmp_path):
    raw = tmp_path / "raw"
    make_kinetics_sounds(raw, per_class={"train": 1, "val": 1}, seconds=3.0, short="singing_val0")
    (tmp_path / "classes.txt").write_text("singing\nplaying drums\n")  # a subset, in this order
    assert preprocess("kinetics_sounds", raw, tmp_path / "out", workers=2, classes=str(tmp_path / "classes.txt")) == 0
    out = tmp_path / "out"
    assert (out / "classes.txt").read_text().split("\n")[:2] == ["singing", "playing drums"]
    rows = _lists(out)
    assert set(rows) == {"train", "test"}  # Kinetics val -> test
    assert sorted(lab for _, lab in rows["test"]) == ["playing drums", "singing"]
    assert not any("chopping" in c for r in rows.values() for c, _ in r)
    for r in rows.values():
        for c, _ in r:
            assert np.load(out / "audio" / f"{c}.npy").shape == (1024, 128)
            assert count_files(out / "visual" / c, ".jpg") == (1 if c == "singing_val0" else 3)


def test_ave_spectrogram_and_its_own_splits(tmp_path):
    raw = tmp_path / "raw"
    make_ave(raw, classes=("Dog", "Guitar"), splits={"train": 1, "val": 1, "test": 1}, seconds=4.0)
    assert preprocess("ave", raw, tmp_path / "out") == 0
    out = tmp_path / "out"
    rows = _lists(out)
    assert {s: len(r) for s, r in rows.items()} == {"train": 2, "val": 2, "test": 2}
    c = rows["train"][0][0]
    assert np.load(out / "audio" / f"{c}.npy").shape == (257, 1004)
    assert count_files(out / "visual" / c, ".jpg") == 4


def test_bad_source_layout_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="VideoFlash"):
        preprocess("crema_d", tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="Annotations.txt"):
        preprocess("ave", tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError, match="not a folder"):
        preprocess("kinetics_sounds", tmp_path / "nope", tmp_path / "out")
