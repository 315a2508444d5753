"""Run-folder files: checkpoint faults in one line, stale temporaries, strict JSON."""
import json
import math
import os
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from mmbalance.config import load_config
from mmbalance.engine.checkpoint import (atomic_write_bytes, checkpoint_fingerprint, finite_json, json_line,
                                         load_checkpoint, load_component_state, load_model_state,
                                         remove_stale_temporaries, save_checkpoint, truncate_metrics, write_json)
from mmbalance.registry import ConfigError


def strict_loads(text):
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token}")
    return json.loads(text, parse_constant=refuse)


def state():
    return {"model": OrderedDict(w=torch.arange(6.0).reshape(2, 3), b=torch.zeros(2)),
            "optimizer": {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
            "scheduler": None, "method": {"acc": [0.5, float("nan")], "stage": 2, "name": "a"}, "epoch": 3}


def one_line(e):
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# ----------------------------------------------------------------------------- loading
def test_round_trip_is_weights_only_and_records_the_fingerprint(tmp_path):
    p = tmp_path / "last.pt"
    save_checkpoint(p, state(), fingerprint="abc123", run="runs/x")
    st = load_checkpoint(p, expect_fingerprint="abc123", required=("model", "epoch"))
    assert torch.equal(st["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert st["fingerprint"] == "abc123" and st["run"] == "runs/x" and st["epoch"] == 3
    # a checkpoint written before fingerprints were recorded still loads
    save_checkpoint(p, state())
    assert "fingerprint" not in load_checkpoint(p, expect_fingerprint="abc123")


def test_checkpoint_of_another_run_is_refused(tmp_path):
    p = tmp_path / "run" / "last.pt"
    save_checkpoint(p, state(), fingerprint="aaaa", run="runs/arl-seed1")
    with pytest.raises(ConfigError) as e:
        load_checkpoint(p, expect_fingerprint="bbbb")
    msg = one_line(e)
    assert str(p) in msg and "belongs to another run" in msg and "runs/arl-seed1" in msg and "aaaa" in msg


def test_fingerprint_ignores_evaluation_only_options():
    a = load_config(None, {"train.epochs": 3})
    b = load_config(None, {"train.epochs": 3, "train.probe": False, "train.eval_batch_size": 7})
    c = load_config(None, {"train.epochs": 4})
    assert checkpoint_fingerprint(a) == checkpoint_fingerprint(b) != checkpoint_fingerprint(c)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "flipped", "not_a_dict", "missing_key"])
def test_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    p = tmp_path / "run" / "last.pt"
    save_checkpoint(p, state())
    data = p.read_bytes()
    if damage == "empty":
        p.write_bytes(b"")
    elif damage == "truncated":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        p.write_bytes(b"this is not a checkpoint at all" * 10)
    elif damage == "flipped":  # a flipped byte inside a tensor's data record
        with zipfile.ZipFile(p) as z:
            info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 8)
        b = bytearray(data)
        h = info.header_offset  # local header: name and extra lengths at +26, +28, data after +30
        start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
        b[start + 2] ^= 0xFF
        p.write_bytes(bytes(b))
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], p)
    elif damage == "missing_key":
        torch.save({"model": {}}, p)
    with pytest.raises(ConfigError) as e:
        load_checkpoint(p, required=("model", "epoch"))
    msg = one_line(e)
    assert str(p) in msg
    if damage in ("truncated", "garbage", "flipped"):
        assert "is corrupt or truncated" in msg and "without --resume" in msg
    if damage == "empty":
        assert "is empty" in msg
    if damage == "missing_key":
        assert "'epoch'" in msg


def test_best_checkpoint_advice_and_missing_file(tmp_path):
    p = tmp_path / "best.pt"
    p.write_bytes(b"\x00" * 100)
    with pytest.raises(ConfigError) as e:
        load_checkpoint(p)
    assert "corrupt or truncated" in one_line(e) and "train the run again" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


class NotPlain:
    pass


def test_pickled_objects_are_not_loaded(tmp_path):
    p = tmp_path / "last.pt"
    torch.save({"model": {}, "x": NotPlain()}, p)
    with pytest.raises(ConfigError) as e:
        load_checkpoint(p)
    msg = one_line(e)
    assert str(p) in msg and "other than tensors and plain values" in msg and "NotPlain" in msg


def test_model_of_another_fusion_or_class_count(tmp_path):
    p = tmp_path / "best.pt"
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    load_model_state(small, small.state_dict(), p)  # the same model loads
    other = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 5))
    with pytest.raises(ConfigError) as e:
        load_model_state(other, small.state_dict(), p)
    msg = one_line(e)
    assert str(p) in msg and "shape mismatch 2" in msg and "1.weight saved (3, 8), model (5, 8)" in msg
    deeper = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3), torch.nn.Linear(3, 3))
    with pytest.raises(ConfigError) as e:
        load_model_state(deeper, small.state_dict(), p)
    assert "missing 2: 2.weight, 2.bias" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_model_state(small, deeper.state_dict(), p)
    assert "unexpected 2" in one_line(e)


def test_optimizer_state_of_another_model(tmp_path):
    a = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    b = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with pytest.raises(ConfigError) as e:
        load_component_state(b, a.state_dict(), tmp_path / "last.pt", "optimizer")
    assert "optimizer state does not fit" in one_line(e)


# ----------------------------------------------------------------------------- temporaries
def test_atomic_write_leaves_nothing_on_error_and_keeps_the_old_file(tmp_path):
    p = tmp_path / "last.pt"
    save_checkpoint(p, {"epoch": 1})

    def boom(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(p, boom)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(p)["epoch"] == 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_temporary_left_by_a_kill_is_removed(tmp_path, warnings_of_mmbalance):
    # a process killed inside atomic_write_bytes (no cleanup runs) leaves .last.pt.XXXXXXXX
    def killed(f):
        f.write(b"half a checkpoint")
        f.flush()
        os._exit(9)

    pid = os.fork()
    if pid == 0:  # the child dies mid-write
        try:
            atomic_write_bytes(tmp_path / "last.pt", killed)
        finally:
            os._exit(1)
    assert os.waitpid(pid, 0)[1] >> 8 == 9
    left = [x.name for x in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".last.pt.")
    for keep in ("last.pt", "notes.txt", ".hidden", ".last.pt.bak", "config.yaml"):
        (tmp_path / keep).write_text("x")
    (tmp_path / ".results.json.ab_12xyz").write_text("{")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(x.name for x in removed) == sorted([left[0], ".results.json.ab_12xyz"])
    assert sorted(x.name for x in tmp_path.iterdir()) == [".hidden", ".last.pt.bak", "config.yaml", "last.pt",
                                                          "notes.txt"]
    assert any("partial write of last.pt" in r.getMessage() for r in warnings_of_mmbalance)
    assert remove_stale_temporaries(tmp_path / "missing") == []


# ----------------------------------------------------------------------------- JSON
def test_write_json_writes_null_for_non_finite_and_says_which_keys(tmp_path, warnings_of_mmbalance):
    results = {"method": "joint", "test": {"accuracy": np.float32(0.5), "loss": float("inf"),
               "per_modality": {"a": {"accuracy": 0.25, "probe_accuracy": float("nan")}}},
               "hist": np.array([1.0, np.nan]), "t": torch.tensor(2.5), "ok": [1, True, None]}
    p = tmp_path / "results.json"
    write_json(p, results)
    out = strict_loads(p.read_text())
    assert out["test"]["per_modality"]["a"] == {"accuracy": 0.25, "probe_accuracy": None}
    assert out["test"]["loss"] is None and out["test"]["accuracy"] == 0.5
    assert out["hist"] == [1.0, None] and out["t"] == 2.5 and out["ok"] == [1, True, None]
    msg = " ".join(r.getMessage() for r in warnings_of_mmbalance)
    assert "test.per_modality.a.probe_accuracy" in msg and "test.loss" in msg and "hist[1]" in msg
    assert "cannot be computed" in msg and str(p) in msg
    assert "test.accuracy" not in msg


def test_json_line_is_strict_and_warns_once_per_key(warnings_of_mmbalance):
    rec = {"epoch": 1, "val": {"per_modality": {"b": {"probe_accuracy": math.nan}}}, "lr": 0.1}
    line = json_line(rec, where="test-metrics.jsonl")
    assert "\n" not in line and strict_loads(line)["val"]["per_modality"]["b"]["probe_accuracy"] is None
    json_line({**rec, "epoch": 2}, where="test-metrics.jsonl")
    hits = [r for r in warnings_of_mmbalance if "val.per_modality.b.probe_accuracy" in r.getMessage()]
    assert len(hits) == 1 and "epoch 1" in hits[0].getMessage()
    assert strict_loads(json_line({"epoch": 3, "x": -math.inf}, where="w", reasons={"x": "cannot be computed: test"}))
    assert "cannot be computed: test" in warnings_of_mmbalance[-1].getMessage()
    clean, found = finite_json({"a": [1.0, math.inf]})
    assert clean == {"a": [1.0, None]} and found[0][0] == "a[1]"


def test_truncate_metrics_drops_later_epochs_and_a_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 1, "v": NaN}\n{"epoch": 2}\n{"epoch": 3}\n{"epo')
    assert truncate_metrics(p, 2) == 2
    assert [json.loads(x)["epoch"] for x in p.read_text().splitlines()] == [1, 2]
    p.write_text('{"epoch": 1}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(ConfigError) as e:
        truncate_metrics(p, 5)
    assert str(p) in one_line(e) and "line 2" in str(e.value)
