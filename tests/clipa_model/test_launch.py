"""The training step's launcher: node layout from CLUSTER_SPEC, process counts checked against
the accelerators present, and a worker's own error surfacing from a failed launch."""
import json
import os

import pytest

from clipa_model.config import ConfigError
from clipa_model.launch import LaunchError, NodeLayout, device_type, launch, node_layout

SPEC = {"cluster": {"workerpool0": ["host-a:2222"], "workerpool1": ["host-b:2222", "host-c:2222"]},
        "environment": "cloud", "task": {"type": "workerpool1", "index": 1}}


def test_layout_of_a_vertex_node_and_of_this_machine():
    layout = node_layout(2, "cpu", {"CLUSTER_SPEC": json.dumps(SPEC)})
    assert layout == NodeLayout("cpu", 2, 3, 2, "host-a", 2222) and layout.world_size == 6
    alone = node_layout(0, "cpu", {})
    assert (alone.procs_per_node, alone.nodes, alone.world_size) == (1, 1, 1)  # CPU: one
    # Without PJRT_DEVICE (or torch_xla) "auto" is not xla; this machine has no GPU.
    assert device_type("auto", {}) == "cpu" and device_type("xla", {}) == "xla"


def test_more_processes_than_accelerators_is_refused():
    cores = os.cpu_count()
    with pytest.raises(ConfigError, match=f"train_procs_per_node={cores + 1}: this node has only "
                                          f"{cores} CPU cores"):
        node_layout(cores + 1, "cpu", {})
    with pytest.raises(ConfigError, match="cuda devices"):
        node_layout(1, "cuda", {})  # no GPU here
    with pytest.raises(ConfigError, match="train_procs_per_node=-1: expected >= 0"):
        node_layout(-1, "cpu", {})


def fail_on_rank_one() -> int:
    """A worker: rank 1 raises an error of its own."""
    rank = int(os.environ["RANK"])
    if rank == 1:
        raise ValueError("shard 17 is unreadable (rank one's own words)")
    return rank


@pytest.mark.slow
def test_a_failed_worker_fails_the_launch_with_its_own_error():
    with pytest.raises(LaunchError) as err:
        launch(fail_on_rank_one, (), node_layout(2, "cpu", {}))
    message = str(err.value)
    assert "training worker rank 1 of 2 failed" in message
    assert "ValueError: shard 17 is unreadable (rank one's own words)" in message
    assert "Traceback" in message and "fail_on_rank_one" in message  # where it was raised
