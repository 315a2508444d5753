"""Two processes on CPU (gloo): replicas stay identical and match one process on the same
global batch; the sharded sampler reproduces a single process's shuffle exactly."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.engine.distributed import ShardedSampler

OVERRIDES = {"train.epochs": 2, "train.progress": "off", "train.probe": False, "train.batch_size": 64,
             "model.encoder_options": {"dropout": 0.0}, "train.eval_batch_size": 512}


def test_sharded_sampler_reproduces_the_single_process_global_batches():
    n, B, world = 103, 16, 2
    g = torch.Generator()
    g.manual_seed(7)
    single = [b.tolist() for b in DataLoader(list(range(n)), batch_size=B, shuffle=True, generator=g)]
    shards = [list(ShardedSampler(n, 7, r, world)) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == 52
    per = B // world
    for t, batch in enumerate(single):
        together = sorted(x for r in range(world) for x in shards[r][t * per:(t + 1) * per])
        if t < len(single) - 1:
            assert together == sorted(batch)
        else:  # the last shard is padded by wrapping around the permutation
            assert set(batch) <= set(together)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = r"""
import json, sys, torch
from mmbalance.config import load_config
from mmbalance.engine import Trainer
from mmbalance.engine import distributed as du
du.init_from_env("cpu")
torch.set_num_threads(1)
ov = json.loads(sys.argv[1])
out = sys.argv[2]
tr = Trainer(load_config(None, ov))
res = tr.fit()
torch.save({"model": tr.model.state_dict(), "test": res["test"]}, f"{out}/rank{du.rank()}.pt")
du.shutdown()
"""


@pytest.mark.parametrize("method", ["joint", "arl"])
def test_two_processes_match_one_process(tmp_path, method):
    ov = {**OVERRIDES, "method.name": method}
    if method == "arl":
        ov["method.warmup_epochs"] = 1
    port = _free_port()
    procs = []
    for r in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(ov), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), f"replicas differ at {k}"
    assert r0["test"] == r1["test"]
    single = Trainer(load_config(None, ov))
    single.fit()
    for k, v in single.model.state_dict().items():
        assert torch.allclose(v, r0["model"][k], atol=2e-5, rtol=1e-4), f"{k} differs from one process"
