"""The run folder: everything a run reads and writes on disk, in one place.

``config.yaml`` (fully resolved), ``model.json`` (the model spec, so a run can be loaded for
inference without its training data), ``metrics.jsonl`` (one line per epoch), ``results.json``,
``best.pt`` / ``last.pt`` (atomic; each records the configuration's fingerprint) and
``train.log``. File-system faults (a path that is a file, no permission, a full disk) and
foreign or damaged files become one-line :class:`~mmbalance.registry.ConfigError` messages.
"""
from __future__ import annotations

import contextlib
import logging
import signal
from pathlib import Path
from typing import Any, Iterator

import torch

from ..registry import ConfigError
from .checkpoint import (json_line, load_checkpoint, load_component_state, load_model_state,
                         remove_stale_temporaries, save_checkpoint, truncate_metrics, write_json)

log = logging.getLogger("mmbalance")

RUN_FILES = ("config.yaml", "model.json", "metrics.jsonl", "results.json", "best.pt", "last.pt", "train.log",
             "evaluation.json", "history.jsonl")


@contextlib.contextmanager
def filesystem_errors(path: Path, doing: str) -> Iterator[None]:
    """Turn OS errors while ``doing`` something with ``path`` into one line."""
    try:
        yield
    except ConfigError:
        raise
    except PermissionError:
        raise ConfigError(f"cannot {doing} {path}: permission denied; choose another --output-dir") from None
    except OSError as e:
        what = {28: "the disk is full", 30: "the file system is read-only", 20: "a part of the path is a file",
                21: "it is a folder", 36: "the name is too long"}.get(e.errno or 0, e.strerror or str(e))
        raise ConfigError(f"cannot {doing} {path}: {what}") from None


_DEFER: dict[str, Any] = {"depth": 0, "pending": None}


def interrupt_handler(signum: int, frame: Any) -> None:
    """SIGINT/SIGTERM: raise KeyboardInterrupt, after the write in progress when inside
    :func:`deferred_interrupts` (so checkpoints, metrics and results stay consistent)."""
    if _DEFER["depth"]:
        _DEFER["pending"] = signum
        return
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    _DEFER["depth"] += 1
    try:
        yield
    finally:
        _DEFER["depth"] -= 1
        if not _DEFER["depth"] and _DEFER["pending"] is not None:
            signum, _DEFER["pending"] = _DEFER["pending"], None
            raise KeyboardInterrupt(signal.Signals(signum).name)


def install_interrupt_handlers() -> None:
    """Handle SIGTERM like SIGINT (both end a run cleanly and resumably); main thread only."""
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, interrupt_handler)
        signal.signal(signal.SIGTERM, interrupt_handler)


class RunFolder:
    """A run's folder. ``writes`` is False on ranks other than 0 (they only read)."""

    def __init__(self, path: str | Path, writes: bool = True):
        self.path = Path(path)
        self.writes = writes
        self._handler: logging.Handler | None = None

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # -- checks ----------------------------------------------------------------------------
    def is_run(self) -> bool:
        return (self.path / "config.yaml").is_file()

    def check_new(self) -> None:
        """Before a new run: refuse a path that is a file, a folder holding a run (resume it),
        and a non-empty folder that is not a run (never overwrite a user's files)."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ConfigError(f"output folder {p} is a file; choose another --output-dir")
        if not p.exists():
            return
        if (p / "last.pt").exists() or (p / "metrics.jsonl").exists() or (p / "results.json").exists():
            raise ConfigError(f"{p} already holds a run; continue it with --resume {p} or choose another --output-dir")
        others = [c.name for c in p.iterdir() if not c.name.startswith(".") and c.name not in RUN_FILES
                  and not (c.name.startswith("epoch") and c.name.endswith(".pt"))]
        if others:
            raise ConfigError(f"{p} is not empty and is not a run folder (it holds {', '.join(sorted(others)[:3])}"
                              f"{' ...' if len(others) > 3 else ''}); choose another --output-dir")

    def check_resume(self) -> None:
        if not self.path.is_dir():
            raise ConfigError(f"cannot resume: {self.path} is not a folder")
        if not self.is_run():
            raise ConfigError(f"cannot resume: {self.path} is not a run folder (no config.yaml)")
        if not (self.path / "last.pt").exists():
            raise ConfigError(f"cannot resume: {self.path / 'last.pt'} does not exist (the run saved no epoch yet); "
                              f"start it again without --resume")

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete temporary files left by a process killed while writing (``.last.pt.XXXX``)."""
        if not self.writes:
            return []
        return remove_stale_temporaries(self.path)

    # -- writing ---------------------------------------------------------------------------
    def create(self, config_text: str, spec: dict[str, Any]) -> None:
        if not self.writes:
            return
        with filesystem_errors(self.path, "create the run folder"):
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "config.yaml").write_text(config_text)
            write_json(self.path / "model.json", spec)

    def write_spec_if_missing(self, spec: dict[str, Any]) -> None:
        if self.writes and not (self.path / "model.json").exists():
            with filesystem_errors(self.path / "model.json", "write"):
                write_json(self.path / "model.json", spec)

    def attach_log(self) -> None:
        if not self.writes:
            return
        with filesystem_errors(self.path / "train.log", "write"):
            handler = logging.FileHandler(self.path / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        self._handler = handler

    def detach_log(self) -> None:
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def append_metrics(self, record: dict[str, Any]) -> None:
        if not self.writes:
            return
        line = json_line(record, str(self.path / "metrics.jsonl"))
        with filesystem_errors(self.path / "metrics.jsonl", "write"):
            with open(self.path / "metrics.jsonl", "a") as f:
                f.write(line + "\n")

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metric lines after 1-based epoch ``last_epoch`` (written after the checkpoint
        by a run killed in between) and a torn last line."""
        if self.writes:
            with filesystem_errors(self.path / "metrics.jsonl", "write"):
                truncate_metrics(self.path / "metrics.jsonl", last_epoch)

    def save(self, name: str, state: dict[str, Any], fingerprint: str) -> None:
        if not self.writes:
            return
        with filesystem_errors(self.path / name, "write"):
            save_checkpoint(self.path / name, state, fingerprint=fingerprint, run=str(self.path))

    def write_json(self, name: str, obj: Any) -> None:
        if not self.writes:
            return
        with filesystem_errors(self.path / name, "write"):
            write_json(self.path / name, obj)

    # -- reading ---------------------------------------------------------------------------
    def load(self, name: str, device: torch.device | str, fingerprint: str | None = None) -> dict[str, Any]:
        """A checkpoint of this run; one line if it is missing, damaged or from another run."""
        return load_checkpoint(self.path / name, device, expect_fingerprint=fingerprint, required=("model",))




__all__ = ["RunFolder", "deferred_interrupts", "filesystem_errors", "install_interrupt_handlers", "load_component_state",
           "load_model_state"]
