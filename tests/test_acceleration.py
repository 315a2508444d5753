"""Opt-in speed options (engine/acceleration.py): channels_last, torch.compile of the encoders,
loader options. CPU only, tiny models.

The compile tests use torch.compile's ``aot_eager`` backend (dynamo tracing and AOTAutograd, the
parts that decide state_dict keys, hooks and autograd) so they take seconds; the inductor backend
that ``train.compile`` uses needs a C++ compile on the CPU (20 s for a one-layer model with a cold
cache, minutes for the ResNets here), so its test runs only with ``MMBALANCE_TEST_COMPILE=1``.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mmbalance.config import TrainConfig, load_config
from mmbalance.data.base import ArrayDataset, DataSplits
from mmbalance.engine import Trainer
from mmbalance.engine.acceleration import (COMPILE_MODE, LoaderPool, compile_encoders, is_compiled,
                                           is_conv_encoder, loader_options, prepare_model, to_channels_last)
from mmbalance.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from mmbalance.models.resnet import ResNet18Audio, ResNet18Visual
from mmbalance.models.video3d import VideoResNetEncoder
from mmbalance.registry import ConfigError
from mmbalance.utils import to_device

CL, CL3 = torch.channels_last, torch.channels_last_3d


def av_splits(n: int = 8) -> DataSplits:
    """Tiny A/V-shaped data: a (1, 32, 24) spectrogram (ResNet audio), (3, 2, 32, 32) frames (ResNet
    visual) and a 4-d feature vector (MLP), 3 classes."""
    rng = np.random.default_rng(0)

    def split(k):
        return ArrayDataset({"audio": rng.standard_normal((k, 1, 32, 24)).astype(np.float32),
                             "visual": rng.standard_normal((k, 3, 2, 32, 32)).astype(np.float32),
                             "vec": rng.standard_normal((k, 4)).astype(np.float32)}, np.arange(k) % 3)

    return DataSplits(train=split(n), val=split(6), test=split(6), modalities=["audio", "visual", "vec"],
                      num_classes=3, input_shapes={"audio": (1, 32, 24), "visual": (3, 2, 32, 32), "vec": (4,)},
                      default_encoders={"audio": "resnet18_audio", "visual": "resnet18_visual", "vec": "mlp"},
                      encoder_options={"audio": {"width": 4}, "visual": {"width": 4}, "vec": {"dropout": 0.0}})


def av_trainer(**train) -> Trainer:
    ov = {"train.epochs": 1, "train.batch_size": 4, "train.progress": "off", "train.probe": False,
          "train.device": "cpu", "train.seed": 0, **{f"train.{k}": v for k, v in train.items()}}
    return Trainer(load_config(None, ov), data=av_splits())


def a_batch(tr: Trainer) -> dict:
    return to_device(next(iter(tr.loader(tr.data.train, batch_size=4))), tr.device)


def step_grads(tr: Trainer, batch: dict) -> dict[str, torch.Tensor]:
    tr.model.train()
    tr.zero_grad()
    out = tr.model(batch["inputs"], batch["present"])
    loss = nn.functional.cross_entropy(out.logits, batch["label"])
    loss.backward()
    return {k: p.grad.clone() for k, p in tr.model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------- config
def test_options_default_off_and_are_validated():
    tc = TrainConfig()
    assert (tc.channels_last, tc.compile, tc.persistent_workers, tc.prefetch_factor) == (False, False, False, None)
    cfg = load_config(None, {"train.channels_last": "true", "train.compile": "true", "train.prefetch_factor": "4",
                             "train.persistent_workers": "true"})
    assert cfg.train.channels_last is True and cfg.train.compile is True
    assert cfg.train.prefetch_factor == 4 and cfg.train.persistent_workers is True
    with pytest.raises(ConfigError, match="train.prefetch_factor"):
        load_config(None, {"train.prefetch_factor": 0})


# ----------------------------------------------------------------------------- channels_last
def test_channels_last_converts_conv_weights_keeps_parameters_and_matches_default():
    ref = av_trainer()
    tr = av_trainer(channels_last=True)
    tr.model.load_state_dict(ref.model.state_dict())
    params_before = {k: p for k, p in tr.model.named_parameters()}
    opt_params = [p for g in tr.optimizer.param_groups for p in g["params"]]
    prepare_model(tr.model, tr.cfg.train)
    # the same Parameter objects (an optimizer built before still updates them), converted in place
    assert all(p is params_before[k] for k, p in tr.model.named_parameters())
    assert {id(p) for p in opt_params} == {id(p) for p in tr.model.parameters()}
    convs = [mod for m in ("audio", "visual") for mod in tr.model.encoders[m].modules() if isinstance(mod, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=CL) and not c.weight.is_contiguous() for c in convs
                         if c.weight.shape[1] > 1 and c.weight.shape[-1] > 1)
    # the MLP encoder is left alone (no convolution): no hook, same strides
    assert not is_conv_encoder(tr.model.encoders["vec"]) and not tr.model.encoders["vec"]._forward_pre_hooks
    assert list(tr.model.state_dict()) == list(ref.model.state_dict())
    batch = a_batch(ref)
    # the frames reach the visual trunk's first convolution as a channels_last batch
    seen = {}
    h = tr.model.encoders["visual"].trunk.conv1.register_forward_pre_hook(
        lambda mod, args: seen.update(cl=args[0].is_contiguous(memory_format=CL), shape=tuple(args[0].shape)))
    g_ref, g_cl = step_grads(ref, batch), step_grads(tr, batch)
    h.remove()
    assert seen == {"cl": True, "shape": (8, 3, 32, 32)}  # B*T frames
    assert set(g_ref) == set(g_cl)
    for k in g_ref:
        torch.testing.assert_close(g_cl[k], g_ref[k], rtol=1e-4, atol=1e-5, msg=k)
    ref.model.eval(), tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(tr.model(batch["inputs"]).logits, ref.model(batch["inputs"]).logits,
                                   rtol=1e-4, atol=1e-5)


def test_channels_last_is_idempotent_and_checkpoints_load_both_ways(tmp_path):
    enc = ResNet18Audio(1, width=4)
    plain = copy.deepcopy(enc)
    to_channels_last(enc)
    to_channels_last(enc)
    assert len(enc._forward_pre_hooks) == 1
    save_checkpoint(tmp_path / "cl.pt", {"model": enc.state_dict()})
    fresh = ResNet18Audio(1, width=4)
    load_model_state(fresh, load_checkpoint(tmp_path / "cl.pt")["model"], tmp_path / "cl.pt")
    x = torch.randn(3, 1, 20, 16)
    enc.eval(), fresh.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), plain(x), rtol=0, atol=0)  # same values, default strides
        torch.testing.assert_close(enc(x), plain(x), rtol=1e-4, atol=1e-5)
    # a default checkpoint into a channels_last encoder: values copied, format kept
    target = to_channels_last(ResNet18Audio(1, width=4))
    target.load_state_dict(plain.state_dict())
    assert target.trunk.layer1[0].conv1.weight.is_contiguous(memory_format=CL)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), plain.state_dict().values()))


def test_channels_last_3d_for_conv3d_encoders_and_clip_inputs():
    enc = VideoResNetEncoder("r3d_18", in_channels=3, width=4)
    plain = copy.deepcopy(enc)
    to_channels_last(enc)
    w = [m.weight for m in enc.modules() if isinstance(m, nn.Conv3d)]
    assert w and all(t.is_contiguous(memory_format=CL3) for t in w)
    seen = []
    stem = next(m for m in enc.modules() if isinstance(m, nn.Conv3d))
    stem.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous(memory_format=CL3)))
    x = torch.randn(2, 3, 4, 16, 16)
    enc.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), plain(x), rtol=1e-4, atol=1e-5)
    assert seen == [True]
    # a visual ResNet fed a single image per sample (4-D) gets it channels_last too
    vis = to_channels_last(ResNet18Visual(3, width=4))
    got = []
    vis.trunk.conv1.register_forward_pre_hook(lambda mod, args: got.append(args[0].is_contiguous(memory_format=CL)))
    vis(torch.randn(2, 3, 16, 16))
    assert got == [True]


# ----------------------------------------------------------------------------- compile
def test_compile_keeps_state_dict_keys_numbers_and_checkpoints(tmp_path):
    from torch._dynamo.utils import counters

    ref = av_trainer()
    tr = av_trainer(channels_last=True)
    tr.model.load_state_dict(ref.model.state_dict())
    keys = list(tr.model.state_dict())
    prepare_model(tr.model, tr.cfg.train)
    compile_encoders(tr.model, backend="aot_eager", mode=None)
    assert all(is_compiled(e) for e in tr.model.encoders.values())
    assert list(tr.model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)
    batch = a_batch(ref)
    torch._dynamo.reset()
    counters.clear()
    g_ref, g_c = step_grads(ref, batch), step_grads(tr, batch)
    # one graph per encoder; the channels_last input hook (shared by the encoders) stays eager,
    # so inputs of rank 4 and 5 do not make torch.compile recompile it with dynamic shapes
    assert counters["stats"]["unique_graphs"] == 3
    assert set(g_ref) == set(g_c)
    for k in g_ref:
        torch.testing.assert_close(g_c[k], g_ref[k], rtol=1e-4, atol=1e-5, msg=k)
    # a checkpoint of the compiled model loads, strictly, into an uncompiled one (and back)
    save_checkpoint(tmp_path / "best.pt", {"model": tr.model.state_dict()})
    plain = av_trainer()
    load_model_state(plain.model, load_checkpoint(tmp_path / "best.pt")["model"], tmp_path / "best.pt")
    for k, v in tr.model.state_dict().items():
        assert torch.equal(plain.model.state_dict()[k], v), k
    load_model_state(tr.model, ref.model.state_dict(), "ref")
    # idempotent: an encoder already compiled is not wrapped again
    impl = tr.model.encoders["audio"]._compiled_call_impl
    compile_encoders(tr.model, backend="aot_eager", mode=None)
    assert tr.model.encoders["audio"]._compiled_call_impl is impl


def test_prepare_model_asks_for_the_documented_mode(monkeypatch):
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    av_trainer()  # the trainer prepares its model (engine/trainer.py)
    assert calls == []  # off by default
    tr = av_trainer(compile=True)
    # every encoder (the MLP too), once, in the documented mode
    assert sorted(c[0] for c in calls) == sorted(type(e).__name__ for e in tr.model.encoders.values())
    assert len(calls) == 3 and all(kw == {"mode": COMPILE_MODE} for _, kw in calls) and COMPILE_MODE == "default"


@pytest.mark.skipif(os.environ.get("MMBALANCE_TEST_COMPILE") != "1",
                    reason="inductor compiles C++ on the CPU (minutes); set MMBALANCE_TEST_COMPILE=1")
def test_train_compile_with_inductor_trains_and_saves_plain_checkpoints(tmp_path):
    ref = av_trainer()
    tr = av_trainer(compile=True, channels_last=True)
    tr.model.load_state_dict(ref.model.state_dict())
    prepare_model(tr.model, tr.cfg.train)
    batch = a_batch(ref)
    g_ref, g_c = step_grads(ref, batch), step_grads(tr, batch)
    for k in g_ref:
        torch.testing.assert_close(g_c[k], g_ref[k], rtol=1e-3, atol=1e-5, msg=k)
    # evaluation: another mode, no grad and another batch size (recompiles, with a dynamic batch)
    small = to_device(next(iter(ref.loader(ref.data.val, batch_size=3))), ref.device)
    ref.model.eval(), tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(tr.model(small["inputs"]).logits, ref.model(small["inputs"]).logits,
                                   rtol=1e-3, atol=1e-5)
    save_checkpoint(tmp_path / "c.pt", {"model": tr.model.state_dict()})
    plain = av_trainer()
    load_model_state(plain.model, load_checkpoint(tmp_path / "c.pt")["model"], tmp_path / "c.pt")


# ----------------------------------------------------------------------------- loaders
def test_loader_options_only_where_pytorch_accepts_them():
    off = load_config(None, {}).train
    assert loader_options(off, "cpu") == {"pin_memory": False, "persistent_workers": False}
    assert loader_options(off, torch.device("cuda", 0))["pin_memory"] is True
    no_workers = load_config(None, {"train.persistent_workers": True, "train.prefetch_factor": 4}).train
    assert loader_options(no_workers, "cpu") == {"pin_memory": False, "persistent_workers": False}
    DataLoader(range(4), num_workers=0, **loader_options(no_workers, "cpu"))  # PyTorch accepts it
    on = load_config(None, {"train.persistent_workers": True, "train.prefetch_factor": 4, "train.num_workers": 2}).train
    assert loader_options(on, "cpu") == {"pin_memory": False, "persistent_workers": True, "prefetch_factor": 4}
    dl = DataLoader(range(4), num_workers=2, **loader_options(on, "cpu"))
    assert dl.persistent_workers and dl.prefetch_factor == 4


class _WhoLoads(torch.utils.data.Dataset):
    """Item i -> (i, pid of the process that loaded it)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return i, os.getpid()


def _loader(ds, seed, sampler=None, workers=2):
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(ds, batch_size=2, shuffle=sampler is None, sampler=sampler, generator=g, num_workers=workers,
                      persistent_workers=workers > 0)


def test_loader_pool_keeps_workers_and_replays_a_new_loaders_shuffle():
    from mmbalance.engine.distributed import ShardedSampler

    ds = _WhoLoads()
    pool, loaders = LoaderPool(size=2), {}
    for key, sampler in (("shuffle", lambda s: None), ("sharded", lambda s: ShardedSampler(len(ds), s, 1, 2))):
        pids, kept = [], None
        for seed in (3, 4, 3, 5):
            dl = pool.get(key, seed, lambda: _loader(ds, seed, sampler(seed)))
            kept = loaders[key] = kept or dl
            assert dl is kept
            got = [(int(i), int(p)) for b in dl for i, p in zip(*b)]
            new = [int(i) for b in _loader(ds, seed, sampler(seed), workers=0) for i in b[0]]  # a new loader, same seed
            assert [i for i, _ in got] == new, (key, seed)
            pids.append({p for _, p in got})
        assert all(p == pids[0] for p in pids) and len(pids[0]) == 2 and os.getpid() not in pids[0]
        assert [i for b in _loader(ds, 3, sampler(3), 0) for i in b[0].tolist()] != \
               [i for b in _loader(ds, 4, sampler(4), 0) for i in b[0].tolist()]  # the seed matters
    # a third key evicts the least recently used loader and shuts its workers down
    pool.get("other", 0, lambda: _loader(ds, 0))
    assert len(pool) == 2 and loaders["shuffle"]._iterator is None and loaders["sharded"]._iterator is not None
    pool.close()
    assert len(pool) == 0
