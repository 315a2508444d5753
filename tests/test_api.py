"""The Python API: the README's "From Python" example runs as written; load_run rebuilds a run
without data or optimizer and reproduces results.json; options are typed and validated."""
import json
import re
from pathlib import Path

import pytest
import torch

import mmbalance
from mmbalance.registry import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- python-example -->\s*```python\n(.*?)```", text, re.S)
    assert block, "README has no python example after <!-- python-example -->"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    assert (tmp_path / "runs" / "py-demo" / "results.json").exists()
    assert "arl" in capsys.readouterr().out


def test_load_run_predicts_without_data_and_matches_results(tmp_path, monkeypatch):
    run = mmbalance.train(method="joint", epochs=2, output_dir=str(tmp_path / "r"),
                          **{"train.progress": "off", "train.probe": False, "model.fusion": "late"})
    import mmbalance.api as api

    calls = []
    monkeypatch.setattr(api, "build_dataset", lambda *a, **k: calls.append(a) or pytest.fail("data loaded"))
    loaded = mmbalance.load_run(tmp_path / "r")
    assert calls == [] and loaded.model.training is False
    for k, v in run.model.state_dict().items():  # the trained run ends at its selected checkpoint
        assert torch.equal(v, loaded.model.state_dict()[k])
    monkeypatch.undo()
    data = mmbalance.load_dataset("uci_mfeat")
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    ev = loaded.evaluate(data.test)
    assert ev["accuracy"] == res["test"]["accuracy"] and ev["macro_f1"] == res["test"]["macro_f1"]
    for m in ("pix", "fou"):
        assert ev["per_modality"][m]["accuracy"] == res["test"]["per_modality"][m]["accuracy"]
    assert loaded.evaluate("val")["accuracy"] == res["val"]["accuracy"]
    pred = loaded.predict({m: data.test.arrays[m][:5] for m in ("pix", "fou")})
    assert pred.probabilities.shape == (5, 10) and torch.allclose(pred.probabilities.sum(1), torch.ones(5))
    with pytest.raises(ConfigError, match="predict needs inputs for fou"):
        loaded.predict({"pix": data.test.arrays["pix"][:5]})
    with pytest.raises(ConfigError, match="per-sample shape"):
        loaded.predict({"pix": data.test.arrays["pix"][:5, :3], "fou": data.test.arrays["fou"][:5]})


def test_checkpoints_load_with_weights_only(tmp_path):
    mmbalance.train(method="qmf", epochs=1, output_dir=str(tmp_path / "r"), **{"train.progress": "off",
                                                                              "train.probe": False})
    for name in ("best.pt", "last.pt"):
        torch.load(tmp_path / "r" / name, weights_only=True)


def test_create_method_coerces_and_validates_options():
    m = mmbalance.create_method("arl", T="4", warmup_epochs=2.0)
    assert m.T == 4.0 and m.warmup_epochs == 2 and isinstance(m.warmup_epochs, int)
    with pytest.raises(ConfigError, match=r"^method 'arl' option 'T' takes a number.*got 'abc'$"):
        mmbalance.create_method("arl", T="abc")
    with pytest.raises(ConfigError, match="method 'arl' has no option 'bogus'"):
        mmbalance.create_method("arl", bogus=1)


def test_registries_are_exposed():
    assert {"joint", "arl", "mla", "mie"} <= set(mmbalance.list_methods())
    assert "concat" in mmbalance.list_fusions() and "mlp" in mmbalance.list_encoders()
    assert "uci_mfeat" in mmbalance.list_datasets()
    with pytest.raises(AttributeError):
        mmbalance.nothing_here
