"""MIE: SAM with exact restore, T = V Sigma V^T, gradient modification (pure math and a training
step against a hand-written autograd reference), schedules and their boundaries, the covariance
pass (eval mode, modes and buffers restored, sharded over ranks), collective calls with a
modality absent, the global-mean loss, optimizer reset, resume state, fusion rules."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmbalance.config import load_config
from mmbalance.engine.trainer import Trainer
from mmbalance.methods.mla import eval_mode
from mmbalance.methods.mie import (average_fusion, batch_mean_outer, entropy_fusion, entropy_weights,
                                   flat_gm_matrix, modify_weight_gradient, sam_perturbation,
                                   select_gm_layers, stage_of_epoch)
from mmbalance.registry import ConfigError

from helpers import quick_config, tiny_data

torch.set_num_threads(1)


def make_trainer(run_dir=None, resume=False, epochs=2, overrides=None, **method):
    ov = {"train.epochs": epochs, "method.name": "mie", "train.progress": "off", "train.probe": False,
          "train.batch_size": 64, "model.encoder_options": {"dropout": 0.0}}
    ov.update({f"method.{k}": v for k, v in method.items()})
    ov.update(overrides or {})
    return Trainer(load_config(None, ov), run_dir=run_dir, resume=resume)


def first_batch(tr, n=32):
    return next(iter(tr.loader(tr.data.train, batch_size=n)))


def capture_step(tr):
    """Replace the optimizer step by a capture of the parameters and gradients it would use."""
    seen = {}

    def fake_step():
        seen["params"] = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
        seen["grads"] = {n: (None if p.grad is None else p.grad.detach().clone())
                         for n, p in tr.model.named_parameters()}

    tr.optimizer_step = fake_step
    return seen


def unimodal_loss(model, m, x, y):
    return F.cross_entropy(model.fusion.heads[m](model.encode(m, x)).float(), y)


# ------------------------------------------------------------------------------------ pure math
def test_sam_perturbation_global_norm():
    g = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    eps, n = sam_perturbation(g, rho=2.0)
    assert n == pytest.approx(5.0)
    assert torch.allclose(eps[0], torch.tensor([1.2, 0.0])) and torch.allclose(eps[1], torch.tensor([[1.6]]))
    assert math.sqrt(sum(float(e.pow(2).sum()) for e in eps)) == pytest.approx(2.0)  # ||eps|| = rho
    eps0, n0 = sam_perturbation([torch.zeros(3)], rho=1.0)
    assert n0 == 0.0 and torch.equal(eps0[0], torch.zeros(3))
    # the norm stays a device tensor: nothing is read back to the host
    from test_precision import count_synchronisations

    (_, norm), n_sync = count_synchronisations(lambda: sam_perturbation(g, rho=2.0))
    assert n_sync == 0 and isinstance(norm, torch.Tensor) and float(norm) == pytest.approx(5.0)


def test_present_rows_with_a_known_count_equal_mla_present_rows():
    """The rows of a unimodal step gathered without boolean indexing (the count is known on the
    host already): the same rows in the same order, the placeholder when none, the batch when
    all; no host synchronisation."""
    from mmbalance.methods.mie import present_rows_known
    from mmbalance.methods.mla import present_rows
    from test_precision import count_synchronisations

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(11, 3, 2, generator=g), torch.randint(0, 4, (11,), generator=g)
    for rate in (0.0, 0.3, 0.8, 1.0):
        present = torch.rand(11, generator=g) >= rate
        want = present_rows(x, y, present)
        got, n_sync = count_synchronisations(lambda: present_rows_known(x, y, present, int(want[2])))
        assert n_sync == 0 and got[2:] == want[2:]
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_flat_gm_matrix_hand_values_and_rotation():
    tau = 0.4
    T, s = flat_gm_matrix(torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)), tau)
    assert torch.allclose(T, torch.diag(torch.tensor([math.exp(-tau), 1.0], dtype=torch.float64)), atol=1e-12)
    assert s.tolist() == pytest.approx([4.0, 1.0])
    # rotated: Q diag(9, 5, 1) Q^T -> Q diag(e^-tau, e^-tau/2, 1) Q^T
    Q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    Y = Q @ torch.diag(torch.tensor([9.0, 5.0, 1.0], dtype=torch.float64)) @ Q.T
    T, _ = flat_gm_matrix(Y, tau)
    want = Q @ torch.diag(torch.tensor([math.exp(-tau), math.exp(-tau / 2), 1.0], dtype=torch.float64)) @ Q.T
    assert torch.allclose(T, want, atol=1e-10)


@pytest.mark.parametrize("tau", [0.4, 1.5])
def test_flat_gm_matrix_symmetric_with_eigenvalues_in_range(tau):
    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(1)) + 0.5
    Y = batch_mean_outer(x, batch_size=12).float()  # 5 batches: rank 5 < 16 (zero eigenvalues)
    T, s = flat_gm_matrix(Y, tau)
    assert T.dtype == torch.float32 and torch.equal(T, T.T)
    ev = torch.linalg.eigvalsh(T.double())
    assert float(ev.min()) >= math.exp(-tau) - 1e-5 and float(ev.max()) <= 1 + 1e-5
    assert float(ev.min()) == pytest.approx(math.exp(-tau), abs=1e-5)  # dominant direction damped
    assert float(ev.max()) == pytest.approx(1.0, abs=1e-5)
    # the damped direction is Ybar's top singular vector
    v = torch.linalg.svd(Y.double())[2][0]
    assert float(v @ T.double() @ v) == pytest.approx(math.exp(-tau), abs=1e-5)


def test_flat_gm_matrix_equal_singular_values_is_identity():
    for Y in (3.0 * torch.eye(4), torch.zeros(4, 4)):
        T, _ = flat_gm_matrix(Y, 0.4)
        assert torch.allclose(T, torch.eye(4), atol=1e-6)


def test_batch_mean_outer_chunks_and_mask_match_loop():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(29, 5, generator=g)
    mask = torch.rand(29, generator=g) > 0.3
    mask[12:24] = False  # one batch with nothing present is skipped
    want = torch.zeros(5, 5, dtype=torch.float64)
    for a in range(0, 29, 12):
        xb, mb = x[a:a + 12].double(), mask[a:a + 12]
        if mb.any():
            z = xb[mb].mean(0)
            want += torch.outer(z, z)
    assert torch.allclose(batch_mean_outer(x, 12, mask), want, atol=1e-12)
    z = x.double().mean(0)
    assert torch.allclose(batch_mean_outer(x), torch.outer(z, z), atol=1e-12)


def test_modify_weight_gradient():
    g = torch.arange(6.0).view(2, 3)
    T = torch.diag(torch.tensor([1.0, 0.5, 2.0]))
    assert torch.equal(modify_weight_gradient(g, T), torch.tensor([[0.0, 0.5, 4.0], [3.0, 2.0, 10.0]]))


def test_stage_of_epoch():
    assert [stage_of_epoch(e, 1) for e in range(4)] == [0, 1, 2, 3]
    assert [stage_of_epoch(e, 3) for e in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [stage_of_epoch(e, [25, 50]) for e in (0, 24, 25, 74, 75, 99, 100, 150)] == [0, 0, 1, 1, 2, 2, 3, 4]


def test_select_gm_layers_scopes():
    enc = nn.Sequential(nn.Flatten(), nn.Linear(240, 256), nn.ReLU(), nn.Linear(256, 128))
    head = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64), nn.Linear(64, 10))
    assert [n for n, _ in select_gm_layers(enc, head, "head")] == ["head3", "head2", "head1"]
    # parameters: enc1 61696, enc2 32896, head1 33024, head2 16448, head3 650 (total 144714)
    assert [n for n, _ in select_gm_layers(enc, head, 0.3)] == ["head3", "head2", "head1"]
    assert [n for n, _ in select_gm_layers(enc, head, 0.4)] == ["head3", "head2", "head1", "enc2"]
    assert [n for n, _ in select_gm_layers(enc, head, 0.001)] == ["head3"]
    assert len(select_gm_layers(enc, head, 1.0)) == 5
    conv = nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6, 128))
    assert len(select_gm_layers(conv, head, "head")) == 3
    with pytest.raises(ConfigError, match="Linear layers only"):
        select_gm_layers(conv, head, 1.0)


def test_fusion_rules():
    z = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.1, 0.0]],     # modality a: confident, unsure
                      [[0.0, 0.2, 0.0], [0.0, 0.0, 5.0]]])    # modality b: unsure, confident
    avg = average_fusion(z)
    assert torch.allclose(avg.exp(), (z.softmax(-1)).mean(0), atol=1e-6)
    w = entropy_weights(z)
    assert torch.allclose(w.sum(0), torch.ones(2))
    assert w[0, 0] > 0.5 and w[1, 1] > 0.5  # per sample: the confident modality gets more weight
    ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    want = torch.exp(ent.max(0).values - ent) / torch.exp(ent.max(0).values - ent).sum(0)
    assert torch.allclose(w, want, atol=1e-6)
    assert torch.allclose(entropy_fusion(z), (want.unsqueeze(-1) * z).sum(0), atol=1e-6)
    mask = torch.tensor([[True, False], [True, True]])
    assert torch.allclose(average_fusion(z, mask)[1].exp(), z[1, 1].softmax(-1), atol=1e-6)
    assert torch.allclose(entropy_weights(z, mask)[:, 1], torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------------------------------ the method
def tiny_trainer(n=48, batchnorm=False, missing=0.0, epochs=2, overrides=None, dropout=0.0, **method):
    """MIE on tiny_data (modalities a, b; 8-wide MLP encoders), SGD without weight decay."""
    data = tiny_data(n=n, missing=missing, seed=1, hidden=[8], dropout=dropout, batchnorm=batchnorm)
    ov = {"train.batch_size": 16, "optim.weight_decay": 0.0, "train.eval_batch_size": 24,
          **{f"method.{k}": v for k, v in method.items()}, **(overrides or {})}
    return Trainer(quick_config("mie", epochs=epochs, **ov), run_dir=None, data=data)


def batches(tr, k=2):
    return [b for _, b in zip(range(k), tr.loader(tr.data.train, batch_size=16))]


def captured_steps(tr, batch):
    """Run one training_step; per optimizer step, the parameters and gradients it is handed."""
    seen = []
    real = tr.optimizer_step

    def capture():
        seen.append(({n: p.detach().clone() for n, p in tr.model.named_parameters()},
                     {n: p.grad.detach().clone() for n, p in tr.model.named_parameters() if p.grad is not None}))
        real()

    tr.optimizer_step = capture
    try:
        tr.method.training_step(batch)
    finally:
        tr.optimizer_step = real
    return seen


def random_T(tr, m, seed):
    """A symmetric, positive T per modified layer of m (deepest first, as the method keeps them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _, mod in tr.method._layers[m]:
        d = mod.in_features
        a = torch.randn(d, d, generator=g)
        out.append((a + a.T) / (2 * d) + torch.eye(d))
    return out


def reference_step(tr, params, batch, m, rho, sam, T):
    """Plain autograd: mean CE of network m over its present samples; with SAM the gradient at
    theta + rho g / ||g|| (global norm over encoder m + head m); head weights right-multiplied
    by the partner's T."""
    ref = copy.deepcopy(tr.model)
    ref.load_state_dict(params, strict=False)
    pres = batch["present"][m]
    x, y = batch["inputs"][m][pres], batch["label"][pres]
    names = [n for n, _ in ref.named_parameters() if n.startswith((f"encoders.{m}.", f"fusion.heads.{m}."))]
    rp = dict(ref.named_parameters())
    g = torch.autograd.grad(unimodal_loss(ref, m, x, y), [rp[n] for n in names])
    if sam:
        gn = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        with torch.no_grad():
            for n, gi in zip(names, g):
                rp[n].add_(rho * gi / gn)
        g = torch.autograd.grad(unimodal_loss(ref, m, x, y), [rp[n] for n in names])
    want = dict(zip(names, g))
    if T is not None:
        for (label, _), t in zip(tr.method._layers[m], T):
            w = f"fusion.heads.{m}.{ {'head1': 0, 'head2': 2, 'head3': 3}[label] }.weight"
            want[w] = want[w] @ t
    return want


@pytest.mark.parametrize("schedule", ["batch", "epochs"])
@pytest.mark.parametrize("sam,gm", [(True, True), (True, False), (False, True)])
def test_training_step_equals_hand_written_reference(schedule, sam, gm):
    """Each optimizer step's gradients equal the reference (SAM at rho 0.05, GM with the partner's
    T on the head weights only), over the present samples only; only network m has gradients;
    the parameters handed to the optimizer are the unperturbed ones, bitwise."""
    rho = 0.05
    tr = tiny_trainer(missing={"a": 0.3}, rho=rho, sam=sam, gm=gm, schedule=schedule)
    meth = tr.method
    Ts = {"a": random_T(tr, "a", 0), "b": random_T(tr, "b", 1)}
    meth._T = dict(Ts)
    if schedule == "epochs":
        meth._stage = 1  # b's stage, after a's
    batch = batches(tr)[0]
    assert 0 < int(batch["present"]["a"].sum()) < 16
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    seen = captured_steps(tr, batch)
    order, partner = (["a", "b"], {"a": "b", "b": "a"}) if schedule == "batch" else (["b"], {"b": "a"})
    assert len(seen) == len(order)
    for (params, got), m in zip(seen, order):
        if m == order[0]:
            assert all(torch.equal(params[n], before[n]) for n in before)  # restored exactly
        want = reference_step(tr, params, batch, m, rho, sam, Ts[partner[m]] if gm else None)
        assert set(got) == set(want)
        for n in want:
            assert torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6), (m, n)
    diag = meth.epoch_diagnostics()
    for m in order:
        assert diag[f"trained/{m}"] == 1.0
        if sam:
            assert diag[f"sam_eps_real/{m}"] == pytest.approx(rho, rel=1e-3)
        if gm:
            assert diag[f"gm_ratio/{m}"] != pytest.approx(1.0)
    if schedule == "epochs":
        assert diag["trained/a"] == 0.0 and diag["stage"] == 1


def test_sam_second_pass_reuses_the_dropout_mask_and_updates_batchnorm_once():
    """The forward at theta + eps draws the same dropout mask as the first (its gradient equals
    the reference's with the RNG replayed) and leaves BatchNorm statistics as one forward does."""
    rho = 0.05
    tr = tiny_trainer(batchnorm=True, dropout=0.5, rho=rho, gm=False, schedule="epochs")
    batch = batches(tr)[0]
    x, y = batch["inputs"]["a"], batch["label"]
    once, ref = copy.deepcopy(tr.model), copy.deepcopy(tr.model)
    rng = torch.get_rng_state()
    seen = captured_steps(tr, batch)
    torch.set_rng_state(rng)
    unimodal_loss(once, "a", x, y)  # one forward: the BatchNorm statistics a step should leave
    names = [n for n, _ in ref.named_parameters() if n.startswith(("encoders.a.", "fusion.heads.a."))]
    rp = dict(ref.named_parameters())
    torch.set_rng_state(rng)
    g = torch.autograd.grad(unimodal_loss(ref, "a", x, y), [rp[n] for n in names])
    gn = torch.sqrt(sum((gi ** 2).sum() for gi in g))
    with torch.no_grad():
        for n, gi in zip(names, g):
            rp[n].add_(rho * gi / gn)
    torch.set_rng_state(rng)
    g_sam = torch.autograd.grad(unimodal_loss(ref, "a", x, y), [rp[n] for n in names])
    for n, gs in zip(names, g_sam):
        assert torch.allclose(seen[0][1][n], gs, rtol=1e-4, atol=1e-6), n
    bufs = {k: v for k, v in once.state_dict().items() if "running" in k or "num_batches" in k}
    assert bufs and all(torch.allclose(tr.model.state_dict()[k], v) for k, v in bufs.items())


def test_paper_rho_is_below_float32_resolution():
    tr = make_trainer()  # rho = 1e-10 (paper), embedded data
    seen = capture_step(tr)
    tr.method.training_step(first_batch(tr))
    d = tr.method.epoch_diagnostics()
    assert d["sam_eps/pix"] == pytest.approx(1e-10)
    assert d["sam_eps_real/pix"] < 0.5e-10  # most of the perturbation is rounded away
    assert seen["grads"]


def test_T_is_identity_before_partner_T_is_built():
    tr = tiny_trainer(schedule="epochs")
    assert tr.method.previous_modality() is None
    assert tr.method.partner_matrices("a") == [None, None, None]
    tr.method._stage = 1
    assert tr.method.previous_modality() == "a" and tr.method.partner_matrices("b") == [None, None, None]
    b = tiny_trainer()
    assert b.method.previous_modality("a") == "b" and b.method.previous_modality("b") == "a"
    assert b.method.partner_matrices("a") == [None, None, None]
    seen_gm = captured_steps(b, batches(b)[0])
    c = tiny_trainer(gm=False)
    seen_raw = captured_steps(c, batches(c)[0])
    for (_, g1), (_, g2) in zip(seen_gm, seen_raw):
        assert all(torch.equal(g1[n], g2[n]) for n in g1)


def test_covariance_pass_builds_T_in_eval_mode_and_restores_modes_and_buffers():
    """T^(m) = flat_gm_matrix of sum of batch-mean outer products of each head layer's input, in
    cov_batch_size batches of the present samples, the network in eval mode; after the pass every
    module is in the mode it had (one deliberately in eval) and BatchNorm buffers are unchanged."""
    tr = tiny_trainer(n=50, batchnorm=True, missing={"a": 0.3}, cov_batch_size=7)
    model, meth = tr.model, tr.method
    model.train()
    model.encoders["b"].eval()  # must come back in eval
    modes = {n: mod.training for n, mod in model.named_modules()}
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    seen_modes = []
    hook = model.fusion.heads["a"][0].register_forward_pre_hook(
        lambda mod, inp: seen_modes.append(any(x.training for x in model.modules())))
    meth.build_T(["a"])
    hook.remove()
    assert seen_modes and not any(seen_modes)
    assert {n: mod.training for n, mod in model.named_modules()} == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    assert meth._T["b"] is None
    ds = tr.data.train_eval
    pres = ds.present["a"]
    with torch.no_grad(), eval_mode([model]):
        h1 = model.encode("a", ds.arrays["a"])
        head = model.fusion.heads["a"]
        h2 = head[1](head[0](h1))
        h3 = head[2](h2)
    for (label, _), T in zip(meth._layers["a"], meth._T["a"]):
        inp = {"head1": h1, "head2": h2, "head3": h3}[label]
        want, _ = flat_gm_matrix(batch_mean_outer(inp, 7, pres), 0.4)
        assert torch.allclose(T.double(), want, atol=1e-5), label
    diag = meth.epoch_diagnostics()
    assert {"sv_min/a/head1", "sv_max/a/head3", "sv_top_share/a"} <= set(diag)


def test_covariance_pass_shards_whole_batches_over_ranks(monkeypatch):
    """Two ranks (simulated): each takes every other cov_batch_size batch, so their Ybar sum is
    the one-process Ybar exactly (not twice it, and with the same batch means)."""
    tr = tiny_trainer(n=50, missing={"a": 0.3}, cov_batch_size=7)
    single = tr.method.layer_input_statistics(["a"])[0]
    monkeypatch.setattr(Trainer, "world_size", property(lambda self: 2))
    parts, sizes = [], []
    for rank in range(2):
        monkeypatch.setattr(tr, "shard", lambda ds, r=rank: torch.utils.data.Subset(ds, list(range(r, len(ds), 2))))
        sizes.append(len(tr.method.covariance_dataset()))
        parts.append(tr.method.layer_input_statistics(["a"])[0])
    assert sizes == [28, 22]  # batches 0, 2, 4, 6 (7 + 7 + 7 + 7) and 1, 3, 5 (7 + 7 + 7 + 1)
    for y0, y1, y in zip(*parts, single):
        assert torch.allclose(y0 + y1, y, rtol=1e-5, atol=1e-9)  # (float32 forwards of other batch sizes)
        assert not torch.allclose(y0, y)


def _spy_passes(monkeypatch, meth):
    calls = []
    real = meth.layer_input_statistics

    def spy(mods):
        calls.append(list(mods))
        return real(mods)

    monkeypatch.setattr(meth, "layer_input_statistics", spy)
    return calls


@pytest.mark.parametrize("schedule,opts,want", [
    ("batch", {}, [[], ["a", "b"], ["a", "b"]]),  # every epoch start but the first
    ("epochs", {}, [[], ["a"], ["b"]]),  # stage 1 at epoch 1, stage 2 at epoch 2
    ("epochs", {"stage_epochs": 2}, [[], [], ["a"]]),  # first epoch of stage 1; none mid-stage
])
def test_passes_at_stage_starts_and_none_after_the_last_epoch(monkeypatch, schedule, opts, want):
    tr = tiny_trainer(epochs=3, schedule=schedule, **opts)
    calls = _spy_passes(monkeypatch, tr.method)
    per_epoch = []
    real = tr.method.on_epoch_start

    def start(epoch):
        n = len(calls)
        real(epoch)
        per_epoch.append([m for c in calls[n:] for m in c])

    monkeypatch.setattr(tr.method, "on_epoch_start", start)
    tr.fit()
    assert per_epoch == want
    assert len(calls) == sum(1 for c in want if c)  # one pass per stage start, none after the last epoch


def test_no_pass_without_gradient_modification(monkeypatch):
    for schedule, opts in (("batch", {}), ("epochs", {})):
        tr = tiny_trainer(epochs=3, gm=False, schedule=schedule, **opts)
        calls = _spy_passes(monkeypatch, tr.method)
        tr.fit()
        assert calls == []


def test_epoch_stage_boundaries_and_optimizer_reset():
    """stage_epochs [2, 3]: a trains epochs 0-1, b 2-4, a 5; T of the finished modality is built at
    the first epoch of the next stage only; reset_optimizer clears exactly the starting modality's
    optimizer state there (and never mid-stage)."""
    tr = tiny_trainer(epochs=6, schedule="epochs", stage_epochs=[2, 3], reset_optimizer=True)
    meth, opt = tr.method, tr.optimizer
    built = []
    meth.build_T = lambda mods: built.append(list(mods))
    mods, resets = [], []
    for epoch in range(6):
        for p in tr.model.parameters():
            opt.state[p] = {"momentum_buffer": torch.ones_like(p)}
        meth.on_epoch_start(epoch)
        mods.append(meth.current_modality())
        cleared = {m for m in ("a", "b") if any(p not in opt.state or not opt.state[p] for p in meth._params[m])}
        kept = {m for m in ("a", "b") if all(opt.state.get(p) for p in meth._params[m])}
        resets.append(sorted(cleared))
        assert cleared | kept == {"a", "b"} and not cleared & kept
    assert mods == ["a", "a", "b", "b", "b", "a"]
    assert built == [["a"], ["b"]]
    assert resets == [[], [], ["b"], [], [], ["a"]]


def test_optimizer_momentum_kept_by_default():
    tr = tiny_trainer(epochs=3, schedule="epochs")
    tr.method.on_epoch_start(0)
    tr.method.training_step(batches(tr)[0])
    state = {p: tr.optimizer.state[p]["momentum_buffer"].clone() for p in tr.method._params["a"]}
    tr.method.on_epoch_start(1)
    tr.method.on_epoch_start(2)  # a again
    assert all(torch.equal(tr.optimizer.state[p]["momentum_buffer"], v) for p, v in state.items())


def test_steps_schedule_and_pending_T():
    """inner_steps 2: a a b b a; the finished stage's T is built at the first step of the next
    stage (and kept in the state); a stage ending at the last step leaves it pending."""
    tr = tiny_trainer(schedule="steps", inner_steps=2, overrides={"model.encoders": {"b": {"hidden": [6]}}})
    meth = tr.method
    built = []
    real = meth.build_T
    meth.build_T = lambda mods: (built.append(list(mods)), real(mods))
    bs = batches(tr, 3)
    mods = []
    for i in range(5):
        mods.append(meth.current_modality())
        meth.training_step(bs[i % 3])
        if i == 1:
            assert meth._pending == "a" and built == [] and meth.state_dict()["pending"] == "a"
    assert mods == ["a", "a", "b", "b", "a"]
    assert built == [["a"], ["b"]] and meth._pending is None
    assert meth._stage == 2 and meth._steps_in_stage == 1
    # b's encoder is 6 wide: head1 of a (8 inputs) has no same-shape partner -> identity
    parts = dict(zip([n for n, _ in meth._layers["a"]], meth.partner_matrices("a")))
    assert parts["head1"] is None and parts["head2"] is not None and parts["head3"] is not None


class Collectives:
    """Stand-ins for one rank's collective calls (of two): records their sequence and the
    gradients averaged; every all-reduce returns ``reduce(t)`` (the other rank's share added)."""

    def __init__(self, monkeypatch, tr, reduce=lambda t: t + 1.0):
        from mmbalance.engine import distributed as du

        self.calls, self.shapes, self.grads = [], [], []

        def all_reduce_sum(t):
            self.calls.append(("all_reduce_sum", tuple(t.shape)))
            return reduce(t)

        def average_gradients(params):
            grads = [(n, p.grad) for n, p in tr.model.named_parameters() if p.grad is not None]
            self.calls.append(("average_gradients", len(grads)))
            self.shapes.append([(n, tuple(g.shape)) for n, g in grads])
            self.grads.append({n: g.clone() for n, g in grads})

        monkeypatch.setattr(tr, "all_reduce_sum", all_reduce_sum)
        monkeypatch.setattr(du, "average_gradients", average_gradients)
        # the engine's synchronous averaging path (not the overlapped bucket reducer, which
        # would call torch.distributed itself), so the stand-in above sees every averaging
        monkeypatch.setattr(tr, "_grad_reducer", lambda: None, raising=False)
        monkeypatch.setattr(du, "broadcast_buffers", lambda module: self.calls.append(("broadcast_buffers",)))


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_absent_modality_on_this_rank_makes_the_same_collective_calls(monkeypatch, variant):
    """A rank whose share of the batch has no sample of a modality makes the same collective calls
    on the same gradient tensors (both SAM backwards included) as one that has them, with zero
    gradients; BatchNorm buffers unchanged and every module back in train mode."""
    runs = {}
    for case in ("present", "absent"):
        tr = tiny_trainer(batchnorm=True, rho=0.05, variant=variant)
        tr.method._T = {"a": random_T(tr, "a", 0), "b": random_T(tr, "b", 1)}
        batch = batches(tr)[0]
        if case == "absent":
            for m in ("a", "b"):
                batch["present"][m] = torch.zeros_like(batch["present"][m])
                batch["inputs"][m] = torch.full_like(batch["inputs"][m], float("nan"))  # never read
        rec = Collectives(monkeypatch, tr)
        buffers = {k: v.clone() for k, v in tr.model.state_dict().items() if "running" in k or "num_batches" in k}
        tr.method.training_step(batch)
        runs[case] = (rec, tr, buffers)
    (p, _, _), (a, tr, buffers) = runs["present"], runs["absent"]
    assert a.calls == p.calls and sum(c[0] == "average_gradients" for c in a.calls) == 4
    assert a.shapes == p.shapes
    assert all(float(g.abs().max()) == 0.0 for gs in a.grads for g in gs.values())
    assert all(torch.equal(v, tr.model.state_dict()[k]) for k, v in buffers.items())
    assert all(mod.training for mod in tr.model.modules())


def test_no_present_sample_anywhere_skips_the_step():
    """One process, no sample of b in the batch: b's step changes nothing (no NaN), a's still runs."""
    tr = tiny_trainer(rho=0.05)
    batch = batches(tr)[0]
    batch["present"]["b"] = torch.zeros_like(batch["present"]["b"])
    batch["inputs"]["b"] = torch.full_like(batch["inputs"]["b"], float("nan"))  # never read
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    seen = captured_steps(tr, batch)
    assert len(seen) == 1 and all(n.startswith(("encoders.a.", "fusion.heads.a.")) for n in seen[0][1])
    assert all(torch.equal(before[k], v) for k, v in tr.model.state_dict().items() if ".b." in k)
    assert all(torch.isfinite(v).all() for v in tr.model.state_dict().values())
    st = tiny_trainer(schedule="epochs")
    st.method._stage = 1
    before = {k: v.clone() for k, v in st.model.state_dict().items()}
    assert st.method.training_step(batch) == {}
    assert all(torch.equal(before[k], v) for k, v in st.model.state_dict().items())


def test_single_present_sample_with_batchnorm():
    """One present sample of b: its SAM step runs with BatchNorm on running statistics instead of
    failing, gradients are finite and b's BatchNorm buffers are left alone."""
    tr = tiny_trainer(batchnorm=True, rho=0.05)
    batch = batches(tr)[0]
    batch["present"]["b"] = torch.zeros_like(batch["present"]["b"])
    batch["present"]["b"][5] = True
    bufs = {k: v.clone() for k, v in tr.model.state_dict().items() if ("running" in k or "num_batches" in k)
            and k.startswith("encoders.b.")}
    seen = captured_steps(tr, batch)
    assert len(seen) == 2 and any(n.startswith("encoders.b.") for n in seen[1][1])
    assert all(torch.isfinite(g).all() for g in seen[1][1].values())
    assert bufs and all(torch.equal(v, tr.model.state_dict()[k]) for k, v in bufs.items())
    assert all(mod.training for mod in tr.model.modules())


def test_loss_is_the_global_mean_over_present_samples(monkeypatch):
    """Several processes: local loss sum x world / global count. Simulated: the other rank has
    3x this rank's present samples (and loss), so this rank's gradient before averaging is half
    its own mean's."""
    tr = tiny_trainer(sam=False, gm=False, schedule="epochs")
    batch = batches(tr)[0]
    params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    want = reference_step(tr, params, batch, "a", 0.0, False, None)
    rec = Collectives(monkeypatch, tr, reduce=lambda t: t * 4)
    monkeypatch.setattr(Trainer, "world_size", property(lambda self: 2))
    tr.method.training_step(batch)
    for n in want:
        assert torch.allclose(rec.grads[0][n], want[n] / 2, atol=1e-6), n


@pytest.mark.parametrize("schedule,opts,k", [("batch", {}, 2), ("steps", {"inner_steps": 2}, 2),
                                             ("steps", {"inner_steps": 2, "reset_optimizer": True}, 2),
                                             ("epochs", {}, 1)])
def test_state_roundtrip_gives_the_same_next_step(schedule, opts, k):
    """Model, optimizer and method state (T, stage, steps in stage, pending T) into a fresh
    trainer: the next step is identical. steps/k=2 resumes with a's T still pending."""
    def make():
        return tiny_trainer(rho=0.05, schedule=schedule, **opts)

    a = make()
    bs = batches(a, 3)
    a.method.on_epoch_start(0)
    for i in range(k):
        a.method.training_step(bs[i])
    if schedule == "batch":  # T from a covariance pass, as at the next epoch start
        a.method.build_T(["a", "b"])
    b = make()
    b.model.load_state_dict(a.model.state_dict())
    b.optimizer.load_state_dict(copy.deepcopy(a.optimizer.state_dict()))  # (it shares tensors)
    b.method.load_state_dict(copy.deepcopy(a.method.state_dict()))
    if schedule == "steps":
        assert b.method._pending == "a"
    a.method.training_step(bs[k])
    b.method.training_step(bs[k])
    for (n, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(pa, pb), n
    assert all((x is None and y is None) or all(torch.equal(u, v) for u, v in zip(x, y))
               for x, y in zip(a.method._T.values(), b.method._T.values()))


@pytest.mark.parametrize("opts,overrides", [
    ({}, {"dataset.modalities": ["pix", "fou", "zer"]}),
    ({"sam": False}, {}),
    ({"gm": False, "fusion": "entropy"}, {}),
    ({"variant": "official", "rho": 0.05, "gm_scope": 1.0}, {}),
    ({"schedule": "epochs"}, {}),
])
def test_runs_and_ablations(opts, overrides):
    tr = make_trainer(epochs=2, overrides={"train.batch_size": 128, "optim.lr": 0.05, **overrides}, **opts)
    res = tr.fit()
    assert res["test"]["accuracy"] > 1.5 / tr.data.num_classes  # learns (chance is 0.1)
    assert set(res["test"]["per_modality"]) == set(tr.modalities)
    for m in tr.modalities:  # every network learned
        assert res["test"]["per_modality"][m]["accuracy"] > 1.5 / tr.data.num_classes, m
    gm = opts.get("gm", True)
    built = [m for m, t in tr.method._T.items() if t is not None]
    assert built == ((tr.modalities if opts.get("schedule", "batch") == "batch" else tr.modalities[:1]) if gm else [])


def test_resume_matches_uninterrupted(tmp_path):
    ov = {"train.batch_size": 128}
    a = make_trainer(run_dir=tmp_path / "a", epochs=3, overrides=ov, rho=0.05).fit()
    assert make_trainer(run_dir=tmp_path / "b", epochs=3, overrides={**ov, "train.stop_after_epochs": 2},
                        rho=0.05).fit() is None
    tr = make_trainer(run_dir=tmp_path / "b", resume=True, epochs=3, overrides=ov, rho=0.05)
    b = tr.fit()
    assert a["test"] == b["test"]
    import json
    la = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1]
    lb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(la)["diagnostics"] == json.loads(lb)["diagnostics"]
    diag = json.loads(lb)["diagnostics"]  # epoch 3: T of both built at its start, both trained
    for key in ("trained/pix", "trained/fou", "loss/pix", "sam_eps_real/pix", "sam_grad_norm/fou", "gm_ratio/pix",
                "gm_ratio/fou", "sv_min/pix/head1", "sv_max/fou/head3", "sv_top_share/pix"):
        assert key in diag, key
    assert diag["trained/pix"] == 1.0 and diag["trained/fou"] == 1.0 and "stage" not in diag
    assert diag["gm_ratio/pix"] < 1.0 and diag["gm_ratio/fou"] < 1.0  # each damped by the other's T


def test_options_are_typed_one_line_errors():
    from mmbalance.methods import create_method

    for bad, msg in ((dict(sam="perhaps"), "'sam' takes true/false, got 'perhaps'"),
                     (dict(rho=-1e-3), "'rho' takes a number >= 0, got -0.001"),
                     (dict(tau=-1), "'tau' takes a number >= 0, got -1"),
                     (dict(cov_batch_size=0), "'cov_batch_size' takes an integer >= 1, got 0"),
                     (dict(gm_scope=1.5), "'gm_scope' takes one of 'head' or a number in (0, 1], got 1.5"),
                     (dict(gm_scope=0), "'gm_scope' takes one of 'head' or a number in (0, 1], got 0"),
                     (dict(schedule="stages"), "'schedule' takes one of 'batch', 'epochs', 'steps', got 'stages'"),
                     (dict(stage_epochs=[2, 0]),
                      "'stage_epochs' takes an integer >= 1 or a list of integers >= 1, got [2, 0]"),
                     (dict(inner_steps=0), "'inner_steps' takes an integer >= 1 or null, got 0"),
                     (dict(fusion="max"), "'fusion' takes one of 'average', 'entropy', got 'max'"),
                     (dict(variant="code"), "'variant' takes one of 'paper', 'official', got 'code'"),
                     (dict(mixup_alpha=0), "'mixup_alpha' takes a number > 0, got 0"),
                     (dict(clean_weight=1.5), "'clean_weight' takes a number in [0, 1], got 1.5")):
        with pytest.raises(ConfigError) as e:
            create_method("mie", **bad)
        assert str(e.value) == f"method 'mie' option {msg}"
    m = create_method("mie", gm_scope="0.5", schedule="epochs", stage_epochs="25,50", reset_optimizer="yes")
    assert (m.gm_scope, m.stage_epochs, m.reset_optimizer) == (0.5, [25, 50], True)
    assert create_method("mie", schedule="steps", inner_steps="3").inner_steps == 3
    assert create_method("mie", gm_scope="head").gm_scope == "head"


def test_config_errors():
    with pytest.raises(ConfigError, match="fusion"):
        make_trainer(fusion="max")
    with pytest.raises(ConfigError, match="schedule=steps"):
        make_trainer(inner_steps=2)
    with pytest.raises(ConfigError, match="schedule=steps"):
        make_trainer(schedule="steps")
    with pytest.raises(ConfigError, match="schedule=epochs"):
        make_trainer(stage_epochs=[2, 3])
    with pytest.raises(ConfigError, match="reset_optimizer"):
        make_trainer(reset_optimizer=True)
    with pytest.raises(ConfigError, match="schedule"):
        make_trainer(schedule="stages")
    with pytest.raises(ConfigError, match="gm_scope"):
        make_trainer(gm_scope=1.5)
    with pytest.raises(ConfigError, match="stage_epochs takes an integer >= 1 or a non-empty list"):
        make_trainer(schedule="epochs", stage_epochs=[])
    with pytest.raises(ConfigError, match="--fusion sum"):
        make_trainer(overrides={"model.fusion": "sum"})


# ---- found by mutation testing (docs/testing.md) ----------------------------------------------
def test_the_fusion_option_reaches_the_heads_with_and_without_missing_modalities():
    """rule average / entropy in the model's own combine, with a presence mask: a sample with one
    modality present gets that modality's output (log-probability / logits), the other the
    MLA entropy weighting of both; an empty gradient list has a zero perturbation."""
    z = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 0.1, 0.0]],
                      [[0.0, 0.2, 0.0], [0.0, 0.0, 5.0]]])
    mask = torch.tensor([[False, True], [True, True]])
    ent = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    w = torch.softmax(-ent[:, 1], 0)  # sample 1: both present
    want_ent = torch.stack([z[1, 0], w[0] * z[0, 1] + w[1] * z[1, 1]])
    want_avg = torch.stack([z[1, 0].log_softmax(-1), z[:, 1].softmax(-1).mean(0).log()])
    assert torch.allclose(entropy_fusion(z, mask), want_ent, atol=1e-6)
    for rule, want in (("average", want_avg), ("entropy", want_ent)):
        tr = tiny_trainer(fusion=rule)
        assert tr.model.fusion.rule == rule
        zm = {"a": z[0], "b": z[1]}
        assert torch.allclose(tr.model.fusion.combine(zm, mask), want, atol=1e-5), rule
        full = want_avg[1] if rule == "average" else want_ent[1]
        assert torch.allclose(tr.model.fusion.combine(zm)[1], full, atol=1e-5), rule
    eps, norm = sam_perturbation([], 0.5)
    assert eps == [] and float(norm) == 0.0


def test_official_variant_loss_is_the_mixup_sum_plus_the_weighted_clean_sum():
    """Official variant: (1 - w) [lam CE(mix, y) + (1 - lam) CE(mix, y_perm)] + w CE(mix, y),
    every term a sum over the rows (the step divides by the global count)."""
    tr = tiny_trainer(variant="official", clean_weight=0.3)
    batch = batches(tr)[0]
    x, y = batch["inputs"]["a"], batch["label"]
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    lam = 0.7
    logits = tr.model.fusion.heads["a"](tr.model.encode("a", lam * x + (1 - lam) * x[perm]))
    ce = lambda t: F.cross_entropy(logits, t, reduction="sum")  # noqa: E731
    want = 0.7 * (lam * ce(y) + (1 - lam) * ce(y[perm])) + 0.3 * ce(y)
    got = tr.method._loss_sum("a", x, y, (lam, perm))
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_step_reports_the_mean_loss_and_its_sam_diagnostics():
    """schedule epochs, a's stage: the step returns and logs the mean CE over the present samples
    of a (all 16; then a single one), sam_eps = rho for a nonzero gradient (here of norm < 1) and
    sam_loss_rise = L(theta + eps) - L(theta) by hand; sam_gm_step called without the counts
    reads them itself and gives the same step."""
    rho = 0.05

    def reference(model, x, y):
        ref = copy.deepcopy(model)
        params = [p for n, p in ref.named_parameters() if n.startswith(("encoders.a.", "fusion.heads.a."))]
        loss = unimodal_loss(ref, "a", x, y)
        g = torch.autograd.grad(loss, params)
        gn = torch.sqrt(sum((gi ** 2).sum() for gi in g))
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.add_(rho * gi / gn)
            return float(loss), float(gn), float(unimodal_loss(ref, "a", x, y) - loss)

    tr, tr2 = tiny_trainer(rho=rho, gm=False, schedule="epochs"), tiny_trainer(rho=rho, gm=False, schedule="epochs")
    tr2.model.load_state_dict(tr.model.state_dict())
    batch = batches(tr)[0]
    assert bool(batch["present"]["a"].all())
    loss, gn, rise = reference(tr.model, batch["inputs"]["a"], batch["label"])
    assert 0 < gn < 1
    out = tr.method.training_step(batch)
    assert float(out["loss"]) == pytest.approx(loss, rel=1e-5)
    d = tr.method.epoch_diagnostics()
    assert d["loss/a"] == pytest.approx(loss, rel=1e-5)
    assert d["sam_eps/a"] == pytest.approx(rho) and d["sam_grad_norm/a"] == pytest.approx(gn, rel=1e-4)
    assert d["sam_loss_rise/a"] == pytest.approx(rise, rel=1e-3, abs=1e-9)
    # one present sample
    one = copy.deepcopy(batch)
    one["present"]["a"] = torch.zeros_like(one["present"]["a"])
    one["present"]["a"][3] = True
    loss, gn, rise = reference(tr2.model, batch["inputs"]["a"][3:4], batch["label"][3:4])
    tr3 = copy.deepcopy(tr2.model.state_dict())
    assert float(tr2.method.training_step(one)["loss"]) == pytest.approx(loss, rel=1e-5)
    d = tr2.method.epoch_diagnostics()
    assert d["sam_eps/a"] == pytest.approx(rho) and d["sam_loss_rise/a"] == pytest.approx(rise, rel=1e-3, abs=1e-9)
    direct = tiny_trainer(rho=rho, gm=False, schedule="epochs")
    direct.model.load_state_dict(tr3)
    assert float(direct.method.sam_gm_step("a", one)) == pytest.approx(loss, rel=1e-5)
    for p, q in zip(tr2.model.parameters(), direct.model.parameters()):
        assert torch.allclose(p, q, atol=1e-7)


def test_short_schedule_warns_about_the_untrained_modality(caplog):
    """schedule epochs, one epoch per stage, two modalities: 1 epoch leaves b untrained (a
    warning naming it and the stage count), 2 epochs train both (no warning). With ``batch``
    the modality before the first (the default) is the last."""
    import logging
    with caplog.at_level(logging.WARNING, logger="mmbalance"):
        tiny_trainer(schedule="epochs", epochs=2)
    assert not [r for r in caplog.records if "never trained" in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmbalance"):
        tiny_trainer(schedule="epochs", epochs=1)
    msgs = [r.getMessage() for r in caplog.records if "never trained" in r.getMessage()]
    assert len(msgs) == 1 and "has 1 stage(s); modality b is never trained" in msgs[0]
    assert tiny_trainer(schedule="batch").method.previous_modality() == "b"


def test_predict_with_a_missing_modality_ignores_its_input():
    """predict with a absent on some samples: fused logits are b's log-probabilities there, the
    unimodal logits are the networks' own, and nothing depends on what the absent rows hold."""
    tr = tiny_trainer(missing={"a": 0.5})
    tr.model.eval()
    batch = batches(tr)[0]
    absent = ~batch["present"]["a"]
    assert 0 < int(absent.sum()) < 16
    with torch.no_grad():
        out = tr.method.predict(batch)
        junk = copy.deepcopy(batch)
        junk["inputs"]["a"][absent] = 1e3 * torch.randn_like(junk["inputs"]["a"][absent])
        out2 = tr.method.predict(junk)
        zb = tr.model.fusion.heads["b"](tr.model.encode("b", batch["inputs"]["b"]))
    assert out.unimodal_logits["b"].shape == zb.shape
    assert torch.allclose(out.logits[absent], zb[absent].log_softmax(-1), atol=1e-5)
    assert torch.allclose(out.unimodal_logits["b"], zb, atol=1e-5)
    assert torch.allclose(out.logits, out2.logits, atol=1e-5)
    for m in ("a", "b"):
        assert out.unimodal_logits[m].shape == zb.shape
        assert torch.allclose(out.unimodal_logits[m], out2.unimodal_logits[m], atol=1e-5), m


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rng_state_on_cuda_replays_the_device_generator():
    """The SAM second pass replays the dropout mask on a GPU too: the saved state is the CUDA
    generator's of the trainer's device, and restoring it replays the same draw."""
    from mmbalance.methods.mie import _rng_state, _set_rng_state
    dev = torch.device("cuda")
    state = _rng_state(dev)
    assert torch.equal(state[1], torch.cuda.get_rng_state(dev))
    a = torch.rand(5, device=dev)
    _set_rng_state(state, dev)
    assert torch.equal(torch.rand(5, device=dev), a)
