"""MSLR (Yao & Mihalcea, Findings of ACL 2022): modality-specific learning rates."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence, get_args

import torch
from torch import nn

from ..options import Annotated, Interval, Literal
from ..registry import ConfigError
from . import register_method
from .base import Method

Strategy = Literal["keep", "smooth", "dynamic"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
PositiveRate = Annotated[float, Interval(0, None, closed="neither")]


def modality_parameters(model, m: str) -> list[nn.Parameter]:
    """Parameters owned by modality ``m`` alone: its encoder, plus its own head where the
    fusion has per-modality heads (``sum``/``late``: ``heads[m]``; ``shared_head``: the
    projection ``proj[m]``). Selected by module ownership, never by parameter names."""
    params = list(model.encoders[m].parameters())
    for attr in ("heads", "proj"):
        sub = getattr(model.fusion, attr, None)
        if isinstance(sub, nn.ModuleDict) and m in sub:
            params += list(sub[m].parameters())
    return params


def parse_rates(rates: Any, modalities: Sequence[str], method: str = "mslr") -> dict[str, float]:
    """``None`` (1.0 each), a number (the same for all), a list in modality order, or a dict by name."""
    if rates is None:
        return {m: 1.0 for m in modalities}
    if isinstance(rates, (int, float)) and not isinstance(rates, bool):
        return {m: float(rates) for m in modalities}
    if isinstance(rates, Mapping):
        unknown = [k for k in rates if k not in modalities]
        if unknown:
            raise ConfigError(f"{method} option rates names unknown modalities {unknown}; modalities: "
                              f"{', '.join(modalities)}")
        out = {m: float(rates.get(m, 1.0)) for m in modalities}
    elif isinstance(rates, (list, tuple)):
        if len(rates) != len(modalities):
            raise ConfigError(f"{method} option rates has {len(rates)} values for {len(modalities)} modalities "
                              f"({', '.join(modalities)}); give one per modality or a dict by name")
        out = {m: float(r) for m, r in zip(modalities, rates)}
    else:  # a direct call (the option is typed and coerced by the config layer)
        raise ValueError(f"{method} option rates must be a number, a list or a dict by modality, got {rates!r}")
    bad = {m: r for m, r in out.items() if not r > 0}
    if bad:  # the values of a mapping are not range-checked by the config layer
        raise ConfigError(f"{method} option rates must be > 0, got {bad}")
    return out


def load_unimodal_weights(model, m: str, run_dir: str | Path, load=None) -> list[str]:
    """Copy modality ``m``'s weights from a finished ``unimodal`` run folder into ``model``.

    Reads the run's validation-selected checkpoint (``best.pt``): the encoder ``encoders.<m>.*``
    (every tensor, shapes must match), and, when ``model``'s fusion has a head of its own for m
    (``sum``/``late``: ``heads[m]``), the unimodal run's linear head (``fusion.fc``, the
    ``concat`` head over m alone). ``load(path)`` reads a checkpoint (the trainer's
    ``load_checkpoint``: safe, one-line errors; default ``torch.load(weights_only=True)``).
    Returns the names of the tensors copied."""
    path = Path(run_dir) / "best.pt"
    if not path.is_file():
        raise ConfigError(f"mslr option init_from[{m}]: {path} does not exist (give a finished unimodal run folder)")
    load = load or (lambda p: torch.load(p, map_location="cpu", weights_only=True))
    saved = load(path).get("model", {})
    prefix = f"encoders.{m}."
    if not any(k.startswith(prefix) for k in saved):
        found = sorted({k.split(".")[1] for k in saved if k.startswith("encoders.")})
        raise ConfigError(f"mslr option init_from[{m}]: {run_dir} holds no '{m}' encoder (it has {found})")
    targets = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    pairs = {k: saved.get(k) for k in targets}
    heads = getattr(model.fusion, "heads", None)
    if isinstance(heads, nn.ModuleDict) and m in heads and "fusion.fc.weight" in saved:
        pairs[f"fusion.heads.{m}.weight"] = saved["fusion.fc.weight"]
        pairs[f"fusion.heads.{m}.bias"] = saved.get("fusion.fc.bias")
    own = model.state_dict()
    for k, v in pairs.items():
        if v is None or tuple(v.shape) != tuple(own[k].shape):
            got = None if v is None else tuple(v.shape)
            raise ConfigError(f"mslr option init_from[{m}]: {run_dir} does not fit this model ({k}: "
                              f"{got} vs {tuple(own[k].shape)}); train the unimodal run with the same encoder")
    with torch.no_grad():
        for k, v in pairs.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))
    return sorted(pairs)


def mslr_dynamic_ratio(history: Sequence[float], window: int = 5) -> float:
    """Dynamic strategy: ``r = acc(t) / mean(acc(t-window) .. acc(t-1))``; 1 until ``window``
    earlier epochs exist (``history`` ends with the current epoch's accuracy)."""
    if len(history) <= window:
        return 1.0
    prev = list(history[-window - 1:-1])
    mean = sum(prev) / window
    return float(history[-1]) / mean if mean > 0 else 1.0


def mslr_smooth_multiplier(rate: float, epoch: int, epochs: int) -> float:
    """Smooth strategy: linear interpolation from the modality's ``rate`` at the first epoch to
    the global rate (multiplier 1) at the last epoch."""
    if epochs <= 1:
        return float(rate)
    t = min(max(epoch, 0), epochs - 1) / (epochs - 1)
    return float(rate) + (1.0 - float(rate)) * t


@register_method("mslr", summary="MSLR: modality-specific learning rates (keep / smooth / dynamic from val accuracy)",
                 paper='Yao, Mihalcea, "Modality-specific Learning Rates for Effective Multimodal Additive Late-fusion"',
                 venue='ACL Findings', year=2022, category='optimisation')
class MSLR(Method):
    """Modality-Specific Learning Rates (Yao & Mihalcea 2022).

    Each modality m gets its own learning rate ``lr * c_m``, realised as a multiplier on the
    updates of the parameters it owns (its encoder and, for per-modality-head fusions
    ``sum``/``late``/``shared_head``, its own head / projection; a shared head such as
    ``concat``'s is trained at the global rate). Loss: CE of the fused logits (the paper's
    additive late fusion is ``--fusion sum`` or ``late``; any fusion works).

    Strategies (paper Sec. 3):
        keep: ``c_m = rates[m]``, fixed (the paper: the rates tuned in unimodal training).
        smooth: ``c_m(t)`` moves linearly from ``rates[m]`` at the first epoch to 1 (the global
            rate) at the last one. *Decision*: the paper's exact schedule could not be checked
            against code; this is our reading (start from the modality-specific rates, end at
            the common one).
        dynamic: ``c_m(t) = rates[m] * r_m`` with ``r_m = acc_m(t-1) / mean(acc_m over the
            ``window`` epochs before it)``, ``acc_m`` the unimodal accuracy (its unimodal
            logits) on the *validation* split, computed at the end of each epoch; ``r_m = 1``
            until that history exists (AGM repository's MSLR baseline).

    Start: the paper builds the late-fusion model from *fine-tuned unimodal models* (trained
    alone, each at its own best learning rate) and then trains it with the modality-specific
    rates. By default every run here starts from scratch like the other methods (the AGM
    repository's baseline does too); ``init_from`` gives the paper's start from finished
    ``unimodal`` runs (:func:`load_unimodal_weights`), e.g.
    ``mmbalance train --method unimodal --method.modality pix --output-dir runs/pix`` then
    ``--method mslr --fusion sum --method.init_from '{pix: runs/pix, fou: runs/fou}'``.

    Options:
        strategy: ``dynamic`` (default: the only rule that adapts without hand-tuned rates; the
            public code's variant) | ``keep`` | ``smooth`` (both need ``rates``: with all rates 1
            they are exactly ``joint``).
        rates: per-modality base multipliers: a number, a list in modality order, or a dict by
            modality name; default 1.0 each (the AGM repo used ``{audio: 0.9, visual: 1.1}``).
        window: dynamic history length (default 5).
        apply: ``grad`` (default; multiply the gradients before the optimizer step, as the
            AGM repo does — exactly a per-modality learning rate for plain SGD, but adaptive
            optimizers (Adam, AdaGrad) largely cancel a gradient scale, and SGD weight decay is
            added unscaled) or ``update`` (scale the optimizer's update of those parameters
            instead: exactly ``lr * c_m`` for every optimizer, weight decay included).
        modulation_start: first 0-based epoch (inclusive) in which the multipliers act (default 0).
        modulation_end: last 0-based epoch (inclusive; None = the last) in which they act; outside
            ``[modulation_start, modulation_end]`` every ``c_m`` is 1 (plain joint training).
            Default: all epochs (the paper). The AGM repository applies its rates only inside
            such a window (``run/CREMAD_main.py``: ``modulation_starts <= epoch <=
            modulation_ends``, 1-based epochs, defaults 0 and 20 in ``utils/config.py``, i.e.
            0-based epochs 0-19 here). The ``dynamic`` history is recorded in every epoch.
        init_from: ``{modality: unimodal run folder}`` (default none): before the first epoch,
            copy each listed modality's encoder (and, for ``sum``/``late``, its head) from that
            run's selected checkpoint. The folders are read once, at the start of training.

    Decisions: the AGM repository's ``dynamic`` ratio reads the audio accuracy from the visual
    predictions (its multimodal ``test`` counts an audio hit when the visual prediction is right);
    here each modality uses its own unimodal accuracy, on the validation split (the repository
    uses the test split).

    Diagnostics: ``rate_<modality>`` (the multiplier in use), and for ``dynamic``
    ``val_acc_<modality>``. Cost: ~1x joint training (+ one validation pass per epoch for
    ``dynamic``).
    """

    def __init__(self, strategy: Strategy = "dynamic",
                 rates: PositiveRate | list[PositiveRate] | dict[str, float] | None = None,
                 window: Annotated[int, Interval(1, None)] = 5, apply: Literal["grad", "update"] = "grad",
                 modulation_start: Annotated[int, Interval(0, None)] = 0,
                 modulation_end: Annotated[int, Interval(0, None)] | None = None,
                 init_from: dict[str, str] | None = None):
        super().__init__()
        if modulation_end is not None and int(modulation_end) < int(modulation_start):
            raise ConfigError(f"mslr option modulation_end ({modulation_end}) must be >= modulation_start "
                              f"({modulation_start}), or None for the last epoch")
        self.strategy = strategy
        self.modulation_start = int(modulation_start)
        self.modulation_end = None if modulation_end is None else int(modulation_end)
        self.init_from = None if init_from is None else {str(k): str(v) for k, v in init_from.items()}
        self.rates = rates
        self.window = int(window)
        self.apply = apply
        self.val_acc: dict[str, list[float]] = {}
        self.multipliers: dict[str, float] = {}

    def setup(self, trainer) -> None:
        super().setup(trainer)
        mods = self.model.modalities
        self.base_rates = parse_rates(self.rates, mods)
        self.val_acc = {m: [] for m in mods}
        self.owned = {m: modality_parameters(self.model, m) for m in mods}
        self.multipliers = dict(self.base_rates)
        unknown = [m for m in (self.init_from or {}) if m not in mods]
        if unknown:
            raise ConfigError(f"mslr option init_from names unknown modalities {unknown}; modalities: {', '.join(mods)}")

    # ------------------------------------------------------------------ rule
    def current_multipliers(self, epoch: int) -> dict[str, float]:
        if not self.in_window(epoch):
            return {m: 1.0 for m in self.base_rates}
        if self.strategy == "keep":
            return dict(self.base_rates)
        if self.strategy == "smooth":
            return {m: mslr_smooth_multiplier(r, epoch, self.trainer.cfg.train.epochs) for m, r in self.base_rates.items()}
        return {m: r * mslr_dynamic_ratio(self.val_acc.get(m, []), self.window) for m, r in self.base_rates.items()}

    def on_epoch_start(self, epoch: int) -> None:
        if epoch == 0 and self.init_from:  # the paper's start: fine-tuned unimodal models
            for m, run_dir in self.init_from.items():
                load_unimodal_weights(self.model, m, run_dir, self.trainer.load_checkpoint)
        self.multipliers = self.current_multipliers(epoch)

    # ------------------------------------------------------------------ training
    def training_step(self, batch):
        tr = self.trainer
        _, loss = self.fused_forward(batch)
        tr.zero_grad()
        tr.backward(loss)
        scaled = {m: c for m, c in self.multipliers.items() if c != 1.0}
        if self.apply == "grad" or not scaled:
            with torch.no_grad():
                for m, c in scaled.items():
                    for p in self.owned[m]:
                        if p.grad is not None:
                            p.grad.mul_(c)
            tr.optimizer_step()
        else:
            with torch.no_grad():
                before = {m: [p.detach().clone() for p in self.owned[m]] for m in scaled}
            tr.optimizer_step()
            with torch.no_grad():
                for m, c in scaled.items():
                    for p, p0 in zip(self.owned[m], before[m]):
                        p.copy_(p0 + c * (p - p0))
        for m, c in self.multipliers.items():
            self.log(f"rate_{m}", c)
        return {"loss": loss.detach()}

    # ------------------------------------------------------------------ validation accuracy
    def unimodal_val_accuracy(self) -> dict[str, float]:
        """Accuracy of each modality's unimodal logits on the validation split (model selection
        data; never the test split)."""
        return self.unimodal_validation(lambda z, y: (z.argmax(1) == y).double())

    def on_epoch_end(self, epoch: int) -> None:
        if self.strategy != "dynamic":
            return
        for m, a in self.unimodal_val_accuracy().items():
            self.val_acc[m].append(a)
            self.log(f"val_acc_{m}", a)

    def state_dict(self) -> dict[str, Any]:
        return {"val_acc": {m: list(v) for m, v in self.val_acc.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "val_acc" in state:
            self.val_acc = {m: list(v) for m, v in state["val_acc"].items()}
