"""Where this process sits in a multi-process run: torchrun, Vertex AI, or alone.

torchrun (and the training step's own launcher, ``launch.py``, which uses the same elastic
agent) sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT for each process. A
Vertex AI custom job sets CLUSTER_SPEC on each node (replica): workerpool0 holds the primary
node, workerpool1 the others; ``cluster_spec_nodes`` reads it for the launcher.
``torchrun_args`` gives the same layout as torchrun flags, for a hand-written torchrun.

The contrastive loss of a multi-process run uses open_clip's ``ClipLoss(local_loss=True,
gather_with_grad=True)``: every rank all-gathers the features of the global batch, scores
its own rows against all columns, and the gradient flows back to the shard that produced
each feature, so the result equals one process on the whole batch (tests/clipa_model/test_distributed.py).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Mapping

from clipa_model.config import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Rank layout of this process.

    Attributes:
        rank: global rank; world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        master_addr, master_port: rendezvous of rank 0 ("" when alone).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = ""
    master_port: int = DEFAULT_PORT

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ConfigError(f"${key}={env[key]!r}: expected an integer") from None


def cluster_spec_nodes(spec_json: str) -> tuple[int, int, str, int]:
    """Parse Vertex AI's CLUSTER_SPEC.

    Returns:
        (node_rank, num_nodes, master_addr, master_port): workerpool0's first host is the
        master; node ranks run over workerpool0 then workerpool1.

    Raises:
        ConfigError: malformed JSON or a task outside workerpool0/1.
    """
    try:
        spec = json.loads(spec_json)
        cluster, task = spec["cluster"], spec["task"]
        pools = [list(cluster.get("workerpool0", [])), list(cluster.get("workerpool1", []))]
        master = pools[0][0]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"$CLUSTER_SPEC: expected Vertex AI's JSON with cluster.workerpool0 "
                          f"and task ({e.__class__.__name__}: {e})") from None
    if task.get("type") not in ("workerpool0", "workerpool1"):
        raise ConfigError(f"$CLUSTER_SPEC task.type={task.get('type')!r}: expected a training "
                          f"pool (workerpool0 or workerpool1)")
    index = int(task.get("index", 0))
    node_rank = index if task["type"] == "workerpool0" else len(pools[0]) + index
    host, _, port = master.rpartition(":") if ":" in master else (master, "", "")
    return node_rank, len(pools[0]) + len(pools[1]), host, int(port or DEFAULT_PORT)


def resolve_dist_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """This process's ``DistEnv`` from torchrun's variables, else CLUSTER_SPEC, else alone."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env and _int(env, "WORLD_SIZE") > 1:
        return DistEnv(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                       local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env
                       else DEFAULT_PORT)
    if env.get("CLUSTER_SPEC"):
        node_rank, nodes, addr, port = cluster_spec_nodes(env["CLUSTER_SPEC"])
        if nodes > 1:  # one process per node
            return DistEnv(node_rank, nodes, 0, env.get("MASTER_ADDR", addr),
                           _int(env, "MASTER_PORT") if "MASTER_PORT" in env else port)
    return DistEnv()


def xla_dist_env() -> DistEnv:
    """This process's ``DistEnv`` under torch_xla's launch (PJRT ordinals; no rendezvous address)."""
    import torch_xla.runtime as xr

    return DistEnv(rank=xr.global_ordinal(), world_size=xr.world_size(),
                   local_rank=xr.local_ordinal())


def torchrun_args(nproc_per_node: int, env: Mapping[str, str] | None = None) -> list[str]:
    """torchrun flags for this Vertex AI node (one process per accelerator)."""
    env = os.environ if env is None else env
    node_rank, nodes, addr, port = (cluster_spec_nodes(env["CLUSTER_SPEC"])
                                    if env.get("CLUSTER_SPEC") else (0, 1, "127.0.0.1", DEFAULT_PORT))
    return [f"--nnodes={nodes}", f"--node_rank={node_rank}", f"--nproc_per_node={nproc_per_node}",
            f"--master_addr={env.get('MASTER_ADDR', addr)}",
            f"--master_port={env.get('MASTER_PORT', port)}"]


def init_process_group(dist_env: DistEnv, device_type: str) -> None:
    """Join the process group (nccl on CUDA, xla on TPU, gloo on CPU); no-op when alone."""
    import torch.distributed as dist

    if dist_env.world_size == 1 or dist.is_initialized():
        return
    if device_type == "xla":
        import torch_xla.distributed.xla_backend  # noqa: F401  registers "xla"

        dist.init_process_group("xla", init_method="xla://")
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{dist_env.master_addr}:{dist_env.master_port}",
                            rank=dist_env.rank, world_size=dist_env.world_size)


def all_gather_object(obj, dist_env: DistEnv) -> list:
    """Every rank's ``obj`` (a one-element list when alone)."""
    if dist_env.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * dist_env.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(dist_env: DistEnv) -> None:
    if dist_env.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


if __name__ == "__main__":  # print torchrun flags for this node: NPROC_PER_NODE
    print(" ".join(torchrun_args(int(sys.argv[1]) if len(sys.argv) > 1 else 1)))
