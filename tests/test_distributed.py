"""Two processes on CPU (gloo), for every registered method, with all modalities present and with
each modality missing at rate 0.5, and with one modality missing from 90% of the samples: the two replicas stay identical (every rank made the same
collective calls and applied the same update) and equal one process on the same global batch.
The sharded sampler reproduces a single process's shuffle exactly.

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
def two_process_runs(tmp_path_factory):
    """Run both ranks over every (method, case) in the background; yield a function that waits
    for them and returns one pair's result per rank (or fails with the ranks' error)."""
    import threading

    out = tmp_path_factory.mktemp("ddp")
    thread = threading.Thread(target=_run_pairs, args=(PAIRS, out), daemon=True)
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
