"""unimodal_pretrain and the pieces the unimodal-member methods share: member losses by hand and
over simulated ranks, the stage-1 step against a hand-written reference, stage-1 length, member
selection (best / last epoch), the validation pass (eval mode, present samples, two ranks), the
fused stage (frozen encoders, encoder learning-rate factor), init_from, optimizer state, resume."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.methods import create_method
from mmbalance.methods import unimodal_pretrain as up
from mmbalance.methods.unimodal_pretrain import (encode_member, masked_mean_loss, member_statistics, member_step,
                                                 member_val_scores, pretrain_members, read_run_weights,
                                                 reduced_member_losses, stage1_seed)
from mmbalance.registry import ConfigError
from mmbalance.utils import to_device

from helpers import tiny_data
from simulated_ranks import run_two_ranks, shard_batch


def make(method="unimodal_pretrain", fusion="concat", epochs=2, data=None, seed=0, over=None, **opts):
    cfg = load_config(None, {"train.epochs": epochs, "method.name": method, "train.progress": "off",
                             "train.probe": False, "model.fusion": fusion, "train.batch_size": 16,
                             "train.seed": seed, "optim.name": "sgd", "optim.momentum": 0.9,
                             "optim.weight_decay": 1e-3, "optim.lr": 0.05, **(over or {}),
                             **{f"method.{k}": v for k, v in opts.items()}})
    return Trainer(cfg, data=data if data is not None else tiny_data(48, hidden=[8], dropout=0.0))


def first_batch(tr, n=16, seed=1):
    return to_device(next(iter(tr.loader(tr.data.train, batch_size=n, shuffle=True, seed=seed))), tr.device)


def capture(tr, fn):
    """Run ``fn()`` and return every parameter's gradient at the optimizer step."""
    got = {}
    orig = tr.optimizer_step

    def grab():
        got.update({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        orig()

    tr.optimizer_step = grab
    try:
        fn()
    finally:
        tr.optimizer_step = orig
    return got


def two_ranks(make_trainer, run, monkeypatch, batch=None):
    """Run ``run(trainer, shard)`` on two simulated ranks (tests/simulated_ranks.py): rank r gets
    samples ``r::2`` of ``batch`` (as the engine's sharded sampler deals them), ``world_size`` /
    ``rank`` say 2 / r, the collectives and the engine's gradient averaging act over the ranks.
    Both trainers start from the same weights. Returns ``[result of rank 0, result of rank 1]``."""
    made = []

    def same_weights():
        tr = make_trainer()
        if made:
            tr.model.load_state_dict(made[0].model.state_dict())
        made.append(tr)
        return tr

    def body(tr, r):
        return run(tr, None if batch is None else shard_batch(batch, r))

    return run_two_ranks(monkeypatch, same_weights, body)


# ----------------------------------------------------------------------------- pure math
def test_member_losses_by_hand_and_over_two_halves():
    v = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 0.0, 5.0, 1.0])}
    pres = {"a": torch.tensor([True, False, True, True]), "b": torch.tensor([False, False, True, False])}
    stats = member_statistics(v, pres)
    assert stats.tolist() == [[8.0, 3.0], [5.0, 1.0]]
    loss, means = reduced_member_losses(v, pres)
    assert float(loss) == pytest.approx(8 / 3 + 5.0) and float(means["a"]) == pytest.approx(8 / 3)
    # two ranks holding halves with different present counts: summed statistics = the global batch
    halves = [({m: t[r::2] for m, t in v.items()}, {m: p[r::2] for m, p in pres.items()}) for r in range(2)]
    total = member_statistics(*halves[0]) + member_statistics(*halves[1])
    assert torch.equal(total, stats)
    per_rank = [masked_mean_loss(h[0]["a"], h[1]["a"], stats[0, 1], world_size=2) for h in halves]
    assert float(sum(per_rank) / 2) == pytest.approx(8 / 3)  # what the engine's gradient average sees
    assert float(masked_mean_loss(torch.tensor([3.0]), torch.tensor([False]), torch.tensor(0.0))) == 0.0


def test_member_encoding_follows_the_absent_policy():
    """``input``: absent samples get a zero input, as MultimodalModel.encode; ``feature``: the
    inputs are left as they are (the model zeroes features, and the member losses mask them);
    no mask: the input as it is."""
    x = torch.randn(4, 3) + 2.0
    p = torch.tensor([True, False, True, False])
    enc = torch.nn.Identity()
    assert torch.equal(encode_member(enc, x, p, "input"), x * p.view(-1, 1).float())
    assert torch.equal(encode_member(enc, x, p, "feature"), x)
    assert torch.equal(encode_member(enc, x, None, "input"), x)


def test_stage1_seeds_are_apart_from_the_run_epochs():
    from mmbalance.utils import epoch_seed

    stage = {stage1_seed(0, e) for e in range(50)}
    run = {epoch_seed(0, e) for e in range(50)}
    assert len(stage) == 50 and not stage & run


# ----------------------------------------------------------------------------- stage 1
def test_member_step_is_each_member_alone_over_present_samples():
    tr = make(data=tiny_data(48, hidden=[8], dropout=0.0, missing=0.4))
    m = tr.method
    batch = first_batch(tr)
    nets = m.nets(["a", "b"])
    model = tr.model
    ref = {}
    for mod in ("a", "b"):  # each member's loss alone: mean CE over its present samples
        model.zero_grad(set_to_none=True)
        p = batch["present"][mod]
        x = batch["inputs"][mod] * p.view(-1, 1).float()
        z = model.pretrain_heads[mod](model.encoders[mod](x))
        F.cross_entropy(z[p], batch["label"][p]).backward()
        ref.update({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    model.zero_grad(set_to_none=True)
    model.train()
    got = capture(tr, lambda: member_step(m, nets, batch))
    assert set(got) == set(ref)  # encoders and member heads only; the fusion gets no gradient
    assert not any(n.startswith("fusion.") for n in got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)


def test_member_step_two_ranks_equal_one_process(monkeypatch):
    data = tiny_data(64, hidden=[8], dropout=0.0, missing={"b": 0.8}, seed=2)
    single = make(data=data)
    batch = first_batch(single, n=32)
    assert batch["present"]["b"][0::2].sum() != batch["present"]["b"][1::2].sum()
    single.model.train()
    expected = capture(single, lambda: member_step(single.method, single.method.nets(["a", "b"]), batch))

    def run(tr, shard):
        tr.model.train()
        return capture(tr, lambda: member_step(tr.method, tr.method.nets(["a", "b"]), shard))

    got = two_ranks(lambda: make(data=data), run, monkeypatch, batch)
    for n in expected:
        torch.testing.assert_close((got[0][n] + got[1][n]) / 2, expected[n], rtol=1e-5, atol=1e-6)


def test_validation_scores_eval_mode_present_samples_and_two_ranks(monkeypatch):
    data = tiny_data(48, hidden=[8], dropout=0.5, missing=0.3, seed=4, n_eval=21)
    tr = make(data=data)
    nets = tr.method.nets(["a", "b"])
    modes = []
    hook = tr.model.encoders["a"].register_forward_pre_hook(lambda mod, inp: modes.append(mod.training))
    tr.model.train()
    got = member_val_scores(tr.method, nets)
    hook.remove()
    assert modes and not any(modes) and tr.model.training  # eval during the pass, train mode back
    val = tr.data.val
    for mod in ("a", "b"):
        p = val.present[mod]
        with torch.no_grad():
            tr.model.eval()
            z = tr.model.pretrain_heads[mod](tr.model.encoders[mod](val.arrays[mod] * p.view(-1, 1).float()))
        acc = float((z.argmax(1)[p] == val.labels[p]).float().mean())
        assert got[mod] == pytest.approx(acc)
    tr.model.train()
    both = two_ranks(lambda: make(data=data), lambda t, _: member_val_scores(t.method, t.method.nets(["a", "b"])),
                     monkeypatch)
    assert both[0] == both[1] == pytest.approx(got)


def _scripted_scores(monkeypatch, script):
    """Replace the validation pass by a script of scores per epoch; record the weights it saw."""
    seen = []

    def fake(method, nets, metric="accuracy"):
        seen.append({m: nets[m][0].state_dict()["net.1.weight"].clone() for m in nets})
        return script[len(seen) - 1]

    monkeypatch.setattr(up, "member_val_scores", fake)
    return seen


@pytest.mark.parametrize("selection", ["best", "last"])
def test_member_selection_keeps_each_members_best_epoch(monkeypatch, selection):
    tr = make()
    script = [{"a": 0.5, "b": 0.2}, {"a": 0.9, "b": 0.3}, {"a": 0.7, "b": 0.3}, {"a": 0.9, "b": 0.8}]
    seen = _scripted_scores(monkeypatch, script)
    kept = pretrain_members(tr.method, tr.method.nets(["a", "b"]), 4, selection)
    assert len(seen) == 4
    now = tr.model.encoders
    if selection == "best":  # a: epoch 1 (first of the tie with epoch 3); b: epoch 3
        assert kept == {"a": (0.9, 1), "b": (0.8, 3)}
        assert torch.equal(now["a"].state_dict()["net.1.weight"], seen[1]["a"])
        assert torch.equal(now["b"].state_dict()["net.1.weight"], seen[3]["b"])
    else:
        assert kept == {"a": (0.9, 3), "b": (0.8, 3)}
        assert torch.equal(now["a"].state_dict()["net.1.weight"], seen[3]["a"])
    assert not torch.equal(seen[1]["a"], seen[3]["a"])  # the epochs did change the weights


def test_the_kept_epoch_is_logged_1_based_and_the_run_metric_scores_members(monkeypatch):
    """Scripted validation scores: a is kept at its epoch 2 (0-based 1), b at epoch 3; the scores
    logged are the final pass's; every validation pass uses the run's select_metric."""
    script = [{"a": 0.5, "b": 0.2}, {"a": 0.9, "b": 0.1}, {"a": 0.7, "b": 0.3}, {"a": 0.85, "b": 0.3}]
    metrics = []
    seen = []

    def fake(method, nets, metric="accuracy"):
        metrics.append(metric)
        seen.append(1)
        return {m: script[len(seen) - 1][m] for m in nets}

    monkeypatch.setattr(up, "member_val_scores", fake)
    tr = make(epochs=2, pretrain_epochs=3, over={"train.select_metric": "macro_f1"})
    tr.method.on_epoch_start(0)
    assert metrics == ["macro_f1"] * 4  # three stage-1 epochs and the final pass
    diag = tr.method.epoch_diagnostics()
    assert (diag["pretrain_epoch_a"], diag["pretrain_epoch_b"]) == (2.0, 3.0)
    assert (diag["pretrain_val_a"], diag["pretrain_val_b"]) == (0.85, 0.3)


def test_stage1_drops_a_trailing_batch_of_one_sample(monkeypatch):
    """49 samples, batch 16: three batches of 16 per stage-1 epoch, the single last sample dropped
    (BatchNorm cannot train on one), as the engine's own epochs."""
    sizes = []
    orig_step = up.member_step
    monkeypatch.setattr(up, "member_step",
                        lambda meth, nets, b: sizes.append(len(b["label"])) or orig_step(meth, nets, b))
    tr = make(epochs=1, pretrain_epochs=2, data=tiny_data(49, hidden=[8], dropout=0.0))
    tr.method.on_epoch_start(0)
    assert sizes == [16] * 6


def test_a_training_step_without_the_epoch_hooks_runs_stage1_first(monkeypatch):
    calls = []
    orig = up.pretrain_members
    monkeypatch.setattr(up, "pretrain_members", lambda *a, **k: calls.append(a[2]) or orig(*a, **k))
    tr = make(epochs=2, pretrain_epochs=1)
    batch = first_batch(tr)
    tr.model.train()
    tr.method.training_step(batch)
    assert calls == [1] and tr.method.stage1_done
    tr.method.training_step(batch)
    assert calls == [1]


def test_stage1_runs_once_for_pretrain_epochs_before_the_first_epoch(monkeypatch):
    calls = []
    orig = up.pretrain_members
    monkeypatch.setattr(up, "pretrain_members", lambda *a, **k: calls.append(a[2]) or orig(*a, **k))
    steps = []
    orig_step = up.member_step
    monkeypatch.setattr(up, "member_step", lambda *a: steps.append(1) or orig_step(*a))
    tr = make(epochs=2, pretrain_epochs=3)
    fusion_before = {k: v.clone() for k, v in tr.model.fusion.state_dict().items()}
    enc_before = tr.model.encoders["a"].state_dict()["net.1.weight"].clone()
    tr.method.on_epoch_start(0)
    assert calls == [3] and len(steps) == 3 * 3  # 48 samples, batch 16: 3 steps per epoch
    assert tr.method.stage1_done
    assert not torch.equal(tr.model.encoders["a"].state_dict()["net.1.weight"], enc_before)
    assert all(torch.equal(v, fusion_before[k]) for k, v in tr.model.fusion.state_dict().items())
    # the pretrained parameters' optimizer state is dropped: the fused stage starts fresh
    assert not any(p in tr.optimizer.state for p in tr.model.encoders.parameters())
    diag = tr.method.epoch_diagnostics()
    assert {"pretrain_val_a", "pretrain_val_b", "pretrain_epoch_a"} <= set(diag)
    assert 1 <= diag["pretrain_epoch_a"] <= 3
    tr.method.on_epoch_start(1)
    assert calls == [3]  # never again
    # default: as many stage-1 epochs as the run has
    tr = make(epochs=2)
    tr.method.on_epoch_start(0)
    assert calls == [3, 2]


def test_pretrain_epochs_zero_needs_every_modality_in_init_from(tmp_path):
    with pytest.raises(ConfigError, match="would start untrained"):
        make(pretrain_epochs=0)
    with pytest.raises(ConfigError, match="unknown modalities"):
        make(init_from={"c": str(tmp_path)})
    with pytest.raises(ConfigError, match="init_from' takes a mapping"):
        create_method("unimodal_pretrain", init_from="runs/a")
    with pytest.raises(ConfigError, match="encoder_lr_factor"):
        create_method("unimodal_pretrain", encoder_lr_factor=-1)
    with pytest.raises(ConfigError, match="member_selection"):
        create_method("unimodal_pretrain", member_selection="median")


# ----------------------------------------------------------------------------- fused stage
def _stage2(tr, batch):
    tr.method.stage1_done = True  # skip stage 1: the fused step alone
    tr.model.train()
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    grads = capture(tr, lambda: tr.method.training_step(batch))
    deltas = {n: p.detach() - before[n] for n, p in tr.model.named_parameters()}
    return grads, deltas


@pytest.mark.parametrize("policy", ["input", "feature"])
def test_fused_step_is_joint_cross_entropy(policy):
    """Joint training's step; with the feature absent policy the presence mask reaches the fusion."""
    over = {"model.absent_policy": policy}
    ref = make("joint", data=tiny_data(48, hidden=[8], dropout=0.0, missing=0.3), over=over)
    tr = make(data=tiny_data(48, hidden=[8], dropout=0.0, missing=0.3), over=over)
    own = {k: v for k, v in tr.model.state_dict().items() if not k.startswith("pretrain_heads.")}
    ref.model.load_state_dict(own)
    batch = first_batch(tr)
    with torch.no_grad():
        z_a = ref.model(batch["inputs"], batch["present"]).unimodal_logits["a"]
    g, d = _stage2(tr, batch)
    ref.model.train()
    g_ref = capture(ref, lambda: ref.method.training_step(batch))
    assert set(g) == set(g_ref)  # the member heads are not trained in the fused stage
    for n in g_ref:
        torch.testing.assert_close(g[n], g_ref[n])
    diag = tr.method.epoch_diagnostics()
    p = batch["present"]["a"]
    assert diag["ce_a"] == pytest.approx(float(F.cross_entropy(z_a[p], batch["label"][p])), rel=1e-4)


def test_encoder_lr_factor_is_a_per_parameter_learning_rate():
    """Three steps with factor 0.25 equal training with an optimizer whose encoder parameter
    group has lr * 0.25 (momentum and weight decay included); the first update is exactly a
    quarter of the factor-1 update for the encoders and identical for the fusion."""
    data = tiny_data(48, hidden=[8], dropout=0.0)
    a, b, ref = make(data=data), make(data=data, encoder_lr_factor=0.25), make(data=data)
    fast = make(data=data, encoder_lr_factor=2.0)  # a factor above 1 scales the update up
    b.model.load_state_dict(a.model.state_dict())
    ref.model.load_state_dict(a.model.state_dict())
    fast.model.load_state_dict(a.model.state_dict())
    enc = list(ref.model.encoders.parameters())
    rest = [p for n, p in ref.model.named_parameters() if not n.startswith("encoders.")]
    ref.optimizer = torch.optim.SGD([{"params": enc, "lr": 0.05 * 0.25}, {"params": rest, "lr": 0.05}],
                                    momentum=0.9, weight_decay=1e-3)
    batch = first_batch(a)
    _, da = _stage2(a, batch)
    _, db = _stage2(b, batch)
    _, dfast = _stage2(fast, batch)
    for n in da:
        if n.startswith("encoders."):
            torch.testing.assert_close(db[n], 0.25 * da[n], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(dfast[n], 2.0 * da[n], rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(db[n], da[n]), n
    _stage2(ref, batch)
    for _ in range(2):
        _stage2(b, batch)
        _stage2(ref, batch)
    for (n, p), q in zip(b.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=n)


def test_frozen_encoders_are_a_linear_probe():
    data = tiny_data(48, hidden=[8], dropout=0.5, batchnorm=True)
    tr = make(data=data, freeze_encoders=True)
    batch = first_batch(tr)
    stats = {k: v.clone() for k, v in tr.model.encoders.state_dict().items()}
    g, d = _stage2(tr, batch)
    assert g and all(n.startswith("fusion.") for n in g)
    assert all(torch.equal(v, stats[k]) for k, v in tr.model.encoders.state_dict().items())  # BN stats too
    assert not tr.model.encoders.training and tr.model.fusion.training


# ----------------------------------------------------------------------------- init_from
def _unimodal_run(tmp_path, modality, hidden=(8,), fusion_method="unimodal", **encoder_options):
    opts = {"method.modality": modality} if fusion_method == "unimodal" else {}
    cfg = load_config(None, {"train.epochs": 1, "method.name": fusion_method, "train.progress": "off",
                             "train.probe": False, "train.seed": 7, **opts})
    run = tmp_path / f"{fusion_method}_{modality}_{len(hidden)}"
    encoder_options = {"dropout": 0.0, **encoder_options}
    Trainer(cfg, run_dir=run, data=tiny_data(48, hidden=list(hidden), **encoder_options)).fit()
    return run


def test_init_from_copies_encoder_and_head(tmp_path):
    run_a = _unimodal_run(tmp_path, "a")
    saved = torch.load(run_a / "best.pt", weights_only=True)["model"]
    enc, head = read_run_weights(run_a, "a", "x")
    assert torch.equal(head["weight"], saved["fusion.fc.weight"]) and set(enc) == {"net.1.weight", "net.1.bias"}
    tr = make(fusion="late", init_from={"a": str(run_a)}, pretrain_epochs=1, init_heads=True)
    b_before = tr.model.encoders["b"].state_dict()["net.1.weight"].clone()
    tr.method.on_epoch_start(0)
    now = tr.model.state_dict()
    assert torch.equal(now["encoders.a.net.1.weight"], saved["encoders.a.net.1.weight"])
    assert torch.equal(now["pretrain_heads.a.weight"], saved["fusion.fc.weight"])
    assert torch.equal(now["fusion.heads.a.weight"], saved["fusion.fc.weight"])  # init_heads with late
    assert torch.equal(now["fusion.heads.b.weight"], now["pretrain_heads.b.weight"])
    assert not torch.equal(now["encoders.b.net.1.weight"], b_before)  # b pretrained in stage 1
    diag = tr.method.epoch_diagnostics()
    assert "pretrain_val_a" in diag and "pretrain_epoch_a" not in diag and "pretrain_epoch_b" in diag
    # every modality from runs: no stage 1 even with pretrain_epochs 0
    run_b = _unimodal_run(tmp_path, "b")
    tr = make(init_from={"a": str(run_a), "b": str(run_b)}, pretrain_epochs=0)
    tr.method.on_epoch_start(0)
    assert torch.equal(tr.model.state_dict()["encoders.b.net.1.weight"],
                       torch.load(run_b / "best.pt", weights_only=True)["model"]["encoders.b.net.1.weight"])


def test_init_from_errors(tmp_path):
    run_a = _unimodal_run(tmp_path, "a")
    with pytest.raises(ConfigError, match="does not exist"):
        make(init_from={"a": str(tmp_path / "nowhere")}).method.on_epoch_start(0)
    with pytest.raises(ConfigError, match="holds no 'b' encoder"):
        make(init_from={"b": str(run_a)}).method.on_epoch_start(0)
    wide = _unimodal_run(tmp_path, "a", hidden=(8, 4))
    with pytest.raises(ConfigError, match="does not fit"):
        make(init_from={"a": str(wide)}).method.on_epoch_start(0)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        make(init_from={"a": str(tmp_path / "junk")}).method.on_epoch_start(0)
    # a multimodal concat run has the encoder but no head of 'a' alone
    joint = _unimodal_run(tmp_path, "a", fusion_method="joint")
    enc, head = read_run_weights(joint, "a", "x")
    assert enc and head is None


def test_read_run_weights_of_odd_checkpoints(tmp_path):
    """A best.pt that is not a mapping is refused in one line; a head without a bias is not a
    member head (None: the member head stays as built)."""
    (tmp_path / "tensor").mkdir()
    torch.save(torch.zeros(3), tmp_path / "tensor" / "best.pt")
    with pytest.raises(ConfigError, match="holds no model weights"):
        read_run_weights(tmp_path / "tensor", "a", "x")
    (tmp_path / "nobias").mkdir()
    torch.save({"model": {"encoders.a.net.1.weight": torch.zeros(8, 5), "encoders.a.net.1.bias": torch.zeros(8),
                          "fusion.heads.a.weight": torch.ones(3, 8)}}, tmp_path / "nobias" / "best.pt")
    enc, head = read_run_weights(tmp_path / "nobias", "a", "x")
    assert set(enc) == {"net.1.weight", "net.1.bias"} and head is None


# ----------------------------------------------------------------------------- resume, runs
def test_state_round_trip_and_resume_skips_stage1(tmp_path):
    tr = make(epochs=2, pretrain_epochs=1)
    tr.method.on_epoch_start(0)
    state = tr.method.state_dict()
    assert state["stage1_done"] is True and set(state["pretrain_scores"]) == {"a", "b"}
    fresh = make(epochs=2, pretrain_epochs=1)
    fresh.method.load_state_dict(state)
    assert fresh.method.state_dict() == state
    w = fresh.model.encoders["a"].state_dict()["net.1.weight"].clone()
    fresh.method.on_epoch_start(1)
    assert torch.equal(fresh.model.encoders["a"].state_dict()["net.1.weight"], w)
    # a run stopped after epoch 1 and resumed equals an uninterrupted one
    base = {"train.epochs": 3, "method.name": "unimodal_pretrain", "train.progress": "off", "train.probe": False,
            "method.pretrain_epochs": 2, "train.batch_size": 16}
    data = tiny_data(48, hidden=[8], dropout=0.2, missing=0.3)
    full = Trainer(load_config(None, base), tmp_path / "full", data=data).fit()
    assert Trainer(load_config(None, {**base, "train.stop_after_epochs": 1}), tmp_path / "part", data=data).fit() is None
    part = Trainer(load_config(None, base), tmp_path / "part", resume=True, data=data).fit()
    assert part["test"] == full["test"] and part["best_epoch"] == full["best_epoch"]


@pytest.mark.parametrize("fusion,M", [("sum", 3), ("film", 2), ("shared_head", 2)])
def test_runs_with_fusions_and_modalities(fusion, M):
    mods = ("a", "b", "c")[:M]
    tr = make(fusion=fusion, epochs=2, pretrain_epochs=1, data=tiny_data(48, mods, hidden=[8], dropout=0.0))
    res = tr.fit()
    assert set(res["test"]["per_modality"]) == set(mods) and res["fusion"] == fusion
    assert math.isfinite(res["test"]["loss"])
