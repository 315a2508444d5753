"""The config layer: typed, validated options for components and built-in sections, numbers in
every form, YAML files with bases, --print-config without data."""
import math
from typing import Literal

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from mmbalance.cli import main
from mmbalance.config import TrainConfig, OptimConfig, config_fingerprint, load_config
from mmbalance.options import Annotated, Interval, coerce_value, describe_options, describe_type
from mmbalance.registry import ConfigError


@pytest.mark.parametrize("text,value", [("1e-3", 0.001), ("5e-4", 0.0005), ("0.05", 0.05), ("3", 3.0),
                                        ("1E2", 100.0), (" 2.5 ", 2.5)])
def test_numbers_in_every_form(text, value):
    assert coerce_value(text, float, "k") == value
    assert load_config(None, {"optim.lr": text}).optim.lr == value


def test_scientific_notation_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5e-4\ntrain:\n  epochs: 1e1\n")
    cfg = load_config(p)
    assert cfg.optim.lr == 0.001 and cfg.optim.weight_decay == 0.0005 and cfg.train.epochs == 10


@pytest.mark.parametrize("key,value,needle", [
    ("optim.grad_clip", -1, "config key 'optim.grad_clip' takes a number > 0 or null, got -1"),
    ("optim.lr", 0, "config key 'optim.lr' takes a number > 0, got 0"),
    ("optim.lr", "abc", "config key 'optim.lr' takes a number > 0, got 'abc'"),
    ("optim.lr", "nan", "config key 'optim.lr' takes a number > 0, got 'nan'"),
    ("optim.momentum", 1.5, "takes a number in [0, 1), got 1.5"),
    ("optim.name", "lion", "config key 'optim.name' takes one of 'sgd', 'adam', 'adamw', 'adagrad', got 'lion'"),
    ("optim.scheduler", "exp", "takes one of 'none', 'step', 'multistep', 'cosine'"),
    ("optim.gamma", 0, "config key 'optim.gamma' takes a number in (0, 1], got 0"),
    ("train.epochs", 0, "config key 'train.epochs' takes an integer >= 1, got 0"),
    ("train.epochs", 2.5, "takes an integer >= 1, got 2.5"),
    ("train.eval_batch_size", 0, "takes an integer >= 1, got 0"),
    ("train.num_workers", -1, "takes an integer >= 0, got -1"),
    ("train.seed", 2**64, "config key 'train.seed' takes an integer in [0, 9223372036854775807]"),
    ("train.seed", -1, "config key 'train.seed' takes an integer in [0, "),
    ("train.stop_after_epochs", 0, "takes an integer >= 1 or null, got 0"),
    ("train.progress", "maybe", "config key 'train.progress' takes one of 'auto', 'on', 'off', got 'maybe'"),
    ("train.precision", "fp8", "takes one of 'auto', 'fp32', 'bf16'"),
    ("train.select_metric", "auc", "takes one of 'accuracy', 'macro_f1', 'map'"),
    ("train.probe", "perhaps", "config key 'train.probe' takes true/false, got 'perhaps'"),
    ("train.loggers", ["wandb"], "takes a list of one of 'csv', 'tensorboard'"),
])
def test_built_in_sections_are_validated_in_one_line(key, value, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, {key: value})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_yaml_booleans_for_choice_fields():
    assert load_config(None, {"train.progress": False}).train.progress == "off"
    assert load_config(None, {"train.progress": "on"}).train.progress == "on"
    assert load_config(None, {"train.probe": "no"}).train.probe is False


def test_coerce_literal_optional_list_and_ranges():
    tp = Annotated[float, Interval(0, 1, closed="left")]
    assert coerce_value("0", tp, "x") == 0.0
    with pytest.raises(ConfigError, match=r"x takes a number in \[0, 1\), got 1"):
        coerce_value(1, tp, "x")
    assert coerce_value(None, Literal["a", "b"] | None, "x") is None
    assert coerce_value("b", Literal["a", "b"] | None, "x") == "b"
    with pytest.raises(ConfigError, match="one of 'a', 'b' or null"):
        coerce_value("c", Literal["a", "b"] | None, "x")
    assert coerce_value("1,2", list[int], "x") == [1, 2]
    assert coerce_value(3, list[int], "x") == [3]
    assert coerce_value("true", bool, "x") is True and coerce_value(0, bool, "x") is False
    with pytest.raises(ConfigError):
        coerce_value(True, int, "x")  # a boolean is not a count
    assert describe_type(Annotated[int, Interval(1, None)] | None) == "an integer >= 1 or null"


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from([f"optim.{k}" for k in OptimConfig.__dataclass_fields__] +
                           [f"train.{k}" for k in TrainConfig.__dataclass_fields__]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True),
                       st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3)))
def test_config_parser_never_crashes(key, value):
    """Any value for any built-in key: a config whose value has the declared type, or one ConfigError."""
    try:
        cfg = load_config(None, {key: value})
    except ConfigError as e:
        assert "\n" not in str(e) and key in str(e)
        return
    sec, k = key.split(".")
    got = getattr(getattr(cfg, sec), k)
    if isinstance(got, float):
        assert math.isfinite(got)


def test_method_options_typed_and_listed():
    from mmbalance.methods import create_method, get_method_class

    with pytest.raises(ConfigError, match=r"^method 'arl' option 'T' takes a number.*got 'abc'$"):
        create_method("arl", T="abc")
    with pytest.raises(ConfigError, match=r"^method 'arl' option 'warmup_epochs' takes an integer"):
        create_method("arl", warmup_epochs=1.5)
    names = [o.name for o in describe_options(get_method_class("arl"))]
    import inspect

    assert names == [p for p in inspect.signature(get_method_class("arl").__init__).parameters if p != "self"]


def test_config_files_with_bases_and_several_files(tmp_path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 7\n")
    (tmp_path / "m.yaml").write_text("base: base.yaml\nmethod:\n  name: arl\n  T: 3\ntrain:\n  epochs: 9\n")
    (tmp_path / "late.yaml").write_text("optim:\n  lr: 0.25\n")
    cfg = load_config([tmp_path / "m.yaml", tmp_path / "late.yaml"], {"train.seed": 4})
    assert (cfg.optim.lr, cfg.train.epochs, cfg.method.name, cfg.method.options["T"], cfg.train.seed) == \
        (0.25, 9, "arl", 3, 4)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_print_config_resolves_method_without_data(capsys, monkeypatch):
    import mmbalance.data as data

    monkeypatch.setattr(data, "build_dataset", lambda *a, **k: pytest.fail("data loaded"))
    assert main(["train", "--print-config", "--method", "arl", "--method.T", "3"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["method"]["T"] == 3.0 and cfg["method"]["gamma"] == 4.0 and cfg["method"]["warmup_epochs"] == 5
    assert main(["train", "--print-config", "--method", "arll"]) == 2
    assert "unknown method 'arll'" in capsys.readouterr().err
    assert main(["train", "--print-config", "--method.T", "abc", "--method", "arl"]) == 2
    assert "method 'arl' option 'T' takes a number" in capsys.readouterr().err


def test_fingerprint_ignores_how_a_run_is_shown_not_what_it_computes():
    a = load_config(None, {})
    assert config_fingerprint(a) == config_fingerprint(load_config(None, {"train.progress": "off",
                                                                          "train.loggers": ["csv"]}))
    assert config_fingerprint(a) != config_fingerprint(load_config(None, {"train.epochs": 3}))
    assert config_fingerprint(a) != config_fingerprint(load_config(None, {"method.name": "arl"}))
