"""D&R: diagnosing and re-learning (Wei, Li, Feng, Hu, "Diagnosing and Re-learning for Balanced
Multimodal Learning", ECCV 2024).

Every few epochs each modality's learning state is diagnosed from the separability of its
encoder's features (the purity of a k-means clustering, on the training and on the validation
split), and each encoder is softly re-initialised in proportion to its train/validation purity
gap: a well-learnt (over-fitted) encoder is pulled back toward its initial weights more, a
scarcely informative one, whose features separate poorly on both splits, barely at all.
Pure math: :func:`minmax_scale`, :func:`kmeans`, :func:`cluster_purity`, :func:`separability`,
:func:`purity_gap`, :func:`reinit_strength`, :func:`soft_reinit_`; :class:`DR` wires them in.
"""
from __future__ import annotations

from typing import Annotated, Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..options import Interval
from ..utils import epoch_seed
from . import register_method
from .base import Method


def minmax_scale(x: Tensor, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Each column mapped linearly onto ``[low, high]`` (the public code's ``MinMaxScaler((-1, 1))``);
    a constant column maps to ``low``.

    >>> minmax_scale(torch.tensor([[0.0, 5.0], [2.0, 5.0], [4.0, 5.0]])).tolist()
    [[-1.0, -1.0], [0.0, -1.0], [1.0, -1.0]]
    """
    x = x.double()
    lo, hi = x.min(0).values, x.max(0).values
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (x - lo) / span * (high - low) + low


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    return torch.cdist(x, c).pow(2)


def _kmeans_pp(x: Tensor, k: int, g: torch.Generator) -> Tensor:
    """k-means++ seeding: the first center uniformly, each next one with probability
    proportional to the squared distance to the nearest center chosen so far."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=g))]
    d2 = _sq_dist(x, x[idx]).squeeze(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total > 0:
            nxt = int(torch.multinomial((d2 / total).cpu(), 1, generator=g))
        else:  # every point coincides with a center: any point will do
            nxt = int(torch.randint(n, (1,), generator=g))
        idx.append(nxt)
        d2 = torch.minimum(d2, _sq_dist(x, x[nxt:nxt + 1]).squeeze(1))
    return x[idx].clone()


def kmeans(x: Tensor, k: int, seed: int = 0, n_init: int = 1, max_iter: int = 300,
           tol: float = 1e-4) -> tuple[Tensor, Tensor, float]:
    """Lloyd's k-means with k-means++ seeding (float64, on ``x``'s device, seeded).

    Returns ``(assignment (N,), centers (k, d), inertia)``, the run with the lowest inertia of
    ``n_init``. Stops when the squared center shift is at most ``tol`` times the mean feature
    variance (scikit-learn's rule). An emptied cluster is moved to the point farthest from its
    center.
    """
    x = x.double()
    n = x.shape[0]
    if n < k:
        raise ValueError(f"kmeans: {n} points for {k} clusters")
    g = torch.Generator()
    g.manual_seed(int(seed) % (2**63))
    threshold = float(tol) * float(x.var(0, unbiased=False).mean())
    best: tuple[Tensor, Tensor, float] | None = None
    for _ in range(max(int(n_init), 1)):
        centers = _kmeans_pp(x, k, g)
        for _ in range(int(max_iter)):
            d2 = _sq_dist(x, centers)
            assign = d2.argmin(1)
            counts = torch.bincount(assign, minlength=k)
            new = torch.zeros_like(centers).index_add_(0, assign, x) / counts.clamp_min(1).unsqueeze(1).to(x)
            empty = torch.nonzero(counts == 0).flatten().tolist()
            if empty:
                far = d2.gather(1, assign.view(-1, 1)).squeeze(1).argsort(descending=True)
                for j, e in enumerate(empty):
                    new[e] = x[far[j]]
            shift = float((new - centers).pow(2).sum())
            centers = new
            if shift <= threshold:
                break
        d2 = _sq_dist(x, centers)
        assign = d2.argmin(1)
        inertia = float(d2.gather(1, assign.view(-1, 1)).sum())
        if best is None or inertia < best[2]:
            best = (assign, centers, inertia)
    assert best is not None
    return best


def cluster_purity(labels: Tensor, clusters: Tensor) -> float:
    """Purity of a clustering: every cluster votes for its most frequent label; the fraction of
    samples whose label is their cluster's vote, ``sum_c max_y |c ∩ y| / N``.

    >>> cluster_purity(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 0, 1, 1, 1]))
    0.6666666666666666
    """
    labels, clusters = labels.long().view(-1), clusters.long().view(-1)
    n = labels.numel()
    if n == 0:
        return float("nan")
    _, lab = torch.unique(labels, return_inverse=True)
    _, clu = torch.unique(clusters, return_inverse=True)
    L = int(lab.max()) + 1
    table = torch.bincount(clu * L + lab, minlength=(int(clu.max()) + 1) * L).view(-1, L)
    return float(table.max(1).values.sum()) / n


def separability(features: Tensor, labels: Tensor, num_clusters: int, seed: int = 0, n_init: int = 1,
                 max_iter: int = 300) -> float:
    """The diagnosis of one representation: purity of a ``num_clusters``-means clustering of the
    min-max scaled features (NaN with fewer samples than clusters)."""
    if features.shape[0] < num_clusters:
        return float("nan")
    assign, _, _ = kmeans(minmax_scale(features), num_clusters, seed=seed, n_init=n_init, max_iter=max_iter)
    return cluster_purity(labels, assign)


def purity_gap(train_purity: float, val_purity: float) -> float:
    """The learning state ``g = |P_train - P_val|`` (0 when either is undefined).

    >>> round(purity_gap(0.9, 0.6), 6), purity_gap(0.5, float("nan"))
    (0.3, 0.0)
    """
    g = abs(float(train_purity) - float(val_purity))
    return g if g == g else 0.0


def reinit_strength(gap: float, lam: float) -> float:
    """The re-initialisation strength ``alpha = tanh(lam * g)`` in [0, 1).

    >>> round(reinit_strength(0.3, 3.0), 6)
    0.716298
    """
    return float(torch.tanh(torch.tensor(float(lam) * float(gap), dtype=torch.float64)))


@torch.no_grad()
def soft_reinit_(params: Sequence[nn.Parameter], initial: Sequence[Tensor], alpha: float) -> None:
    """In place: ``theta <- (1 - alpha) theta + alpha theta_init``."""
    for p, p0 in zip(params, initial):
        p.mul_(1.0 - float(alpha)).add_(p0.to(p.device, p.dtype), alpha=float(alpha))


@register_method("dr", summary="D&R: purity-gap diagnosis per modality, soft re-initialisation of the encoders (Wei 2024)",
                 paper='Wei, Li, Feng, Hu, "Diagnosing and Re-learning for Balanced Multimodal Learning"',
                 venue='ECCV', year=2024, category='optimisation')
class DR(Method):
    """Diagnosing & Re-learning (Wei et al., ECCV 2024; public code
    ``GeWu-Lab/Diagnosing_Relearning_ECCV2024``, ``code/ours.py``).

    Training steps are plain joint training, ``L = CE(z, y)``. Diagnosis and re-learning run
    after epoch e (0-based) when ``e > 0``, ``e % interval == 0`` and fewer than ``max_reinits``
    re-initialisations were made — after that epoch's validation, at the start of the next:

    1. Encoder features ``h_m`` of every training sample and every validation sample (eval mode,
       no gradient; samples without modality m left out).
    2. Per modality and split: min-max scale each feature to [-1, 1], cluster with k-means into
       as many clusters as classes, and take the clustering's purity (:func:`separability`):
       ``P_train^m`` and ``P_val^m``.
    3. Learning state ``g_m = |P_train^m - P_val^m|`` (:func:`purity_gap`), strength
       ``alpha_m = tanh(lam * g_m)`` (:func:`reinit_strength`).
    4. Every parameter of encoder m: ``theta <- (1 - alpha_m) theta + alpha_m theta_init``, with
       ``theta_init`` the encoder's weights before training (:func:`soft_reinit_`). The fusion
       head, BatchNorm running statistics and the optimizer state are kept (as the code).

    Any fusion, any number of modalities. Inference: the fused logits.

    Options:
        lam: re-initialisation scale lambda in ``tanh(lam * g)`` (3.0, the public
            ``script/ours.sh`` ``move_lambda``).
        interval: epochs between diagnoses (20, the public script's ``reinit_epoch``).
        max_reinits: at most this many re-initialisations (3, the script's ``reinit_num``;
            null = no limit).
        kmeans_init: k-means restarts per clustering, the lowest-inertia one kept (1; current
            scikit-learn's default for k-means++, which the public code calls).
        kmeans_iter: maximum Lloyd iterations per clustering (300).

    Decisions:
        * The validation split of the gap is the run's validation split (the paper's V; the
          code's ``val.csv``), which also selects the checkpoint; the test split is never read.
        * Training features are taken in eval mode with the deterministic (evaluation)
          transforms; the public code passes its shuffled training loader with training
          augmentation, in eval mode.
        * k-means is this module's (:func:`kmeans`, k-means++ seeded by the run seed and the
          epoch), not scikit-learn's; with several processes every process computes the
          features of its share, the shares are summed into the whole split on every process,
          rank 0 clusters, and its strengths are summed over processes (the others add 0), so
          every replica re-initialises identically.
        * The initial weights are part of the method's checkpoint state until the last allowed
          re-initialisation, so a resumed run re-initialises as an uninterrupted one.

    Diagnostics per epoch: ``reinits`` (re-initialisations so far); in an epoch that starts
    with a diagnosis: ``purity_train_<m>``, ``purity_val_<m>``, ``gap_<m>``, ``alpha_<m>``.
    Cost: ~1.0x joint training per step, plus at each diagnosis one evaluation pass over the
    training and validation splits and 2M k-means clusterings.
    """

    def __init__(self, lam: Annotated[float, Interval(0, None)] = 3.0,
                 interval: Annotated[int, Interval(1, None)] = 20,
                 max_reinits: Annotated[int, Interval(0, None)] | None = 3,
                 kmeans_init: Annotated[int, Interval(1, None)] = 1,
                 kmeans_iter: Annotated[int, Interval(1, None)] = 300):
        super().__init__()
        self.lam = float(lam)
        self.interval = int(interval)
        self.max_reinits = None if max_reinits is None else int(max_reinits)
        self.kmeans_init = int(kmeans_init)
        self.kmeans_iter = int(kmeans_iter)
        self.count = 0
        self.initial: dict[str, dict[str, Tensor]] | None = None

    def setup(self, trainer):
        super().setup(trainer)
        if self.max_reinits != 0:
            self.initial = {m: {n: p.detach().clone() for n, p in enc.named_parameters()}
                            for m, enc in self.model.encoders.items()}

    # -- schedule ------------------------------------------------------------------------------
    def due(self, epoch: int) -> bool:
        """True when a diagnosis runs at the start of 0-based ``epoch`` (i.e. after epoch - 1)."""
        prev = int(epoch) - 1
        room = self.max_reinits is None or self.count < self.max_reinits
        return prev > 0 and prev % self.interval == 0 and room

    def on_epoch_start(self, epoch):
        if self.due(epoch):
            self.relearn(self.diagnose(epoch))
        self.log("reinits", float(self.count))

    # -- diagnosis -------------------------------------------------------------------------------
    @torch.no_grad()
    def split_features(self, dataset) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Encoder features ``{m: (N, d_m)}``, presence ``(N, M)`` and labels ``(N,)`` of a whole
        split, in eval mode: each process encodes its share, the shares are summed into place."""
        tr, model = self.trainer, self.model
        mods = model.modalities
        dims = [model.feature_dim(m) for m in mods]
        n = len(dataset)
        part = tr.shard(dataset)
        # the shard's positions in the split (a Subset of it), or the whole split on one process
        positions = torch.as_tensor(list(part.indices) if part is not dataset else range(n), dtype=torch.long)
        width = sum(dims) + len(mods) + 1
        table = torch.zeros(n, width, device=tr.device)
        at = 0
        for batch in tr.batches(part):
            with tr.autocast():
                feats = model.encode_all(batch["inputs"], batch["present"])
            rows = positions[at:at + batch["label"].numel()].to(tr.device)
            at += batch["label"].numel()
            cols = [feats[m].float() for m in mods] + [batch["present"][m].float().view(-1, 1) for m in mods]
            cols.append(batch["label"].float().view(-1, 1))
            table[rows] = torch.cat(cols, 1)
        table = tr.all_reduce_sum(table)
        out, s = {}, 0
        for m, d in zip(mods, dims):
            out[m] = table[:, s:s + d]
            s += d
        present = table[:, s:s + len(mods)] > 0.5
        labels = table[:, -1].round().long()
        return out, present, labels

    def diagnose(self, epoch: int) -> dict[str, float]:
        """Re-initialisation strengths ``{m: alpha_m}`` (logged with the purities); the same on
        every process."""
        tr = self.trainer
        mods = self.model.modalities
        C = tr.data.num_classes
        seed = epoch_seed(tr.cfg.train.seed, epoch)
        splits = {"train": self.split_features(tr.data.train_eval), "val": self.split_features(tr.data.val)}
        result = torch.zeros(len(mods), 3, dtype=torch.float64, device=tr.device)  # P_train, P_val, alpha
        if tr.rank == 0:
            for i, m in enumerate(mods):
                purity = {}
                for name, (feats, present, labels) in splits.items():
                    keep = present[:, i]
                    purity[name] = separability(feats[m][keep], labels[keep], C, seed=seed + i,
                                                n_init=self.kmeans_init, max_iter=self.kmeans_iter)
                alpha = reinit_strength(purity_gap(purity["train"], purity["val"]), self.lam)
                result[i] = torch.tensor([purity["train"], purity["val"], alpha], dtype=torch.float64)
        result = tr.all_reduce_sum(result).cpu()
        out = {}
        for i, m in enumerate(mods):
            p_train, p_val, alpha = (float(v) for v in result[i])
            self.log(f"purity_train_{m}", p_train)
            self.log(f"purity_val_{m}", p_val)
            self.log(f"gap_{m}", purity_gap(p_train, p_val))
            self.log(f"alpha_{m}", alpha)
            out[m] = alpha
        return out

    def relearn(self, alphas: Mapping[str, float]) -> None:
        """Soft re-initialisation of every encoder by its strength."""
        assert self.initial is not None, "dr: initial weights missing"
        for m, enc in self.model.encoders.items():
            names, params = zip(*enc.named_parameters())
            soft_reinit_(params, [self.initial[m][n] for n in names], alphas[m])
        self.count += 1
        if self.max_reinits is not None and self.count >= self.max_reinits:
            self.initial = None  # no further re-initialisation: free the copy

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch):
        _, loss = self.fused_forward(batch)
        self.trainer.step(loss)
        return {"loss": loss.detach()}

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        st: dict[str, Any] = {"count": self.count}
        if self.initial is not None:
            st["initial"] = {m: {n: t.cpu().clone() for n, t in d.items()} for m, d in self.initial.items()}
        return st

    def load_state_dict(self, state):
        self.count = int(state.get("count", 0))
        if "initial" in state:
            dev = self.trainer.device if self.trainer is not None else "cpu"
            self.initial = {m: {n: t.to(dev) for n, t in d.items()} for m, d in state["initial"].items()}
        elif self.max_reinits is not None and self.count >= self.max_reinits:
            self.initial = None


__all__ = ["DR", "cluster_purity", "kmeans", "minmax_scale", "purity_gap", "reinit_strength", "separability",
           "soft_reinit_"]
