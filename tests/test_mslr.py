"""MSLR: rate rules by hand; only the targeted modality's updates change; the modulation window;
the validation pass; resume; the start from unimodal runs."""
import argparse
import pickle

import pytest
import torch

from mmbalance.config import load_config
from mmbalance.engine.trainer import Trainer, to_device
from mmbalance.methods.mslr import mslr_dynamic_ratio, mslr_smooth_multiplier, parse_rates
from mmbalance.methods import create_method
from mmbalance.registry import ConfigError
from helpers import tiny_data as make_tiny_data


def tiny_data(n=48, mods=("a", "b")):
    return make_tiny_data(n, mods, hidden=[8], dropout=0.0)


def make(method, fusion="sum", cfg=None, **opts):
    o = {f"method.{k}": v for k, v in opts.items()}
    cfg = load_config(None, {"train.epochs": 3, "method.name": method, "train.progress": "off", "train.probe": False,
                             "model.fusion": fusion, "optim.name": "sgd", "optim.momentum": 0.9,
                             "optim.weight_decay": 1e-3, **o, **(cfg or {})})
    return Trainer(cfg, data=tiny_data())


def test_dynamic_ratio_by_hand():
    assert mslr_dynamic_ratio([0.5, 0.6, 0.7, 0.8, 0.9], window=5) == 1.0  # no 5 earlier epochs yet
    assert mslr_dynamic_ratio([0.5, 0.6, 0.7, 0.8, 0.9, 1.0], window=5) == pytest.approx(1.0 / 0.7)
    assert mslr_dynamic_ratio([0.1, 0.4, 0.6, 0.9], window=2) == pytest.approx(0.9 / 0.5)
    assert mslr_dynamic_ratio([], window=1) == 1.0
    assert mslr_dynamic_ratio([0.0, 0.0, 0.4], window=2) == 1.0  # no accuracy before: no ratio (no 0 division)


def test_smooth_and_parse_rates():
    assert mslr_smooth_multiplier(0.5, 0, 5) == 0.5
    assert mslr_smooth_multiplier(0.5, 2, 5) == pytest.approx(0.75)
    assert mslr_smooth_multiplier(0.5, 4, 5) == pytest.approx(1.0)
    assert mslr_smooth_multiplier(0.5, 0, 1) == 0.5  # a one-epoch run: the modality's own rate
    assert parse_rates(None, ["a", "b"]) == {"a": 1.0, "b": 1.0}
    assert parse_rates(0.5, ["a", "b"]) == {"a": 0.5, "b": 0.5} and parse_rates(2, ["a"]) == {"a": 2.0}
    with pytest.raises(ValueError, match="must be a number"):  # a bool is no rate
        parse_rates(True, ["a", "b"])
    assert parse_rates({"b": 1.1}, ["a", "b"]) == {"a": 1.0, "b": 1.1}
    assert parse_rates([0.9, 1.1], ["a", "b"]) == {"a": 0.9, "b": 1.1}
    for bad in ({"c": 1.0}, [1.0], [1.0, -1.0], {"a": 0.0}):  # data-dependent, or a mapping's values
        with pytest.raises(ConfigError):
            parse_rates(bad, ["a", "b"])
    with pytest.raises(ValueError, match="must be a number, a list or a dict"):
        parse_rates("x", ["a", "b"])


def _one_step(tr):
    batch = to_device(next(iter(tr.loader(tr.data.train, batch_size=16))), tr.device)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.method.on_epoch_start(0)
    tr.model.train()
    tr.method.training_step(batch)
    grads = {n: p.grad.detach().clone() for n, p in tr.model.named_parameters()}
    deltas = {n: p.detach() - before[n] for n, p in tr.model.named_parameters()}
    return grads, deltas


@pytest.mark.parametrize("apply,fusion", [("grad", "sum"), ("update", "sum"), ("grad", "concat"),
                                          ("grad", "shared_head")])
def test_only_targeted_modality_changes(apply, fusion):
    opts = {"model.fusion_options": {"common_dim": 6}} if fusion == "shared_head" else {}
    g_ref, d_ref = _one_step(make("joint", fusion, cfg=opts))
    g, d = _one_step(make("mslr", fusion, cfg=opts, rates={"a": 0.5}, apply=apply))
    # sum: modality a owns its encoder and its head; shared_head: its encoder and its projection
    # to the shared head's width; concat: only its encoder (the head is shared)
    owned_a = lambda n: n.startswith(("encoders.a.", "fusion.heads.a.", "fusion.proj.a."))
    if fusion == "shared_head":
        assert any(n.startswith("fusion.proj.a.") for n in g)
    assert any(owned_a(n) for n in g) and any(n.startswith("fusion.") and not owned_a(n) for n in g)
    for n in g_ref:
        if owned_a(n):
            if apply == "grad":
                assert torch.equal(g[n], 0.5 * g_ref[n]), n
            else:  # the update is halved exactly (weight decay and momentum included)
                assert torch.equal(g[n], g_ref[n]), n
                torch.testing.assert_close(d[n], 0.5 * d_ref[n], rtol=1e-5, atol=1e-7)
        else:  # the other modality and the shared parts: bit-identical to joint training
            assert torch.equal(g[n], g_ref[n]), n
            assert torch.equal(d[n], d_ref[n]), n


def test_dynamic_strategy_uses_val_history():
    tr = make("mslr", strategy="dynamic", window=1, rates=[2.0, 1.0])
    m = tr.method
    m.on_epoch_start(0)
    assert m.multipliers == {"a": 2.0, "b": 1.0}
    m.val_acc = {"a": [0.5, 0.75], "b": [0.4, 0.2]}
    m.on_epoch_start(2)
    assert m.multipliers["a"] == pytest.approx(2.0 * 1.5) and m.multipliers["b"] == pytest.approx(0.5)
    m.on_epoch_end(2)  # appends this epoch's validation accuracies
    assert len(m.val_acc["a"]) == 3 and 0.0 <= m.val_acc["a"][-1] <= 1.0
    diag = m.epoch_diagnostics()
    assert "val_acc_a" in diag
    st = m.state_dict()
    m.val_acc = {}
    m.load_state_dict(st)
    assert m.val_acc["b"][:2] == [0.4, 0.2]


# ---------------------------------------------------------------------------------- step, window, passes, resume
import copy  # noqa: E402
import json  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from mmbalance.methods.mslr import MSLR, load_unimodal_weights  # noqa: E402
from helpers import capture_step_grads  # noqa: E402


def _batch(tr, seed=0):
    return to_device(next(iter(tr.loader(tr.data.train, shuffle=True, batch_size=16, seed=seed))), tr.device)


def _owner(n):
    for m in ("a", "b"):
        if n.startswith(f"encoders.{m}.") or n.startswith(f"fusion.heads.{m}."):
            return m
    return None


def test_training_step_matches_hand_written_reference():
    """Fused CE; the gradients of what modality m owns (encoder + its own head) times c_m."""
    tr = make("mslr", "sum", strategy="keep", rates={"a": 0.5, "b": 2.0})
    tr.method.on_epoch_start(0)
    tr.model.train()
    batch = _batch(tr)
    ref = copy.deepcopy(tr.model)
    z = sum(F.linear(ref.encoders[m](batch["inputs"][m]), ref.fusion.heads[m].weight, ref.fusion.heads[m].bias)
            for m in ("a", "b"))
    loss = F.cross_entropy(z, batch["label"])
    loss.backward()
    expect = {n: p.grad * {"a": 0.5, "b": 2.0, None: 1.0}[_owner(n)] for n, p in ref.named_parameters()}
    out = {}
    grads = capture_step_grads(tr, batch, out)
    assert float(out["loss"]) == pytest.approx(float(loss), rel=1e-5)  # the loss the engine logs
    assert set(grads) == set(expect)
    for n, g in expect.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)
    diag = tr.method.epoch_diagnostics()
    assert diag["rate_a"] == 0.5 and diag["rate_b"] == 2.0


def test_modulation_window_boundaries():
    tr = make("mslr", "sum", strategy="keep", rates={"a": 0.5, "b": 2.0}, modulation_start=2, modulation_end=4)
    m = tr.method
    for epoch, active in ((1, False), (2, True), (4, True), (5, False)):
        m.on_epoch_start(epoch)
        assert m.multipliers == ({"a": 0.5, "b": 2.0} if active else {"a": 1.0, "b": 1.0}), epoch
    assert MSLR().modulation_start == 0 and MSLR().modulation_end is None  # the paper: every epoch
    # outside the window the step is exactly joint training (grads unscaled), inside it scaled
    tr.model.train()
    batch = _batch(tr)
    m.on_epoch_start(1)
    ref = make("mslr", "sum", strategy="keep", rates={"a": 0.5, "b": 2.0}, modulation_start=2, modulation_end=4)
    ref.method.on_epoch_start(2)
    ref.model.train()
    g_out = capture_step_grads(tr, batch)
    g_in = capture_step_grads(ref, batch)
    for n in g_out:  # same initial weights (same seed), same batch
        c = {"a": 0.5, "b": 2.0, None: 1.0}[_owner(n)]
        torch.testing.assert_close(g_in[n], c * g_out[n], msg=n)
    with pytest.raises(ConfigError, match="modulation_end"):
        MSLR(modulation_start=3, modulation_end=2)
    from mmbalance.methods import create_method

    for bad, msg in (({"modulation_start": -1}, "'modulation_start' takes an integer >= 0, got -1"),
                     ({"modulation_end": -1}, "'modulation_end' takes an integer >= 0 or null, got -1"),
                     ({"strategy": "fast"}, "'strategy' takes one of 'keep', 'smooth', 'dynamic', got 'fast'"),
                     ({"apply": "loss"}, "'apply' takes one of 'grad', 'update', got 'loss'"),
                     ({"window": 0}, "'window' takes an integer >= 1, got 0"),
                     ({"rates": [1.0, -1.0]},
                      "'rates' takes a number > 0 or a list of numbers > 0 or a mapping or null, got [1.0, -1.0]"),
                     ({"rates": "x"},
                      "'rates' takes a number > 0 or a list of numbers > 0 or a mapping or null, got 'x'"),
                     ({"init_from": "runs/a"}, "'init_from' takes a mapping or null, got 'runs/a'")):
        with pytest.raises(ConfigError) as e:
            create_method("mslr", **bad)
        assert str(e.value) == f"method 'mslr' option {msg}"
    assert create_method("mslr", rates="0.9,1.1").rates == [0.9, 1.1]
    assert create_method("mslr", rates="2").rates == 2.0
    assert create_method("mslr", rates={"a": 0.5}).rates == {"a": 0.5}


def test_smooth_strategy_follows_the_runs_epochs():
    """smooth in a 3-epoch run: rates[m] at epoch 0, half-way at epoch 1, 1 at the last epoch."""
    m = make("mslr", "sum", strategy="smooth", rates={"a": 0.5, "b": 2.0}).method
    for epoch, want in ((0, {"a": 0.5, "b": 2.0}), (1, {"a": 0.75, "b": 1.5}), (2, {"a": 1.0, "b": 1.0})):
        m.on_epoch_start(epoch)
        assert m.multipliers == pytest.approx(want), epoch


def test_dynamic_history_is_recorded_outside_the_window():
    tr = make("mslr", "sum", strategy="dynamic", window=1, modulation_start=5)
    m = tr.method
    m.on_epoch_end(0)
    m.on_epoch_end(1)
    assert len(m.val_acc["a"]) == 2
    m.val_acc = {"a": [0.5, 0.75], "b": [0.4, 0.2]}
    m.on_epoch_start(4)
    assert m.multipliers == {"a": 1.0, "b": 1.0}
    m.on_epoch_start(5)
    assert m.multipliers["a"] == pytest.approx(1.5) and m.multipliers["b"] == pytest.approx(0.5)


def test_validation_pass_is_eval_mode_and_leaves_train_mode_and_buffers():
    cfg = load_config(None, {"train.epochs": 3, "method.name": "mslr", "train.progress": "off", "train.probe": False,
                             "model.fusion": "sum", "method.window": 1})
    tr = Trainer(cfg, data=make_tiny_data(48, ("a", "b"), hidden=[8], dropout=0.3, batchnorm=True))
    tr.model.train()
    for seed in (1, 2):
        tr.method.training_step(_batch(tr, seed))
    buffers = {k: v.clone() for k, v in tr.model.named_buffers()}
    ref = copy.deepcopy(tr.model).eval()
    val = tr.data.val
    xs = {m: torch.stack([val[i]["inputs"][m] for i in range(len(val))]) for m in ("a", "b")}
    ys = torch.stack([val[i]["label"] for i in range(len(val))])
    with torch.no_grad():
        out = ref(xs)
    expect = {m: float((out.unimodal_logits[m].argmax(1) == ys).float().mean()) for m in ("a", "b")}
    tr.method.on_epoch_end(0)
    assert tr.method.val_acc == {"a": [pytest.approx(expect["a"])], "b": [pytest.approx(expect["b"])]}
    assert all(torch.equal(v, buffers[k]) for k, v in tr.model.named_buffers())
    assert all(mod.training for mod in tr.model.modules())


def _fit(tmp_path, name, resume=False, **opts):
    o = {f"method.{k}": v for k, v in opts.items()}
    cfg = load_config(None, {"train.epochs": 3, "method.name": "mslr", "train.progress": "off", "train.probe": False,
                             "model.fusion": "sum", "train.batch_size": 16, "optim.lr": 0.05, **o})
    cfg.train.stop_after_epochs = 2 if name == "part" else None
    return Trainer(cfg, run_dir=tmp_path / name, resume=resume, data=tiny_data()).fit()


def test_resume_equals_uninterrupted(tmp_path):
    """Stopped after 2 of 3 epochs, resumed: the third epoch's dynamic rates come from the
    restored validation history; everything equals an uninterrupted run."""
    opts = {"strategy": "dynamic", "window": 1, "rates": [0.8, 1.2], "modulation_start": 1}
    full = _fit(tmp_path, "full", **opts)
    assert _fit(tmp_path, "part", **opts) is None
    part = _fit(tmp_path, "part", resume=True, **opts)
    lines = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
             for k in ("full", "part")}
    rates = [x["diagnostics"]["rate_a"] for x in lines["full"]]
    assert rates[0] == 1.0 and rates[1] == pytest.approx(0.8) and rates[2] != pytest.approx(0.8)
    for key in ("val", "diagnostics", "train"):
        assert [x[key] for x in lines["full"]] == [x[key] for x in lines["part"]], key
    assert full["test"] == part["test"] and full["best_epoch"] == part["best_epoch"]


# ---------------------------------------------------------------------------------- start from unimodal runs
def _unimodal_run(tmp_path, modality, hidden=(8,)):
    cfg = load_config(None, {"train.epochs": 1, "method.name": "unimodal", "method.modality": modality,
                             "train.progress": "off", "train.probe": False, "train.seed": 7})
    run = tmp_path / f"uni_{modality}_{len(hidden)}"
    Trainer(cfg, run_dir=run, data=make_tiny_data(48, ("a", "b"), hidden=list(hidden), dropout=0.0)).fit()
    return run


def test_init_from_unimodal_runs(tmp_path):
    run_a = _unimodal_run(tmp_path, "a")
    saved = torch.load(run_a / "best.pt", weights_only=False)["model"]
    tr = make("mslr", "sum", init_from={"a": str(run_a)})
    before_b = {k: v.clone() for k, v in tr.model.state_dict().items() if not k.startswith(("encoders.a.", "fusion.heads.a."))}
    assert not torch.equal(tr.model.state_dict()["encoders.a.net.1.weight"], saved["encoders.a.net.1.weight"])
    tr.method.on_epoch_start(1)  # only the first epoch of a fresh run loads (a resumed run has its weights)
    assert not torch.equal(tr.model.state_dict()["encoders.a.net.1.weight"], saved["encoders.a.net.1.weight"])
    tr.method.on_epoch_start(0)
    now = tr.model.state_dict()
    for k, v in saved.items():
        if k.startswith("encoders.a."):
            assert torch.equal(now[k], v), k
    assert torch.equal(now["fusion.heads.a.weight"], saved["fusion.fc.weight"])
    assert torch.equal(now["fusion.heads.a.bias"], saved["fusion.fc.bias"])
    assert all(torch.equal(now[k], v) for k, v in before_b.items())  # modality b and the rest untouched
    # a shared head (concat) keeps its own initialisation; only the encoder is copied
    tr = make("mslr", "concat", init_from={"a": str(run_a)})
    names = load_unimodal_weights(tr.model, "a", run_a)
    assert names and all(n.startswith("encoders.a.") for n in names)


def test_init_from_errors(tmp_path):
    run_a = _unimodal_run(tmp_path, "a")
    tr = make("mslr", "sum", init_from={"a": str(tmp_path / "nowhere")})  # building never reads (evaluate)
    with pytest.raises(ConfigError, match="does not exist"):
        tr.method.on_epoch_start(0)
    with pytest.raises(ConfigError, match=r"holds no 'b' encoder \(it has \['a'\]\)"):
        make("mslr", "sum", init_from={"b": str(run_a)}).method.on_epoch_start(0)
    # a damaged checkpoint: the trainer's loader's one-line error, not a raw unpickling error
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt or truncated"):
        make("mslr", "sum", init_from={"a": str(bad)}).method.on_epoch_start(0)
    # called directly (default loader): a file that is no run checkpoint, or one holding pickled
    # objects (refused unread: weights_only)
    torch.save({"weights": {}}, bad / "best.pt")
    with pytest.raises(ConfigError, match=r"holds no 'a' encoder \(it has \[\]\)"):
        load_unimodal_weights(make("mslr", "sum").model, "a", bad)
    torch.save({"model": torch.load(run_a / "best.pt", weights_only=True)["model"], "args": argparse.Namespace()},
               bad / "best.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_unimodal_weights(make("mslr", "sum").model, "a", bad)
    with pytest.raises(ConfigError, match="unknown modalities"):
        make("mslr", "sum", init_from={"c": str(run_a)})
    wide = _unimodal_run(tmp_path, "a", hidden=(8, 4))
    with pytest.raises(ConfigError, match="does not fit"):
        make("mslr", "sum", init_from={"a": str(wide)}).method.on_epoch_start(0)
    with pytest.raises(ConfigError, match="option 'init_from' takes a mapping or null"):
        create_method("mslr", init_from="runs/a")
