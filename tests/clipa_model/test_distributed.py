"""Distributed training: rank layout from torchrun / Vertex AI, data split, 2 gloo processes.

Run as a script, this file is one rank of the 2-process run:
    python tests/clipa_model/test_distributed.py RANK WORLD_SIZE PORT OUT_DIR
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from clipa_model.config import ConfigError, StageConfig  # noqa: E402
from clipa_model.data import consumer_shards, train_batches  # noqa: E402
from clipa_model.distributed import (DistEnv, cluster_spec_nodes, init_process_group,  # noqa: E402
                                     resolve_dist_env, torchrun_args)

GLOBAL_BATCH, STEPS = 8, 3


# ---------------------------------------------------------------- the equivalence run

def _global_batches():
    """The same STEPS global batches for every process: uint8 images, BPE tokens."""
    from clipa_model.model import get_tokenizer

    g = torch.Generator().manual_seed(123)
    words = ["red", "blue", "circle", "star", "stripes", "dots", "large", "small"]
    tok = get_tokenizer("tiny", 8)
    out = []
    for _ in range(STEPS):
        images = torch.randint(0, 256, (GLOBAL_BATCH, 3, 28, 28), generator=g, dtype=torch.uint8)
        idx = torch.randint(0, len(words), (GLOBAL_BATCH, 3), generator=g).tolist()
        out.append((images, tok([" ".join(words[i] for i in row) for row in idx])))
    return out


def train_shard(rank: int, world_size: int, port: int) -> tuple[dict, list[float]]:
    """Train the tiny model on this rank's rows of the global batches."""
    from clipa_model.model import build_model
    from clipa_model.presets import IMAGE_MEAN, IMAGE_STD
    from clipa_model.train_loop import train_loop

    torch.set_num_threads(1)
    env = DistEnv(rank, world_size, 0, "127.0.0.1", port)
    init_process_group(env, "cpu")
    torch.manual_seed(0)
    model = build_model("tiny", 28, 8)
    stage = StageConfig(image_size=28, text_len=8, samples=GLOBAL_BATCH * STEPS,
                        batch_size=GLOBAL_BATCH, lr=1e-3, warmup_frac=0.3, precision="fp32",
                        log_every=1)
    per_rank = GLOBAL_BATCH // world_size
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    batches = [(im[rows], tok[rows]) for im, tok in _global_batches()]
    history = train_loop(model, batches, stage, IMAGE_MEAN, IMAGE_STD,
                         device=torch.device("cpu"), dist_env=env)
    return model.state_dict(), [r["loss"] for r in history]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_global_batch(tmp_path):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(port), str(tmp_path)],
                              env=env, cwd=ROOT) for r in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    single, single_losses = train_shard(0, 1, port)
    replicas = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    # DDP keeps its replicas identical, bit for bit.
    assert all(torch.equal(replicas[0][k], replicas[1][k]) for k in replicas[0])
    for rank, weights in enumerate(replicas):
        losses = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert losses == pytest.approx(single_losses, rel=1e-5, abs=1e-6)
        for key, value in single.items():
            if key.endswith("attn.in_proj_bias"):
                # The key bias cannot change a softmax: its true gradient is 0, so Adam turns
                # float noise (which differs with the reduction order) into +-lr steps.
                width = value.shape[0] // 3
                value, weights[key] = (torch.cat([t[:width], t[2 * width:]])
                                       for t in (value, weights[key]))
            # Adam does the same to the rare weight whose gradient is near 0 (its step is
            # grad / sqrt(grad^2): float noise decides its sign). Which weights those are
            # depends on the CPU's kernels (one of 65,536 in an MLP matrix on an AVX-512
            # Xeon), so allow a few, each within the LR x steps Adam can move it; a wrong
            # gradient average moves most weights.
            off = ~torch.isclose(weights[key], value, rtol=1e-4, atol=1e-4)
            assert off.sum() <= max(1, value.numel() // 10_000), key
            assert (weights[key] - value).abs().max() <= 1e-3 * STEPS, key
    # ...and training did move the weights (the comparison is not vacuous).
    torch.manual_seed(0)
    from clipa_model.model import build_model

    init = build_model("tiny", 28, 8).state_dict()
    assert not torch.allclose(init["visual.conv1.weight"], single["visual.conv1.weight"])


# ---------------------------------------------------------------- rank layout

def test_torchrun_environment():
    env = resolve_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                            "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "1234"})
    assert env == DistEnv(3, 8, 1, "10.0.0.2", 1234) and not env.is_main
    assert resolve_dist_env({}) == DistEnv()
    with pytest.raises(ConfigError, match=r"\$WORLD_SIZE"):
        resolve_dist_env({"RANK": "0", "WORLD_SIZE": "two"})


VERTEX_SPEC = {"cluster": {"workerpool0": ["cmle-training-workerpool0-ab-0:2222"],
                           "workerpool1": ["cmle-training-workerpool1-ab-0:2222",
                                           "cmle-training-workerpool1-ab-1:2222"]},
               "environment": "cloud", "task": {"type": "workerpool1", "index": 1}}


def test_vertex_cluster_spec():
    spec = json.dumps(VERTEX_SPEC)
    assert cluster_spec_nodes(spec) == (2, 3, "cmle-training-workerpool0-ab-0", 2222)
    env = resolve_dist_env({"CLUSTER_SPEC": spec})
    assert (env.rank, env.world_size, env.master_addr) == (2, 3, "cmle-training-workerpool0-ab-0")
    args = torchrun_args(8, {"CLUSTER_SPEC": spec})
    assert "--nnodes=3" in args and "--node_rank=2" in args and "--nproc_per_node=8" in args
    # torchrun's variables win when both are present (one process per GPU on each node).
    env = resolve_dist_env({"CLUSTER_SPEC": spec, "RANK": "17", "WORLD_SIZE": "24",
                            "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500"})
    assert (env.rank, env.world_size, env.local_rank) == (17, 24, 1)
    with pytest.raises(ConfigError, match="CLUSTER_SPEC"):
        cluster_spec_nodes('{"cluster": {}}')
    bad = {**VERTEX_SPEC, "task": {"type": "workerpool2", "index": 0}}
    with pytest.raises(ConfigError, match="workerpool2"):
        cluster_spec_nodes(json.dumps(bad))


# ---------------------------------------------------------------- data split

def test_consumers_partition_the_shards_and_never_run_dry():
    urls = [f"s{i}" for i in range(3)]
    n = 4  # e.g. 2 ranks x 2 loader workers: more consumers than shards
    streams = [consumer_shards(urls, 0, c, n) for c in range(n)]
    taken = [[next(s)["url"] for _ in range(3)] for s in streams]  # 12 = 4 epochs of 3
    flat = sorted(u for t in taken for u in t)
    assert flat == sorted(urls * 4)  # every epoch's shards handed out exactly once


def test_every_rank_gets_the_same_number_of_batches(tmp_path):
    from clipa_model.model import get_tokenizer
    from pipelines.demo_data import write_demo_shards

    shards = write_demo_shards(str(tmp_path), 24, seed=0, size=48, shard_size=16)
    tok = get_tokenizer("tiny", 8)
    per_rank = []
    for rank in range(3):  # 3 ranks, 2 shards of 16 and 8 samples
        batches = list(train_batches(shards, 28, 4, 5, tok, (0.8, 1.0), seed=0,
                                     rank=rank, world_size=3))
        per_rank.append(batches)
        assert len(batches) == 5 and all(b[0].shape == (4, 3, 28, 28) for b in batches)
    assert not torch.equal(per_rank[0][0][0], per_rank[1][0][0])  # ranks see other samples
    resumed = list(train_batches(shards, 28, 4, 5, tok, (0.8, 1.0), seed=0,
                                 rank=1, world_size=3, start_step=3))
    assert len(resumed) == 2
    for (a_im, a_tok), (b_im, b_tok) in zip(resumed, per_rank[1][3:]):
        assert torch.equal(a_im, b_im) and torch.equal(a_tok, b_tok)


if __name__ == "__main__":
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    state, losses = train_shard(rank, world, port)
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(losses, f)
