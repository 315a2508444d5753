"""UMT: the distillation term by hand (= nn.MSELoss), the student step against a hand-written
reference (CE + lambda * masked MSE; gradients reach the student only; teachers frozen in eval
mode), lambda = 0 is joint training, teachers trained once before the first epoch (the student
untouched) or loaded from runs, student_init, two simulated ranks, resume, fusions and M = 3."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.methods.umt import feature_distillation
from mmbalance.registry import ConfigError

from helpers import tiny_data
from test_unimodal_pretrain import capture, first_batch, two_ranks, _unimodal_run


def make(method="umt", fusion="concat", epochs=2, data=None, **opts):
    cfg = load_config(None, {"train.epochs": epochs, "method.name": method, "train.progress": "off",
                             "train.probe": False, "model.fusion": fusion, "train.batch_size": 16,
                             "optim.name": "sgd", "optim.momentum": 0.9, "optim.weight_decay": 1e-3,
                             "optim.lr": 0.05, **{f"method.{k}": v for k, v in opts.items()}})
    return Trainer(cfg, data=data if data is not None else tiny_data(48, hidden=[8], dropout=0.0))


def test_distillation_term_by_hand_and_mse_loss():
    s = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert feature_distillation(s, t).tolist() == pytest.approx([13 / 3, 5 / 3])
    assert float(feature_distillation(s, t).mean()) == pytest.approx(float(F.mse_loss(s, t)))
    with pytest.raises(ValueError, match="differ"):
        feature_distillation(s, t[:, :2])


def _student_step(tr, batch, reported=None):
    tr.method.stage1_done = True  # teachers as they are: the student's step alone
    tr.model.train()
    reported = {} if reported is None else reported
    return capture(tr, lambda: reported.update(tr.method.training_step(batch)))


def test_student_step_against_reference():
    lam = 0.7
    data = tiny_data(48, hidden=[8], dropout=0.5, batchnorm=True, missing=0.4)
    tr = make(data=data, lambda_distill=lam)
    batch = first_batch(tr)
    model = tr.model
    teach_state = {k: v.clone() for k, v in model.teachers.state_dict().items()}
    # reference: teachers in eval mode (no dropout, running BN statistics), student in train mode
    with torch.no_grad():
        model.teachers.eval()
        t = {m: model.teachers[m].encoder(batch["inputs"][m] * batch["present"][m].view(-1, 1).float())
             for m in ("a", "b")}
    model.train()
    torch.manual_seed(5)
    feats = model.encode_all(batch["inputs"], batch["present"])
    out = model.fuse(feats, batch["present"])
    loss = F.cross_entropy(out.logits, batch["label"])
    for m in ("a", "b"):
        p = batch["present"][m]
        loss = loss + lam * F.mse_loss(feats[m][p], t[m][p])
    model.zero_grad(set_to_none=True)
    loss.backward()
    ref = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks for the student
    reported = {}
    got = _student_step(tr, batch, reported)
    # what the step reports (the epoch's train losses in metrics.jsonl): the loss it stepped on
    assert float(reported["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(reported["loss_fused"]) == pytest.approx(float(F.cross_entropy(out.logits.detach(), batch["label"])), rel=1e-5)
    assert set(got) == set(ref) and not any(n.startswith("teachers.") for n in got)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)
    # the teachers ran in eval mode: their BatchNorm statistics did not move
    assert all(torch.equal(v, teach_state[k]) for k, v in model.teachers.state_dict().items())
    diag = tr.method.epoch_diagnostics()
    p = batch["present"]["a"]
    assert set(diag) == {"loss_fused", "mse_a", "mse_b"}
    assert diag["mse_a"] == pytest.approx(float(F.mse_loss(feats["a"][p].detach(), t["a"][p])), rel=1e-5)


def test_lambda_zero_is_joint_training():
    data = tiny_data(48, hidden=[8], dropout=0.0)
    tr, joint = make(data=data, lambda_distill=0.0), make("joint", data=data)
    joint.model.load_state_dict({k: v for k, v in tr.model.state_dict().items() if not k.startswith("teachers.")})
    batch = first_batch(tr)
    got = _student_step(tr, batch)
    joint.model.train()
    want = capture(joint, lambda: joint.method.training_step(batch))
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n])


def test_teachers_trained_once_before_the_first_epoch_student_untouched():
    tr = make(epochs=3, pretrain_epochs=2)
    student = {k: v.clone() for k, v in tr.model.state_dict().items() if not k.startswith("teachers.")}
    teachers = {k: v.clone() for k, v in tr.model.teachers.state_dict().items()}
    tr.method.on_epoch_start(0)
    now = tr.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in student.items())  # stage 1 trains the teachers only
    assert any(not torch.equal(now["teachers." + k], v) for k, v in teachers.items())
    assert not any(p in tr.optimizer.state for p in tr.model.teachers.parameters())
    diag = tr.method.epoch_diagnostics()
    assert {"teacher_val_a", "teacher_val_b", "teacher_epoch_a", "teacher_epoch_b"} <= set(diag)
    assert diag["teacher_epoch_a"] in (1.0, 2.0)
    again = {k: v.clone() for k, v in tr.model.teachers.state_dict().items()}
    tr.method.on_epoch_start(1)
    assert all(torch.equal(tr.model.teachers.state_dict()[k], v) for k, v in again.items())
    # the student's steps never move the teachers
    batch = first_batch(tr)
    tr.model.train()
    tr.method.training_step(batch)
    assert all(torch.equal(tr.model.teachers.state_dict()[k], v) for k, v in again.items())


def test_teachers_kept_at_their_best_epoch_by_default():
    """Default member_selection: each teacher ends at its best validation epoch, as a separate
    unimodal run's best.pt (here that differs from the last epoch for at least one teacher)."""
    def teachers(**opts):
        tr = make(pretrain_epochs=4, **opts)
        tr.method.on_epoch_start(0)
        return tr.model.teachers.state_dict(), tr.method.epoch_diagnostics()

    default, diag = teachers()
    best, _ = teachers(member_selection="best")
    last, _ = teachers(member_selection="last")
    assert all(torch.equal(v, best[k]) for k, v in default.items())
    assert any(not torch.equal(v, last[k]) for k, v in default.items())
    assert any(diag[f"teacher_epoch_{m}"] < 4 for m in ("a", "b"))


def test_teacher_scores_use_the_runs_select_metric():
    from mmbalance.methods.unimodal_pretrain import member_val_scores

    cfg = load_config(None, {"train.epochs": 2, "method.name": "umt", "train.progress": "off", "train.probe": False,
                             "train.batch_size": 16, "train.select_metric": "map", "method.pretrain_epochs": 1})
    tr = Trainer(cfg, data=tiny_data(48, hidden=[8], dropout=0.0))
    tr.method.on_epoch_start(0)
    diag = tr.method.epoch_diagnostics()
    nets = tr.method.nets(["a", "b"])
    want, acc = member_val_scores(tr.method, nets, "map"), member_val_scores(tr.method, nets, "accuracy")
    for m in ("a", "b"):
        assert diag[f"teacher_val_{m}"] == pytest.approx(want[m]) and want[m] != pytest.approx(acc[m])


def test_training_step_without_the_epoch_hooks_trains_the_teachers_first():
    tr = make(pretrain_epochs=1)
    teachers = {k: v.clone() for k, v in tr.model.teachers.state_dict().items()}
    tr.model.train()
    tr.method.training_step(first_batch(tr))  # no on_epoch_start: stage 1 runs before the step
    assert tr.method.stage1_done and "teacher_val_a" in tr.method.epoch_diagnostics()
    assert any(not torch.equal(v, teachers[k]) for k, v in tr.model.teachers.state_dict().items())


def test_student_init_teacher_copies_the_teacher_encoders():
    tr = make(pretrain_epochs=1, student_init="teacher")
    tr.method.on_epoch_start(0)
    for m in ("a", "b"):
        for k, v in tr.model.teachers[m].encoder.state_dict().items():
            assert torch.equal(tr.model.encoders[m].state_dict()[k], v)
    batch = first_batch(tr)
    tr.method.training_step(batch)  # distillation is zero at the start; the CE moves the student
    assert tr.method.epoch_diagnostics()["mse_a"] == 0.0


def test_teachers_from_runs(tmp_path):
    run_a = _unimodal_run(tmp_path, "a")
    saved = torch.load(run_a / "best.pt", weights_only=True)["model"]
    tr = make(teachers_from={"a": str(run_a)}, pretrain_epochs=1)
    tr.method.on_epoch_start(0)
    now = tr.model.state_dict()
    assert torch.equal(now["teachers.a.encoder.net.1.weight"], saved["encoders.a.net.1.weight"])
    assert torch.equal(now["teachers.a.head.weight"], saved["fusion.fc.weight"])
    diag = tr.method.epoch_diagnostics()
    assert "teacher_val_a" in diag and "teacher_epoch_a" not in diag and "teacher_epoch_b" in diag
    with pytest.raises(ConfigError, match="untrained teacher"):
        make(teachers_from={"a": str(run_a)}, pretrain_epochs=0)
    with pytest.raises(ConfigError, match="unknown modalities"):
        make(teachers_from={"v": str(run_a)})
    wide = _unimodal_run(tmp_path, "a", hidden=(8, 4))
    with pytest.raises(ConfigError, match="does not fit"):
        make(teachers_from={"a": str(wide)}).method.on_epoch_start(0)


def test_teachers_from_every_modality_trains_no_teacher(tmp_path):
    """Every teacher from a run: no stage 1 (pretrain_epochs left at its default, train.epochs)."""
    runs = {m: _unimodal_run(tmp_path, m) for m in ("a", "b")}
    tr = make(teachers_from={m: str(r) for m, r in runs.items()})
    tr.method.on_epoch_start(0)
    now = tr.model.state_dict()
    for m, r in runs.items():
        saved = torch.load(r / "best.pt", weights_only=True)["model"]
        assert torch.equal(now[f"teachers.{m}.encoder.net.1.weight"], saved[f"encoders.{m}.net.1.weight"])
        assert torch.equal(now[f"teachers.{m}.head.weight"], saved["fusion.fc.weight"])
    diag = tr.method.epoch_diagnostics()
    assert {"teacher_val_a", "teacher_val_b"} <= set(diag) and not any(k.startswith("teacher_epoch_") for k in diag)


def test_two_ranks_equal_one_process(monkeypatch):
    data = tiny_data(64, hidden=[8], dropout=0.0, missing={"b": 0.8}, seed=2)
    single = make(data=data, lambda_distill=2.0)
    single.method.stage1_done = True
    with torch.no_grad():  # teachers unlike the student, so that the term matters
        for p in single.model.teachers.parameters():
            p.add_(0.3)
    state = {k: v.clone() for k, v in single.model.state_dict().items()}
    batch = first_batch(single, n=32)
    assert batch["present"]["b"][0::2].sum() != batch["present"]["b"][1::2].sum()
    expected = _student_step(single, batch)
    diag = single.method.epoch_diagnostics()

    def fresh():
        tr = make(data=data, lambda_distill=2.0)
        tr.model.load_state_dict(state)
        return tr

    def run(tr, shard):
        return _student_step(tr, shard), tr.method.epoch_diagnostics()

    got = two_ranks(fresh, run, monkeypatch, batch)
    for n in expected:
        torch.testing.assert_close((got[0][0][n] + got[1][0][n]) / 2, expected[n], rtol=1e-5, atol=1e-6)
    assert got[0][1] == got[1][1] == pytest.approx(diag)


def test_state_round_trip_and_resume(tmp_path):
    tr = make(pretrain_epochs=1)
    tr.method.on_epoch_start(0)
    state = tr.method.state_dict()
    other = make(pretrain_epochs=1)
    other.method.load_state_dict(state)
    assert other.method.state_dict() == state and other.method.stage1_done
    base = {"train.epochs": 3, "method.name": "umt", "train.progress": "off", "train.probe": False,
            "method.pretrain_epochs": 2, "train.batch_size": 16}
    data = tiny_data(48, hidden=[8], dropout=0.2, missing=0.3)
    full = Trainer(load_config(None, base), tmp_path / "full", data=data).fit()
    assert Trainer(load_config(None, {**base, "train.stop_after_epochs": 2}), tmp_path / "part", data=data).fit() is None
    part = Trainer(load_config(None, base), tmp_path / "part", resume=True, data=data).fit()
    assert part["test"] == full["test"] and part["best_epoch"] == full["best_epoch"]


@pytest.mark.parametrize("fusion,M", [("late", 3), ("gated", 2), ("film", 3)])
def test_runs_with_fusions_and_modalities(fusion, M):
    mods = ("a", "b", "c")[:M]
    res = make(fusion=fusion, pretrain_epochs=1, data=tiny_data(48, mods, hidden=[8], dropout=0.0)).fit()
    assert set(res["test"]["per_modality"]) == set(mods) and math.isfinite(res["test"]["loss"])
