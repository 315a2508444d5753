"""The training engine: one flat loop, methods plug into it.

The trainer owns data loading, devices, precision, seeding, validation-based model selection,
checkpoints (atomic), ``metrics.jsonl`` / ``results.json`` and progress; a
:class:`~mmbalance.methods.Method` owns what one training step does.

Reproducibility: everything random in epoch ``e`` (shuffling, dropout, augmentation, method
sampling) is seeded from ``(seed, e)``, so a run resumed at epoch ``e`` replays exactly what an
uninterrupted run does from ``e`` on.
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() on the loader eagerly (a second DataLoader iterator per epoch)

from .. import __version__
from ..config import RunConfig, dump_yaml, from_dict
from ..data import DataSplits, build_dataset
from ..evaluation.metrics import classification_metrics
from ..evaluation.probe import probe_accuracy
from ..methods import Method, ModelSpec, create_method
from ..models import FUSIONS, MultimodalModel
from ..registry import ConfigError
from . import distributed as dist_utils
from .checkpoint import load_checkpoint, save_checkpoint, write_json
from .optim import build_optimizer, build_scheduler
from .seed import epoch_seed, seed_everything, set_deterministic, worker_init_fn

log = logging.getLogger("mmbalance")


class TrainingDiverged(RuntimeError):
    """Loss became NaN/inf; the message says where and what to change."""


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is '{name}' but CUDA is not available; use --train.device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None


def dataset_label(cfg: RunConfig, data: DataSplits) -> str:
    return str(data.info.get("name") or Path(cfg.dataset.name).stem)


def fusion_name(model: MultimodalModel) -> str:
    for entry in FUSIONS.entries():
        if type(model.fusion) is entry.obj:
            return entry.name
    return getattr(model.fusion, "name", type(model.fusion).__name__)


class Trainer:
    """Build everything a run needs from a :class:`RunConfig` and train it.

    ``run_dir=None`` trains without writing anything (used by tests and sweeps in memory).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False,
                 data: DataSplits | None = None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.resume = resume
        tc = cfg.train
        if tc.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {tc.epochs}")
        if tc.batch_size < 1:
            raise ConfigError(f"train.batch_size must be >= 1, got {tc.batch_size}")
        if tc.select_metric not in ("accuracy", "macro_f1", "map"):
            raise ConfigError("train.select_metric must be accuracy, macro_f1 or map")
        self.device = resolve_device(tc.device)
        if dist_utils.is_distributed() and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        if tc.batch_size % self.world_size:
            raise ConfigError(f"train.batch_size {tc.batch_size} (the global batch) must be divisible by the "
                              f"number of processes ({self.world_size})")
        if tc.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError("train.precision must be auto, fp32 or bf16")
        self.amp_dtype = torch.bfloat16 if (tc.precision == "bf16" or (
            tc.precision == "auto" and self.device.type == "cuda")) else None
        self.show_progress = {"on": True, "off": False}.get(tc.progress, sys.stderr.isatty()) and self.rank == 0
        set_deterministic(tc.deterministic)
        seed_everything(tc.seed)

        self.data = data if data is not None else build_dataset(cfg.dataset.name, **cfg.dataset.options)
        self.method: Method = create_method(cfg.method.name, **cfg.method.options)
        self.modalities = self.method.modalities(list(self.data.modalities))
        self.spec = self._model_spec()
        self.model: MultimodalModel = self.method.build_model(self.spec).to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, tc.epochs)
        self.epoch = 0
        self.global_step = 0
        self.start_epoch = 0
        self.best_value = -math.inf
        self.best_epoch = -1
        self.train_seconds = 0.0
        self.method.setup(self)

    # ------------------------------------------------------------------ construction helpers
    def _model_spec(self) -> ModelSpec:
        mc = self.cfg.model
        encoders: dict[str, tuple[str, dict[str, Any]]] = {}
        for m in self.modalities:
            name = self.data.default_encoders.get(m, "mlp")
            opts = dict(self.data.encoder_options.get(m, {}))
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
        unknown = [m for m in mc.encoders if m not in self.data.modalities]
        if unknown:
            raise ConfigError(f"model.encoders names unknown modality {unknown}; modalities: "
                              f"{', '.join(self.data.modalities)}")
        return ModelSpec(modalities=list(self.modalities), num_classes=self.data.num_classes,
                         input_shapes={m: tuple(self.data.input_shapes[m]) for m in self.modalities},
                         encoders=encoders, fusion=mc.fusion, fusion_options=dict(mc.fusion_options),
                         absent_policy=mc.absent_policy)

    def loader(self, dataset: Dataset, shuffle: bool = False, batch_size: int | None = None,
               seed: int | None = None, drop_last: bool = False, shard: bool = False) -> DataLoader:
        """A DataLoader over ``dataset``. ``shard=True`` (the training loader) gives this rank its
        share of the shuffle when several processes train; ``batch_size`` is then global."""
        g = torch.Generator()
        g.manual_seed(seed if seed is not None else self.cfg.train.seed)
        nw = self.cfg.train.num_workers
        bs = batch_size or self.cfg.train.eval_batch_size
        sampler = None
        if shard and self.world_size > 1:
            sampler = dist_utils.ShardedSampler(len(dataset), int(g.initial_seed()), self.rank, self.world_size)
            bs, shuffle = bs // self.world_size, False
        return DataLoader(dataset, batch_size=bs, shuffle=shuffle, sampler=sampler,
                          generator=g, num_workers=nw, worker_init_fn=worker_init_fn if nw else None,
                          drop_last=drop_last, pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    # ------------------------------------------------------------------ helpers for methods
    def shard(self, dataset: Dataset) -> Dataset:
        """This rank's share of ``dataset`` for a per-epoch pass (positions ``rank::world``, no
        padding, so every sample is counted exactly once over the ranks); the dataset itself on one
        process. Sum the pass's statistics with :meth:`all_reduce_sum` afterwards."""
        if self.world_size == 1:
            return dataset
        return torch.utils.data.Subset(dataset, list(range(self.rank, len(dataset), self.world_size)))

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            raise TrainingDiverged(
                f"loss is {float(loss.detach())} at epoch {self.epoch + 1}, step {self.global_step}; "
                "lower optim.lr or set optim.grad_clip")

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Backward; with several processes the gradients are then averaged over ranks, so
        whatever a method does to them next acts on the global-batch gradient."""
        self.check_finite(loss)
        loss.backward(**kwargs)
        dist_utils.average_gradients(self.model.parameters())

    def clip_gradients(self) -> float | None:
        if self.cfg.optim.grad_clip is None:
            return None
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip))

    def optimizer_step(self) -> None:
        self.clip_gradients()
        self.optimizer.step()
        dist_utils.broadcast_buffers(self.model)

    def step(self, loss: torch.Tensor) -> None:
        """zero grads, backward, clip, optimizer step."""
        self.zero_grad()
        self.backward(loss)
        self.optimizer_step()

    @property
    def world_size(self) -> int:
        return dist_utils.world_size()

    @property
    def rank(self) -> int:
        return dist_utils.rank()

    @property
    def writes(self) -> bool:
        """True on the process that writes the run folder (rank 0)."""
        return self.run_dir is not None and self.rank == 0

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Average a batch statistic over processes (identity in a single process)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = t.clone()
            torch.distributed.all_reduce(t)
            t /= torch.distributed.get_world_size()
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = t.clone()
            torch.distributed.all_reduce(t)
        return t

    def progress(self, iterable, **kwargs):
        return tqdm(iterable, disable=not self.show_progress, leave=False, dynamic_ncols=True, **kwargs)

    # ------------------------------------------------------------------ run folder
    def _prepare_run_dir(self) -> None:
        if self.run_dir is None:
            return
        rd = self.run_dir
        if not self.resume:
            if (rd / "last.pt").exists() or (rd / "metrics.jsonl").exists():
                raise ConfigError(f"{rd} already holds a run; continue it with --resume {rd} "
                                  "or choose another --output-dir")
            dist_utils.barrier()  # every rank has checked before rank 0 creates anything
            if self.rank == 0:
                rd.mkdir(parents=True, exist_ok=True)
                (rd / "config.yaml").write_text(dump_yaml(self.resolved_config()))
        if self.rank != 0:
            return
        handler = logging.FileHandler(rd / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        self._log_handler = handler

    def resolved_config(self) -> RunConfig:
        """The config with the method's full hyperparameters filled in (for config.yaml)."""
        d = json.loads(json.dumps(_cfg_dict(self.cfg), default=str))
        d["method"] = {"name": self.cfg.method.name, **self.method.hparams()}
        return from_dict(d)

    def _load_resume_state(self) -> None:
        assert self.run_dir is not None
        path = self.run_dir / "last.pt"
        if not path.exists():
            raise ConfigError(f"cannot resume: {path} does not exist (the run saved no epoch yet)")
        st = load_checkpoint(path, self.device)
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        if self.scheduler is not None and st.get("scheduler") is not None:
            self.scheduler.load_state_dict(st["scheduler"])
        self.method.load_state_dict(st.get("method", {}))
        self.start_epoch = int(st["epoch"]) + 1
        self.global_step = int(st["global_step"])
        self.best_value = float(st["best_value"])
        self.best_epoch = int(st["best_epoch"])
        self.train_seconds = float(st["train_seconds"])
        mpath = self.run_dir / "metrics.jsonl"
        if mpath.exists() and self.rank == 0:  # drop epochs recorded after the checkpoint (killed in between)
            lines = [ln for ln in mpath.read_text().splitlines()
                     if ln.strip() and json.loads(ln)["epoch"] <= self.start_epoch]
            mpath.write_text("".join(ln + "\n" for ln in lines))
        log.info("resuming %s at epoch %d", self.run_dir, self.start_epoch + 1)

    def _checkpoint_state(self, epoch: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "method": self.method.state_dict(), "epoch": epoch, "global_step": self.global_step,
                "best_value": self.best_value, "best_epoch": self.best_epoch,
                "train_seconds": self.train_seconds}

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any] | None:
        """Train (or continue) and return the results dict; None if stopped early on purpose."""
        self._prepare_run_dir()
        try:
            if self.resume:
                self._load_resume_state()
            return self._fit()
        finally:
            if getattr(self, "_log_handler", None) is not None:
                log.removeHandler(self._log_handler)
                self._log_handler.close()

    def _fit(self) -> dict[str, Any] | None:
        tc = self.cfg.train
        done_this_call = 0
        for epoch in range(self.start_epoch, tc.epochs):
            self.epoch = epoch
            t0 = time.perf_counter()
            seed_everything(epoch_seed(tc.seed, epoch))
            self.method.on_epoch_start(epoch)
            dataset = self.method.train_dataset(epoch, self.data.train)
            # a trailing batch of one sample breaks BatchNorm in training mode: drop it
            per_rank = -(-len(dataset) // self.world_size)
            drop_last = tc.drop_last or per_rank % (tc.batch_size // self.world_size) == 1
            loader = self.loader(dataset, shuffle=True, batch_size=tc.batch_size,
                                 seed=epoch_seed(tc.seed, epoch), drop_last=drop_last, shard=True)
            self.model.train()
            sums: dict[str, float] = {}
            n = 0
            for batch in self.progress(loader, desc=f"epoch {epoch + 1}/{tc.epochs}"):
                batch = to_device(batch, self.device)
                self.global_step += 1
                stats = self.method.training_step(batch)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                n += 1
            self.method.on_epoch_end(epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            if self.scheduler is not None:
                self.scheduler.step()
            diagnostics = self.method.epoch_diagnostics()
            val = self.evaluate("val", probe=False)
            self.train_seconds += time.perf_counter() - t0
            value = val[tc.select_metric]
            improved = value > self.best_value
            if improved:
                self.best_value, self.best_epoch = value, epoch
            record = {"epoch": epoch + 1, "lr": lr, "train": {k: v / max(n, 1) for k, v in sums.items()},
                      "train_size": len(dataset), "val": val, "diagnostics": diagnostics,
                      "seconds": round(time.perf_counter() - t0, 4)}
            self._log_epoch(record, improved)
            if self.writes:
                if improved:
                    save_checkpoint(self.run_dir / "best.pt", {"model": self.model.state_dict(),
                                                               "method": self.method.state_dict(),
                                                               "epoch": epoch})
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                save_checkpoint(self.run_dir / "last.pt", self._checkpoint_state(epoch))
            elif improved:  # no run folder, or a rank that does not write: keep the best in memory
                self._best_in_memory = {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                                        "method": copy.deepcopy(self.method.state_dict()), "epoch": epoch}
            done_this_call += 1
            if tc.stop_after_epochs is not None and done_this_call >= tc.stop_after_epochs and epoch + 1 < tc.epochs:
                log.info("stopped after %d epoch(s) as asked; continue with --resume %s", done_this_call, self.run_dir)
                return None
        return self.finish()

    def _log_epoch(self, record: dict[str, Any], improved: bool) -> None:
        tr = " ".join(f"{k} {v:.4f}" for k, v in record["train"].items())
        val = record["val"]
        per = " ".join(f"{m} {v['accuracy']:.3f}" for m, v in val["per_modality"].items())
        log.info("epoch %d/%d %s | val acc %.4f f1 %.4f (%s)%s", record["epoch"], self.cfg.train.epochs, tr,
                 val["accuracy"], val["macro_f1"], per, " *" if improved else "")

    # ------------------------------------------------------------------ evaluation
    def load_best(self) -> int:
        st = getattr(self, "_best_in_memory", None)
        if st is None and self.run_dir is not None:
            path = self.run_dir / "best.pt"
            if not path.exists():
                raise ConfigError(f"{path} does not exist: the run has no selected checkpoint")
            st = load_checkpoint(path, self.device)
        if st is None:
            return self.epoch
        self.model.load_state_dict(st["model"])
        self.method.load_state_dict(st.get("method", {}))
        return int(st["epoch"])

    def finish(self) -> dict[str, Any]:
        """Load the validation-selected checkpoint, evaluate val and test once, write results."""
        self.best_epoch = self.load_best()
        results = self.results()
        if self.writes:
            write_json(self.run_dir / "results.json", results)
        return results

    def results(self) -> dict[str, Any]:
        probe = self.cfg.train.probe
        val = self.evaluate("val", probe=probe)
        test = self.evaluate("test", probe=probe)
        return {
            "method": self.cfg.method.name, "dataset": dataset_label(self.cfg, self.data),
            "fusion": fusion_name(self.model), "seed": self.cfg.train.seed, "modalities": self.modalities,
            "num_classes": self.data.num_classes, "best_epoch": self.best_epoch + 1, "epochs": self.cfg.train.epochs,
            "train_seconds": round(self.train_seconds, 3), "device": str(self.device),
            "val": val, "test": test, "method_options": _jsonable(self.method.hparams()),
            "versions": {"mmbalance": __version__, "torch": torch.__version__},
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    @torch.no_grad()
    def predict_split(self, dataset: Dataset, desc: str = "eval") -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Fused logits, unimodal logits and labels over a dataset (eval mode)."""
        self.model.eval()
        logits, uni, labels = [], {m: [] for m in self.modalities}, []
        for batch in self.progress(self.loader(dataset), desc=desc):
            batch = to_device(batch, self.device)
            with self.autocast():
                out = self.method.predict(batch)
            logits.append(out.logits.float().cpu())
            for m in self.modalities:
                uni[m].append(out.unimodal_logits[m].float().cpu())
            labels.append(batch["label"].cpu())
        return torch.cat(logits), {m: torch.cat(v) for m, v in uni.items()}, torch.cat(labels)

    @torch.no_grad()
    def encoder_features(self, dataset: Dataset, desc: str = "features") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """Encoder outputs per modality (eval mode), presence masks and labels."""
        self.model.eval()
        feats, pres, labels = {m: [] for m in self.modalities}, {m: [] for m in self.modalities}, []
        for batch in self.progress(self.loader(dataset), desc=desc):
            batch = to_device(batch, self.device)
            with self.autocast():
                for m in self.modalities:
                    feats[m].append(self.model.encode(m, batch["inputs"][m]).float().cpu())
                    pres[m].append(batch["present"][m].cpu())
            labels.append(batch["label"].cpu())
        return ({m: torch.cat(v) for m, v in feats.items()}, {m: torch.cat(v) for m, v in pres.items()},
                torch.cat(labels))

    def evaluate(self, split: str, probe: bool = False) -> dict[str, Any]:
        dataset = {"val": self.data.val, "test": self.data.test, "train": self.data.train_eval}[split]
        logits, uni, labels = self.predict_split(dataset, desc=f"eval {split}")
        C = self.data.num_classes
        res: dict[str, Any] = classification_metrics(logits, labels, C)
        res["loss"] = float(F.cross_entropy(logits, labels))
        res["per_modality"] = {m: classification_metrics(uni[m], labels, C) for m in self.modalities}
        if probe:
            tr_f, tr_p, tr_y = self.encoder_features(self.data.train_eval, desc="probe features (train)")
            ev_f, ev_p, ev_y = self.encoder_features(dataset, desc=f"probe features ({split})")
            for m in self.modalities:
                res["per_modality"][m]["probe_accuracy"] = probe_accuracy(
                    tr_f[m][tr_p[m]], tr_y[tr_p[m]], ev_f[m][ev_p[m]], ev_y[ev_p[m]], C)
        self.model.train()
        return res


def _cfg_dict(cfg: RunConfig) -> dict[str, Any]:
    from ..config import to_dict

    return to_dict(cfg)


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(d), default=str))


def default_run_dir(cfg: RunConfig, root: str = "runs") -> Path:
    ds = Path(cfg.dataset.name).stem
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(root) / f"{ds}-{cfg.method.name}-{cfg.model.fusion}-s{cfg.train.seed}-{stamp}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = Path(f"{base}-{k}")
    return path


def load_run_config(run_dir: str | Path) -> RunConfig:
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
    import yaml

    return from_dict(yaml.safe_load(p.read_text()) or {})
