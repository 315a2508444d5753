"""Loggers: every epoch's record goes to ``metrics.jsonl`` (always), and optionally to a CSV
file (``metrics.csv``, one column per flattened key) and TensorBoard (``tensorboard/``;
``pip install 'mmbalance[tensorboard]'``). Select with ``--train.loggers csv,tensorboard``
(or ``--logger tensorboard``)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping

from ..registry import ConfigError
from .checkpoint import atomic_write_bytes


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a nested record as ``a/b/c`` keys (the epoch record's layout).

    >>> flatten({"epoch": 1, "val": {"accuracy": 0.5, "per_modality": {"a": {"accuracy": 0.4}}}})
    {'epoch': 1.0, 'val/accuracy': 0.5, 'val/per_modality/a/accuracy': 0.4}
    """
    out: dict[str, float] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class CSVLogger:
    """``metrics.csv``, rebuilt from ``metrics.jsonl`` after every epoch, so columns that appear
    later (a method's diagnostics after warm-up) and resumed runs stay consistent."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def log(self, record: Mapping[str, Any]) -> None:
        rows = []
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            rows = [flatten(json.loads(ln)) for ln in path.read_text().splitlines() if ln.strip()]
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if not math.isfinite(v) else repr(v)) for k, v in r.items()})
        atomic_write_bytes(self.run_dir / "metrics.csv", lambda f: f.write(buf.getvalue().encode()))

    def close(self) -> None:
        pass


class TensorBoardLogger:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("the tensorboard logger needs the tensorboard package: "
                              "pip install 'mmbalance[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, record: Mapping[str, Any]) -> None:
        step = int(record["epoch"])
        for k, v in flatten(record).items():
            if k != "epoch" and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


LOGGERS = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}


def build_loggers(names: list[str], run_dir: Path | None) -> list[Any]:
    if run_dir is None:
        return []
    return [LOGGERS[n](run_dir) for n in dict.fromkeys(names)]
