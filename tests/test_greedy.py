"""Greedy: MMTM shapes and running means, the re-balancing controller by hand, two modalities only;
the training step against a hand-written reference (sum of the branch losses), the unlock epoch,
resume."""
import math

import pytest
import torch

from mmbalance.config import load_config
from mmbalance.engine.trainer import Trainer, to_device
from mmbalance.methods.greedy import MMTM, Greedy, GreedyModel, bdr, greedy_controller, initial_controller_state
from mmbalance.models import create_encoder
from mmbalance.registry import ConfigError
from helpers import tiny_data as make_tiny_data


def tiny_data(n=32, mods=("a", "b")):
    return make_tiny_data(n, mods, n_eval=9, hidden=[8, 6], dropout=0.0)


def make(data=None, **opts):
    o = {f"method.{k}": v for k, v in opts.items()}
    cfg = load_config(None, {"train.epochs": 1, "method.name": "greedy", "train.progress": "off",
                             "train.probe": False, "train.batch_size": 8, **o})
    return Trainer(cfg, data=data or tiny_data())


def test_mmtm_shapes_excitation_and_running_means():
    torch.manual_seed(0)
    block = MMTM(8, 6, reduction=4)
    assert block.fc_squeeze.out_features == int(2 * 14 / 4)
    s_a, s_b = torch.randn(4, 8), torch.randn(4, 6)
    e_a, e_b = block(s_a, s_b)
    assert e_a.shape == (4, 8) and e_b.shape == (4, 6)
    assert ((e_a > 0) & (e_a < 2)).all()  # 2 * sigmoid
    # each running mean comes from its own modality (the official code fed modality 0's into both)
    torch.testing.assert_close(block.running_0, e_a.detach().mean(0))
    torch.testing.assert_close(block.running_1, e_b.detach().mean(0))
    e_a2, e_b2 = block(2 * s_a, s_b)
    torch.testing.assert_close(block.running_0, (e_a.mean(0) + e_a2.mean(0)).detach() / 2)
    # caring = 1: modality 1's excitation is its (detached) running mean, modality 0's is live
    e_a3, e_b3 = block(s_a, s_b, caring=1)
    assert torch.equal(e_b3, block.running_1.expand(4, 6)) and not e_b3.requires_grad
    assert e_a3.requires_grad
    block.eval()
    steps = int(block.steps)
    block(s_a, s_b)
    assert int(block.steps) == steps  # evaluation passes leave the running means alone
    plain = MMTM(8, 6, excitation="sigmoid")
    assert (plain(s_a, s_b)[0] < 1).all()


def test_greedy_model_resnet_shapes():
    torch.manual_seed(0)
    shapes = {"audio": (1, 32, 32), "visual": (3, 2, 32, 32)}
    encs = {"audio": create_encoder("resnet18_audio", shapes["audio"], width=4),
            "visual": create_encoder("resnet18_visual", shapes["visual"], width=4)}
    model = GreedyModel(encs, 5, shapes)
    assert list(model.mmtm) == ["layer2", "layer3", "layer4"]
    assert model.mmtm["layer3"].fc_excite[0].out_features == 16 and model.mmtm["layer4"].fc_excite[1].out_features == 32
    x = {m: torch.randn(3, *s) for m, s in shapes.items()}
    out = model(x)
    assert out.logits.shape == (3, 5) and out.features["visual"].shape == (3, 32)
    torch.testing.assert_close(out.logits, (out.unimodal_logits["audio"] + out.unimodal_logits["visual"]) / 2)
    out.logits.sum().backward()
    assert model.mmtm["layer2"].fc_squeeze.weight.grad is not None
    model.eval()
    assert model.encode("visual", x["visual"]).shape == (3, 32)
    with pytest.raises(ConfigError):
        GreedyModel(encs, 5, shapes, mmtm_stages=["layer9"])


def test_controller_by_hand():
    st = initial_controller_state()
    # speeds [bypass_0, bypass_1, main_0, main_1]: BDR_0 = log10(1e-3/1e-2) = -1, BDR_1 = log10(1e-3/1e-1) = -2
    speeds = [1e-3, 1e-3, 1e-2, 1e-1]
    locked = greedy_controller(st, speeds, unlocked=False, epsilon=0.01, window=3)
    assert not locked["curating"] and locked["d"] == pytest.approx(1.0) and locked["acc"] == speeds
    assert st["acc"] == [0.0] * 4  # pure: input untouched
    s = greedy_controller(st, speeds, unlocked=True, epsilon=0.01, window=3)
    assert s["curating"] and s["caring"] == 0 and s["step"] == 0  # d > 0: care for modality 0
    for k in range(3):  # three curated steps: nothing accumulated, then back to normal
        assert s["curating"]
        s = greedy_controller(s, None, unlocked=True, epsilon=0.01, window=3)
    assert not s["curating"] and s["acc"] == speeds
    # d < 0 cares for modality 1; |d| <= epsilon leaves training alone
    s = greedy_controller(initial_controller_state(), [1e-3, 1e-3, 1e-1, 1e-2], True, 0.01, 3)
    assert s["caring"] == 1 and s["d"] == pytest.approx(-1.0)
    s = greedy_controller(initial_controller_state(), [1e-3, 1.01e-3, 1e-2, 1e-2], True, 0.01, 3)
    assert not s["curating"] and abs(s["d"]) == pytest.approx(abs(math.log10(1 / 1.01)))
    assert bdr(1e-3, 1e-2) == pytest.approx(-1.0)


def test_options_are_typed_one_line_errors():
    from mmbalance.methods import create_method

    for bad, msg in ((dict(excitation="tanh"), "'excitation' takes one of 'sigmoid', '2sigmoid', got 'tanh'"),
                     (dict(window=0), "'window' takes an integer >= 1, got 0"),
                     (dict(start_epoch=-1), "'start_epoch' takes an integer >= 0, got -1"),
                     (dict(epsilon=-0.1), "'epsilon' takes a number >= 0, got -0.1"),
                     (dict(reduction=0), "'reduction' takes a number > 0, got 0")):
        with pytest.raises(ConfigError) as e:
            create_method("greedy", **bad)
        assert str(e.value) == f"method 'greedy' option {msg}"
    assert create_method("greedy", mmtm_stages="hidden1, hidden2").mmtm_stages == ["hidden1", "hidden2"]
    with pytest.raises(ValueError, match="excitation"):
        MMTM(4, 4, excitation="tanh")


def test_two_modalities_only():
    with pytest.raises(ConfigError, match="two modalities"):
        Greedy().modalities(["a", "b", "c"])
    with pytest.raises(ConfigError, match="two modalities"):
        make(data=tiny_data(mods=("a", "b", "c")))


def test_training_step_mlp_and_curation():
    tr = make(start_epoch=0, epsilon=0.0, window=2)
    m = tr.method
    assert list(tr.model.mmtm) == ["hidden1", "hidden2"]
    loader = tr.loader(tr.data.train, shuffle=True, batch_size=8)
    tr.model.train()
    for batch in loader:
        m.training_step(to_device(batch, tr.device))
    diag = m.epoch_diagnostics()
    # epsilon 0: decide, curate 2 steps, decide, ... -> 2 of the 4 steps curated
    assert diag["rebalance_frac"] == pytest.approx(0.5)
    assert diag["caring_a"] + diag["caring_b"] == pytest.approx(0.5)
    assert {"bdr_a", "bdr_b", "bdr_diff"} <= set(diag)
    assert tr.model.curation is None
    st = m.state_dict()
    m.controller = initial_controller_state()
    m.load_state_dict(st)
    assert m.controller["acc"] == st["controller"]["acc"]


# ---------------------------------------------------------------------------------- the training step
from mmbalance.cli import main  # noqa: E402
from mmbalance.methods.greedy import branch_denominators, greedy_branch_losses  # noqa: E402
from helpers import capture_step_grads  # noqa: E402

import copy  # noqa: E402
import json  # noqa: E402

import torch.nn.functional as F  # noqa: E402

MODS = ("a", "b")
STAGES = ("hidden1", "hidden2")


def test_branch_losses_by_hand():
    z0 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    z1 = torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 1])
    ce = lambda z, i: float(-torch.log_softmax(z[i], 0)[y[i]])  # noqa: E731
    both = torch.tensor([True, True])
    t = greedy_branch_losses([z0, z1], y, [both, both], [2.0, 2.0])
    # all present: each term is the batch-mean CE of its own head (the sum is the loss, not CE of the mean)
    assert float(t[0]) == pytest.approx((ce(z0, 0) + ce(z0, 1)) / 2)
    assert float(t[1]) == pytest.approx((ce(z1, 0) + ce(z1, 1)) / 2)
    fused = float(F.cross_entropy((z0 + z1) / 2, y))
    assert float(t[0] + t[1]) != pytest.approx(fused)
    # modality 1 absent for sample 0: its branch is trained on sample 1 only (share of 1 sample)
    t = greedy_branch_losses([z0, z1], y, [both, torch.tensor([False, True])], [2.0, 1.0])
    assert float(t[1]) == pytest.approx(ce(z1, 1))
    assert float(t[0]) == pytest.approx((ce(z0, 0) + ce(z0, 1)) / 2)


def test_branch_denominators_are_each_process_share_of_the_global_count():
    d = branch_denominators(torch.tensor([16.0, 1.0, 0.0]), 2)
    assert d.tolist() == [8.0, 0.5, 0.5]  # one present sample over two processes: 0.5 each
    assert branch_denominators(torch.tensor([5.0, 0.0]), 1).tolist() == [5.0, 1.0]


def _batch(tr, seed=0):
    return to_device(next(iter(tr.loader(tr.data.train, shuffle=True, batch_size=16, seed=seed))), tr.device)


def reference_step(model, batch, caring=None):
    """The Greedy loss and gradients written out by hand for the MLP GreedyModel (two stages
    Linear -> ReLU -> MMTM, one linear head per branch), from copies of the weights."""
    P = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    buf = {n: b.detach().clone() for n, b in model.named_buffers()}
    x, y, pres = batch["inputs"], batch["label"], batch["present"]
    h = {m: x[m] * pres[m][:, None].float() for m in MODS}
    running = {}
    for i, stage in enumerate(STAGES):
        k = 2 * i + 1  # net = [Flatten, Linear, ReLU, Linear, ReLU]
        h = {m: F.relu(F.linear(h[m], P[f"encoders.{m}.net.{k}.weight"], P[f"encoders.{m}.net.{k}.bias"])) for m in MODS}
        pre = f"mmtm.{stage}."
        s = F.relu(F.linear(torch.cat([h["a"], h["b"]], 1), P[pre + "fc_squeeze.weight"], P[pre + "fc_squeeze.bias"]))
        e = [2 * torch.sigmoid(F.linear(s, P[pre + f"fc_excite.{j}.weight"], P[pre + f"fc_excite.{j}.bias"]))
             for j in range(2)]
        n = float(buf[pre + "steps"])
        running[stage] = [(e[j].detach().mean(0) + buf[pre + f"running_{j}"] * n) / (n + 1) for j in range(2)]
        if caring is not None:  # the cared-for branch gets its running mean excitation, detached
            e[caring] = running[stage][caring].expand_as(e[caring])
        h = {"a": h["a"] * e[0], "b": h["b"] * e[1]}
    z = {m: F.linear(h[m], P[f"fusion.heads.{m}.weight"], P[f"fusion.heads.{m}.bias"]) for m in MODS}
    loss = sum((F.cross_entropy(z[m], y, reduction="none") * pres[m].float()).sum() / pres[m].sum() for m in MODS)
    names = list(P)
    grads = torch.autograd.grad(loss, [P[n] for n in names], allow_unused=True)
    return float(loss.detach()), {n: g for n, g in zip(names, grads) if g is not None}, running


@pytest.mark.parametrize("caring", [None, 0, 1])
@pytest.mark.parametrize("missing", [0.0, 0.5])
def test_training_step_matches_hand_written_reference(caring, missing):
    tr = make(data=make_tiny_data(32, MODS, n_eval=9, hidden=[8, 6], dropout=0.0, missing=missing),
              start_epoch=99)
    m = tr.method
    tr.model.train()
    for seed in (1, 2):  # non-trivial running means and weights first
        m.training_step(_batch(tr, seed))
    batch = _batch(tr, 3)
    m.epoch_diagnostics()  # forget the warm-up steps' logs
    if caring is not None:
        m.controller = {**m.controller, "curating": True, "caring": caring, "step": 0}
    acc_before = list(m.controller["acc"])
    loss, ref, running = reference_step(tr.model, batch, caring)
    grads = capture_step_grads(tr, batch)
    # the same parameters get a gradient (the cared-for excitation FC none) and the same values
    assert set(grads) == set(ref)
    if caring is not None:
        assert not any(f"fc_excite.{caring}." in n for n in grads)
        assert all(f"mmtm.{s}.fc_excite.{1 - caring}.weight" in grads for s in STAGES)
    for n, g in ref.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-5, atol=1e-7, msg=n)
    diag = m.epoch_diagnostics()
    assert diag["rebalance_frac"] == (0.0 if caring is None else 1.0)
    assert [diag["caring_a"], diag["caring_b"]] == [float(caring == 0), float(caring == 1)]
    assert diag["loss_a"] + diag["loss_b"] == pytest.approx(loss, rel=1e-6)  # the sum of the branch CEs
    for s in STAGES:  # running means: this batch's excitation folded in (also during curation)
        torch.testing.assert_close(tr.model.mmtm[s].running_0, running[s][0])
        torch.testing.assert_close(tr.model.mmtm[s].running_1, running[s][1])
    if caring is not None:  # a curated step counts towards the window and accumulates no speed
        assert m.controller["step"] == 1 and m.controller["acc"] == acc_before
    else:
        assert m.controller["acc"] != acc_before


def test_step_speeds_accumulate_the_right_parameter_groups():
    tr = make(start_epoch=99)
    tr.model.train()
    batch = _batch(tr)
    w = {n: p.detach().clone() for n, p in tr.model.named_parameters()}  # speeds use pre-step weights
    g = capture_step_grads(tr, batch)

    def speed(select):
        names = [n for n in w if select(n)]
        assert names
        return sum(float(g[n].pow(2).sum()) for n in names) / sum(float(w[n].pow(2).sum()) for n in names)

    bypass = [speed(lambda n, j=j: n.startswith("mmtm.") and ("fc_squeeze" in n or f"fc_excite.{j}." in n))
              for j in range(2)]
    main_ = [speed(lambda n, m=m: n.startswith(f"encoders.{m}.") or n.startswith(f"fusion.heads.{m}.")) for m in MODS]
    acc = tr.method.controller["acc"]
    assert acc == pytest.approx(bypass + main_, rel=1e-5)
    d = math.log10(bypass[0] / main_[0]) - math.log10(bypass[1] / main_[1])
    assert tr.method.controller["d"] == pytest.approx(d, rel=1e-5)
    # the diagnostics: BDR_m = log10(bypass_m / main_m) of each branch, and their difference
    diag = tr.method.epoch_diagnostics()
    assert diag["bdr_a"] == pytest.approx(math.log10(bypass[0] / main_[0]), rel=1e-5)
    assert diag["bdr_b"] == pytest.approx(math.log10(bypass[1] / main_[1]), rel=1e-5)
    assert diag["bdr_diff"] == pytest.approx(d, rel=1e-5)


@pytest.mark.parametrize("start", [1, 2])
def test_rebalancing_unlocks_at_start_epoch(start):
    """0-based ``start_epoch`` (default 1 = the official 1-based ``starting_epoch=2``): the
    epoch before it never re-balances, its first step may decide to."""
    assert Greedy().start_epoch == 1
    opts = {"epsilon": 0.0, "window": 1}
    if start != 1:
        opts["start_epoch"] = start
    tr = make(**opts)
    m = tr.method
    tr.model.train()
    tr.epoch = start - 1
    for seed in (1, 2, 3):
        m.training_step(_batch(tr, seed))
        assert not m.controller["curating"]
    tr.epoch = start
    m.training_step(_batch(tr, 4))
    assert m.controller["curating"]  # decided at the first step of the first unlocked epoch
    m.training_step(_batch(tr, 5))  # ... and the next step is curated (window 1), then released
    assert not m.controller["curating"]
    assert m.epoch_diagnostics()["rebalance_frac"] == pytest.approx(1 / 5)


def test_state_round_trip_gives_the_same_next_step():
    tr = make(start_epoch=0, epsilon=0.0, window=3)
    tr.model.train()
    for seed in (1, 2, 3):
        tr.method.training_step(_batch(tr, seed))
    assert tr.method.controller["curating"]  # stopped inside a re-balancing window
    state = {"model": copy.deepcopy(tr.model.state_dict()), "optimizer": copy.deepcopy(tr.optimizer.state_dict()),
             "method": copy.deepcopy(tr.method.state_dict())}
    fresh = make(start_epoch=0, epsilon=0.0, window=3)
    fresh.model.load_state_dict(state["model"])
    fresh.optimizer.load_state_dict(state["optimizer"])
    fresh.method.load_state_dict(state["method"])
    fresh.model.train()
    batch = _batch(tr, 4)
    g1, g2 = capture_step_grads(tr, batch), capture_step_grads(fresh, batch)
    assert set(g1) == set(g2) and all(torch.equal(g1[n], g2[n]) for n in g1)
    assert tr.method.controller == fresh.method.controller
    for (n, a), (_, b) in zip(tr.model.state_dict().items(), fresh.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_resume_equals_uninterrupted_and_contract(tmp_path):
    """The common resume test (tests/test_methods_common.py) for greedy, on the embedded data
    (MLP branches): stopped after 2 of 3 epochs (re-balancing active from the second), resumed."""
    common = ["-q", "train", "--method", "greedy", "--epochs", "3", "--train.progress", "off",
              "--train.probe", "false", "--train.eval_batch_size", "512"]
    assert main([*common, "--output-dir", str(tmp_path / "full")]) == 0
    assert main([*common, "--output-dir", str(tmp_path / "part"), "--train.stop_after_epochs", "2"]) == 0
    assert main(["-q", "train", "--resume", str(tmp_path / "part"), "--train.progress", "off"]) == 0
    lines = {k: [json.loads(x) for x in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
             for k in ("full", "part")}
    assert len(lines["part"]) == 3
    assert [x["val"] for x in lines["full"]] == [x["val"] for x in lines["part"]]
    assert [x["diagnostics"] for x in lines["full"]] == [x["diagnostics"] for x in lines["part"]]
    assert lines["full"][0]["diagnostics"]["rebalance_frac"] == 0.0  # epoch 1: locked
    assert lines["full"][1]["diagnostics"]["rebalance_frac"] > 0.0  # epoch 2: re-balancing
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    part = json.loads((tmp_path / "part" / "results.json").read_text())
    assert full["test"] == part["test"] and full["best_epoch"] == part["best_epoch"]
    assert full["method"] == "greedy" and full["fusion"] == "late" and 0.0 <= full["test"]["accuracy"] <= 1.0
    assert main(["-q", "evaluate", "--run", str(tmp_path / "full"), "--train.progress", "off"]) == 0
    again = json.loads((tmp_path / "full" / "evaluation.json").read_text())
    assert again["test"] == full["test"] and again["val"] == full["val"]


# ---------------------------------------------------------------------------------- mutation-testing additions
def test_bdr_of_a_group_without_speed_is_zero():
    """A speed of 0 (no gradient reached the group yet) gives BDR 0, not a math error."""
    assert bdr(0.0, 1e-2) == 0.0 and bdr(1e-3, 0.0) == 0.0 and bdr(0.0, 0.0) == 0.0


def test_resnet_stem_mmtm_uses_the_stem_width():
    torch.manual_seed(0)
    shapes = {"audio": (1, 32, 32), "visual": (3, 2, 32, 32)}
    encs = {"audio": create_encoder("resnet18_audio", shapes["audio"], width=4),
            "visual": create_encoder("resnet18_visual", shapes["visual"], width=4)}
    model = GreedyModel(encs, 5, shapes, mmtm_stages=["stem", "layer4"])
    assert list(model.mmtm) == ["stem", "layer4"]
    assert [fc.out_features for fc in model.mmtm["stem"].fc_excite] == [4, 4]  # conv1 / bn1 width
    assert [fc.out_features for fc in model.mmtm["layer4"].fc_excite] == [32, 32]
    out = model({m: torch.randn(2, *s) for m, s in shapes.items()})
    assert out.logits.shape == (2, 5)


def _mlp_model(policy="input", shape=(5,), seed=0):
    torch.manual_seed(seed)
    encs = {m: create_encoder("mlp", shape, hidden=[8, 6], dropout=0.0) for m in MODS}
    model = GreedyModel(encs, 3, {m: shape for m in MODS}, absent_policy=policy)
    return model.eval()


def test_mlp_branch_flattens_inputs_of_several_dimensions_like_the_encoder():
    flat, grid = _mlp_model(shape=(6,)), _mlp_model(shape=(2, 3))
    grid.load_state_dict(flat.state_dict())
    x = {m: torch.randn(4, 2, 3) for m in MODS}
    with torch.no_grad():
        a, b = grid(x), flat({m: v.reshape(4, 6) for m, v in x.items()})
    torch.testing.assert_close(a.logits, b.logits)


def test_greedy_model_applies_the_absent_policy():
    """``input``: an absent sample's input is zeroed, whatever the batch holds (also through
    ``encode(m, x, present)``); ``feature``: its squeezed vector is zeroed before every MMTM, so
    the present branch does not depend on it, and its final feature is zeroed before the heads."""
    g = torch.Generator().manual_seed(1)
    x = {m: torch.randn(6, 5, generator=g) for m in MODS}
    present = {"a": torch.ones(6, dtype=torch.bool), "b": torch.tensor([False, False, True, True, False, True])}
    other = {**x, "b": torch.where(present["b"][:, None], x["b"], torch.randn(6, 5, generator=g) * 3)}
    zeroed = {**x, "b": x["b"] * present["b"][:, None]}
    model = _mlp_model("input")
    with torch.no_grad():
        torch.testing.assert_close(model(other, present).logits, model(zeroed, present).logits)
        torch.testing.assert_close(model.encode("b", other["b"], present["b"]), model.encode("b", zeroed["b"]))
        assert not torch.allclose(model.encode("b", other["b"]), model.encode("b", zeroed["b"]))
    model = _mlp_model("feature")
    absent = ~present["b"]
    with torch.no_grad():
        out, out2 = model(x, present), model(other, present)
        torch.testing.assert_close(out.features["a"], out2.features["a"])
        torch.testing.assert_close(out.logits, out2.logits)
        assert torch.equal(out.features["b"][absent], torch.zeros(int(absent.sum()), 6))
        heads = model.fusion.heads
        torch.testing.assert_close(out.logits, (heads["a"](out.features["a"]) + heads["b"](out.features["b"])) / 2)
        full = model(x)  # nothing absent: the other branch's input matters
        assert not torch.allclose(full.features["a"][absent], out.features["a"][absent])


def test_another_fusion_is_replaced_with_a_warning(warnings_of_mmbalance):
    records = warnings_of_mmbalance
    for fusion, warned in (("sum", True), (None, False)):
        over = {"train.epochs": 1, "method.name": "greedy", "train.progress": "off", "train.probe": False}
        if fusion is not None:
            over["model.fusion"] = fusion
        records.clear()
        tr = Trainer(load_config(None, over), data=tiny_data())
        assert isinstance(tr.model, GreedyModel)
        assert any("fusion 'sum' is ignored" in r.getMessage() for r in records) == warned
