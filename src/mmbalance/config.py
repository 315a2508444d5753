"""Run configuration: defaults < YAML file < command-line overrides.

The configuration is a tree of dataclasses. ``dataset``, ``method`` and ``model.encoders`` /
``*_options`` accept free keys that are validated against the chosen component's constructor
(unknown keys fail with the list of valid ones), so ``--method.T 8`` or ``--dataset.root DIR``
work for any method or dataset without a central list of options.

Why not jsonargparse (suggested by the design notes): the CLI contract mixes a value and a
namespace under one name (``--dataset av_digits`` *and* ``--dataset.root DIR``; likewise
``--method arl --method.T 8``), and component options depend on the chosen registry name.
Both need a custom layer on top of jsonargparse; doing it directly on dataclasses is ~150
lines, has no dependency, and gives one-line errors.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml

from .options import Interval, coerce_value
from .registry import ConfigError


@dataclass
class DatasetConfig:
    """``name``: a registered dataset or a path to a ``.npz`` features file; other keys are the
    dataset's options (e.g. ``modalities``, ``root``)."""

    name: str = "uci_mfeat"
    options: dict[str, Any] = field(default_factory=dict)
    #: missing-modality protocol: each modality of each sample absent with this probability in
    #: every split (one rate, or ``{modality: rate}``); see ``mmbalance.data.missing``
    missing_rate: Annotated[float, Interval(0, 1, closed="left")] | dict[str, float] = 0.0
    missing_seed: Annotated[int, Interval(0, None)] = 0


@dataclass
class ModelConfig:
    """``encoder``/``encoder_options`` apply to every modality (over the dataset's defaults);
    ``encoders`` sets them per modality: ``{audio: {name: resnet18_audio, width: 64}}``."""

    encoder: str | None = None
    encoder_options: dict[str, Any] = field(default_factory=dict)
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    fusion: str = "concat"
    fusion_options: dict[str, Any] = field(default_factory=dict)
    absent_policy: Literal["input", "feature"] = "input"


@dataclass
class MethodConfig:
    """``name``: a registered method; other keys are the method's hyperparameters."""

    name: str = "joint"
    options: dict[str, Any] = field(default_factory=dict)


NonNegInt = Annotated[int, Interval(0, None)]
PosInt = Annotated[int, Interval(1, None)]
NonNegFloat = Annotated[float, Interval(0, None)]
PosFloat = Annotated[float, Interval(0, None, closed="neither")]
Fraction = Annotated[float, Interval(0, 1, closed="left")]


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule.

    name: the optimizer.
    lr: initial learning rate.
    momentum: SGD momentum.
    weight_decay: L2 weight decay.
    betas: Adam/AdamW betas, two numbers in [0, 1).
    nesterov: Nesterov momentum (SGD).
    grad_clip: max global gradient norm; null = off.
    scheduler: learning-rate schedule over the epochs.
    step_size: epochs per decay for ``step``.
    milestones: epochs at which ``multistep`` decays.
    gamma: decay factor of ``step``/``multistep``.
    min_lr: final learning rate of ``cosine``.
    """

    name: Literal["sgd", "adam", "adamw", "adagrad"] = "sgd"
    lr: PosFloat = 0.01
    momentum: Fraction = 0.9
    weight_decay: NonNegFloat = 1e-4
    betas: list[Fraction] = field(default_factory=lambda: [0.9, 0.999])
    nesterov: bool = False
    grad_clip: PosFloat | None = None
    scheduler: Literal["none", "step", "multistep", "cosine"] = "cosine"
    step_size: PosInt = 70
    milestones: list[PosInt] = field(default_factory=lambda: [70])
    gamma: Annotated[float, Interval(0, 1, closed="right")] = 0.1
    min_lr: NonNegFloat = 0.0


@dataclass
class TrainConfig:
    """The training loop.

    epochs: number of epochs.
    batch_size: global batch size (over all processes).
    eval_batch_size: batch size of evaluation passes.
    seed: seed of everything random in the run.
    deterministic: use deterministic algorithms only (slower on GPU).
    device: auto, cpu, cuda or cuda:N.
    precision: auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16, or fp16 (with dynamic loss scaling).
    num_workers: DataLoader worker processes.
    drop_last: drop the last incomplete training batch.
    select_metric: validation metric for model selection.
    probe: linear-probe accuracy of each frozen encoder at the end.
    progress: progress bars: auto (when stderr is a terminal), on or off.
    stop_after_epochs: stop this invocation after N epochs (continue with --resume).
    loggers: extra loggers besides metrics.jsonl: csv (metrics.csv) and/or tensorboard.
    keep_checkpoints: also keep every epoch's weights as epoch<N>.pt (for contribution over epochs).
    channels_last: store convolutional encoders' weights and 4-D / 5-D inputs in the channels_last
        (channels_last_3d) memory format; same numbers to float tolerance; ResNet-18 CPU step 0.87x,
        GPU unmeasured (docs/performance.md).
    compile: compile each encoder in place with nn.Module.compile (torch.compile, mode "default");
        state_dict keys and checkpoints unchanged; ResNet-18 CPU step 0.83x after minutes of
        compilation, GPU unmeasured (docs/performance.md).
    persistent_workers: keep DataLoader workers alive and reuse each loader for the next epoch or
        evaluation (same samples and order; augmentation inside workers is not reseeded per epoch);
        only with num_workers > 0.
    prefetch_factor: batches each DataLoader worker loads ahead (null: PyTorch's default, 2; only
        with num_workers > 0).
    bucket_mb: with several processes, the size cap (MB) of the gradient buckets all-reduced while
        backward runs, as DDP's reducer (0: one all-reduce after backward; same numbers).
    """

    epochs: PosInt = 40
    batch_size: PosInt = 64
    eval_batch_size: PosInt = 256
    seed: Annotated[int, Interval(0, 2**63 - 1)] = 0
    deterministic: bool = False
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    num_workers: NonNegInt = 0
    drop_last: bool = False
    select_metric: Literal["accuracy", "macro_f1", "map"] = "accuracy"
    probe: bool = True
    progress: Literal["auto", "on", "off"] = "auto"
    stop_after_epochs: PosInt | None = None
    loggers: list[Literal["csv", "tensorboard"]] = field(default_factory=list)
    keep_checkpoints: bool = False
    channels_last: bool = False
    compile: bool = False
    persistent_workers: bool = False
    prefetch_factor: PosInt | None = None
    bucket_mb: Annotated[float, Interval(0, None)] = 25.0


@dataclass
class RunConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str | None = None


# Sections whose unknown keys go into an ``options`` dict instead of failing.
_OPEN_SECTIONS = {"dataset": "options", "method": "options"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Coerce a YAML-parsed value to a dataclass field's type hint and check its declared range."""
    return coerce_value(value, tp, f"config key '{key}'")


def _deep_update(d: dict[str, Any], u: dict[str, Any]) -> dict[str, Any]:
    """Merge ``u`` into ``d`` recursively: ``--model.encoders.image.weights F`` keeps the other
    options a config file gave ``model.encoders.image``."""
    for k, x in u.items():
        d[k] = _deep_update(d[k], x) if isinstance(x, dict) and isinstance(d.get(k), dict) else x
    return d


def _merge_section(obj: Any, data: dict[str, Any], prefix: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(type(obj), include_extras=True)
    fields = {f.name for f in dataclasses.fields(obj)}
    open_key = _OPEN_SECTIONS.get(prefix)
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k in fields and dataclasses.is_dataclass(getattr(obj, k)):
            _merge_section(getattr(obj, k), v, key)
        elif k in fields and k == open_key:
            getattr(obj, k).update(v or {})
        elif k in fields:
            cur = getattr(obj, k)
            if isinstance(cur, dict) and isinstance(v, dict):
                _deep_update(cur, v)
            else:
                setattr(obj, k, _coerce(v, hints[k], key))
        elif open_key is not None:
            getattr(obj, open_key)[k] = v
        else:
            valid = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key '{key}'; valid keys{' under ' + prefix if prefix else ''}: {valid}")


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in dotted.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            nxt = d.setdefault(p, {})
            if not isinstance(nxt, dict):
                # "--dataset x --dataset.root y": the scalar is the section's name
                nxt = d[p] = {"name": nxt}
            d = nxt
        if parts[-1] in d and isinstance(d[parts[-1]], dict) and not isinstance(v, dict):
            d[parts[-1]]["name"] = v
        else:
            d[parts[-1]] = v
    return out


def _normalise_sections(data: dict[str, Any]) -> dict[str, Any]:
    """Allow ``dataset: NAME`` / ``method: NAME`` shorthand in YAML and on the command line."""
    data = dict(data)
    for sec in ("dataset", "method"):
        if sec in data and not isinstance(data[sec], dict):
            data[sec] = {"name": data[sec]}
    return data


def _read_yaml(p: Path, seen: tuple[Path, ...] = ()) -> list[dict[str, Any]]:
    """The mappings of a YAML config file, its ``base:`` files (relative to it) first."""
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in seen:
        raise ConfigError(f"config file {p} includes itself through 'base:'")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of config keys, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    out: list[dict[str, Any]] = []
    for b in [bases] if isinstance(bases, str) else bases:
        out += _read_yaml((p.parent / str(b)), (*seen, p.resolve()))
    return [*out, data]


def load_config(path: str | Path | Sequence[str | Path] | None = None, overrides: dict[str, Any] | None = None,
                base: RunConfig | None = None) -> RunConfig:
    """Resolve a config: ``base`` (or defaults) < YAML file(s) at ``path`` (later files win; a
    file may name its own ``base:`` files) < dotted ``overrides``."""
    cfg = base if base is not None else RunConfig()
    paths = [] if path is None else [path] if isinstance(path, (str, Path)) else list(path)
    for one in paths:
        for data in _read_yaml(Path(one)):
            _merge_section(cfg, _normalise_sections(data), "")
    if overrides:
        _merge_section(cfg, _normalise_sections(_nest(overrides)), "")
    return cfg


def parse_value(text: str) -> Any:
    """Parse a command-line value as YAML (numbers, booleans, lists ``[a,b]``, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as a plain dict, with ``options`` flattened into their sections."""
    d = dataclasses.asdict(cfg)
    for sec, key in _OPEN_SECTIONS.items():
        opts = d[sec].pop(key)
        d[sec].update(opts)
    return d


def from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    _merge_section(cfg, _normalise_sections(data), "")
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# Keys that change how a run is executed or shown, not what it computes: a run folder whose
# configuration differs only in these is the same run (its results stand).
FINGERPRINT_IGNORES = ("output_dir", "train.progress", "train.num_workers", "train.stop_after_epochs",
                       "train.device", "train.loggers", "train.keep_checkpoints", "train.bucket_mb",
                       "train.channels_last", "train.compile", "train.persistent_workers", "train.prefetch_factor")


def config_fingerprint(cfg: RunConfig | dict[str, Any]) -> str:
    """A short hash of a *resolved* configuration (method hyperparameters filled in), ignoring
    :data:`FINGERPRINT_IGNORES`. Two runs with the same fingerprint compute the same thing."""
    import hashlib
    import json

    d = to_dict(cfg) if isinstance(cfg, RunConfig) else to_dict(from_dict(cfg))
    for key in FINGERPRINT_IGNORES:
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            node = node.get(p, {})
        node.pop(parts[-1], None)
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_difference(a: RunConfig, b: RunConfig) -> list[str]:
    """Dotted keys whose values differ between two configurations, as ``key: a -> b``."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict) and v:
                out.update(flat(v, key + "."))
            else:
                out[key] = v
        return out

    fa, fb = flat(to_dict(a)), flat(to_dict(b))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k) and k not in FINGERPRINT_IGNORES]


# Short flags of the contract -> config keys.
SHORT_FLAGS = {
    "dataset": "dataset.name", "method": "method.name", "fusion": "model.fusion", "encoder": "model.encoder",
    "epochs": "train.epochs", "seed": "train.seed", "batch_size": "train.batch_size", "lr": "optim.lr",
    "optimizer": "optim.name", "scheduler": "optim.scheduler", "device": "train.device",
    "modalities": "dataset.modalities", "output_dir": "output_dir", "logger": "train.loggers",
    "missing_rate": "dataset.missing_rate",
}


def parse_overrides(rest: Sequence[str]) -> dict[str, Any]:
    """Parse ``--a.b value`` / ``--a.b=value`` pairs into a dotted-key dict."""
    out: dict[str, Any] = {}
    i = 0
    rest = list(rest)
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or len(tok) <= 2:
            raise ConfigError(f"unexpected argument '{tok}'; overrides look like --section.key value")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest) or (rest[i + 1].startswith("--") and len(rest[i + 1]) > 2):
                val = "true"  # a bare flag, e.g. --train.deterministic
                i += 1
            else:
                val = rest[i + 1]
                i += 2
        key = key.replace("-", "_")
        key = SHORT_FLAGS.get(key, key)
        out[key] = parse_value(val)
    return out
