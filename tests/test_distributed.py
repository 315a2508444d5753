"""Two processes on CPU (gloo), for every registered method, with all modalities present and with
each modality missing at rate 0.5, and with one modality missing from 90% of the samples: the two replicas stay identical (every rank made the same
collective calls and applied the same update) and equal one process on the same global batch.
The sharded sampler reproduces a single process's shuffle exactly. The gradient all-reduce
overlapped with backward leaves replicas bit-identical to the synchronous one (methods that
call backward several times, ``retain_graph``, ``inputs=``, accumulation), and the sharded
evaluation equals one process's.

The two ranks run every (method, case) pair in one pair of worker processes (importing torch
twice per pair would cost more than the training), started once per test session; the
single-process references run here meanwhile.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from helpers import tiny_data
from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.engine.distributed import ShardedSampler
from mmbalance.methods import list_methods

BASE = {"train.epochs": 3, "train.progress": "off", "train.probe": False, "train.batch_size": 16,
        "train.eval_batch_size": 16, "model.encoder_options": {"dropout": 0.0, "hidden": [16, 8]}}
# options that make each method's rule act within three short epochs
FAST = {"arl": {"method.warmup_epochs": 1}, "sample_valuation": {"method.warmup_epochs": 1},
        "modality_valuation": {"method.warmup_epochs": 1, "method.subset_ratio": 0.5},
        "gblending": {"method.estimate_epochs": 1}, "greedy": {"method.start_epoch": 1, "method.window": 1},
        "mses": {"method.patience": 1}, "mslr": {"method.window": 1},
        # a ranking term large enough that pairing samples per rank instead of over the global batch shows
        "qmf": {"method.lambda_rank": 1.0, "method.temperature": 0.2},
        "reconboost": {"method.epochs_per_stage": 1, "method.correct_epochs": 1},
        "opm": {"method.modulation_start": 0}, "dr": {"method.interval": 1}}
# "missing": every modality absent at rate 0.5; "sparse": modality b absent from 90% of samples, so a
# rank's share of a batch often holds no sample of b while the other rank's does
CASES = {"full": 0.0, "missing": 0.5, "sparse": {"b": 0.9}}
# methods whose two-process run is not expected to equal one process to float tolerance, and why
NOT_EQUAL_TO_ONE_PROCESS: dict[str, str] = {}

PAIRS = [(m, c) for m in list_methods() for c in CASES]


def overrides(method: str) -> dict:
    return {**BASE, "method.name": method, **FAST.get(method, {})}


def data(case: str):
    return tiny_data(n=64, n_eval=24, seed=3, missing=CASES[case])


def test_sharded_sampler_reproduces_the_single_process_global_batches():
    n, B, world = 103, 16, 2
    g = torch.Generator()
    g.manual_seed(7)
    single = [b.tolist() for b in DataLoader(list(range(n)), batch_size=B, shuffle=True, generator=g)]
    shards = [list(ShardedSampler(n, 7, r, world)) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0]) & set(shards[1])  # no sample twice
    per = B // world
    for t, batch in enumerate(single):
        together = sorted(x for r in range(world) for x in shards[r][t * per:(t + 1) * per])
        if t < len(single) - 1:
            assert together == sorted(batch)
        else:  # the last global batch leaves out n mod world = 1 sample, the shuffle's last
            assert together == sorted(batch[:-1])


def test_helper_masks_never_drop_every_modality():
    d = tiny_data(n=400, missing=0.7, seed=1)
    pres = d.train.present
    both = torch.stack([pres["a"], pres["b"]])
    assert both.any(0).all() and not both.all(0).all()
    assert 0.2 < float((~pres["a"]).float().mean()) < 0.6


WORKER = r"""
import datetime, json, os, sys, traceback
import torch, torch.distributed as dist
sys.path.insert(0, sys.argv[3])
torch.set_num_threads(1)
import test_distributed as T
from mmbalance.config import load_config
from mmbalance.engine import Trainer
out, rank = sys.argv[2], int(os.environ["RANK"])
for i, (method, case) in enumerate(json.loads(sys.argv[1])):
    # a process group per pair, so that a pair whose collectives fall out of step (one rank
    # fails, the other times out) does not take the following pairs with it
    dist.init_process_group("gloo", store=dist.FileStore(f"{out}/store-{i}", 2), rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    tag = f"{method}-{case}-rank{rank}"
    try:
        tr = Trainer(load_config(None, T.overrides(method)), data=T.data(case))
        res = tr.fit()
        torch.save({"model": tr.model.state_dict(), "test": res["test"]}, f"{out}/{tag}.pt")
    except Exception:
        with open(f"{out}/{tag}.err", "w") as f:
            f.write(traceback.format_exc()[-4000:])
    dist.destroy_process_group()
"""


def _run_pairs(pairs, out: Path) -> None:
    """Run both ranks over ``pairs``; when gloo aborts a process (it terminates on a collective
    mismatch), record the pair being run as failed with the ranks' output and go on from the next
    pair in fresh processes."""
    todo = list(pairs)
    while todo:
        procs = []
        for r in range(2):
            env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(todo), str(out),
                                           str(Path(__file__).parent)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        logs = []
        for p in procs:
            try:
                o, _ = p.communicate(timeout=900)
            except subprocess.TimeoutExpired:
                p.kill()
                o, _ = p.communicate()
            logs.append(o.decode(errors="replace")[-3000:])
        done = lambda mc, r: any((out / f"{mc[0]}-{mc[1]}-rank{r}{ext}").exists() for ext in (".pt", ".err"))
        while todo and all(done(todo[0], r) for r in range(2)):
            todo.pop(0)
        if todo and all(p.returncode == 0 for p in procs):
            raise RuntimeError("workers exited without running every pair:\n" + "\n".join(logs))
        if todo:  # a process died inside todo[0]
            method, case = todo.pop(0)
            for r in range(2):
                (out / f"{method}-{case}-rank{r}.err").write_text(
                    f"a rank process died (exit {procs[r].returncode}); output of rank {r}:\n{logs[r]}")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, request):
    """Run both ranks over every selected (method, case) in the background (``-k joint`` runs
    joint's pairs only); yield a function that waits for them and returns one pair's result per
    rank (or fails with the ranks' error)."""
    import threading

    selected = [tuple(item.callspec.params[k] for k in ("method", "case")) for item in request.session.items
                if getattr(item, "originalname", None) == "test_two_processes_identical_replicas_equal_one_process"]
    out = tmp_path_factory.mktemp("ddp")
    thread = threading.Thread(target=_run_pairs, args=([pc for pc in PAIRS if pc in selected], out), daemon=True)
    thread.start()

    def get(method: str, case: str):
        thread.join()
        ranks = []
        for r in range(2):
            tag = out / f"{method}-{case}-rank{r}"
            if tag.with_suffix(".err").exists():
                pytest.fail(f"rank {r} failed on {method}/{case}:\n{tag.with_suffix('.err').read_text()}")
            ranks.append(torch.load(tag.with_suffix(".pt"), weights_only=True))
        return ranks

    return get


@pytest.mark.parametrize("method,case", PAIRS)
def test_two_processes_identical_replicas_equal_one_process(two_process_runs, method, case):
    torch.set_num_threads(1)
    single = Trainer(load_config(None, overrides(method)), data=data(case))
    single_res = single.fit()
    r0, r1 = two_process_runs(method, case)
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), f"replicas differ at {k}"
    assert r0["test"] == r1["test"]
    if method in NOT_EQUAL_TO_ONE_PROCESS:
        return
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v.float(), r0["model"][k].float(), atol=5e-5, rtol=1e-4), \
            f"{k} differs from one process by {float((v.float() - r0['model'][k].float()).abs().max()):.2e}"
    assert abs(single_res["test"]["accuracy"] - r0["test"]["accuracy"]) < 1e-9


# ------------------------------------------------------------------ overlapped all-reduce, sharded evaluation
def _two_ranks(worker: str, out: Path, *args: str, timeout: float = 600) -> None:
    """Run ``worker`` as ranks 0 and 1 of a gloo group (FileStore in ``out``); fail with their
    output when either fails."""
    procs = []
    for r in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", worker, str(out), str(Path(__file__).parent), *args],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    logs = []
    for p in procs:
        try:
            o, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            o, _ = p.communicate()
        logs.append(o.decode(errors="replace")[-3000:])
    if any(p.returncode for p in procs):
        pytest.fail("a rank failed:\n" + "\n".join(f"rank {r}:\n{log}" for r, log in enumerate(logs)))


# methods that call backward more than once per step (MLA per modality, MIE with SAM, MMPareto
# with retain_graph), run their own backward + average_gradients (G-Blending), or change the
# gradient after backward (OGM-GE), and joint
OVERLAP_METHODS = ["joint", "mla", "mie", "mmpareto", "gblending", "ogm_ge", "arl"]
OVERLAP_CASES = {"joint": ["full", "missing"]}
OVERLAP_PAIRS = [(m, c) for m in OVERLAP_METHODS for c in OVERLAP_CASES.get(m, ["missing"])]

WORKER_OVERLAP = r"""
import datetime, json, os, sys
import torch, torch.distributed as dist
out, tests = sys.argv[1], sys.argv[2]
sys.path.insert(0, tests)
torch.set_num_threads(1)
import test_distributed as T, test_reducer as R
from mmbalance.config import load_config
from mmbalance.engine import Trainer, distributed as D
rank = int(os.environ["RANK"])
dist.init_process_group("gloo", store=dist.FileStore(f"{out}/store", 2), rank=rank, world_size=2,
                        timeout=datetime.timedelta(seconds=60))
launched = {"in_backward": 0, "flushed": 0}
finish = D.GradReducer.finish
def counting(self):
    finish(self)
    launched["in_backward"] += self.launches["launched_in_backward"]
    launched["flushed"] += self.launches["flushed"]
D.GradReducer.finish = counting
res = {}
for method, case in json.loads(sys.argv[3]):
    for mode, mb in (("overlap", 0.0005), ("sync", 0.0)):  # 0.0005 MB: buckets of a few layers
        launched.update(in_backward=0, flushed=0)
        tr = Trainer(load_config(None, {**T.overrides(method), "train.epochs": 2, "train.bucket_mb": mb}),
                     data=T.data(case))
        tr.fit()
        res[f"{method}-{case}-{mode}"] = {"model": tr.model.state_dict(), "launched": dict(launched)}
# backward sequences through trainer.backward on a plain model, each rank with its own data
for mode, mb in (("overlap", 0.0005), ("sync", 0.0)):
    tr = Trainer(load_config(None, {**T.overrides("joint"), "train.bucket_mb": mb}), data=T.data("full"))
    for name in ("accumulate", "retain", "inputs", "partial"):
        tr.model = R.mlp()
        R.scenarios(tr.model, seed=1 + rank)[name](tr.backward)
        res[f"scenario-{name}-{mode}"] = {"grads": [None if p.grad is None else p.grad for p in tr.model.parameters()]}
for method in json.loads(sys.argv[4]):  # sharded evaluation
    res[f"eval-{method}"] = T.eval_outputs(T.eval_trainer(method))
torch.save(res, f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def overlap_and_eval_runs(tmp_path_factory):
    """Both ranks' results of WORKER_OVERLAP (one pair of processes for the two tests below)."""
    out = tmp_path_factory.mktemp("overlap")
    _two_ranks(WORKER_OVERLAP, out, json.dumps(OVERLAP_PAIRS), json.dumps(EVAL_METHODS))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_overlapped_all_reduce_replicas_bit_identical_to_synchronous(overlap_and_eval_runs):
    """Two gloo processes, each method trained with the bucketed reducer (buckets of a few
    layers, so several are launched during every backward) and with the synchronous all-reduce:
    the weights are bit-identical between the two paths and between the ranks; backward
    sequences through ``trainer.backward`` (accumulation, ``retain_graph``, ``inputs=``, a
    partial backward) give the synchronous gradients exactly, and their mean over the two
    ranks' data."""
    r0, r1 = overlap_and_eval_runs
    for method, case in OVERLAP_PAIRS:
        tag = f"{method}-{case}"
        over, sync = r0[f"{tag}-overlap"], r0[f"{tag}-sync"]
        assert over["launched"]["in_backward"] > 0, f"{tag}: no bucket launched during backward"
        assert sync["launched"]["in_backward"] == 0
        for k, v in sync["model"].items():
            assert torch.equal(over["model"][k], v), f"{tag}: overlapped differs from synchronous at {k}"
            assert torch.equal(r1[f"{tag}-overlap"]["model"][k], v), f"{tag}: replicas differ at {k}"
    from test_reducer import mlp, scenarios

    for name in ("accumulate", "retain", "inputs", "partial"):
        sync = r0[f"scenario-{name}-sync"]["grads"]
        for got in (r0[f"scenario-{name}-overlap"]["grads"], r1[f"scenario-{name}-overlap"]["grads"],
                    r1[f"scenario-{name}-sync"]["grads"]):
            assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(got, sync)), name
        # one process: averaging after every backward is linear, so the result is the mean of
        # the two ranks' accumulated gradients
        per_rank = []
        for r in range(2):
            model = mlp()
            scenarios(model, seed=1 + r)[name](lambda loss, **kw: loss.backward(**kw))
            per_rank.append([p.grad for p in model.parameters()])
        for a, b, s in zip(*per_rank, sync):
            assert (s is None) == (a is None) == (b is None), name
            if s is not None:
                assert torch.allclose(s, (a + b) / 2, atol=1e-5), name


EVAL_METHODS = ["joint", "qmf", "mla"]


def eval_trainer(method: str) -> Trainer:
    """An untrained model (same seed: same weights on every process) over a validation split of
    25 samples (odd: the shards differ in size) with missing modalities."""
    over = {**overrides(method), "train.eval_batch_size": 4, "train.probe": True}
    return Trainer(load_config(None, over), data=tiny_data(n=30, n_eval=25, seed=5, missing=0.5))


def eval_outputs(tr: Trainer) -> dict:
    from torch.utils.data import Subset

    seen = []
    predict = tr.method.predict
    tr.method.predict = lambda batch: (seen.append(len(batch["label"])), predict(batch))[1]
    logits, uni, labels = tr.predict_split(tr.data.val)
    tr.method.predict = predict
    feats, pres, flabels = tr.encoder_features(tr.data.val)
    one = tr.predict_split(Subset(tr.data.val, [3]))  # one sample: rank 1's shard is empty
    return {"val": tr.evaluate("val", probe=True), "test": tr.evaluate("test"), "logits": logits, "uni": uni,
            "labels": labels, "feats": feats, "present": pres, "feat_labels": flabels,
            "one": {"logits": one[0], "uni": one[1], "labels": one[2]}, "predicted": sum(seen)}


def test_sharded_evaluation_equals_one_process(overlap_and_eval_runs):
    """Two processes each predict half of the split (25 samples: 13 and 12) and gather: the
    logits, features, presence and labels are those of one process in the split's order, and
    the metrics (probe accuracy included) are equal, on both ranks."""
    r0, r1 = overlap_and_eval_runs
    torch.set_num_threads(1)
    for method in EVAL_METHODS:
        single = eval_outputs(eval_trainer(method))
        for got in (r0[f"eval-{method}"], r1[f"eval-{method}"]):
            assert torch.equal(got["labels"], single["labels"]) and torch.equal(got["feat_labels"], single["labels"])
            assert torch.allclose(got["logits"], single["logits"], atol=1e-6), method
            for m in single["uni"]:
                assert torch.allclose(got["uni"][m], single["uni"][m], atol=1e-6), (method, m)
                assert torch.allclose(got["feats"][m], single["feats"][m], atol=1e-6), (method, m)
                assert torch.equal(got["present"][m], single["present"][m]), (method, m)
            assert got["present"]["a"].dtype == torch.bool and not got["present"]["a"].all()
            for split in ("val", "test"):
                assert _metrics(got[split]) == _metrics(single[split]), (method, split)
                assert got[split]["loss"] == pytest.approx(single[split]["loss"], abs=1e-6)
            assert torch.equal(got["one"]["labels"], single["one"]["labels"])
            assert torch.allclose(got["one"]["logits"], single["one"]["logits"], atol=1e-6)
        assert r0[f"eval-{method}"]["val"] == r1[f"eval-{method}"]["val"]  # every rank computes the same metrics
        assert (single["predicted"], r0[f"eval-{method}"]["predicted"], r1[f"eval-{method}"]["predicted"]) == (25, 13, 12)


def _metrics(res: dict) -> dict:
    """Every metric but the loss (a float compared to tolerance)."""
    return {k: v for k, v in res.items() if k != "loss"}
