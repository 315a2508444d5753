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
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() on the loader eagerly (a second DataLoader iterator per epoch)

from .. import __version__
from ..config import RunConfig, config_fingerprint, dump_yaml, from_dict
from ..data import DataSplits, build_dataset, validate_splits
from ..data.missing import apply_missing
from ..evaluation.probe import probe_accuracy
from ..methods import Method
from ..models import MultimodalModel
from ..registry import ConfigError
from ..utils import epoch_seed, seed_everything, set_deterministic, to_device, worker_init_fn
from . import distributed as dist_utils
from .acceleration import LoaderPool, loader_options, prepare_model
from .assembly import (amp_dtype, build_method, check_config, fusion_name, model_spec, resolve_config,
                       resolve_device, spec_to_dict)
from .checkpoint import checkpoint_fingerprint
from .inference import predict_batches, split_metrics
from .loggers import build_loggers
from .optim import build_optimizer, build_scheduler
from .rundir import RunFolder, deferred_interrupts, load_component_state, load_model_state

log = logging.getLogger("mmbalance")


class TrainingDiverged(RuntimeError):
    """Loss became NaN/inf; the message says where and what to change."""


def dataset_label(cfg: RunConfig, data: DataSplits) -> str:
    return str(data.info.get("name") or Path(cfg.dataset.name).stem)


class Trainer:
    """Build everything a run needs from a :class:`RunConfig` and train it.

    ``run_dir=None`` trains without writing anything (used by tests and sweeps in memory).
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path | None = None, resume: bool = False,
                 data: DataSplits | None = None, resume_changes: Mapping[str, Any] | None = None):
        # assembly, fail-fast order: config, device, method (no data yet), data, model
        check_config(cfg, self.world_size)
        self.method: Method = build_method(cfg)
        self.cfg = resolve_config(cfg, self.method)
        self.fingerprint = checkpoint_fingerprint(self.cfg)  # what checkpoints record (evaluate may change probe)
        self.config_fingerprint = config_fingerprint(self.cfg)  # what results.json records
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.folder = RunFolder(run_dir, writes=self.rank == 0) if run_dir is not None else None
        self.resume = resume
        self.resume_changes = dict(resume_changes or {})
        self.continue_hint = f"continue with --resume {self.run_dir}"  # an experiment says: rerun it
        if self.folder is not None:
            self.folder.check_resume() if resume else self.folder.check_new()
        tc = self.cfg.train
        self.device = resolve_device(tc.device)
        if dist_utils.is_distributed() and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.amp_dtype = amp_dtype(tc.precision, self.device)
        # fp16: dynamic loss scaling (as torch.amp.GradScaler), unscaled right after every backward
        # so methods that read or change gradients see true gradients; steps with inf/NaN skipped
        self.loss_scale: float | None = 2.0 ** 16 if tc.precision == "fp16" else None
        self._found_inf = torch.zeros((), device=self.device)
        self._good_steps = 0
        self.skipped_steps = 0
        self.show_progress = {"on": True, "off": False}.get(tc.progress, sys.stderr.isatty()) and self.rank == 0
        set_deterministic(tc.deterministic)
        seed_everything(tc.seed)

        self.data = data if data is not None else build_dataset(self.cfg.dataset.name, **self.cfg.dataset.options)
        validate_splits(self.data, source=self.cfg.dataset.name if data is None else None)
        if self.cfg.dataset.missing_rate:
            self.data = apply_missing(self.data, self.cfg.dataset.missing_rate, self.cfg.dataset.missing_seed)
        self.modalities = self.method.modalities(list(self.data.modalities))
        self.spec = model_spec(self.cfg, self.data, self.modalities)
        self.model: MultimodalModel = self.method.build_model(self.spec).to(self.device)
        prepare_model(self.model, tc)  # train.channels_last, train.compile (engine/acceleration.py)
        self._loader_pool = LoaderPool()  # loaders kept for the next pass with train.persistent_workers
        self.optimizer = build_optimizer(self.model.parameters(), self.cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, tc.epochs)
        self.epoch = 0
        self.global_step = 0
        self.start_epoch = 0
        self.best_value = -math.inf
        self.best_epoch = -1
        self.train_seconds = 0.0
        self.method.setup(self)

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
        opts = loader_options(self.cfg.train, self.device)

        def build() -> DataLoader:
            return DataLoader(dataset, batch_size=bs, shuffle=shuffle, sampler=sampler, generator=g, num_workers=nw,
                              worker_init_fn=worker_init_fn if nw else None, drop_last=drop_last, **opts)

        if opts["persistent_workers"]:  # the same loader next epoch, reseeded: the workers stay up
            return self._loader_pool.get((id(dataset), bs, shuffle, drop_last, sampler is not None),
                                         int(g.initial_seed()), build)
        return build()

    # ------------------------------------------------------------------ helpers for methods
    def shard(self, dataset: Dataset) -> Dataset:
        """This rank's share of ``dataset`` for a per-epoch pass (positions ``rank::world``, no
        padding, so every sample is counted exactly once over the ranks); the dataset itself on one
        process. Sum the pass's statistics with :meth:`all_reduce_sum` afterwards."""
        if self.world_size == 1:
            return dataset
        return torch.utils.data.Subset(dataset, list(range(self.rank, len(dataset), self.world_size)))

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """A fresh optimizer of the run's kind (``optim.*``) over ``params`` (auxiliary models)."""
        return build_optimizer(params, self.cfg.optim)

    def average_gradients(self, params) -> None:
        """Average ``.grad`` of ``params`` over processes (what :meth:`backward` does for the model)."""
        dist_utils.average_gradients(params)

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) to every rank (what :meth:`optimizer_step` does)."""
        dist_utils.broadcast_buffers(module)

    def drop_last_for(self, n: int) -> bool:
        """The training loader's ``drop_last`` for ``n`` samples: when asked, or when this process's
        trailing batch would hold one sample (BatchNorm cannot train on one)."""
        per_rank = n // self.world_size if self.world_size > 1 else n
        return bool(self.cfg.train.drop_last) or per_rank % max(self.cfg.train.batch_size // self.world_size, 1) == 1

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """A checkpoint file (e.g. another run's ``best.pt``), loaded safely (``weights_only``), on
        the CPU; one-line errors when it is missing or damaged."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(path, "cpu", required=("model",))

    def batches(self, dataset: Dataset, *, train: bool = False, batch_size: int | None = None,
                shuffle: bool = False, seed: int | None = None, drop_last: bool = False,
                desc: str | None = None):
        """Device batches of ``dataset`` for an extra pass (valuation, prototypes, statistics):
        the model in eval mode unless ``train``, and back in train mode afterwards."""
        was_training = self.model.training
        self.model.train(train)
        try:
            loader = self.loader(dataset, shuffle=shuffle, batch_size=batch_size, seed=seed, drop_last=drop_last)
            for batch in (self.progress(loader, desc=desc) if desc else loader):
                yield to_device(batch, self.device)
        finally:
            self.model.train(was_training)

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
                "lower optim.lr or set optim.grad_clip"
                + (f" (continue from the last good epoch: mmbalance train --resume {self.run_dir} --optim.lr LOWER)"
                   if self.run_dir is not None and (self.run_dir / "last.pt").exists() else ""))

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Backward; with several processes the gradients are averaged over ranks, bucket by
        bucket while backward runs (:class:`~mmbalance.engine.distributed.GradReducer`) and
        complete when this returns, so whatever a method does to them next acts on the
        global-batch gradient. The L2 norm of each encoder's gradient is accumulated on the
        device for ``metrics.jsonl``."""
        self.check_finite(loss)
        if self.loss_scale is None:
            self._backward_averaged(loss, **kwargs)
        else:
            self._backward_averaged(loss * self.loss_scale, **kwargs)  # an inf on any rank reaches every rank
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                inv = torch.full((), 1.0 / self.loss_scale, device=self.device)
                for dtype_group in _by_dtype(grads):
                    torch._amp_foreach_non_finite_check_and_unscale_(dtype_group, self._found_inf, inv)
        self._record_grad_norms()

    def _backward_averaged(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``loss.backward(**kwargs)``, then the model's gradients are the average over ranks:
        overlapped with backward by the bucketed reducer, or, with ``bucket_mb`` 0, one
        synchronous all-reduce per dtype afterwards (the same numbers)."""
        reducer = self._grad_reducer()
        if reducer is None:
            loss.backward(**kwargs)
            dist_utils.average_gradients(self.model.parameters())
            return
        reducer.begin([loss], kwargs.get("inputs"))
        try:
            loss.backward(**kwargs)
        except BaseException:
            reducer.active = False
            raise
        reducer.finish()

    def _grad_reducer(self) -> dist_utils.GradReducer | None:
        """The model's gradient reducer (rebuilt when its parameters or their ``requires_grad``
        change); None on one process or when the synchronous path is chosen (``bucket_mb`` 0)."""
        if self.world_size == 1 or not dist_utils.is_distributed():  # (tests simulate ranks without a group)
            return None
        mb = float(self.cfg.train.bucket_mb)
        reducer: dist_utils.GradReducer | None = getattr(self, "_reducer", None)
        if mb <= 0:
            return None
        params = list(self.model.parameters())
        if reducer is None or reducer.bucket_mb != mb or not reducer.matches(params):
            if reducer is not None:
                reducer.remove()
            reducer = self._reducer = dist_utils.GradReducer(params, mb)
        return reducer

    @torch.no_grad()
    def _record_grad_norms(self) -> None:
        acc = getattr(self, "_grad_norms", None)
        if acc is None:
            return
        for i, m in enumerate(self.modalities):
            grads = [p.grad for p in self.model.encoders[m].parameters() if p.grad is not None]
            if grads:
                acc[i] += torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).double()
        acc[-1] += 1

    def _epoch_grad_norms(self) -> dict[str, float]:
        """Mean per-backward L2 norm of each encoder's gradient over the epoch (one host sync)."""
        acc = self._grad_norms.cpu()
        n = max(float(acc[-1]), 1.0)
        return {m: float(acc[i]) / n for i, m in enumerate(self.modalities)}

    def clip_gradients(self) -> torch.Tensor | None:
        """Clip the global gradient norm at ``optim.grad_clip``; returns the norm before clipping
        (a device tensor: no host synchronisation)."""
        if self.cfg.optim.grad_clip is None:
            return None
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)

    def optimizer_step(self) -> None:
        if self.loss_scale is not None and self._skip_for_overflow():
            return
        self.clip_gradients()
        self.optimizer.step()
        dist_utils.broadcast_buffers(self.model)

    def _skip_for_overflow(self) -> bool:
        """fp16: skip this step when a gradient overflowed (halve the scale), else let the scale
        grow after 2000 good steps, as ``torch.amp.GradScaler`` does."""
        found = bool(self._found_inf.item())
        self._found_inf.zero_()
        if found:
            self.zero_grad()
            self.loss_scale = max(self.loss_scale / 2.0, 1.0)
            self.skipped_steps += 1
            return True
        self._good_steps += 1
        if self._good_steps % 2000 == 0:
            self.loss_scale *= 2.0
        return False

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
        if self.folder is None:
            return
        if not self.resume:
            dist_utils.barrier()  # every rank has checked the folder before rank 0 creates anything
            self.folder.create(dump_yaml(self.cfg), spec_to_dict(self.spec))
        self.folder.remove_stale_temporaries()
        self.folder.write_spec_if_missing(spec_to_dict(self.spec))
        self.folder.attach_log()
        if self.writes:
            self.loggers = build_loggers(self.cfg.train.loggers, self.run_dir)

    def resolved_config(self) -> RunConfig:
        """The config with the method's full hyperparameters filled in (for config.yaml)."""
        return self.cfg

    def _load_resume_state(self) -> None:
        assert self.folder is not None
        st = self.folder.load("last.pt", self.device, self.fingerprint)
        load_model_state(self.model, st["model"], self.folder / "last.pt")
        path = self.folder / "last.pt"
        load_component_state(self.optimizer, st["optimizer"], path, "optimizer")
        if self.scheduler is not None and st.get("scheduler") is not None:
            load_component_state(self.scheduler, st["scheduler"], path, "scheduler")
        load_component_state(self.method, st.get("method", {}), path, "method")
        self.start_epoch = int(st["epoch"]) + 1
        if self.start_epoch >= self.cfg.train.epochs and (self.folder / "results.json").exists():
            raise ConfigError(f"{self.run_dir} is finished (all {self.cfg.train.epochs} epochs; see its results.json); "
                              "nothing to resume")
        self.global_step = int(st["global_step"])
        self.best_value = float(st["best_value"])
        self.best_epoch = int(st["best_epoch"])
        self.train_seconds = float(st["train_seconds"])
        if self.loss_scale is not None and st.get("loss_scale") is not None:
            self.loss_scale, self.skipped_steps = float(st["loss_scale"]), int(st.get("skipped_steps", 0))
        self.history = list(st.get("history", []))
        self._apply_resume_changes()
        self.folder.truncate_metrics(self.start_epoch)  # drop epochs recorded after the checkpoint
        log.info("resuming %s at epoch %d", self.run_dir, self.start_epoch + 1)

    def _apply_resume_changes(self) -> None:
        """Learning rate and gradient clipping may change on resume (e.g. after divergence):
        the optimizer's and scheduler's rates are rescaled, and the change is recorded in the
        checkpoint's history and in ``results.json``."""
        ch = self.resume_changes
        if not ch:
            return
        if "optim.lr" in ch:
            factor = float(ch["optim.lr"]) / self.cfg.optim.lr
            for g in self.optimizer.param_groups:
                g["lr"] *= factor
                if "initial_lr" in g:
                    g["initial_lr"] *= factor
            if self.scheduler is not None and hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = [b * factor for b in self.scheduler.base_lrs]
            self.cfg.optim.lr = float(ch["optim.lr"])
        if "optim.grad_clip" in ch:
            self.cfg.optim.grad_clip = ch["optim.grad_clip"]
        self.history.append({"resumed_at_epoch": self.start_epoch + 1,
                             "changed": {k: v for k, v in ch.items()}})
        log.info("resuming with %s", ", ".join(f"{k} = {v}" for k, v in ch.items()))

    def _checkpoint_state(self, epoch: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "method": self.method.state_dict(), "epoch": epoch, "global_step": self.global_step,
                "best_value": self.best_value, "best_epoch": self.best_epoch,
                "train_seconds": self.train_seconds, "history": getattr(self, "history", []),
                "loss_scale": self.loss_scale, "skipped_steps": self.skipped_steps}

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any] | None:
        """Train (or continue) and return the results dict; None if stopped early on purpose."""
        self.history: list[dict[str, Any]] = []
        self._prepare_run_dir()
        try:
            if self.resume:
                self._load_resume_state()
            return self._fit()
        finally:
            self._loader_pool.close()
            if self.folder is not None:
                self.folder.detach_log()
            for lg in getattr(self, "loggers", []):
                lg.close()

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
            drop_last = self.drop_last_for(len(dataset))
            loader = self.loader(dataset, shuffle=True, batch_size=tc.batch_size,
                                 seed=epoch_seed(tc.seed, epoch), drop_last=drop_last, shard=True)
            self.model.train()
            sums: dict[str, Any] = {}
            self._grad_norms = torch.zeros(len(self.modalities) + 1, dtype=torch.float64, device=self.device)
            n = 0
            for batch in self.progress(loader, desc=f"epoch {epoch + 1}/{tc.epochs}"):
                batch = to_device(batch, self.device)
                self.global_step += 1
                stats = self.method.training_step(batch)
                for k, v in stats.items():
                    # tensors stay on the device: one host synchronisation per epoch, not per step
                    sums[k] = sums.get(k, 0.0) + (v.detach().to(torch.float64) if torch.is_tensor(v) else float(v))
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
            record = {"epoch": epoch + 1, "lr": lr, "train": {k: float(v) / max(n, 1) for k, v in sums.items()},
                      "grad_norm": self._epoch_grad_norms(),
                      "train_size": len(dataset), "val": val, "diagnostics": diagnostics,
                      **({"loss_scale": self.loss_scale, "skipped_steps": self.skipped_steps}
                         if self.loss_scale is not None else {}),
                      "seconds": round(time.perf_counter() - t0, 4)}
            self._log_epoch(record, improved)
            if self.writes:
                with deferred_interrupts():  # an interrupt waits until the epoch's files are consistent
                    if improved:
                        self.folder.save("best.pt", {"model": self.model.state_dict(),
                                                     "method": self.method.state_dict(), "epoch": epoch},
                                         self.fingerprint)
                    if tc.keep_checkpoints:
                        self.folder.save(f"epoch{epoch + 1}.pt", {"model": self.model.state_dict(),
                                                                  "method": self.method.state_dict(), "epoch": epoch},
                                         self.fingerprint)
                    self.folder.append_metrics(record)
                    for lg in getattr(self, "loggers", []):
                        lg.log(record)
                    self.folder.save("last.pt", self._checkpoint_state(epoch), self.fingerprint)
            elif improved:  # no run folder, or a rank that does not write: keep the best in memory
                self._best_in_memory = {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                                        "method": copy.deepcopy(self.method.state_dict()), "epoch": epoch}
            done_this_call += 1
            if tc.stop_after_epochs is not None and done_this_call >= tc.stop_after_epochs and epoch + 1 < tc.epochs:
                log.info("stopped after %d epoch(s) as asked; %s", done_this_call, self.continue_hint)
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
        if st is None and self.folder is not None:
            if not (self.folder / "best.pt").exists():
                raise ConfigError(f"{self.folder / 'best.pt'} does not exist: the run has no selected checkpoint")
            st = self.folder.load("best.pt", self.device, self.fingerprint)
        if st is None:
            return self.epoch
        load_model_state(self.model, st["model"], self.folder / "best.pt" if self.folder else "checkpoint")
        self.method.load_state_dict(st.get("method", {}))
        return int(st["epoch"])

    def finish(self) -> dict[str, Any]:
        """Load the validation-selected checkpoint, evaluate val and test once, write results."""
        self.best_epoch = self.load_best()
        results = self.results()
        if self.writes:
            with deferred_interrupts():
                self.folder.write_json("results.json", results)
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
            "fingerprint": self.config_fingerprint, "history": getattr(self, "history", []),
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def predict_split(self, dataset: Dataset, desc: str = "eval") -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Fused logits, unimodal logits and labels over a dataset (eval mode). With several
        processes each rank predicts its shard (:meth:`shard`) and every rank gets the whole
        split's outputs, in its order."""
        part = self.shard(dataset)
        logits, uni, labels = predict_batches(self.method, self.batches(part, desc=desc), self.modalities,
                                              self.autocast, num_classes=self.data.num_classes)
        if self.world_size == 1:
            return logits, uni, labels
        mods = self.modalities
        got = dist_utils.all_gather_shards([logits, *(uni[m] for m in mods), labels], len(dataset), self.device)
        return got[0], dict(zip(mods, got[1:-1])), got[-1]

    @torch.no_grad()
    def encoder_features(self, dataset: Dataset, desc: str = "features") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """Encoder outputs per modality (eval mode), presence masks and labels; sharded over the
        processes and gathered to every rank, as :meth:`predict_split`."""
        mods = self.modalities
        feats, pres, labels = {m: [] for m in mods}, {m: [] for m in mods}, []
        for batch in self.batches(self.shard(dataset), desc=desc):
            with self.autocast():
                for m in mods:
                    feats[m].append(self.model.encode(m, batch["inputs"][m]).float().cpu())
                    pres[m].append(batch["present"][m].cpu())
            labels.append(batch["label"].cpu())
        if not labels:  # an empty shard (fewer samples than processes)
            return self._gather_features({m: torch.zeros(0, self.model.feature_dim(m)) for m in mods},
                                         {m: torch.zeros(0, dtype=torch.bool) for m in mods},
                                         torch.zeros(0, dtype=torch.long), len(dataset))
        return self._gather_features({m: torch.cat(v) for m, v in feats.items()},
                                     {m: torch.cat(v) for m, v in pres.items()}, torch.cat(labels), len(dataset))

    def _gather_features(self, feats: dict[str, torch.Tensor], pres: dict[str, torch.Tensor], labels: torch.Tensor,
                         n: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        if self.world_size == 1:
            return feats, pres, labels
        mods = self.modalities
        got = dist_utils.all_gather_shards([*(feats[m] for m in mods), *(pres[m] for m in mods), labels], n,
                                           self.device)
        M = len(mods)
        return dict(zip(mods, got[:M])), dict(zip(mods, got[M:2 * M])), got[-1]

    def evaluate(self, split: str, probe: bool = False) -> dict[str, Any]:
        dataset = {"val": self.data.val, "test": self.data.test, "train": self.data.train_eval}[split]
        logits, uni, labels = self.predict_split(dataset, desc=f"eval {split}")
        C = self.data.num_classes
        res = split_metrics(logits, uni, labels, C)
        if probe:
            tr_f, tr_p, tr_y = self.encoder_features(self.data.train_eval, desc="probe features (train)")
            ev_f, ev_p, ev_y = self.encoder_features(dataset, desc=f"probe features ({split})")
            for m in self.modalities:
                res["per_modality"][m]["probe_accuracy"] = probe_accuracy(
                    tr_f[m][tr_p[m]], tr_y[tr_p[m]], ev_f[m][ev_p[m]], ev_y[ev_p[m]], C)
        return res


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


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved configuration a run folder holds (``config.yaml``); one line when it is
    missing or damaged."""
    p = Path(run_dir) / "config.yaml"
    if not p.is_file():
        raise ConfigError(f"{run_dir} is not a run folder (no config.yaml)")
    import yaml

    try:
        data = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p} is not valid YAML ({str(e).splitlines()[0]}); restore it from a copy, or retrain "
                          "the run") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} is damaged (not a mapping of config keys); restore it, or retrain the run")
    try:
        return from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
