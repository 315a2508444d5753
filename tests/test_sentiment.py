"""Sentiment/emotion feature sets (MulT pickles for MOSI/MOSEI/IEMOCAP, the MMGCN/DialogueRNN MELD
pickle) and the masked sequence encoders: labels by hand, padding kept at zero, masking exact
against the unpadded sequence, one-line errors, one epoch of joint and ARL from the CLI."""
import json
import pickle

import numpy as np
import pytest
import torch

from mmbalance.cli import main
from mmbalance.data import build_dataset
from mmbalance.data.sentiment import MELD_ITEMS_9, MELD_ITEMS_10, iemocap_classes, sentiment_classes
from mmbalance.models.encoders import create_encoder
from mmbalance.models.sequence import compact_steps, step_mask
from mmbalance.registry import ConfigError

STEPS = {"audio": 6, "vision": 7, "text": 5}
DIMS = {"audio": 4, "vision": 3, "text": 6}
SIZES = {"train": 30, "valid": 10, "test": 10}


def mult_split(n, rng, labels):
    """One MulT split: zero-padded sequences (padding at the front, lengths 1..L), -inf in audio."""
    part = {}
    for key in ("audio", "vision", "text"):
        x = rng.standard_normal((n, STEPS[key], DIMS[key])).astype(np.float32)
        for i in range(n):
            length = 1 + i % STEPS[key]
            x[i, : STEPS[key] - length] = 0.0
        part[key] = x
    part["audio"][1, -1, 0] = -np.inf  # as in MOSEI's COVAREP features
    part["labels"] = labels
    part["id"] = np.array([[f"vid{i}", "0", "1"] for i in range(n)])
    return part


def make_mult(path, kind="mosi"):
    rng = np.random.default_rng(0)
    obj = {}
    for s, n in SIZES.items():
        if kind == "iemocap":
            emo = np.arange(n) % 4
            lab = np.zeros((n, 4, 2), dtype=np.float32)
            lab[:, :, 0] = 1
            lab[np.arange(n), emo, 0], lab[np.arange(n), emo, 1] = 0, 1
            lab[1] = 0
            lab[1, :, 0] = 1  # no emotion marked: dropped in the 4-way task
        else:
            scores = np.linspace(-3.4, 3.4, n).astype(np.float32)
            scores[::5] = 0.0  # zero-score clips
            lab = scores.reshape(n, 1, 1)
        obj[s] = mult_split(n, rng, lab)
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return obj


@pytest.fixture(scope="module")
def mosi_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosi")
    raw = make_mult(root / "mosi_data_noalign.pkl")
    return root, raw


def test_label_rules_by_hand():
    s = np.array([-3.6, -2.5, -0.5, -0.2, 0.0, 0.2, 0.5, 1.5, 2.5, 3.5])
    # MulT: round(clip(s, -3, 3)), half to even
    assert sentiment_classes(s, "7class").tolist() == [0, 1, 3, 3, 3, 3, 3, 5, 5, 6]
    assert sentiment_classes(s, "binary", "exclude").tolist() == [0, 0, 0, 0, -1, 1, 1, 1, 1, 1]
    assert sentiment_classes(s, "binary", "positive").tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert sentiment_classes(s, "binary", "negative").tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    yes, no = [0, 1], [1, 0]
    raw = np.array([[no, no, yes, no], [no, yes, yes, no], [yes, no, no, no]])
    assert iemocap_classes(raw).tolist() == [2, -1, 0]
    assert iemocap_classes(raw, "sad").tolist() == [1, 1, 0]
    assert iemocap_classes(np.array([[0, 0, 0, 1]])).tolist() == [3]  # (N, 4) 0/1 form
    with pytest.raises(ValueError):
        iemocap_classes(np.zeros((2, 3)))


def test_mosi_loader_contract_labels_and_padding(mosi_root):
    root, raw = mosi_root
    d = build_dataset("mosi", root=str(root))
    assert d.modalities == ["audio", "visual", "text"] and d.num_classes == 2
    assert d.input_shapes == {"audio": (6, 4), "visual": (7, 3), "text": (5, 6)}
    assert d.default_encoders == {"audio": "seq_transformer", "visual": "seq_transformer", "text": "seq_transformer"}
    for ours, theirs in (("train", "train"), ("val", "valid"), ("test", "test")):
        scores = raw[theirs]["labels"].reshape(-1)
        keep = scores != 0  # exclude: zero-score clips dropped
        ds = getattr(d, ours)
        assert len(ds) == int(keep.sum()) and d.info["dropped"][ours] == int((~keep).sum())
        np.testing.assert_array_equal(ds.labels.numpy(), (scores[keep] > 0).astype(int))
        vis = raw[theirs]["vision"][keep]
        np.testing.assert_array_equal(ds.arrays["visual"].numpy(), vis)  # raw features, padding kept
    assert d.info["nonfinite_replaced"]["audio"] == 3  # one -inf per split
    assert d.info["empty_sequences"]["train"] == {"audio": 0, "visual": 0, "text": 0}
    assert bool(torch.isfinite(d.train.arrays["audio"]).all())
    s = d.train[0]
    assert set(s) == {"inputs", "label", "index", "present"} and s["inputs"]["text"].shape == (5, 6)
    seven = build_dataset("mosi", root=str(root / "mosi_data_noalign.pkl"), labels="7class", modalities=["text"])
    assert seven.num_classes == 7 and seven.modalities == ["text"] and seven.class_names[0] == "-3"
    sc = raw["test"]["labels"].reshape(-1)
    np.testing.assert_array_equal(seven.test.labels.numpy(), np.round(np.clip(sc, -3, 3)).astype(int) + 3)
    pos = build_dataset("mosi", root=str(root), binary_zero="positive")
    assert len(pos.train) == SIZES["train"] and pos.info["dropped"]["train"] == 0


def test_standardize_uses_real_steps_and_keeps_padding_zero(mosi_root):
    root, raw = mosi_root
    d = build_dataset("mosi", root=str(root), standardize=True, binary_zero="positive")
    for m, key in (("visual", "vision"), ("text", "text")):
        x = d.train.arrays[m].numpy()
        real = (raw["train"][key] != 0).any(-1)
        np.testing.assert_array_equal((x != 0).any(-1), real)  # padding rows are still exactly zero
        rows = x[real]
        np.testing.assert_allclose(rows.mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(rows.std(0), 1, atol=1e-4)
        ref = raw["train"][key][real]
        val = d.val.arrays[m].numpy()
        vreal = (raw["valid"][key] != 0).any(-1)
        np.testing.assert_allclose(val[vreal], (raw["valid"][key][vreal] - ref.mean(0)) / ref.std(0), rtol=1e-4, atol=1e-5)


def test_iemocap_tasks(tmp_path):
    raw = make_mult(tmp_path / "iemocap_data.pkl", "iemocap")
    d = build_dataset("iemocap", root=str(tmp_path), aligned=True)
    assert d.num_classes == 4 and d.class_names == ["neutral", "happy", "sad", "angry"]
    assert len(d.train) == SIZES["train"] - 1 and d.info["dropped"]["train"] == 1  # the unmarked sample
    expected = np.delete(np.arange(SIZES["train"]) % 4, 1)
    np.testing.assert_array_equal(d.train.labels.numpy(), expected)
    happy = build_dataset("iemocap", root=str(tmp_path), aligned=True, task="happy")
    assert happy.num_classes == 2 and len(happy.train) == SIZES["train"]
    np.testing.assert_array_equal(happy.train.labels.numpy(), np.argmax(raw["train"]["labels"][:, 1], -1))


def test_missing_key_or_file_is_one_line(tmp_path, mosi_root):
    root, raw = mosi_root
    bad = {k: v for k, v in raw.items() if k != "valid"}
    with open(tmp_path / "mosi_data_noalign.pkl", "wb") as f:
        pickle.dump(bad, f)
    with pytest.raises(ConfigError, match=r"missing key 'valid' \(has \['test', 'train'\]\); expected a MulT-style "
                                          r"pickle \{'train' \| 'valid' \| 'test': \{'vision'"):
        build_dataset("mosi", root=str(tmp_path))
    no_vision = {s: {k: v for k, v in p.items() if k != "vision"} for s, p in raw.items()}
    with open(tmp_path / "mosei_senti_data_noalign.pkl", "wb") as f:
        pickle.dump(no_vision, f)
    with pytest.raises(ConfigError, match=r"missing key 'vision' in \['train'\]"):
        build_dataset("mosei", root=str(tmp_path))
    assert build_dataset("mosei", root=str(tmp_path), modalities=["audio", "text"]).modalities == ["audio", "text"]
    with pytest.raises(ConfigError, match=r"has no mosi_data.pkl; expected MulT's mosi_data.pkl"):
        build_dataset("mosi", root=str(root), aligned=True)
    with pytest.raises(ConfigError, match="needs the option root"):
        build_dataset("mosi")
    (tmp_path / "iemocap_data_noalign.pkl").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="cannot be read as a pickle"):
        build_dataset("iemocap", root=str(tmp_path))
    with pytest.raises(ConfigError, match="has modalities audio, visual, text"):
        build_dataset("mosi", root=str(root), modalities=["vision"])


# ----------------------------------------------------------------------------- encoders

def test_step_mask_and_compaction():
    x = torch.tensor([[[0., 0.], [1., 0.], [0., 0.], [0., 3.]], [[0., 0.]] * 4])
    feats, valid = step_mask(x, "nonzero")
    assert valid.tolist() == [[False, True, False, True], [False] * 4]
    xc, mc, n = compact_steps(feats, valid)
    assert n.tolist() == [2, 0] and xc.shape == (2, 2, 2)
    assert xc[0].tolist() == [[1., 0.], [0., 3.]] and mc.tolist() == [[True, True], [False, False]]
    assert step_mask(x, "none")[1].all()


@pytest.mark.parametrize("name,opts", [("seq_transformer", {"hidden": 8, "heads": 2, "ff": 16}),
                                       ("seq_transformer", {"hidden": 8, "heads": 2, "pool": "last"}),
                                       ("seq_transformer", {"hidden": 8, "heads": 2, "pool": "first", "positional": False}),
                                       ("gru", {"hidden": 6}), ("gru", {"hidden": 6, "bidirectional": True, "pool": "mean"})])
def test_masking_equals_the_unpadded_sequence(name, opts):
    """Padding anywhere, of any amount, changes nothing: each sample's output equals the encoder
    run on its real steps alone; an empty (absent) sequence gives the zero vector."""
    torch.manual_seed(0)
    enc = create_encoder(name, (7, 3), dropout=0.0, **opts).eval()
    real = [torch.randn(k, 3) for k in (3, 7, 1)]
    x = torch.zeros(4, 7, 3)
    x[0, [0, 3, 6]] = real[0]  # scattered padding
    x[1] = real[1]
    x[2, 5] = real[2]
    out = enc(x)
    for i, r in enumerate(real):
        alone = create_encoder(name, (len(r), 3), dropout=0.0, mask="none", **opts).eval()
        alone.load_state_dict(enc.state_dict())
        torch.testing.assert_close(out[i], alone(r.unsqueeze(0))[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    with torch.no_grad():  # inference (PyTorch's fused Transformer path) computes the same
        torch.testing.assert_close(enc(x), out, atol=1e-5, rtol=1e-5)
    # "channel": the last channel flags real steps; padded rows may hold anything
    chan = create_encoder(name, (7, 4), dropout=0.0, mask="channel", **opts).eval()
    chan.load_state_dict(enc.state_dict())
    xc = torch.cat([torch.randn(4, 7, 3), torch.zeros(4, 7, 1)], dim=-1)
    xc[..., :3][x.abs().sum(-1) > 0] = x[x.abs().sum(-1) > 0]
    xc[..., 3] = (x.abs().sum(-1) > 0).float()
    torch.testing.assert_close(chan(xc), out, atol=1e-5, rtol=1e-5)


def test_encoder_gradients_and_errors():
    enc = create_encoder("seq_transformer", (5, 4), hidden=8, heads=2)
    x = torch.randn(3, 5, 4)
    x[0] = 0
    y = enc(x)
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters() if p.grad is not None)
    assert enc.out_dim == 8 and create_encoder("gru", (5, 4), hidden=6, bidirectional=True).out_dim == 12
    with pytest.raises(ConfigError, match=r"expects a sequence \(steps, features\)"):
        create_encoder("gru", (5,))
    with pytest.raises(ConfigError, match=r"heads \(3\) must divide hidden \(8\)"):
        create_encoder("seq_transformer", (5, 4), hidden=8, heads=3)
    with pytest.raises(ConfigError, match="option 'pool' takes one of 'mean', 'last', 'first'"):
        create_encoder("seq_transformer", (5, 4), pool="max")


# ----------------------------------------------------------------------------- MELD

def make_meld(path, with_visual=True, as_dict=False):
    rng = np.random.default_rng(1)
    fields = {k: {} for k in ("videoIDs", "videoSpeakers", "videoLabels", "videoText", "videoAudio", "videoVisual",
                              "videoSentence", "videoSentiment")}
    dialogues = list(range(12))
    for d in dialogues:
        n = 2 + d % 3
        fields["videoIDs"][d] = list(range(n))
        fields["videoSpeakers"][d] = [[1, 0]] * n
        fields["videoLabels"][d] = [(d + u) % 7 for u in range(n)]
        fields["videoSentiment"][d] = [(d + u) % 3 for u in range(n)]
        fields["videoText"][d] = [rng.standard_normal(6) for _ in range(n)]
        fields["videoAudio"][d] = [rng.standard_normal(4) for _ in range(n)]
        fields["videoVisual"][d] = [rng.standard_normal(5) for _ in range(n)]
        fields["videoSentence"][d] = ["hi"] * n
    fields["trainVid"] = dialogues[:9]
    fields["testVid"] = dialogues[9:]
    items = MELD_ITEMS_10 if with_visual else MELD_ITEMS_9
    obj = {k: fields[k] for k in items} if as_dict else tuple(fields[k] for k in items)
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return fields


def test_meld_layouts_and_dialogue_split(tmp_path):
    fields = make_meld(tmp_path / "MELD_features_raw1.pkl")
    d = build_dataset("meld", root=str(tmp_path))
    assert d.modalities == ["text", "audio", "visual"] and d.num_classes == 7
    assert d.input_shapes == {"text": (6,), "audio": (4,), "visual": (5,)} and d.default_encoders["text"] == "mlp"
    assert d.info["dialogues"] == {"train": 8, "val": 1, "test": 3}
    n_train_utts = sum(len(fields["videoLabels"][v]) for v in range(9))
    assert len(d.train) + len(d.val) == n_train_utts
    test_labels = [lab for v in range(9, 12) for lab in fields["videoLabels"][v]]
    assert d.test.labels.tolist() == test_labels
    first = np.stack(fields["videoText"][9]).astype(np.float32)
    np.testing.assert_allclose(d.test.arrays["text"][: len(first)].numpy(), first, rtol=1e-6)
    # the validation dialogue's utterances are all in val: match them by their feature rows
    val_rows = {tuple(np.round(r, 5)) for r in d.val.arrays["audio"].numpy()}
    for v in range(9):
        rows = [tuple(np.round(np.asarray(a, np.float32), 5)) for a in fields["videoAudio"][v]]
        assert all(r in val_rows for r in rows) or not any(r in val_rows for r in rows)
    senti = build_dataset("meld", root=str(tmp_path), labels="sentiment", modalities=["audio"])
    assert senti.num_classes == 3 and senti.modalities == ["audio"]
    make_meld(tmp_path / "dr.pkl", with_visual=False)
    two = build_dataset("meld", root=str(tmp_path), file="dr.pkl")
    assert two.modalities == ["text", "audio"]
    with pytest.raises(ConfigError, match="meld has modalities text, audio; got"):
        build_dataset("meld", root=str(tmp_path / "dr.pkl"), modalities=["visual"])


def test_meld_wrong_structure_is_one_line(tmp_path):
    make_meld(tmp_path / "d.pkl", as_dict=True)
    with open(tmp_path / "d.pkl", "rb") as f:
        obj = pickle.load(f)
    del obj["testVid"]
    with open(tmp_path / "d.pkl", "wb") as f:
        pickle.dump(obj, f)
    with pytest.raises(ConfigError, match=r"missing key 'testVid' .*expected a tuple \(videoIDs, videoSpeakers"):
        build_dataset("meld", root=str(tmp_path / "d.pkl"))
    make_meld(tmp_path / "r.pkl")
    with open(tmp_path / "r.pkl", "rb") as f:
        obj = pickle.load(f)
    obj[4][0][0] = [1.0, 2.0]  # one utterance's audio vector of the wrong size
    with open(tmp_path / "r.pkl", "wb") as f:
        pickle.dump(obj, f)
    with pytest.raises(ConfigError, match=r"videoAudio\[0\] must hold one numeric vector per utterance, all of one size"):
        build_dataset("meld", root=str(tmp_path / "r.pkl"))
    with open(tmp_path / "t.pkl", "wb") as f:
        pickle.dump((1, 2, 3), f)
    with pytest.raises(ConfigError, match="holds a tuple of 3 items; expected a tuple"):
        build_dataset("meld", root=str(tmp_path / "t.pkl"))


# ----------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("dataset", ["mosi", "iemocap"])
@pytest.mark.parametrize("method", ["joint", "arl"])
def test_one_epoch_on_mult_pickles_from_the_cli(tmp_path, mosi_root, method, dataset):
    root, _ = mosi_root
    if dataset == "iemocap":
        root = tmp_path
        make_mult(root / "iemocap_data_noalign.pkl", "iemocap")
    out = tmp_path / "run"
    args = ["-q", "train", "--dataset", dataset, "--dataset.root", str(root), "--method", method, "--epochs", "1",
            "--batch-size", "8", "--optimizer", "adam", "--lr", "0.001",
            "--model.encoder_options", "{hidden: 8, heads: 2, ff: 16}", "--train.progress", "off",
            "--output-dir", str(out)]
    if method == "arl":
        args += ["--method.warmup_epochs", "0"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"] == dataset and set(res["test"]["per_modality"]) == {"audio", "visual", "text"}
    assert all(0.0 <= pm["probe_accuracy"] <= 1.0 for pm in res["test"]["per_modality"].values())


@pytest.mark.parametrize("method", ["joint", "arl"])
def test_one_epoch_on_meld_from_the_cli(tmp_path, method):
    make_meld(tmp_path / "MELD_features_raw1.pkl")
    out = tmp_path / "run"
    args = ["-q", "train", "--dataset", "meld", "--dataset.root", str(tmp_path), "--method", method, "--epochs", "1",
            "--batch-size", "8", "--train.progress", "off", "--train.probe", "false", "--output-dir", str(out)]
    if method == "arl":
        args += ["--method.warmup_epochs", "0"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["test"]["per_modality"]) == {"text", "audio", "visual"}


def test_missing_modalities_are_empty_sequences(mosi_root, tmp_path):
    """--missing-rate zeroes inputs: for the sequence encoders that is an empty sequence (zero
    feature), so training and evaluation stay finite."""
    root, _ = mosi_root
    out = tmp_path / "run"
    assert main(["-q", "train", "--dataset", "mosi", "--dataset.root", str(root), "--epochs", "1", "--batch-size", "8",
                 "--missing-rate", "0.5", "--model.encoder", "gru", "--model.encoder_options.hidden", "6",
                 "--train.progress", "off", "--train.probe", "false", "--output-dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert np.isfinite(res["test"]["loss"])


CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("ds,classes", [("mosi", 2), ("mosei", 2), ("iemocap", 4), ("meld", 7)])
def test_shipped_configs_build_on_the_published_layouts(tmp_path, ds, classes):
    from mmbalance.config import load_config

    if ds == "meld":
        make_meld(tmp_path / "MELD_features_raw1.pkl")
    else:
        make_mult(tmp_path / f"{ {'mosi': 'mosi', 'mosei': 'mosei_senti', 'iemocap': 'iemocap'}[ds]}_data_noalign.pkl",
                  "iemocap" if ds == "iemocap" else "mosi")
    paths = sorted((CONFIGS / ds).glob("*.yaml"))
    assert {p.stem for p in paths} >= {"base", "joint", "arl"}
    for p in paths:
        cfg = load_config(p, {"dataset.root": str(tmp_path)})
        d = build_dataset(cfg.dataset.name, **cfg.dataset.options)
        assert d.num_classes == classes and len(d.modalities) == 3


def test_mosi_arl_recipe_runs(tmp_path, mosi_root):
    root, _ = mosi_root
    out = tmp_path / "run"
    assert main(["-q", "train", "--config", str(CONFIGS / "mosi" / "arl.yaml"), "--dataset.root", str(root),
                 "--model.encoder_options", "{hidden: 8, heads: 2, ff: 16}", "--method.warmup_epochs", "0",
                 "--epochs", "1", "--batch-size", "8", "--train.progress", "off", "--train.probe", "false",
                 "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["method"] == "arl"
