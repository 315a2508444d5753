"""QMF: confidence fusion formula, ranking loss by hand (zero when the confidence order matches
the loss-history order), history keyed by dataset index (shuffle invariance), training run."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmbalance.engine import Trainer
from mmbalance.methods.qmf import LossHistory, energy_confidence, minmax_normalise, qmf_fuse, qmf_rank_loss
from mmbalance.registry import ConfigError

from simulated_ranks import two_rank_step_grads
from helpers import quick_config


def test_fused_logits_follow_the_formula():
    torch.manual_seed(0)
    za, zv = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    z, w = qmf_fuse({"a": za, "v": zv}, temperature=10.0)
    wa = torch.log(torch.exp(za).sum(1, keepdim=True)) / 10
    wv = torch.log(torch.exp(zv).sum(1, keepdim=True)) / 10
    assert torch.allclose(w["a"], wa) and torch.allclose(w["v"], wv)
    assert torch.allclose(z, wa * za + wv * zv, atol=1e-6)
    # weights not detached: the gradient includes d(w_a)/d(z_a); detached: it does not
    z.sum().backward()
    g_full = za.grad.clone()
    za.grad = None
    zd, _ = qmf_fuse({"a": za, "v": zv}, temperature=10.0, detach_weights=True)
    zd.sum().backward()
    assert torch.allclose(za.grad, wa.detach().expand(4, 3))
    assert not torch.allclose(g_full, za.grad)
    assert torch.allclose(energy_confidence(torch.tensor([[1.0, 1.0, 1.0]]), 2.0), torch.tensor([[(1 + math.log(3)) / 2]]))


def test_rank_loss_by_hand():
    # pairs (0,1), (1,2), (2,0); hist L = [0.9, 0.1, 0.5]
    hist = torch.tensor([0.9, 0.1, 0.5])
    w = torch.tensor([0.8, 0.2, 0.5])
    # pair (0,1): t=+1, margin 0.8 -> max(0, 0.8 - 0.2 - 0.8) = 0
    # pair (1,2): t=-1, margin 0.4 -> max(0, 0.5 - 0.2 - 0.4) = 0
    # pair (2,0): t=-1, margin 0.4 -> max(0, 0.8 - 0.5 - 0.4) = 0
    assert float(qmf_rank_loss(w, hist)) == 0.0
    w = torch.tensor([1.5, 0.2, 0.5])
    # (0,1): max(0, 1.5-0.2-0.8)=0.5; (1,2): 0; (2,0): max(0, 1.5-0.5-0.4)=0.6 -> mean 1.1/3
    assert math.isclose(float(qmf_rank_loss(w, hist)), 1.1 / 3, rel_tol=1e-6)
    # equals torch's MarginRankingLoss written as in the release
    t = torch.sign(hist - torch.roll(hist, -1))
    ref = F.margin_ranking_loss(w, torch.roll(w, -1) + (hist - torch.roll(hist, -1)).abs() / t, -t)
    assert math.isclose(float(qmf_rank_loss(w, hist)), float(ref), rel_tol=1e-6)


def test_rank_loss_zero_when_confidence_order_matches_history_order():
    """'Matches': the sample with the larger history loss never has the larger confidence
    (confidence is a decreasing function of history loss) -> loss 0 for any margins."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        hist = torch.rand(32, generator=g)
        for w in (1.0 - 2.0 * hist, -hist**3, torch.exp(-5 * hist)):  # decreasing in the history loss
            assert float(qmf_rank_loss(w, hist)) == 0.0
        # inverted order (confidence grows with history loss) beyond the margin slack: positive
        assert float(qmf_rank_loss(3.0 * hist, hist)) > 0.0
    # ties in the history give t = 0: no loss whatever the confidences
    assert float(qmf_rank_loss(torch.tensor([5.0, -5.0]), torch.tensor([0.3, 0.3]))) == 0.0


def test_minmax_normalise_flat_history_is_zero():
    assert minmax_normalise(torch.tensor([2.0]), torch.tensor([2.0, 2.0])).tolist() == [0.0]
    assert torch.allclose(minmax_normalise(torch.tensor([3.0]), torch.tensor([1.0, 5.0])), torch.tensor([0.5]))


def test_history_is_keyed_by_dataset_index_shuffle_invariant():
    n = 10
    losses = torch.arange(n, dtype=torch.float32) * 0.1 + 1.0
    a, b = LossHistory(["x"], n), LossHistory(["x"], n)
    for perm in (torch.arange(n), torch.randperm(n, generator=torch.Generator().manual_seed(3))):
        for chunk in perm.split(3):
            a.update("x", chunk, losses[chunk])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(5))
    b.update("x", order, losses[order])
    b.update("x", order.flip(0), losses[order.flip(0)])
    assert torch.allclose(a.values["x"], 2 * losses.double())
    assert torch.allclose(a.values["x"], b.values["x"])
    assert torch.allclose(a.normalised("x", torch.tensor([0, 9])), torch.tensor([0.0, 1.0]))


def _cfg(**over):
    return quick_config("qmf", epochs=2, **over)


def test_training_history_predict_and_resume_state():
    tr = Trainer(_cfg(**{"train.epochs": 1}))
    assert type(tr.model.fusion).__name__ == "LateFusion"  # concat default -> late heads
    res = tr.fit()
    assert 0.0 <= res["test"]["accuracy"] <= 1.0
    hist = tr.method.history.values
    n = len(tr.data.train)
    for m in ("pix", "fou"):
        assert hist[m].shape == (n,) and bool((hist[m] > 0).all())  # every sample seen once
    # the history equals the per-sample CE summed over the epoch: bounded by a plausible range
    st = tr.method.state_dict()
    tr2 = Trainer(_cfg(**{"train.epochs": 1}))
    tr2.method.load_state_dict(st)
    assert torch.equal(tr2.method.history.values["pix"].cpu(), st["history"]["pix"].double())
    # predict = confidence-weighted sum of the unimodal logits
    batch = next(iter(tr.loader(tr.data.val, batch_size=16)))
    tr.model.eval()
    with torch.no_grad():
        out = tr.method.predict(batch)
        z = sum(energy_confidence(out.unimodal_logits[m], 10.0) * out.unimodal_logits[m] for m in ("pix", "fou"))
    assert torch.allclose(out.logits, z, atol=1e-5)


def test_three_modalities_and_fusion_rules():
    Trainer(_cfg(**{"dataset.options": {"modalities": ["pix", "fou", "zer"]}, "train.epochs": 1,
                    "model.fusion": "sum"})).fit()
    with pytest.raises(ConfigError, match="qmf needs per-modality classifiers"):
        Trainer(_cfg(**{"model.fusion": "film"}))


def test_options_are_typed_one_line_errors():
    from mmbalance.methods import create_method

    for bad, msg in (({"temperature": 0}, "'temperature' takes a number > 0, got 0"),
                     ({"lambda_rank": -0.1}, "'lambda_rank' takes a number >= 0, got -0.1"),
                     ({"detach_weights": "sometimes"}, "'detach_weights' takes true/false, got 'sometimes'")):
        with pytest.raises(ConfigError) as e:
            create_method("qmf", **bad)
        assert str(e.value) == f"method 'qmf' option {msg}"
    m = create_method("qmf", temperature="5", detach_weights="true")
    assert (m.temperature, m.detach_weights) == (5.0, True)


def test_training_step_adds_per_sample_unimodal_ce_at_the_batch_indices():
    tr = Trainer(_cfg(**{"model.encoder_options": {"dropout": 0.0}}))
    batch = next(iter(tr.loader(tr.data.train, shuffle=True, batch_size=32, seed=7)))
    idx = batch["index"]
    assert not torch.equal(idx, torch.arange(32))  # shuffled: positions != indices
    tr.model.train()
    with torch.no_grad():
        out = tr.model(batch["inputs"], batch["present"])
        ce = {m: F.cross_entropy(out.unimodal_logits[m], batch["label"], reduction="none") for m in ("pix", "fou")}
    tr.method.training_step(batch)
    for m in ("pix", "fou"):
        h = tr.method.history.values[m]
        assert torch.allclose(h[idx].float(), ce[m], atol=1e-5)
        mask = torch.ones_like(h, dtype=torch.bool)
        mask[idx] = False
        assert float(h[mask].abs().sum()) == 0.0



# ---------------------------------------------------------------------------------------------
# process-count invariance of the ranking pairs, reference step, resume
import copy

from mmbalance.methods.qmf import gather_global_batch, qmf_global_rank_loss
from helpers import capture_step_grads, tiny_data


def _simulated_reduce(rank, slots_of_others):
    """all_reduce_sum as rank ``rank`` would see it: its zero-padded slots plus the others'."""
    def reduce(t):
        t = t.clone()
        for q, v in slots_of_others.items():
            if q != rank:
                t[q] = v
        return t
    return reduce


def _rank_loss_by_hand(w, h):
    """Mean over the pairs (i, i+1 mod B) of max(0, w_hard - w_easy - |h_i - h_j|), 0 on ties."""
    B = len(w)
    total = 0.0
    for i in range(B):
        j = (i + 1) % B
        margin = abs(h[i] - h[j])
        if h[i] > h[j]:
            total = total + torch.clamp(w[i] - w[j] - margin, min=0)
        elif h[i] < h[j]:
            total = total + torch.clamp(w[j] - w[i] - margin, min=0)
    return total / B


def test_gather_global_batch_is_the_single_process_order():
    world, B = 3, 4
    glob = torch.arange(world * B, dtype=torch.float32).view(1, -1) * 1.5
    shards = {r: glob[:, r::world] for r in range(world)}  # what ShardedSampler deals to rank r
    for r in range(world):
        got = gather_global_batch(shards[r], r, world, _simulated_reduce(r, shards))
        assert torch.equal(got, glob)
    assert gather_global_batch(glob, 0, 1, None) is glob


@pytest.mark.parametrize("world", [2, 3])
def test_rank_loss_is_process_count_invariant(world):
    """The loss value of each process equals the single-process loss of the global batch, and the
    gradients averaged over processes (what the engine does) equal the single-process gradient of
    a parameter shared by all processes. Pairing within the local batch would not."""
    g = torch.Generator().manual_seed(0)
    B = 4 * world
    x = torch.randn(B, 3, generator=g)
    hist = torch.rand(B, generator=g)
    theta = torch.randn(3, generator=g)

    single_theta = theta.clone().requires_grad_(True)
    single = qmf_rank_loss(x @ single_theta, hist)
    single.backward()
    assert float(single.detach()) > 0

    thetas = {r: theta.clone().requires_grad_(True) for r in range(world)}
    conf = {r: x[r::world] @ thetas[r] for r in range(world)}
    others = {r: torch.stack([conf[r].detach(), hist[r::world]]) for r in range(world)}
    local = []
    for r in range(world):
        loss = qmf_global_rank_loss(conf[r], hist[r::world], r, world, _simulated_reduce(r, others))
        assert float(loss.detach()) == pytest.approx(float(single.detach()), rel=1e-6, abs=1e-7)
        loss.backward()
        local.append(float(qmf_rank_loss(conf[r].detach(), hist[r::world])))
    averaged = sum(thetas[r].grad for r in range(world)) / world
    assert torch.allclose(averaged, single_theta.grad, atol=1e-6)
    assert abs(sum(local) / world - float(single.detach())) > 1e-4  # local pairing differs from one process


def _trainer(missing=0.0, **method):
    over = {f"method.{k}": v for k, v in method.items()}
    cfg = quick_config("qmf", epochs=1, **{"train.batch_size": 24, **over})
    return Trainer(cfg, data=tiny_data(48, ("a", "b"), hidden=[8], dropout=0.0, missing=missing))


def _batch(tr, seed=0):
    return next(iter(tr.loader(tr.data.train, batch_size=24, shuffle=True, seed=seed)))


def _scramble_absent_inputs(batch):
    """Non-zero inputs where a modality is absent (a loader that leaves them as they were): the
    model's absent policy, not the data, must turn them into zeros."""
    g = torch.Generator().manual_seed(9)
    for m, p in batch["present"].items():
        x = batch["inputs"][m]
        x[~p] = 3.0 + torch.randn(x[~p].shape, generator=g)
    return batch


@pytest.mark.parametrize("detach,missing", [(False, 0.0), (True, 0.0), (False, 0.4)])
def test_training_step_gradients_equal_a_hand_written_reference(detach, missing):
    lam, T = 0.7, 4.0
    tr = _trainer(missing, lambda_rank=lam, temperature=T, detach_weights=detach)
    g = torch.Generator().manual_seed(1)
    for m in ("a", "b"):  # a non-flat history, so the ranking term is active
        tr.method.history.values[m] = torch.rand(48, generator=g, dtype=torch.float64) * 3
    hist = {m: tr.method.history.values[m].clone() for m in ("a", "b")}
    batch = _scramble_absent_inputs(_batch(tr))
    assert missing == 0.0 or not batch["present"]["a"].all()
    idx, y = batch["index"], batch["label"]
    ref = copy.deepcopy(tr.model)
    out = ref(batch["inputs"], batch["present"])
    z = 0
    loss = 0
    conf, rank = {}, {}
    for m in ("a", "b"):
        zm = out.unimodal_logits[m]
        w = torch.log(torch.exp(zm).sum(1)) / T
        z = z + (w.detach() if detach else w)[:, None] * zm
        h = (hist[m][idx] - hist[m].min()) / (hist[m].max() - hist[m].min())
        r = _rank_loss_by_hand(w, h.float())
        rank[m], conf[m] = float(r.detach()), float(w.detach().mean())
        loss = loss + F.cross_entropy(zm, y) + lam * r
    loss = loss + F.cross_entropy(z, y)
    loss.backward()
    tr.model.train()
    result = {}
    step = tr.method.training_step
    tr.method.training_step = lambda b: result.update(step(b)) or result
    got = capture_step_grads(tr, batch)
    del tr.method.training_step
    for n, p in ref.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-6), n
    # the step reports its loss (what the engine's train loss averages) and the ranking losses' sum
    assert float(result["loss"]) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(result["rank_loss"]) == pytest.approx(rank["a"] + rank["b"], rel=1e-5)
    # the history is updated after the step with the detached per-sample CE of each modality
    for m in ("a", "b"):
        ce = F.cross_entropy(out.unimodal_logits[m].detach(), y, reduction="none").double()
        assert torch.allclose(tr.method.history.values[m][idx] - hist[m][idx], ce, atol=1e-6)
    # diagnostics: each modality's mean confidence and ranking loss, and the ranking losses' sum
    d = tr.method.epoch_diagnostics()
    assert min(rank.values()) > 0
    for m in ("a", "b"):
        assert d[f"conf_{m}"] == pytest.approx(conf[m], rel=1e-5)
        assert d[f"rank_loss_{m}"] == pytest.approx(rank[m], rel=1e-5)
    assert d["rank_loss"] == pytest.approx(rank["a"] + rank["b"], rel=1e-5)
    # prediction: the confidence-weighted fusion of the model's output under the presence mask
    tr.model.eval()
    with torch.no_grad():
        pred = tr.method.predict(batch)
        want, _ = qmf_fuse(tr.model(batch["inputs"], batch["present"]).unimodal_logits, T)
    assert torch.allclose(pred.logits, want, atol=1e-6)


def test_history_lives_on_the_runs_device_and_resumes_there_in_float64():
    """A history saved from a CPU checkpoint (float32 here) is loaded onto the run's device in
    float64; the method builds it on the trainer's device ('meta' stands in for an accelerator)."""
    h = LossHistory(["a"], 4, device="meta")
    h.load_state_dict({"a": torch.arange(4, dtype=torch.float32)})
    assert h.values["a"].device.type == "meta" and h.values["a"].dtype == torch.float64
    from types import SimpleNamespace

    from mmbalance.methods import create_method

    tr = _trainer()
    method = create_method("qmf")
    method.setup(SimpleNamespace(model=tr.model, data=tr.data, device=torch.device("meta")))
    assert {v.device.type for v in method.history.values.values()} == {"meta"}
    assert all(v.shape == (48,) for v in method.history.values.values())


def test_resume_state_round_trip_gives_the_same_next_step():
    a = _trainer()
    a.model.train()
    a.method.training_step(_batch(a, seed=1))
    a.method.training_step(_batch(a, seed=2))  # a non-flat history
    b = _trainer()
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))
    b.method.load_state_dict(copy.deepcopy(a.method.state_dict()))
    batch = _batch(a, seed=3)
    b.model.train()
    ga, gb = capture_step_grads(a, batch), capture_step_grads(b, batch)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n
    fresh = _trainer()
    fresh.model.load_state_dict(a.model.state_dict())
    assert not all(torch.equal(ga[n], g) for n, g in capture_step_grads(fresh, batch).items())  # history matters
    with pytest.raises(ConfigError):
        LossHistory(["a"], 5).load_state_dict({"a": torch.zeros(4)})


# ---------------------------------------------------------------------------------------------
# two processes simulated in one: threads with a summing barrier stand in for all_reduce



def two_rank_grads(make_trainer, batch, monkeypatch):
    """One step's gradients with ``batch`` dealt to two simulated ranks (tests/simulated_ranks.py)."""
    return two_rank_step_grads(monkeypatch, make_trainer, batch)


def test_two_processes_equal_one_process_on_the_same_global_batch(monkeypatch):
    """A whole training step on two simulated processes (the confidences and histories gathered,
    the gradient scaled for the engine's averaging) gives one process's gradients."""
    def make():
        tr = _trainer(lambda_rank=1.0, temperature=0.2)
        g = torch.Generator().manual_seed(4)
        for m in ("a", "b"):
            tr.method.history.values[m] = torch.rand(48, generator=g, dtype=torch.float64)
        return tr

    single = make()
    batch = _batch(single)
    single.model.train()
    expected = capture_step_grads(single, batch)
    assert single.method.epoch_diagnostics()["rank_loss"] > 0
    got = two_rank_grads(make, batch, monkeypatch)
    for n in expected:
        assert torch.allclose(got[n], expected[n], atol=1e-6), n


def test_two_processes_keep_the_global_loss_history(monkeypatch):
    """After a step on two simulated processes every rank holds the history one process holds
    after the step on the global batch (each rank's increments all-reduced), so the next step's
    normalised histories agree."""
    from simulated_ranks import run_two_ranks, shard_batch

    def make():
        return _trainer()

    single = make()
    batch = _batch(single)
    single.model.train()
    single.method.training_step(batch)
    expected = single.method.history.values

    def body(tr, r):
        tr.model.train()
        tr.method.training_step(shard_batch(batch, r))
        return {m: v.clone() for m, v in tr.method.history.values.items()}

    h0, h1 = run_two_ranks(monkeypatch, make, body)
    for m in ("a", "b"):
        assert torch.equal(h0[m], h1[m]), m
        assert torch.allclose(h0[m], expected[m], atol=1e-6), m
        assert bool((h0[m][batch["index"]] > 0).all())
