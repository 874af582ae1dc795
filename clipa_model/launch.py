"""One training process per accelerator on every node, started by the training step itself.

The training step (the same KFP component locally and in a Vertex AI custom job) calls
``launch(fn, args, layout)``:

- CUDA / CPU: torch's elastic launcher API (``torch.distributed.launcher.api.elastic_launch``,
  what ``torchrun`` runs) starts ``procs_per_node`` workers with static rendezvous at the
  primary node: nodes and node rank come from Vertex AI's CLUSTER_SPEC
  (``distributed.cluster_spec_nodes``), so every replica of a multi-node custom job runs
  the same command. Workers get torchrun's RANK / WORLD_SIZE / LOCAL_RANK variables.
- TPU (xla): ``torch_xla.launch``, PJRT's multi-process launch, one process per local chip;
  PJRT itself joins the hosts of a slice. Multi-process rather than SPMD because the
  training loop then stays the one tested on CUDA and gloo (DDP, ``ClipLoss`` gathering the
  global batch, exact accumulation); SPMD would need sharding annotations of its own.

A worker's failure fails the launch with that worker's own error (``LaunchError``), not a
bare exit status.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

from clipa_model.config import ConfigError
from clipa_model.distributed import DEFAULT_PORT, cluster_spec_nodes


class LaunchError(RuntimeError):
    """A worker process failed; the message carries its rank and its own error."""


@dataclass(frozen=True)
class NodeLayout:
    """How many processes run where.

    Attributes:
        device: the device type the workers train on: "cpu", "cuda" or "xla".
        procs_per_node: worker processes on this node.
        nodes, node_rank: replicas of the job and this one's index (0 = primary).
        master_addr, master_port: the primary node's rendezvous.
    """

    device: str = "cpu"
    procs_per_node: int = 1
    nodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    def to_dict(self) -> dict:
        return {**asdict(self), "world_size": self.world_size}


def xla_available(env: Mapping[str, str] | None = None) -> bool:
    """A PJRT device is configured (PJRT_DEVICE set, as on a TPU VM) and torch_xla imports."""
    env = os.environ if env is None else env
    if not env.get("PJRT_DEVICE"):
        return False
    try:
        import torch_xla  # noqa: F401
    except ImportError:
        return False
    return True


def device_type(name: str = "auto", env: Mapping[str, str] | None = None) -> str:
    """The device type a ``StageConfig.device`` value trains on: auto -> xla, cuda, cpu in turn."""
    if name != "auto":
        return name
    if xla_available(env):
        return "xla"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def accelerators_present(device: str) -> int:
    """Processes that can each own an accelerator here: GPUs, local TPU chips, or CPU cores."""
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
    if device == "xla":
        # Count chips without opening them: a TPU is held by the first process that
        # initialises the runtime, and the workers must be the ones that do.
        if os.environ.get("PJRT_DEVICE", "").upper() == "TPU":
            from torch_xla._internal import tpu

            return tpu.num_available_chips()
        return int(os.environ.get("CPU_NUM_DEVICES", "1"))
    return os.cpu_count() or 1


def node_layout(procs_per_node: int = 0, device: str = "auto",
                env: Mapping[str, str] | None = None) -> NodeLayout:
    """This node's layout: ``procs_per_node`` (0 = one per accelerator; one on a CPU) and the
    nodes of CLUSTER_SPEC.

    Raises:
        ConfigError: a negative count, or more processes than accelerators (cores on a CPU).
    """
    env = os.environ if env is None else env
    kind = device_type(device, env)
    if procs_per_node < 0:
        raise ConfigError(f"train_procs_per_node={procs_per_node}: expected >= 0 "
                          "(0 = one per visible accelerator)")
    present = accelerators_present(kind)
    if procs_per_node > present:
        what = "CPU cores" if kind == "cpu" else f"{kind} devices"
        raise ConfigError(f"train_procs_per_node={procs_per_node}: this node has only {present} "
                          f"{what}; expected at most {present} (0 = one per accelerator)")
    if procs_per_node == 0:
        procs_per_node = 1 if kind == "cpu" else max(1, present)
    nodes, node_rank, addr, port = 1, 0, "127.0.0.1", 0
    if env.get("CLUSTER_SPEC"):
        node_rank, nodes, addr, port = cluster_spec_nodes(env["CLUSTER_SPEC"])
    elif procs_per_node > 1 and "MASTER_PORT" not in env:
        port = _free_port()  # one node: any free port, so that two local runs can coexist
    return NodeLayout(kind, procs_per_node, nodes, node_rank, env.get("MASTER_ADDR", addr),
                      int(env.get("MASTER_PORT", port)))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(fn: Callable, args: tuple, layout: NodeLayout):
    """Run ``fn(*args)`` on every process of ``layout``; return local rank 0's result.

    ``fn`` must be a module-level function (workers are spawned and import it). One process
    in all runs ``fn`` right here, except on xla, where torch_xla's launch always starts the
    workers (one per local device: PJRT counts them, and the process that opens a TPU
    holds it).

    Raises:
        LaunchError: a worker failed (its rank and error in the message).
    """
    if layout.device == "xla":
        return _launch_xla(fn, args)
    if layout.world_size == 1:
        return fn(*args)
    return _launch_elastic(fn, args, layout)


def _launch_elastic(fn: Callable, args: tuple, layout: NodeLayout):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=layout.nodes, max_nodes=layout.nodes, nproc_per_node=layout.procs_per_node,
        run_id=os.environ.get("CLOUD_ML_JOB_ID", "clipa"), rdzv_backend="static",
        rdzv_endpoint=f"{layout.master_addr}:{layout.master_port}",
        rdzv_configs={"rank": layout.node_rank}, max_restarts=0, start_method="spawn")
    try:
        results = elastic_launch(config, fn)(*args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        raise LaunchError(f"training worker rank {rank} of {layout.world_size} failed "
                          f"(exit code {failure.exitcode}): {_failure_text(failure)}") from None
    return results.get(layout.node_rank * layout.procs_per_node)


def _failure_text(failure) -> str:
    """The worker's own error: its exception, then its traceback, from the elastic error file."""
    message = failure.message
    if isinstance(message, dict):  # {"message": "E: ...", "extraInfo": {"py_callstack": ...}}
        stack = message.get("extraInfo", {}).get("py_callstack", "")
        message = f"{message.get('message', '')}\n{stack}"
    return str(message).strip() or "no error recorded (a signal, or an exit without a traceback)"


def _launch_xla(fn: Callable, args: tuple):
    """torch_xla's PJRT launch; rank 0's result comes back through a file."""
    import tempfile

    import torch
    import torch_xla

    with tempfile.TemporaryDirectory(prefix="clipa-xla-") as tmp:
        out = os.path.join(tmp, f"result-{uuid.uuid4().hex}.pt")
        torch_xla.launch(_xla_worker, args=(fn, args, out))
        return torch.load(out, weights_only=False) if os.path.exists(out) else None


def _xla_worker(index: int, fn: Callable, args: tuple, out: str) -> None:
    import torch
    import torch_xla.runtime as xr

    result = fn(*args)
    if xr.global_ordinal() == 0:
        torch.save(result, out)
