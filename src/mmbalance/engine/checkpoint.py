"""The run folder's files: atomic writes, checkpoints that fail in one line, strict JSON.

* Every file is written atomically (:func:`atomic_write_bytes`: a temporary ``.NAME.XXXXXXXX``
  next to it, fsync, rename); a process killed mid-write leaves that temporary behind, which
  :func:`remove_stale_temporaries` deletes when the next run starts.
* Checkpoints are loaded with ``torch.load(weights_only=True)`` (tensors and plain values only,
  never arbitrary pickled code). A missing, empty, truncated or corrupt file (checked against
  the zip archive's CRCs), a checkpoint of another run (its recorded config fingerprint) or of
  another model (:func:`load_model_state`) is reported as one
  :class:`~mmbalance.registry.ConfigError` line naming the file and what to do.
* JSON output (``results.json``, each ``metrics.jsonl`` line) is strict: a non-finite float is
  written as ``null`` and logged with its key and why, never as a bare ``NaN``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..registry import ConfigError

log = logging.getLogger("mmbalance")

# ``tempfile.mkstemp(prefix=".NAME.")`` appends 8 characters from [a-z0-9_]
_TEMPORARY = re.compile(r"^\.(?P<target>.+\.(?:pt|json|jsonl|yaml))\.[a-z0-9_]{8}$")


def atomic_write_bytes(path: str | Path, write: Callable[[Any], Any]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, which
    is fsynced and renamed over ``path``; on any error the temporary is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporaries (``.last.pt.XXXXXXXX``, ``.results.json.XXXXXXXX``, ...) that a
    process killed during :func:`atomic_write_bytes` left in ``run_dir``; return them.

    Call it when a run starts (rank 0, before writing anything), never while another process
    writes the same folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    removed = []
    for p in sorted(run_dir.iterdir()):
        if _TEMPORARY.match(p.name) and p.is_file() and not p.is_symlink():
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            removed.append(p)
            log.warning("removed %s, a partial write of %s left by an interrupted run", p,
                        _TEMPORARY.match(p.name).group("target"))
    return removed


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_fingerprint(cfg: Any) -> str:
    """The config fingerprint a run's checkpoints record: :func:`mmbalance.config.config_fingerprint`
    of the resolved config, with the options that change only evaluation (``train.eval_batch_size``,
    ``train.probe``, which ``mmbalance evaluate`` may override) set to their defaults."""
    from ..config import TrainConfig, config_fingerprint

    defaults = TrainConfig()
    reset = {k: getattr(defaults, k) for k in ("eval_batch_size", "probe") if hasattr(cfg.train, k)}
    return config_fingerprint(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **reset)))


def save_checkpoint(path: str | Path, state: Mapping[str, Any], fingerprint: str | None = None,
                    run: str | None = None) -> None:
    """Write ``state`` atomically with ``torch.save``; ``fingerprint`` (the run's config
    fingerprint) and ``run`` (a description of the run, e.g. its folder) are recorded so that
    :func:`load_checkpoint` can refuse a checkpoint of another run."""
    state = dict(state)
    if fingerprint is not None:
        state["fingerprint"] = str(fingerprint)
    if run is not None:
        state["run"] = str(run)
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def _advice(path: Path) -> str:
    if path.name == "last.pt":
        return "restore it, or delete the run folder and train again without --resume"
    if path.name == "best.pt":
        return "restore it, or train the run again (into a new --output-dir)"
    return "restore it or write it again"


def _short(e: BaseException) -> str:
    """One line about a loading failure (torch's messages span lines and advise weights_only=False)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if m:
        text = m.group(1)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
    first = text.split(". ")[0].splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    expect_fingerprint: str | None = None, required: Sequence[str] = ()) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, safely (``weights_only=True``).

    Raises one :class:`ConfigError` line naming the file and what to do when it is missing,
    empty, truncated or corrupt, holds anything but tensors and plain values, lacks one of the
    ``required`` keys, or records a fingerprint other than ``expect_fingerprint`` (a checkpoint
    without a fingerprint, written before they were recorded, is accepted)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        size = path.stat().st_size
        if size == 0:
            raise ConfigError(f"{path} is empty (0 bytes; the run was stopped while writing it?); {_advice(path)}")
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise ConfigError(f"{path} is corrupt or truncated (checksum mismatch in {bad}); {_advice(path)}")
        state = torch.load(path, map_location=map_location, weights_only=True)
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"{path} cannot be read ({_short(e)}); check the file's permissions") from None
    except Exception as e:  # noqa: BLE001 - torch/pickle/zip raise many kinds for a damaged file
        if "Unsupported global" in str(e):  # a pickled class or function (not "Unsupported operand": garbage)
            raise ConfigError(f"{path} holds objects other than tensors and plain values ({_short(e)}), so it is "
                              "not loaded (unsafe); it was not written by mmbalance — use a checkpoint of the "
                              "run") from None
        raise ConfigError(f"{path} is corrupt or truncated ({_short(e)}); {_advice(path)}") from None
    if not isinstance(state, dict):
        raise ConfigError(f"{path} is not an mmbalance checkpoint (it holds a {type(state).__name__}, not a "
                          f"mapping); {_advice(path)}")
    missing = [k for k in required if k not in state]
    if missing:
        raise ConfigError(f"{path} is not an mmbalance checkpoint of this kind (no {', '.join(map(repr, missing))}); "
                          f"{_advice(path)}")
    saved = state.get("fingerprint")
    if expect_fingerprint is not None and saved is not None and saved != expect_fingerprint:
        run = state.get("run")
        raise ConfigError(f"{path} belongs to another run ({(str(run) + ', ') if run else ''}config fingerprint "
                          f"{saved}; this run's is {expect_fingerprint}); use that run's folder, or remove the file "
                          "and train again")
    return state


def load_model_state(model: torch.nn.Module, state: Any, path: str | Path) -> None:
    """``model.load_state_dict(state)``, with missing / unexpected keys and shape mismatches (a
    checkpoint of another fusion, encoder, modality set or class count) reported as one
    :class:`ConfigError` line naming ``path``."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"{path} holds no model weights (got {type(state).__name__}); {_advice(Path(path))}")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} saved {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and isinstance(own[k], torch.Tensor)
              and state[k].shape != own[k].shape]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            parts.append(f"{what} {len(keys)}: " + ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else ""))
    if parts:
        raise ConfigError(f"{path} holds weights of a different model ({'; '.join(parts)}); it was saved with "
                          "another fusion, encoders, modalities or number of classes: use it with the configuration "
                          "it was trained with (its run folder's config.yaml)")
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{path} does not fit the model ({_short(e)}); use it with the configuration it was "
                          "trained with") from None


def load_component_state(obj: Any, state: Any, path: str | Path, what: str) -> None:
    """``obj.load_state_dict(state)`` for an optimizer, scheduler or method, with a failure (a
    checkpoint of another optimizer or method) reported as one :class:`ConfigError` line."""
    try:
        obj.load_state_dict(state)
    except ConfigError:
        raise
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ConfigError(f"{path}: its {what} state does not fit this run ({_short(e)}); it was saved with another "
                          f"{what} configuration: resume it with the configuration it was trained with") from None


# ----------------------------------------------------------------------------- JSON
def _reason(key: str, value: float) -> str:
    leaf = key.rsplit(".", 1)[-1]
    if "probe" in leaf:
        return ("cannot be computed: no sample of the split has this modality present, or no training sample for "
                "the probe")
    if "loss" in leaf:
        return "cannot be computed: the loss is not finite (diverged, or over no samples)"
    if math.isnan(value):
        return "cannot be computed: undefined (e.g. a metric over no samples)"
    return "cannot be computed: it overflowed"


def finite_json(obj: Any, reasons: Mapping[str, str] | None = None) -> tuple[Any, list[tuple[str, str]]]:
    """``obj`` made strictly JSON-serialisable: non-finite floats become ``None``; numpy and
    0-d torch scalars become Python numbers, arrays and tensors lists, other objects ``str``.
    Returns it and ``[(dotted key, reason)]`` for each replaced value; ``reasons`` maps a dotted
    key (or a prefix of one) to the reason to report instead of the default.

    >>> finite_json({"accuracy": 0.5, "per_modality": {"a": {"probe_accuracy": float("nan")}}})
    ({'accuracy': 0.5, 'per_modality': {'a': {'probe_accuracy': None}}}, [('per_modality.a.probe_accuracy', 'nan: cannot be computed: ...')])
    """
    found: list[tuple[str, str]] = []

    def why(key: str, v: float) -> str:
        for k, r in (reasons or {}).items():
            if key == k or key.startswith(k + "."):
                return r
        return _reason(key, v)

    def walk(x: Any, key: str) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().tolist()
        elif isinstance(x, np.ndarray):
            x = x.tolist()
        elif isinstance(x, np.generic):
            x = x.item()
        if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
            return x
        if isinstance(x, float):
            if math.isfinite(x):
                return x
            found.append((key or "(value)", f"{x!r}: " + why(key, x)))
            return None
        if isinstance(x, Mapping):
            return {(k if isinstance(k, str) else str(k)): walk(v, f"{key}.{k}" if key else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple, set, frozenset)):
            return [walk(v, f"{key}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, complex):
            return walk(str(x), key)
        return str(x)

    return walk(obj, ""), found


def _warn(where: str, found: list[tuple[str, str]]) -> None:
    if found:
        log.warning("%s: %d non-finite value(s) written as null: %s", where, len(found),
                    "; ".join(f"{k} = {r}" for k, r in found))


def write_json(path: str | Path, obj: Any, reasons: Mapping[str, str] | None = None) -> None:
    """Write ``obj`` as indented, strict JSON, atomically; non-finite floats become ``null``
    and are logged (``logging.getLogger("mmbalance").warning``) with their keys and why."""
    clean, found = finite_json(obj, reasons)
    _warn(str(path), found)
    text = json.dumps(clean, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


_warned_lines: set[tuple[str, str]] = set()


def json_line(obj: Any, where: str = "metrics.jsonl", reasons: Mapping[str, str] | None = None) -> str:
    """``obj`` as one line of strict JSON (no newline) for ``metrics.jsonl``: non-finite floats
    become ``null``; each key is logged the first time it is non-finite (not every epoch)."""
    clean, found = finite_json(obj, reasons)
    new = [(k, r) for k, r in found if (where, k) not in _warned_lines]
    _warned_lines.update((where, k) for k, _ in new)
    label = f"{where} (epoch {obj['epoch']})" if isinstance(obj, Mapping) and "epoch" in obj else where
    _warn(label, new)
    return json.dumps(clean, allow_nan=False)


def truncate_metrics(path: str | Path, last_epoch: int) -> int:
    """Keep the records of ``metrics.jsonl`` up to epoch ``last_epoch`` (those a resumed run
    keeps); drop later ones and a torn last line (a kill mid-append, logged). A damaged line
    before the end raises one :class:`ConfigError` line. Returns the number of records kept."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text(errors="replace").splitlines()
    keep: list[str] = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            epoch = int(rec["epoch"])
        except (ValueError, KeyError, TypeError) as e:
            if i == len(lines) - 1:
                log.warning("%s: dropped a partial last line (an interrupted write)", path)
                break
            raise ConfigError(f"{path} line {i + 1} is not a metrics record ({_short(e)}); delete that line and "
                              "resume again") from None
        if epoch <= last_epoch:
            keep.append(ln)
    text = "".join(ln + "\n" for ln in keep)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
    return len(keep)
