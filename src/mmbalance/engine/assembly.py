"""Assembly: from a configuration to the components of a run, before any training.

The order is chosen so that mistakes fail fast: the configuration is checked first, then the
method is built (a misspelt method or option fails before any data is loaded or generated),
then the data, the model spec and the model. :func:`resolve_config` gives the fully resolved
configuration (method hyperparameters filled in) without touching any data, for
``--print-config``, experiment fingerprints and ``config.yaml``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import torch

from ..config import RunConfig, from_dict, to_dict
from ..data import DataSplits
from ..methods import Method, ModelSpec, create_method
from ..models import FUSIONS, MultimodalModel, list_encoders, list_fusions
from ..registry import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is '{name}' but CUDA is not available; use --train.device cpu")
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    return torch.device(name)


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 when asked, or on CUDA with ``auto``; fp16 when asked (with the
    trainer's loss scaling); None = fp32."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return None


def check_config(cfg: RunConfig, world_size: int = 1) -> None:
    """Cross-field checks the types and ranges of the config layer cannot express."""
    tc = cfg.train
    if tc.batch_size % world_size:
        raise ConfigError(f"train.batch_size {tc.batch_size} (the global batch) must be divisible by the "
                          f"number of processes ({world_size})")
    mods = cfg.dataset.options.get("modalities")
    if mods is not None:
        if isinstance(mods, str):
            mods = [m for m in mods.split(",") if m]
        if not mods:
            raise ConfigError("--modalities names no modality; give at least one, e.g. pix,fou")
        dup = sorted({m for m in mods if list(mods).count(m) > 1})
        if dup:
            raise ConfigError(f"--modalities names {', '.join(dup)} twice; each modality once")
    if cfg.model.fusion not in list_fusions():
        FUSIONS.get(cfg.model.fusion)  # the registry's one-line error with the valid names
    if cfg.model.encoder is not None and cfg.model.encoder not in list_encoders():
        raise ConfigError(f"unknown encoder '{cfg.model.encoder}'; valid encoders: {', '.join(list_encoders())}")
    resolve_device(cfg.train.device)


def build_method(cfg: RunConfig) -> Method:
    """The method, from ``method.name`` and its options (validated and coerced)."""
    return create_method(cfg.method.name, **cfg.method.options)


def resolve_config(cfg: RunConfig, method: Method | None = None) -> RunConfig:
    """The configuration with the method's full hyperparameters filled in (no data needed)."""
    method = method if method is not None else build_method(cfg)
    d = json.loads(json.dumps(to_dict(cfg), default=str))
    d["method"] = {"name": cfg.method.name, **json.loads(json.dumps(method.hparams(), default=str))}
    return from_dict(d)


def model_spec(cfg: RunConfig, data: DataSplits, modalities: list[str]) -> ModelSpec:
    """Per-modality encoders (dataset defaults < ``model.encoder`` < ``model.encoders.<m>``)."""
    mc = cfg.model
    unknown = [m for m in mc.encoders if m not in data.modalities]
    if unknown:
        raise ConfigError(f"model.encoders names unknown modality {unknown}; modalities: "
                          f"{', '.join(data.modalities)}")
    encoders: dict[str, tuple[str, dict[str, Any]]] = {}
    for m in modalities:
        name = data.default_encoders.get(m, "mlp")
        opts = dict(data.encoder_options.get(m, {}))
        if mc.encoder is not None and mc.encoder != name:
            name, opts = mc.encoder, {}
        opts.update(mc.encoder_options)
        per = dict(mc.encoders.get(m, {}))
        if "name" in per:
            new = per.pop("name")
            if new != name:
                name, opts = new, {}
        opts.update(per)
        encoders[m] = (name, opts)
    return ModelSpec(modalities=list(modalities), num_classes=data.num_classes,
                     input_shapes={m: tuple(data.input_shapes[m]) for m in modalities},
                     encoders=encoders, fusion=mc.fusion, fusion_options=dict(mc.fusion_options),
                     absent_policy=mc.absent_policy)


def spec_to_dict(spec: ModelSpec) -> dict[str, Any]:
    d = asdict(spec)
    d["input_shapes"] = {m: list(s) for m, s in spec.input_shapes.items()}
    d["encoders"] = {m: [n, o] for m, (n, o) in spec.encoders.items()}
    return json.loads(json.dumps(d, default=str))


def spec_from_dict(d: Mapping[str, Any]) -> ModelSpec:
    return ModelSpec(modalities=list(d["modalities"]), num_classes=int(d["num_classes"]),
                     input_shapes={m: tuple(s) for m, s in d["input_shapes"].items()},
                     encoders={m: (no[0], dict(no[1])) for m, no in d["encoders"].items()},
                     fusion=d["fusion"], fusion_options=dict(d.get("fusion_options", {})),
                     absent_policy=d.get("absent_policy", "input"))


def fusion_name(model: MultimodalModel) -> str:
    for entry in FUSIONS.entries():
        if type(model.fusion) is entry.obj:
            return entry.name
    return getattr(model.fusion, "name", type(model.fusion).__name__)


@dataclass
class Components:
    """What a run is made of, before training."""

    cfg: RunConfig  # resolved (method hyperparameters filled in)
    method: Method
    data: DataSplits
    modalities: list[str]
    spec: ModelSpec
