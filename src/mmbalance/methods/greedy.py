"""Greedy / balanced multimodal learning (Wu, Jastrzebski, Cho & Geras, ICML 2022).

Two unimodal branches joined by MMTM blocks (Joze et al. 2020) at several stages, one head
per branch, fused output = mean of the two heads. The conditional learning speed of each
branch (how fast its cross-modal "bypass" parameters learn relative to its own) is tracked;
when the two branches are imbalanced, the slow branch is trained for a few steps with the
cross-modal information it receives frozen to its running mean.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import MultimodalModel, create_fusion
from ..models.encoders import MLPEncoder
from ..options import Annotated, Interval, Literal
from ..registry import ConfigError
from . import register_method
from .base import Method, ModelSpec

log = logging.getLogger("mmbalance")

Excitation = Literal["sigmoid", "2sigmoid"]
EXCITATIONS: tuple[str, ...] = get_args(Excitation)


# ---------------------------------------------------------------------------------- MMTM
class MMTM(nn.Module):
    """Multimodal transfer module between two feature maps (Joze et al. 2020).

    Joint squeeze ``s = [mean-pool(A); mean-pool(B)]`` -> ``z = ReLU(W s)`` (width
    ``2 (C_A + C_B) / reduction``) -> per-modality excitations ``E_A = act(W_A z)``,
    ``E_B = act(W_B z)`` that rescale the channels. ``act`` is ``sigmoid`` (the Greedy code)
    or ``2 * sigmoid`` (the MMTM paper). The running mean of each excitation over training
    batches (cumulative average, as the Greedy code) is kept in buffers; with ``caring = c``
    the excitation applied to modality c is replaced by that running mean (detached).
    """

    def __init__(self, dim_a: int, dim_b: int, reduction: float = 4, excitation: str = "2sigmoid"):
        super().__init__()
        if excitation not in EXCITATIONS:  # a direct call (the method's option is validated by the config layer)
            raise ValueError(f"MMTM excitation must be one of {', '.join(EXCITATIONS)}, got {excitation!r}")
        hidden = max(1, int(2 * (dim_a + dim_b) / reduction))
        self.excitation = excitation
        self.fc_squeeze = nn.Linear(dim_a + dim_b, hidden)
        self.fc_excite = nn.ModuleList([nn.Linear(hidden, dim_a), nn.Linear(hidden, dim_b)])
        self.register_buffer("running_0", torch.zeros(dim_a))
        self.register_buffer("running_1", torch.zeros(dim_b))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.reduce = None  # set by the method: all-reduce of the batch-mean excitation (DDP)

    def forward(self, s_a: Tensor, s_b: Tensor, caring: int | None = None) -> tuple[Tensor, Tensor]:
        """Excitations ``(B, C_A), (B, C_B)`` from the squeezed vectors ``(B, C_A), (B, C_B)``."""
        z = F.relu(self.fc_squeeze(torch.cat([s_a, s_b], dim=1)))
        exc = [torch.sigmoid(fc(z)) for fc in self.fc_excite]
        if self.excitation == "2sigmoid":
            exc = [2.0 * e for e in exc]
        if self.training:
            with torch.no_grad():
                n = self.steps.to(torch.float32)
                for i, e in enumerate(exc):  # modality i's mean from modality i (official bug fixed)
                    mean = e.detach().float().mean(0)
                    if self.reduce is not None:
                        mean = self.reduce(mean)
                    buf = getattr(self, f"running_{i}")
                    buf.copy_((mean + buf * n) / (n + 1))
                self.steps += 1
        if caring is not None:
            run = getattr(self, f"running_{caring}").to(exc[caring].dtype)
            exc[caring] = run.detach().unsqueeze(0).expand_as(exc[caring])
        return exc[0], exc[1]


# ---------------------------------------------------------------------------------- branches
class _Branch:
    """Stage-wise view of an encoder (plain object, not a module: the encoder owns the weights).

    ``begin(x)`` -> state, ``run(stage, h)``, ``squeeze(h) -> (B, C)``, ``excite(h, e)``,
    ``end(h) -> (B, out_dim)``; ``stages`` names the stages, ``channels[stage]`` their widths.
    """

    def __init__(self, encoder: nn.Module, modality: str):
        from ..models.resnet import ResNet18Audio, ResNet18Visual

        self.encoder = encoder
        self.frames = 1
        if isinstance(encoder, (ResNet18Audio, ResNet18Visual)):
            self.kind = "visual" if isinstance(encoder, ResNet18Visual) else "audio"
            t = encoder.trunk
            self.stages = ["stem", "layer1", "layer2", "layer3", "layer4"]
            self.modules = {"stem": nn.Sequential(t.conv1, t.bn1, t.relu, t.maxpool), "layer1": t.layer1,
                            "layer2": t.layer2, "layer3": t.layer3, "layer4": t.layer4}
            self.channels = {"stem": t.bn1.num_features}
            for s in self.stages[1:]:
                self.channels[s] = _last_channels(self.modules[s])
        elif isinstance(encoder, MLPEncoder):
            self.kind = "mlp"
            layers = list(encoder.net)
            self.flatten = layers[0]
            groups: list[list[nn.Module]] = []
            for layer in layers[1:]:
                if isinstance(layer, nn.Linear):
                    groups.append([])
                groups[-1].append(layer)
            self.stages = [f"hidden{i + 1}" for i in range(len(groups))]
            self.modules = {s: nn.Sequential(*g) for s, g in zip(self.stages, groups)}
            self.channels = {s: g[0].out_features for s, g in zip(self.stages, groups)}
        else:
            raise ConfigError(f"greedy needs ResNet-18 (resnet18_audio / resnet18_visual) or mlp encoders; "
                              f"modality '{modality}' uses {type(encoder).__name__}")

    def begin(self, x: Tensor) -> Tensor:
        if self.kind == "visual":
            if x.dim() == 4:
                x = x.unsqueeze(2)
            b, c, t, h, w = x.shape
            self.frames = t
            return x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        if self.kind == "mlp":
            return self.flatten(x)
        return x

    def run(self, stage: str, h: Tensor) -> Tensor:
        return self.modules[stage](h)

    def squeeze(self, h: Tensor) -> Tensor:
        if self.kind == "visual":
            return h.reshape(-1, self.frames, *h.shape[1:]).mean(dim=(1, 3, 4))
        if self.kind == "audio":
            return h.mean(dim=(2, 3))
        return h

    def excite(self, h: Tensor, e: Tensor) -> Tensor:
        if self.kind == "visual":
            t = self.frames
            return (h.reshape(-1, t, *h.shape[1:]) * e[:, None, :, None, None].to(h.dtype)).reshape(h.shape)
        if self.kind == "audio":
            return h * e[:, :, None, None].to(h.dtype)
        return h * e.to(h.dtype)

    def end(self, h: Tensor) -> Tensor:
        if self.kind == "mlp":
            return h
        return self.squeeze(h)  # global average pool (over frames too for visual)


def _last_channels(layer: nn.Module) -> int:
    bns = [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)]
    return bns[-1].num_features


class GreedyModel(MultimodalModel):
    """Two branches with MMTM blocks after the stages in ``mmtm_stages``, late-fusion heads.

    ``encode_all`` runs both branches together (the MMTMs need both); ``encode(m, x)`` alone
    treats the other modality as absent (``input`` policy: a zero input runs through its
    branch; ``feature`` policy: its squeezed vectors are zeros). ``curation`` (None or the
    caring modality's index) is read in training mode only.
    """

    def __init__(self, encoders: Mapping[str, nn.Module], num_classes: int, input_shapes, absent_policy: str = "input",
                 mmtm_stages: Sequence[str] | None = None, reduction: float = 4, excitation: str = "2sigmoid"):
        dims = {m: int(e.out_dim) for m, e in encoders.items()}
        super().__init__(encoders, create_fusion("late", dims, num_classes), input_shapes, absent_policy)
        mods = self.modalities
        self.branches = [_Branch(self.encoders[m], m) for m in mods]
        b0, b1 = self.branches
        if b0.stages != b1.stages:
            raise ConfigError(f"greedy needs two branches with the same stages; {mods[0]} has {b0.stages}, "
                              f"{mods[1]} has {b1.stages} (use the same encoder family/depth)")
        if mmtm_stages is None:
            mmtm_stages = ["layer2", "layer3", "layer4"] if b0.kind != "mlp" else list(b0.stages)
        unknown = [s for s in mmtm_stages if s not in b0.stages]
        if unknown or not mmtm_stages:
            raise ConfigError(f"greedy option mmtm_stages {list(mmtm_stages)} must name stages of the encoders: "
                              f"{', '.join(b0.stages)}")
        self.stage_names = list(b0.stages)
        self.mmtm = nn.ModuleDict({s: MMTM(b0.channels[s], b1.channels[s], reduction, excitation)
                                   for s in self.stage_names if s in mmtm_stages})
        self.curation: int | None = None

    def encode_all(self, inputs: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        present = present or {}
        mods = self.modalities
        hs, masks = [], []
        for m, br in zip(mods, self.branches):
            x, p = inputs[m], present.get(m)
            mask = None if p is None or bool(p.all()) else p
            if mask is not None and self.absent_policy == "input":
                x = x * mask.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
            hs.append(br.begin(x))
            masks.append(mask)
        caring = self.curation if self.training else None
        for stage in self.stage_names:
            hs = [br.run(stage, h) for br, h in zip(self.branches, hs)]
            if stage in self.mmtm:
                sq = [br.squeeze(h) for br, h in zip(self.branches, hs)]
                if self.absent_policy == "feature":
                    sq = [s if k is None else s * k.view(-1, 1).to(s.dtype) for s, k in zip(sq, masks)]
                e0, e1 = self.mmtm[stage](sq[0], sq[1], caring)
                hs = [self.branches[0].excite(hs[0], e0), self.branches[1].excite(hs[1], e1)]
        return {m: br.end(h) for m, br, h in zip(mods, self.branches, hs)}

    def encode(self, m: str, x: Tensor, present: Tensor | None = None) -> Tensor:
        other = [o for o in self.modalities if o != m][0]
        b = x.shape[0]
        inputs = {m: x, other: x.new_zeros((b, *self.input_shapes[other]))}
        pres = {other: torch.zeros(b, dtype=torch.bool, device=x.device)}
        if present is not None:
            pres[m] = present
        return self.encode_all(inputs, pres)[m]

    def forward(self, inputs, present=None):
        return self.fuse(self.encode_all(inputs, present), present)


# ---------------------------------------------------------------------------------- rule
def branch_speeds(grad_sq: Sequence[float], weight_sq: Sequence[float]) -> list[float]:
    """Per-group learning speed of one step: ``sum ||g||^2 / sum ||w||^2``."""
    return [g / w if w > 0 else 0.0 for g, w in zip(grad_sq, weight_sq)]


def bdr(bypass: float, main: float) -> float:
    """Conditional utilisation as a log ratio: ``BDR = log10(bypass / main)``."""
    if bypass <= 0 or main <= 0:
        return 0.0
    return math.log10(bypass / main)


def greedy_controller(state: dict[str, Any], speeds: Sequence[float] | None, unlocked: bool,
                      epsilon: float, window: int) -> dict[str, Any]:
    """One step of the Greedy re-balancing controller (official ``Bias_Mitigation_Strong``).

    ``state``: ``acc`` = accumulated speeds ``[bypass_0, bypass_1, main_0, main_1]``,
    ``curating`` (bool), ``caring`` (0/1/None), ``step`` (steps spent curating), ``d``
    (last BDR_0 - BDR_1). ``speeds`` are this step's ``[bypass_0, bypass_1, main_0, main_1]``
    (needed when not curating). Returns the new state (the input is not modified).

    * not curating: accumulate ``speeds``, ``d = BDR_0 - BDR_1``; if ``unlocked`` (epoch >=
      start) and ``|d| > epsilon``, start curating for ``window`` steps caring for modality
      0 if d > 0 else 1.
    * curating: count the step; after ``window`` curated steps, stop (no accumulation meanwhile).
    """
    st = {**state, "acc": list(state["acc"])}
    if st["curating"]:
        st["step"] += 1
        if st["step"] >= window:
            st["curating"], st["caring"] = False, None
        return st
    assert speeds is not None
    st["acc"] = [a + s for a, s in zip(st["acc"], speeds)]
    d = bdr(st["acc"][0], st["acc"][2]) - bdr(st["acc"][1], st["acc"][3])
    st["d"] = d
    if unlocked and abs(d) > epsilon:
        st["curating"], st["step"], st["caring"] = True, 0, (0 if d > 0 else 1)
    return st


def greedy_branch_losses(unimodal_logits: Sequence[Tensor], labels: Tensor, present: Sequence[Tensor],
                         denominators: Sequence[Tensor | float]) -> list[Tensor]:
    """The terms of the Greedy training loss, one per branch: ``sum_{i: m present} CE(z_m[i],
    y_i) / n_m``. The loss is their *sum* (official ``train.py`` ``blend_loss`` applied by
    ``framework.py`` to the per-branch outputs ``[x_0, x_1]``).

    ``present[m]`` is the bool ``(B,)`` mask of samples where branch m's modality is present
    (a branch is not trained on samples without its input); ``n_m`` = ``denominators[m]`` is
    this process's share of the global count of such samples (the batch size when everything is
    present in one process, so each term is the plain batch-mean CE). The mask multiplies rather
    than indexes, so every parameter gets a gradient (zero when nothing is present) on every rank.
    """
    terms = []
    for z, p, n in zip(unimodal_logits, present, denominators):
        ce = F.cross_entropy(z.float(), labels, reduction="none")
        terms.append((ce * p.to(ce.dtype)).sum() / n)
    return terms


def branch_denominators(global_counts: Tensor, world_size: int) -> Tensor:
    """Each process's denominators for :func:`greedy_branch_losses`: its share ``N_m / world``
    of the global count ``N_m`` of samples with modality m present, so that the gradients
    averaged over processes are those of the global-batch mean. A count of 0 (its numerator is
    0 too) counts as 1; the share itself is never clamped (``N_m = 1`` over two processes is
    0.5 each)."""
    return global_counts.clamp(min=1.0) / world_size


def initial_controller_state() -> dict[str, Any]:
    return {"acc": [0.0, 0.0, 0.0, 0.0], "curating": False, "caring": None, "step": 0, "d": 0.0}


@register_method("greedy", summary="Greedy (Wu et al. 2022): MMTM mid-fusion, re-balance the slow branch (2 modalities)",
                 paper='Wu et al., "Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal Deep Neural Networks"',
                 venue='ICML', year=2022, category='optimisation')
class Greedy(Method):
    """Balanced multimodal learning against greedy learning (Wu et al. 2022, Alg. 1 "guided").

    Model: two branches (ResNet-18 audio/visual from ``models/resnet.py``, or MLP encoders where
    each hidden layer is a stage) joined by MMTM blocks after ``mmtm_stages`` (default ResNet
    ``layer2, layer3, layer4`` as the Greedy code; MLP: every hidden layer); a linear head per
    branch; fused logits ``(z_0 + z_1) / 2`` (unimodal logits = each head; reported fusion
    ``late``; ``--fusion`` is not used). Loss: ``CE(z_0, y) + CE(z_1, y)``, the sum of the
    branch losses (official ``train.py`` ``blend_loss`` on the model's per-branch outputs; the
    paper's Fig. 1 model predicts with the average ``(z_0 + z_1) / 2``, which is never trained
    directly); each branch's CE is averaged over the samples where its modality is present
    (:func:`greedy_branch_losses`). Inference: plain forward (the averaged logits).

    Conditional learning speed (Sec. 4; official ``Bias_Mitigation_Strong``): after each
    backward, for modality m, ``main_m`` = ``sum ||g||^2 / sum ||w||^2`` over its branch's
    encoder and head, ``bypass_m`` = the same over the MMTM parameters that feed its excitation
    (the shared squeeze FC counts for both, its own excitation FC for m); each is accumulated
    over all non-curating steps from the start of training. ``BDR_m = log10(bypass_m / main_m)``
    and ``d = BDR_0 - BDR_1``. From epoch ``start_epoch`` on, when not re-balancing and
    ``|d| > epsilon``, re-balance for ``window`` steps caring for modality ``c = 0 if d > 0
    else 1``: the MMTM excitation applied to branch c is replaced by its running mean over
    training batches (detached), so branch c has to learn without the other modality's
    information (:func:`greedy_controller`).

    Options:
        epsilon: imbalance threshold on ``|d|`` (default 0.01; BalanceBenchmark uses 0.001).
        window: re-balancing window in steps (default 5).
        start_epoch: first 0-based epoch where re-balancing may start (default 1, the second
            epoch: the official ``Bias_Mitigation_Strong(starting_epoch=2)`` counts epochs from
            1 (``framework.py`` ``for epoch in range(1, epochs + 1)``, unlocked when
            ``epoch >= starting_epoch``).
        mmtm_stages: stages followed by an MMTM (ResNet: ``stem``, ``layer1`` .. ``layer4``;
            MLP: ``hidden1`` ..).
        reduction: MMTM bottleneck ratio, width ``2 (C_0 + C_1) / reduction`` (default 4).
        excitation: ``2sigmoid`` (default; the MMTM paper's ``E = 2 sigmoid(W z)``, in (0, 2),
            about 1 at initialisation so a block starts near the identity) or ``sigmoid`` (the
            Greedy code's plain sigmoid, which halves the features at every block at
            initialisation; harmless before a BatchNorm, but on the MLP path it stalls early
            training: on uci_mfeat, 4 epochs reach val accuracy 0.21 vs 0.80 with ``2sigmoid``).

    Decisions/deviations from the official code: the running excitation mean of modality 1 is
    computed from modality 1's excitation (the official MMTM updates it from modality 0's — a
    bug that also breaks unequal widths); the running means are updated in training forwards
    only (the official code also updates them on evaluation passes) and are model buffers
    (saved in checkpoints); speeds are accumulated from the first step, before re-balancing is
    unlocked too, as the official callback does. Missing modalities (not in the official code):
    a branch's CE skips the samples where its modality is absent. Two modalities only.
    Diagnostics: ``bdr_<modality>``, ``bdr_diff``, ``rebalance_frac`` (share of steps trained
    with curation), ``caring_<modality>`` (share of steps caring for it), ``loss_<modality>``
    (each branch's CE). Cost: the MMTM compute plus one grad/weight-norm pass per step
    (~+10-20%).
    """

    required_fusion = "late"

    def __init__(self, epsilon: Annotated[float, Interval(0, None)] = 0.01,
                 window: Annotated[int, Interval(1, None)] = 5,
                 start_epoch: Annotated[int, Interval(0, None)] = 1,
                 mmtm_stages: list[str] | None = None,
                 reduction: Annotated[float, Interval(0, None, closed="neither")] = 4,
                 excitation: Excitation = "2sigmoid"):
        super().__init__()
        self.epsilon = float(epsilon)
        self.window = int(window)
        self.start_epoch = int(start_epoch)
        self.mmtm_stages = None if mmtm_stages is None else list(mmtm_stages)
        self.reduction = float(reduction)
        self.excitation = excitation
        self.controller = initial_controller_state()

    def modalities(self, available):
        if len(available) != 2:
            raise ConfigError(f"greedy is defined for exactly two modalities (its re-balancing rule is pairwise); "
                              f"got {len(available)}: {', '.join(available)}; choose two with --modalities")
        return list(available)

    def build_model(self, spec: ModelSpec) -> MultimodalModel:
        if len(spec.modalities) != 2:
            self.modalities(spec.modalities)
        if spec.fusion not in ("concat", "late"):
            log.warning("greedy uses its own MMTM mid-fusion with late-fusion heads; fusion '%s' is ignored", spec.fusion)
        return GreedyModel(spec.build_encoders(), spec.num_classes, spec.input_shapes, spec.absent_policy,
                           self.mmtm_stages, self.reduction, self.excitation)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        model = self.model
        if not isinstance(model, GreedyModel):
            raise ConfigError("greedy needs its own GreedyModel (build_model was replaced)")
        mods = model.modalities
        for block in model.mmtm.values():
            block.reduce = trainer.all_reduce_mean
        shared = [p for b in model.mmtm.values() for p in b.fc_squeeze.parameters()]
        # groups in the controller's order: bypass_0, bypass_1, main_0, main_1
        self.groups = [shared + [p for b in model.mmtm.values() for p in b.fc_excite[i].parameters()] for i in range(2)]
        self.groups += [list(model.encoders[m].parameters()) + list(model.fusion.heads[m].parameters()) for m in mods]

    @torch.no_grad()
    def step_speeds(self) -> list[float]:
        """This step's ``sum ||g||^2 / sum ||w||^2`` for ``[bypass_0, bypass_1, main_0, main_1]``."""
        stats = []
        for group in self.groups:
            ps = [p for p in group if p.grad is not None]
            g = torch.stack([p.grad.float().pow(2).sum() for p in ps]).sum() if ps else torch.zeros((), device=self.trainer.device)
            w = torch.stack([p.float().pow(2).sum() for p in group]).sum()
            stats += [g, w]
        t = self.trainer.all_reduce_mean(torch.stack(stats)).tolist()
        return branch_speeds(t[0::2], t[1::2])

    def training_step(self, batch):
        tr = self.trainer
        model = self.model
        ctl = self.controller
        curated = bool(ctl["curating"])
        model.curation = ctl["caring"] if curated else None
        try:
            with tr.autocast():
                out = model(batch["inputs"], batch["present"])
        finally:
            model.curation = None
        mods = model.modalities
        present = [batch["present"][m] for m in mods]
        # each branch's CE is a mean over its present samples of the *global* batch: the counts are
        # summed over ranks, and each rank divides by its share (gradients are averaged over ranks)
        counts = tr.all_reduce_sum(torch.stack([p.sum() for p in present]).to(torch.float32))
        share = branch_denominators(counts, tr.world_size)
        terms = greedy_branch_losses([out.unimodal_logits[m] for m in mods], batch["label"], present, list(share))
        loss = terms[0] + terms[1]
        tr.zero_grad()
        tr.backward(loss)
        speeds = None if curated else self.step_speeds()
        self.controller = greedy_controller(ctl, speeds, tr.epoch >= self.start_epoch, self.epsilon, self.window)
        tr.optimizer_step()
        acc = self.controller["acc"]
        for i, m in enumerate(mods):
            self.log(f"bdr_{m}", bdr(acc[i], acc[2 + i]))
            self.log(f"caring_{m}", float(curated and ctl["caring"] == i))
            self.log(f"loss_{m}", terms[i].detach())
        self.log("bdr_diff", self.controller["d"])
        self.log("rebalance_frac", float(curated))
        return {"loss": float(loss.detach())}

    def state_dict(self) -> dict[str, Any]:
        return {"controller": {**self.controller, "acc": list(self.controller["acc"])}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "controller" in state:
            c = dict(state["controller"])
            c["acc"] = [float(a) for a in c["acc"]]
            self.controller = c
