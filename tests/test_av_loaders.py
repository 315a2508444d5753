"""Loaders crema_d / kinetics_sounds / ave over preprocessed fixtures: contract, shapes, sampling, splits."""
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from av_fixtures import make_ave, make_crema_d, make_kinetics_sounds, preprocess
from mmbalance.data import build_dataset
from mmbalance.data.audiovisual import _transforms, actor_disjoint_split, sample_frame_indices
from mmbalance.registry import ConfigError


@pytest.fixture(scope="module")
def crema_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("crema")
    make_crema_d(root / "raw", actors=(1001, 1002, 1003, 1004), sentences=("DFA",), seconds=3.2,
                 short="1004_DFA_NEU_XX")
    assert preprocess("crema_d", root / "raw", root / "out") == 0
    return root / "out"


def test_frame_index_sampling():
    assert sample_frame_indices(10, 3, train=False) == [1, 4, 7]  # segment middles
    assert sample_frame_indices(3, 3, train=False) == [0, 1, 2]
    assert sample_frame_indices(1, 3, train=False) == [0, 0, 0]  # short clip: repeated, not rejected
    g = torch.Generator().manual_seed(0)
    draws = [tuple(sample_frame_indices(10, 3, train=True, generator=g)) for _ in range(200)]
    for d in draws:
        assert 0 <= d[0] <= 2 and 3 <= d[1] <= 5 and 6 <= d[2] <= 9
    assert len(set(draws)) > 10  # random within segments in training
    assert {d[2] for d in draws} == {6, 7, 8, 9}


def test_crema_d_batch_contract_and_shapes(crema_root):
    d = build_dataset("crema_d", root=str(crema_root), num_frames=2, image_size=32)
    assert d.num_classes == 6 and d.modalities == ["audio", "visual"]
    assert d.input_shapes == {"audio": (1, 257, 188), "visual": (3, 2, 32, 32)}
    assert d.default_encoders == {"audio": "resnet18_audio", "visual": "resnet18_visual"}
    s = d.test[0]
    assert set(s) == {"inputs", "label", "index", "present"}
    assert s["inputs"]["audio"].shape == (1, 257, 188) and s["inputs"]["visual"].shape == (3, 2, 32, 32)
    assert s["label"].dtype == torch.long and int(s["index"]) == 0 and bool(s["present"]["visual"])
    assert d.test.clips[0].split("_")[2] == d.class_names[int(s["label"])]
    batch = next(iter(DataLoader(d.train, batch_size=4)))
    assert batch["inputs"]["visual"].shape == (4, 3, 2, 32, 32) and batch["index"].tolist() == [0, 1, 2, 3]
    one = build_dataset("crema_d", root=str(crema_root), modalities=["visual"], image_size=32)
    assert list(one.train[0]["inputs"]) == ["visual"] and one.input_shapes == {"visual": (3, 1, 32, 32)}


def test_test_time_frames_are_segment_middles_and_train_is_random(crema_root):
    from PIL import Image

    d = build_dataset("crema_d", root=str(crema_root), num_frames=3, image_size=32)
    ds = d.test
    i = next(k for k in range(len(ds)) if len(ds.frame_files(k)) == 4)  # 3.2 s clip -> 4 frames
    files = ds.frame_files(i)
    assert [f.name for f in files] == sorted(f.name for f in files)
    expected = torch.stack([_transforms(False, 32)(Image.open(files[k]).convert("RGB")) for k in (0, 1, 2)], 1)
    torch.testing.assert_close(ds[i]["inputs"]["visual"], expected)  # middles of 3 segments of 4 frames
    torch.testing.assert_close(ds[i]["inputs"]["visual"], ds[i]["inputs"]["visual"])  # deterministic
    tr = d.train
    torch.manual_seed(0)
    a, b = tr[0]["inputs"]["visual"], tr[0]["inputs"]["visual"]
    assert not torch.equal(a, b)  # random frames / crops / flips in training
    te = d.train_eval  # train split with test transforms
    assert te.clips == tr.clips and torch.equal(te[0]["inputs"]["visual"], te[0]["inputs"]["visual"])


def test_short_clip_repeats_its_frame(crema_root):
    d = build_dataset("crema_d", root=str(crema_root), num_frames=3, image_size=32, actor_disjoint=False)
    for ds in (d.train, d.val, d.test):
        if "1004_DFA_NEU_XX" in ds.clips:
            v = ds[ds.clips.index("1004_DFA_NEU_XX")]["inputs"]["visual"]
            assert v.shape == (3, 3, 32, 32)
            break
    else:
        pytest.fail("short clip missing")


def test_validation_carved_from_train_not_test(crema_root):
    d = build_dataset("crema_d", root=str(crema_root), image_size=32)
    listed_test = [ln.split(",")[0] for ln in (crema_root / "test.txt").read_text().splitlines()]
    listed_train = [ln.split(",")[0] for ln in (crema_root / "train.txt").read_text().splitlines()]
    assert d.test.clips == listed_test
    assert len(d.val) >= 1 and set(d.val.clips).isdisjoint(d.train.clips)
    assert sorted(d.val.clips + d.train.clips) == sorted(listed_train)
    again = build_dataset("crema_d", root=str(crema_root), image_size=32)
    assert again.val.clips == d.val.clips  # fixed split


def test_actor_disjoint_split(crema_root):
    d = build_dataset("crema_d", root=str(crema_root), image_size=32, actor_disjoint=True)
    actors = [{c.split("_")[0] for c in ds.clips} for ds in (d.train, d.val, d.test)]
    assert all(actors) and not (actors[0] & actors[1]) and not (actors[0] & actors[2]) and not (actors[1] & actors[2])
    assert len(d.train) + len(d.val) + len(d.test) == 24
    clips = [f"{a}_X_NEU_XX" for a in range(1000, 1091) for _ in range(3)]
    parts = actor_disjoint_split(clips, (0.8, 0.1, 0.1))
    sets = [{clips[i].split("_")[0] for i in p} for p in parts]
    assert [len(s) for s in sets] == [73, 9, 9] and not (sets[0] & sets[1] | sets[0] & sets[2] | sets[1] & sets[2])


def test_kinetics_sounds_and_ave_loaders(tmp_path):
    make_kinetics_sounds(tmp_path / "ks", classes=("a", "b"), per_class={"train": 2, "val": 1}, seconds=3.0)
    assert preprocess("kinetics_sounds", tmp_path / "ks", tmp_path / "ks_out") == 0
    ks = build_dataset("kinetics_sounds", root=str(tmp_path / "ks_out"), image_size=32)
    assert ks.input_shapes == {"audio": (1, 1024, 128), "visual": (3, 3, 32, 32)}
    assert ks.train[0]["inputs"]["audio"].shape == (1, 1024, 128) and len(ks.test) == 2
    (tmp_path / "one.txt").write_text("b\n")
    sub = build_dataset("kinetics_sounds", root=str(tmp_path / "ks_out"), image_size=32, classes=str(tmp_path / "one.txt"))
    assert sub.num_classes == 1 and all(c.startswith("b_") for c in sub.test.clips)

    make_ave(tmp_path / "ave", classes=("Dog", "Guitar"), splits={"train": 1, "val": 1, "test": 1}, seconds=3.0)
    assert preprocess("ave", tmp_path / "ave", tmp_path / "ave_out") == 0
    ave = build_dataset("ave", root=str(tmp_path / "ave_out"), image_size=32, num_frames=4)
    assert (len(ave.train), len(ave.val), len(ave.test)) == (2, 2, 2)  # AVE's own val split is used
    assert ave.test[0]["inputs"]["audio"].shape == (1, 257, 1004)
    assert ave.test[0]["inputs"]["visual"].shape == (3, 4, 32, 32)
    assert ave.class_names == ["Dog", "Guitar"]


def test_config_errors(tmp_path, crema_root):
    with pytest.raises(ConfigError, match="needs the option root"):
        build_dataset("crema_d")
    with pytest.raises(ConfigError, match="not a folder"):
        build_dataset("ave", root=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="lacks"):
        build_dataset("kinetics_sounds", root=str(tmp_path))
    with pytest.raises(ConfigError, match="holds preprocessed crema_d"):
        build_dataset("ave", root=str(crema_root))
    with pytest.raises(ConfigError, match="modalities"):
        build_dataset("crema_d", root=str(crema_root), modalities=["text"])
    with pytest.raises(ConfigError, match="no option"):
        build_dataset("crema_d", root=str(crema_root), bogus=1)
    with pytest.raises(ConfigError, match="names a modality twice"):
        build_dataset("crema_d", root=str(crema_root), modalities=["audio", "audio"])
    for name, bad, msg in (("crema_d", dict(modalities=["text"]),
                            "'modalities' takes a list of one of 'audio', 'visual' or null, got ['text']"),
                           ("ave", dict(num_frames=0), "'num_frames' takes an integer >= 1, got 0"),
                           ("kinetics_sounds", dict(val_fraction=1.0), "'val_fraction' takes a number in (0, 1), got 1.0"),
                           ("crema_d", dict(image_size="big"), "'image_size' takes an integer >= 1, got 'big'"),
                           ("crema_d", dict(actor_disjoint="maybe"), "'actor_disjoint' takes true/false, got 'maybe'")):
        with pytest.raises(ConfigError) as e:
            build_dataset(name, root=str(crema_root), **bad)
        assert str(e.value) == f"dataset '{name}' option {msg}"
    assert json.loads((crema_root / "meta.json").read_text())["dataset"] == "crema_d"


def test_one_epoch_joint_smoke_run_from_the_cli(crema_root, tmp_path):
    """The issue's smoke run: `mmbalance train` with the CREMA-D config on the fixture layout."""
    from mmbalance.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "crema_d" / "joint.yaml"), "--dataset.root", str(crema_root),
                 "--dataset.image_size", "32", "--model.encoder_options.width", "8", "--epochs", "1",
                 "--batch-size", "8", "--train.drop_last", "true", "--train.progress", "off",
                 "--train.probe", "false", "--output-dir", str(out)])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == "crema_d" and set(res["test"]["per_modality"]) == {"audio", "visual"}
