"""``mmbalance extract-features``: frozen encoders once over a dataset -> the .npz features format."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imagetext_fixtures import tiny_bert, tiny_resnet, twitter_tombert
from mmbalance.data import build_dataset
from mmbalance.experiments import extract
from mmbalance.data.features import load_features
from mmbalance.models import create_encoder
from mmbalance.registry import ConfigError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract")
    return {"root": twitter_tombert(d / "tw"), "bert": tiny_bert(d / "bert"), "r50": tiny_resnet(d / "r50.pth")}


def _args(env, out, *extra):
    return ["--dataset", "twitter2015", "--output", str(out), "--batch-size", "4", "--workers", "0",
            "--progress", "off", "--dataset.root", str(env["root"]), "--dataset.image_size", "32",
            "--model.encoders.text.path", str(env["bert"]), "--model.encoders.image.weights", str(env["r50"]),
            "--model.encoders.image.width", "8", *extra]


def run_extract(argv):
    """Parse like the CLI does (known flags + dotted overrides) and call extract.run."""
    p = argparse.ArgumentParser()
    extract.add_arguments(p)
    args, rest = p.parse_known_args(argv)
    return extract.run(args, rest)


def test_features_equal_the_frozen_encoders_on_evaluation_inputs(env, tmp_path, capsys):
    out = tmp_path / "tw.npz"
    assert run_extract(_args(env, out, "--shard-size", "5")) == 0
    assert "wrote" in capsys.readouterr().out and not (tmp_path / "tw.parts").exists()  # shards removed at the end
    z = np.load(out)
    d = build_dataset("twitter2015", root=str(env["root"]), image_size=32)
    n = {s: len(getattr(d, s)) for s in ("train", "val", "test")}
    assert [str(m) for m in z["modality_names"]] == ["image", "text"]
    assert [str(c) for c in z["class_names"]] == d.class_names
    assert z["split"].tolist() == ["train"] * n["train"] + ["val"] * n["val"] + ["test"] * n["test"]
    assert z["labels"].tolist() == d.train.labels.tolist() + d.val.labels.tolist() + d.test.labels.tolist()
    assert z["image"].shape == (len(z["labels"]), 256) and z["text"].shape == (len(z["labels"]), 16)
    assert z["image"].dtype == np.float32 and "present_image" not in z.files  # every image present
    img = create_encoder("resnet_image", (3, 32, 32), weights=str(env["r50"]), width=8, freeze=True)
    txt = create_encoder("bert_text", (1024,), path=str(env["bert"]), freeze=True)
    for row, (ds, i) in ((0, (d.train_eval, 0)), (n["train"] + 1, (d.val, 1)), (len(z["labels"]) - 1, (d.test, n["test"] - 1))):
        s = ds[i]  # evaluation transforms everywhere (train_eval for the training split)
        with torch.no_grad():
            np.testing.assert_allclose(z["image"][row], img(s["inputs"]["image"][None])[0].numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(z["text"][row], txt(s["inputs"]["text"][None])[0].numpy(), rtol=1e-4, atol=1e-5)
    data = load_features(str(out))  # valid in the features format, the dataset's own splits
    assert (len(data.train), len(data.val), len(data.test)) == (n["train"], n["val"], n["test"])


def test_resumes_from_finished_shards_and_refuses_other_settings(env, tmp_path, monkeypatch):
    ref = tmp_path / "ref.npz"
    assert run_extract(_args(env, ref, "--shard-size", "4")) == 0
    out = tmp_path / "part.npz"
    calls = {"n": 0}
    real = extract._atomic_savez

    def crash_after_two(path, **arrays):
        if path.parent.name.endswith(".parts"):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt("stopped")
        return real(path, **arrays)

    monkeypatch.setattr(extract, "_atomic_savez", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_extract(_args(env, out, "--shard-size", "4"))
    parts = tmp_path / "part.parts"
    assert sorted(p.name for p in parts.glob("*.npz")) == ["train-00000.npz", "train-00001.npz"]
    assert not list(parts.glob("*.tmp")) and not out.exists()  # nothing half-written
    monkeypatch.setattr(extract, "_atomic_savez", real)
    encoded = {"n": 0}
    real_encoders = extract._frozen_encoders

    def counting(spec):
        encs = real_encoders(spec)
        for e in encs.values():
            e.register_forward_hook(lambda *a: encoded.__setitem__("n", encoded["n"] + 1))
        return encs

    monkeypatch.setattr(extract, "_frozen_encoders", counting)
    with pytest.raises(ConfigError, match="other settings"):  # another shard size would mix shards
        run_extract(_args(env, out, "--shard-size", "5"))
    assert run_extract(_args(env, out, "--shard-size", "4")) == 0
    # only the unfinished shards are encoded: train-00002 (4), val (4 + 2), test (4 + 2): 5 batches x 2 encoders
    assert encoded["n"] == 2 * 5
    a, b = np.load(ref), np.load(out)
    assert a.files == b.files
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k])
    assert run_extract(_args(env, out, "--shard-size", "5", "--restart")) == 0  # --restart discards old shards


def test_missing_images_are_absent_in_the_file(env, tmp_path):
    root = twitter_tombert(tmp_path / "tw")
    d = build_dataset("twitter2015", root=str(root))
    Path(d.test.samples[0].image).unlink()
    out = tmp_path / "f.npz"
    assert run_extract(_args({**env, "root": root}, out)) == 0
    z = np.load(out)
    p = z["present_image"]
    first_test = int(np.flatnonzero(z["split"] == "test")[0])
    assert p.sum() == len(p) - 1 and not p[first_test] and float(np.abs(z["image"][first_test]).sum()) == 0.0
    assert "present_text" not in z.files
    assert load_features(str(out)).test.present["image"].tolist()[0] is False


def test_the_output_trains_with_mmbalance_train(env, tmp_path):
    from mmbalance.cli import main

    out = tmp_path / "tw.npz"
    assert run_extract(_args(env, out)) == 0
    for method in ("joint", "arl"):
        run = tmp_path / method
        assert main(["train", "--dataset", str(out), "--method", method, "--epochs", "2", "--batch-size", "4",
                     "--train.progress", "off", "--output-dir", str(run)]) == 0
        res = json.loads((run / "results.json").read_text())
        assert res["dataset"] == "tw" and set(res["test"]["per_modality"]) == {"image", "text"}


def test_bad_arguments_are_one_line(env, tmp_path):
    for argv, text in [
        (_args(env, tmp_path / "x.txt"), "must name a .npz file"),
        (_args(env, tmp_path / "x.npz", "--optim.lr", "0.1"), "--dataset.* and --model.* overrides only"),
        (_args(env, tmp_path / "x.npz", "--batch-size", "0"), "--batch-size must be >= 1"),
        (["--output", str(tmp_path / "x.npz")], "needs a dataset"),
        (["--output", str(tmp_path / "x.npz"), "--dataset", "twitter2015", "--dataset.root", str(tmp_path)],
         "lacks train.tsv"),
        (_args(env, tmp_path / "x.npz", "--model.encoders.image.weights", str(tmp_path / "r.pth")), "weights file not found"),
    ]:
        with pytest.raises(ConfigError) as e:
            run_extract(argv)
        assert text in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))


def test_through_the_mmbalance_command(env, tmp_path, capsys):
    from mmbalance.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "extract-features" not in sub.choices:
        pytest.skip("mmbalance extract-features is not wired into mmbalance.cli yet")
    out = tmp_path / "cli.npz"
    assert main(["extract-features", *_args(env, out)]) == 0
    assert "wrote" in capsys.readouterr().out and np.load(out)["image"].shape[1] == 256
    assert main(["extract-features", *_args(env, out, "--model.encoders.text.path", str(tmp_path / "none"))]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a folder" in err and "\n" not in err
