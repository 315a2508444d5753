"""OPM: on-the-fly prediction modulation (Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced
Multimodal Learning", T-PAMI 2024; the feed-forward half of the paper, OGM being ``ogm_ge``).

During training the features of the dominant modality are dropped per sample with a probability
that grows with how far its score is ahead, so the fused prediction has to rely on the others.
Pure math: :func:`opm_scores`, :func:`opm_drop_probabilities`, :func:`opm_random_draws`,
:func:`opm_keep_masks`, :func:`opm_rescale`; :class:`OPM` wires them into a training step.
"""
from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
from torch import Tensor

from ..options import Interval
from ..registry import ConfigError
from . import register_method
from .base import Method, masked_cross_entropy

RESCALES = ("concat", "per_modality", "none")


def opm_scores(unimodal_logits: Sequence[Tensor], labels: Tensor,
               present: Sequence[Tensor | None] | None = None) -> Tensor:
    """``s_m = sum_b softmax(z_m)_{b, y_b}`` over the samples where modality m is present;
    shape (M,), float64, detached (sums, so that summing over processes gives the global batch's).

    >>> z = [torch.tensor([[0.0, 0.0]]), torch.tensor([[10.0, -10.0]])]
    >>> opm_scores(z, torch.tensor([0])).round(decimals=3).tolist()
    [0.5, 1.0]
    """
    present = list(present) if present is not None else [None] * len(unimodal_logits)
    rows = []
    with torch.no_grad():
        for z, p in zip(unimodal_logits, present):
            py = z.detach().double().softmax(1).gather(1, labels.view(-1, 1).long()).squeeze(1)
            if p is not None:
                py = py * p.view(-1).to(py.dtype)
            rows.append(py.sum())
    return torch.stack(rows)


def opm_drop_probabilities(scores: Tensor, q_base: float, lam: float, counts: Tensor | None = None,
                           eps: float = 1e-12) -> tuple[Tensor, Tensor]:
    """Drop probabilities ``q`` (M,) and discrepancy ratios ``rho`` (M,) from the scores ``s`` (M,),
    float32, computed on the scores' device (float64 arithmetic; no host synchronisation).

    ``rho_m = s_m / mean_{n != m} s_n`` (two modalities: ``s_1 / s_2`` and its inverse);
    ``q_m = q_base * (1 + lam * tanh(rho_m - 1))`` where ``rho_m > 1``, else 0; clipped to [0, 1].
    Only modalities ahead of the others are dropped; for two modalities at most one.

    ``counts`` (M,), the number of samples each score sums over (missing modalities): the ratio
    then compares mean scores ``s_m / n_m``, and a modality with no sample takes no part (its
    ``q`` and ``rho`` are 0); with fewer than two taking part nothing is dropped. Equal counts
    give the plain rule.

    >>> q, rho = opm_drop_probabilities(torch.tensor([3.0, 1.0]), q_base=0.5, lam=0.5)
    >>> round(float(q[0]), 4), float(q[1]), rho.tolist()
    (0.741, 0.0, [3.0, 0.3333333432674408])
    """
    s = scores.detach().reshape(-1).double()
    M = s.numel()
    if M < 2:
        raise ConfigError("opm needs at least two modalities")
    if counts is None:
        on, mean = torch.ones(M, dtype=torch.bool, device=s.device), s
    else:  # compare mean scores; a modality without samples takes no part
        n = counts.detach().reshape(-1).to(s)
        on = n > 0
        mean = torch.where(on, s / n, 0.0)
    k = on.sum().to(s.dtype)
    total = mean[0]
    for i in range(1, M):  # left to right, as a Python sum (absent modalities add an exact 0)
        total = total + mean[i]
    part = on & (k >= 2)
    rho = torch.where(part, mean / ((total - mean) / (k - 1.0)).clamp_min(eps), 0.0)
    q = torch.where(part & (rho > 1.0), (q_base * (1.0 + lam * torch.tanh(rho - 1.0))).clamp(0.0, 1.0), 0.0)
    return q.float(), rho.float()


def opm_random_draws(seed: int, table_size: int, num_modalities: int) -> tuple[float, Tensor]:
    """The random numbers of one step, from a generator seeded by ``seed``: the execution draw
    ``u`` (the drop runs when ``u < p_exe``) and a ``(table_size, M)`` table of uniforms, one per
    training sample (by its dataset index) and modality. Every process draws the same numbers, so
    a sample's mask does not depend on which process holds it (several processes apply the
    update one process would)."""
    g = torch.Generator()
    g.manual_seed(int(seed) % (2**63))
    u = float(torch.rand(1, generator=g))
    return u, torch.rand(int(table_size), int(num_modalities), generator=g)


def opm_keep_masks(uniforms: Tensor, q: Tensor) -> Tensor:
    """Per sample and modality, True where the feature is kept: ``uniform >= q_m`` (so a modality
    is dropped with probability ``q_m``). ``uniforms`` (B, M), ``q`` (M,) -> bool (B, M).

    >>> opm_keep_masks(torch.tensor([[0.1, 0.9], [0.6, 0.2]]), torch.tensor([0.5, 0.0])).tolist()
    [[False, True], [True, True]]
    """
    return uniforms >= q.to(uniforms).view(1, -1)


def opm_rescale(q: Tensor, dims: Sequence[int], mode: str = "concat") -> Tensor:
    """Per-modality factors (M,) that multiply the kept features.

    ``concat`` (the public code): one factor ``1 / (1 - theta)`` for every modality, with
    ``theta = sum_m d_m q_m / sum_m d_m`` the expected dropped fraction of the concatenated
    feature. ``per_modality``: ``1 / (1 - q_m)`` (inverted dropout per modality: each modality's
    feature keeps its expectation). ``none``: 1.

    >>> opm_rescale(torch.tensor([0.5, 0.0]), [4, 4]).tolist()
    [1.3333333730697632, 1.3333333730697632]
    >>> opm_rescale(torch.tensor([0.5, 0.0]), [4, 4], "per_modality").tolist()
    [2.0, 1.0]
    """
    if mode not in RESCALES:
        raise ConfigError(f"opm: unknown rescale '{mode}'; valid: {', '.join(RESCALES)}")
    q = q.double()
    if mode == "none":
        return torch.ones_like(q).float()
    if mode == "per_modality":
        return (1.0 / (1.0 - q).clamp_min(1e-6)).float()
    # theta = sum_m d_m q_m / sum_m d_m on q's device (the widths are host numbers)
    theta = torch.stack([q[i] * float(d) for i, d in enumerate(dims)]).sum() / float(sum(float(d) for d in dims))
    return (1.0 / (1.0 - theta).clamp_min(1e-6)).expand(q.shape).float()


def _step_seed(seed: int, step: int) -> int:
    return int(seed) * 1_000_003 + int(step) * 7_919 + 104_729


@register_method("opm", summary="OPM: drop the dominant modality's features with a score-ratio probability (Wei 2024)",
                 paper='Wei, Hu, Du, Wen, "On-the-fly Modulation for Balanced Multimodal Learning"',
                 venue='T-PAMI', year=2024, category='feed-forward')
class OPM(Method):
    """On-the-fly Prediction Modulation (the feed-forward half of the T-PAMI 2024 paper; public
    code ``GeWu-Lab/BML_TPAMI2024``, ``code/models/Classifier.py`` and ``code/main.py``).

    Per step, in the window ``[modulation_start, modulation_end]`` (0-based epochs, inclusive):

    1. One forward: encoder features ``h_m`` and, from the model's fusion on the full features,
       the unimodal logits ``z_m``; scores ``s_m = sum_b softmax(z_m)_{b, y_b}`` over the samples
       where m is present, summed over processes (:func:`opm_scores`).
    2. ``rho_m = s_m / mean_{n != m} s_n`` (mean scores over the present samples when
       modalities are missing) and the drop probability
       ``q_m = q_base (1 + lam tanh(rho_m - 1))`` for ``rho_m > 1``, else 0, clipped to [0, 1]
       (:func:`opm_drop_probabilities`).
    3. With probability ``p_exe`` (one draw per step), every sample's feature ``h_m`` is zeroed
       with probability ``q_m`` (independently per sample and modality; :func:`opm_keep_masks`)
       and the kept features are multiplied by the rescale factor (:func:`opm_rescale`). Samples
       left with no feature (every present modality dropped) are removed from the step.
    4. The fusion runs again on the modulated features; ``L = CE(z, y)`` averaged over the kept
       samples of the global batch; backward; optimizer step. Outside the window, or when the
       drop is not executed: ``L = CE(z, y)`` on the full features (plain joint training).

    Inference: the fused logits on the full features (nothing is dropped).

    Options:
        q_base: base drop probability of the dominant modality (0.5, the public
            ``scripts/train_opm.sh``; ``config.py`` and BalanceBenchmark use 0.4).
        lam: how much the probability grows with the score ratio (0.5).
        p_exe: probability that the drop is executed in a step (0.7).
        modulation_start: first epoch with dropping, 0-based (6: the public code drops from its
            epoch index 6 on, ``warm_up = 1 if epoch <= 5``).
        modulation_end: last epoch with dropping, inclusive (null = until the end).
        rescale: ``concat`` (the public code: one factor ``1/(1 - theta)`` for all features,
            ``theta = sum_m d_m q_m / sum_m d_m``), ``per_modality`` (``1/(1 - q_m)`` on each
            modality's kept features) or ``none``.

    Decisions:
        * The drop probability and the rescale follow the public code (``calcu_q`` and
          ``Modality_drop`` in ``code/models/Classifier.py``).
        * ``rho_m`` is the ratio to the *mean* of the other modalities' scores: for two
          modalities it is the code's ``s_1 / s_2``; for more, BalanceBenchmark divides
          by the *sum* of the others (``OPM_trainer.py``), which makes ``rho_m > 1`` rare for
          M >= 3. The mean is the rule ``ogm_ge`` uses here.
        * The scores come from the model's own unimodal logits (for ``concat``: ``W_m h_m + b/M``,
          the code's ``b/2`` for two modalities), detached, as the code.
        * The random numbers of a step come from a generator seeded by ``(train.seed,
          global_step)``; each sample's draw is looked up by its dataset index, so several
          processes drop exactly what one process would, and a resumed run replays the drops.
        * Missing modalities: scores count present samples only and the ratio compares mean
          scores (a modality absent from the whole global batch takes no part); a sample whose
          present modalities are all dropped is removed, like a sample with every modality
          dropped.

    Diagnostics per epoch: ``q_<m>`` (drop probability, averaged over steps; also outside the
    window, where nothing is dropped), ``rho_<m>``, ``score_<m>`` (mean true-class probability),
    ``executed`` (fraction of steps that dropped), ``dropped_<m>`` (fraction of the batch's
    samples whose m was dropped), ``removed`` (fraction of samples removed). Cost: ~1.0x joint
    training (one extra fusion-head evaluation on dropping steps). Host synchronisation: the
    probabilities and masks stay on the device; a dropping step reads the global number of kept
    samples once (none kept anywhere = no update), and the execution draw is a host number.
    """

    def __init__(self, q_base: Annotated[float, Interval(0, 1)] = 0.5,
                 lam: Annotated[float, Interval(0, None)] = 0.5,
                 p_exe: Annotated[float, Interval(0, 1)] = 0.7,
                 modulation_start: Annotated[int, Interval(0, None)] = 6,
                 modulation_end: int | None = None,
                 rescale: Literal["concat", "per_modality", "none"] = "concat"):
        super().__init__()
        self.q_base = float(q_base)
        self.lam = float(lam)
        self.p_exe = float(p_exe)
        self.modulation_start = int(modulation_start)
        self.modulation_end = None if modulation_end is None else int(modulation_end)
        self.rescale = rescale

    def setup(self, trainer):
        super().setup(trainer)
        if len(self.model.modalities) < 2:
            raise ConfigError("opm needs at least two modalities (it drops the dominant one's features)")

    def training_step(self, batch):
        tr, model = self.trainer, self.model
        mods = model.modalities
        M = len(mods)
        y = batch["label"]
        present = batch["present"]
        executed = False
        if self.in_window(tr.epoch):  # the step's draws do not depend on the forward
            u, table = opm_random_draws(_step_seed(tr.cfg.train.seed, tr.global_step), len(tr.data.train), M)
            executed = u < self.p_exe
        with tr.autocast():
            feats = model.encode_all(batch["inputs"], present)
            if executed:  # the full features only score the modalities: no graph
                with torch.no_grad():
                    out = model.fuse({m: f.detach() for m, f in feats.items()}, present)
            else:
                out = model.fuse(feats, present)
        pres = torch.stack([present[m].view(-1) for m in mods], 1)  # (B, M) bool
        # one collective every step: score sums and present counts per modality (device tensors:
        # q and rho are computed on the device, no host synchronisation)
        stats = tr.all_reduce_sum(torch.stack([
            opm_scores([out.unimodal_logits[m] for m in mods], y, [present[m] for m in mods]),
            pres.sum(0).double()], 1))
        scores, counts = stats[:, 0], stats[:, 1]
        q, rho = opm_drop_probabilities(scores, self.q_base, self.lam, counts)
        loss = None
        if executed:
            # this batch's rows of the step's table (drawn on the host by dataset index; the
            # copy to the device does not wait for it)
            idx = batch["index"]
            keep = opm_keep_masks(table.to(idx.device, non_blocking=True)[idx], q).to(y.device)  # (B, M)
            scale = opm_rescale(q, [model.feature_dim(m) for m in mods], self.rescale)
            modulated = {m: feats[m] * (keep[:, i].view(-1, 1).to(feats[m].dtype) * scale[i].to(feats[m].dtype))
                         for i, m in enumerate(mods)}
            kept = (keep & pres).any(1)  # a sample keeps at least one present modality
            with tr.autocast():
                out = model.fuse(modulated, present)
            # second collective, on every process alike (the execution draw is shared): the number
            # of kept samples and of dropped features per modality in the global batch
            drop_stats = tr.all_reduce_sum(torch.cat([kept.sum().view(1), ((~keep) & pres).sum(0),
                                                      torch.full((1,), y.numel(), device=y.device)]).double())
            for i, m in enumerate(mods):
                self.log(f"dropped_{m}", drop_stats[1 + i] / counts[i].clamp(min=1.0))
            self.log("removed", 1.0 - drop_stats[0] / drop_stats[-1].clamp(min=1.0))
            # the one host read of the step: with no sample kept anywhere there is no update at
            # all (a zero loss would still move the weights through momentum and weight decay)
            n_kept = float(drop_stats[0])
            if n_kept > 0:
                loss = masked_cross_entropy(out.logits, y, kept, n_kept, tr.world_size)
        else:
            loss = self.ce(out.logits, y)
            for m in mods:
                self.log(f"dropped_{m}", 0.0)
            self.log("removed", 0.0)
        for i, m in enumerate(mods):
            self.log(f"q_{m}", q[i])
            self.log(f"rho_{m}", rho[i])
            self.log(f"score_{m}", scores[i] / counts[i], weight=counts[i] > 0)
        self.log("executed", float(executed))
        if loss is None:  # every sample of the global batch lost all its features: no update
            return {"loss": 0.0}
        tr.step(loss)
        return {"loss": loss.detach()}


__all__ = ["OPM", "opm_drop_probabilities", "opm_keep_masks", "opm_random_draws", "opm_rescale", "opm_scores"]
