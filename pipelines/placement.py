"""Compile-time placement of pipeline steps: which machine, accelerators and image each runs on.

The pipeline functions call their steps through ``PlacedStep`` wrappers. Compiled as they
are (``pipeline.yaml``, ``clipa run``), every step is its plain component. Compiled under a
``Placement`` (``place_pipeline``), a step becomes

- a Vertex AI custom job (google-cloud-pipeline-components'
  ``create_custom_training_job_from_component``) when its ``Machine`` names a machine type:
  machine type, accelerator type / count, replica count, TPU topology, boot disk, env; or
- the same component with kfp task settings (CPU / memory limits, accelerator type and
  count), from which Vertex picks a machine; or
- untouched,

and each step's container image is the placement's data or train image (images are
compile-time parameters). A sub-pipeline step (``download``) gets the image and task
settings on each of its inner containers. ``step_args`` add component arguments per step
(``with_dataflow``: filter_shard's Beam runner on Dataflow). Presets: ``PLACEMENTS``.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass, field, replace
from typing import Mapping

from components.clipa_component import DATA_IMAGE, TRAIN_IMAGE

# Steps that run on the data image (img2dataset + Beam); the others use the train image.
DATA_STEPS = frozenset({"download", "filter_shard", "summarize", "record_history"})
STEPS = ("download", "filter_shard", "pretrain", "finetune", "evaluate", "summarize",
         "benchmark", "record_history")
TRAIN_STEPS = ("pretrain", "finetune")


@dataclass(frozen=True)
class Machine:
    """Where one step runs on Vertex AI.

    Attributes:
        machine_type: e.g. "a3-highgpu-8g"; set -> the step runs as a Vertex custom job.
            Empty -> kfp task settings only (Vertex chooses a machine that fits them).
        accelerator_type: e.g. "NVIDIA_H100_80GB", "NVIDIA_A100_80GB", "NVIDIA_L4".
        accelerator_count: accelerators per replica.
        replica_count: machines (nodes) of a custom job: workerpool0 holds 1, workerpool1
            the other N-1, every one running the same command; the training step's
            launcher joins them through CLUSTER_SPEC (``clipa ... --nodes N``).
        tpu_topology: e.g. "2x4" for a TPU v5e slice (custom jobs).
        cpu_limit, memory_limit: kfp task settings, e.g. "8", "32G".
        boot_disk_size_gb: custom jobs' boot disk.
        env: extra environment variables of a custom job, as (name, value) pairs.
    """
    machine_type: str = ""
    accelerator_type: str = ""
    accelerator_count: int = 0
    replica_count: int = 1
    tpu_topology: str = ""
    cpu_limit: str = ""
    memory_limit: str = ""
    boot_disk_size_gb: int = 100
    env: tuple = ()


@dataclass(frozen=True)
class Placement:
    """Machines (by step name) and images for one compilation of a pipeline."""
    name: str = "local"
    machines: Mapping[str, Machine] = field(default_factory=dict)
    data_image: str = DATA_IMAGE
    train_image: str = TRAIN_IMAGE
    # Identity and VPC of the custom jobs: a custom job does not inherit the pipeline
    # job's service account or network, so they are compiled into its spec.
    service_account: str = ""
    network: str = ""
    # Extra arguments of a step's component, by step (e.g. filter_shard's Dataflow runner);
    # the pipeline's own arguments win over them.
    step_args: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    def image_for(self, step: str) -> str:
        return self.data_image if step in DATA_STEPS else self.train_image

    def with_training(self, **changes) -> "Placement":
        """A copy whose pretrain and finetune machines have ``changes`` applied."""
        machines = dict(self.machines)
        for step in TRAIN_STEPS:
            machines[step] = replace(machines.get(step, Machine()), **changes)
        return replace(self, machines=machines)


def with_dataflow(placement: Placement, project: str, region: str, temp_location: str,
                  machine_type: str = "", max_workers: int = 0) -> Placement:
    """A copy of ``placement`` whose filter_shard runs its Beam pipeline on Dataflow.

    The workers use the placement's data image (it has this package installed); the
    filter_shard task itself then only launches and watches the Dataflow job.
    """
    if not temp_location.startswith("gs://"):
        raise ValueError(f"Dataflow temp location {temp_location!r}: expected a gs:// folder")
    args = {"runner": "DataflowRunner", "dataflow_project": project, "dataflow_region": region,
            "dataflow_temp_location": temp_location, "dataflow_machine_type": machine_type,
            "dataflow_max_workers": max_workers, "dataflow_container_image": placement.data_image}
    return replace(placement, step_args={**placement.step_args, "filter_shard": args})


_CPU_DATA = Machine(cpu_limit="8", memory_limit="32G")
_GPU_EVAL = Machine(machine_type="g2-standard-8", accelerator_type="NVIDIA_L4", accelerator_count=1)


def _gpu(machine_type: str, accelerator: str) -> Placement:
    train = Machine(machine_type=machine_type, accelerator_type=accelerator, accelerator_count=8,
                    boot_disk_size_gb=500)
    return Placement(machine_type, {"download": _CPU_DATA, "filter_shard": _CPU_DATA,
                                    "pretrain": train, "finetune": train,
                                    "evaluate": _GPU_EVAL, "benchmark": _GPU_EVAL})


PLACEMENTS: dict[str, Placement] = {
    "local": Placement(),
    "vertex-cpu": Placement("vertex-cpu", {s: _CPU_DATA for s in STEPS}),
    "a3-highgpu-8g": _gpu("a3-highgpu-8g", "NVIDIA_H100_80GB"),
    "a2-ultragpu-8g": _gpu("a2-ultragpu-8g", "NVIDIA_A100_80GB"),
    "tpu-v5e-8": Placement(
        "tpu-v5e-8",
        {"download": _CPU_DATA, "filter_shard": _CPU_DATA, "evaluate": _GPU_EVAL,
         "benchmark": _GPU_EVAL,
         **{s: Machine(machine_type="ct5lp-hightpu-8t", tpu_topology="2x4",
                       env=(("PJRT_DEVICE", "TPU"),)) for s in TRAIN_STEPS}},
        train_image=TRAIN_IMAGE.replace("clipa-train:", "clipa-train-tpu:")),
}


def get_placement(name: str) -> Placement:
    """A preset by name; the error lists the known ones."""
    try:
        return PLACEMENTS[name]
    except KeyError:
        raise ValueError(f"placement {name!r}: unknown; expected one of {sorted(PLACEMENTS)}") from None


_ACTIVE: contextvars.ContextVar[Placement] = contextvars.ContextVar("clipa_placement", default=PLACEMENTS["local"])


@contextlib.contextmanager
def placing(placement: Placement):
    """Make ``placement`` the one that ``PlacedStep`` calls use while compiling."""
    token = _ACTIVE.set(placement)
    try:
        yield placement
    finally:
        _ACTIVE.reset(token)


def resolve_placement(name: str, data_image: str = "", train_image: str = "",
                      service_account: str = "", network: str = "") -> Placement:
    """The preset ``name`` with the given images / custom-job identity (empty: keep)."""
    placement = get_placement(name)
    changes = {k: v for k, v in (("data_image", data_image), ("train_image", train_image),
                                 ("service_account", service_account), ("network", network)) if v}
    return replace(placement, **changes) if changes else placement


def with_image(component, image: str):
    """A copy of a container component that runs in ``image``."""
    if component.component_spec.implementation.container.image == image:
        return component
    comp = copy.deepcopy(component)
    comp.component_spec.implementation.container.image = image
    return comp


def _resources(machine: Machine) -> dict:
    """``machine``'s kfp task settings as the IR's container ``resources`` (what kfp writes)."""
    from kfp.compiler import compiler_utils

    res: dict = {}
    if machine.cpu_limit:
        res.update(cpuLimit=compiler_utils._cpu_to_float(machine.cpu_limit),
                   resourceCpuLimit=machine.cpu_limit)
    if machine.memory_limit:
        res.update(memoryLimit=compiler_utils._memory_to_float(machine.memory_limit),
                   resourceMemoryLimit=machine.memory_limit)
    if machine.accelerator_type:
        count = str(machine.accelerator_count or 1)
        res["accelerator"] = {"type": machine.accelerator_type, "count": count,
                              "resourceType": machine.accelerator_type, "resourceCount": count}
    return res


def place_graph(component, image: str, machine: Machine | None):
    """A copy of a sub-pipeline (e.g. ``download``) whose every container runs in ``image``
    with ``machine``'s task settings.

    Its inner steps are plain components traced when the sub-pipeline was defined, so the
    placement edits the compiled executors (image, resources) rather than re-tracing it.
    A ``machine_type`` (custom job) is refused: a sub-pipeline's steps are many small tasks.
    """
    from google.protobuf import json_format

    if machine is not None and machine.machine_type:
        raise ValueError(f"sub-pipeline {component.name!r}: a machine_type (custom job) cannot place "
                         "a sub-pipeline; expected kfp task settings (cpu_limit, memory_limit, accelerator)")
    comp = copy.deepcopy(component)
    spec = comp.pipeline_spec.deployment_spec
    executors = json_format.MessageToDict(spec)["executors"]
    resources = _resources(machine) if machine is not None else {}
    for executor in executors.values():
        container = executor.get("container")
        if container is None:
            continue  # importers and the like: no container to place
        container["image"] = image
        if resources:
            container["resources"] = resources
    spec.Clear()
    spec.update({"executors": executors})
    return comp


def as_custom_job(component, machine: Machine, service_account: str = "", network: str = ""):
    """``component`` as a Vertex AI custom job on ``machine`` (google-cloud-pipeline-components),
    running as ``service_account`` in ``network`` when given."""
    from google_cloud_pipeline_components.v1.custom_job import create_custom_training_job_from_component

    job = create_custom_training_job_from_component(
        component, machine_type=machine.machine_type, accelerator_type=machine.accelerator_type,
        accelerator_count=machine.accelerator_count or 1, replica_count=machine.replica_count,
        boot_disk_size_gb=machine.boot_disk_size_gb, service_account=service_account,
        network=network, env=[{"name": k, "value": v} for k, v in machine.env] or None)
    if machine.tpu_topology:  # GCPC has no argument for it; it is one field of the spec
        specs = job.component_spec.inputs["worker_pool_specs"].default
        for spec in specs:
            spec["machine_spec"]["tpu_topology"] = machine.tpu_topology
    return job


def _task_settings(task, machine: Machine) -> None:
    if machine.cpu_limit:
        task.set_cpu_limit(machine.cpu_limit)
    if machine.memory_limit:
        task.set_memory_limit(machine.memory_limit)
    if machine.accelerator_type:
        task.set_accelerator_type(machine.accelerator_type)
        task.set_accelerator_limit(machine.accelerator_count or 1)


class PlacedStep:
    """A pipeline step whose component and task settings follow the active placement.

    Calling it is calling the component (same arguments, returns the task); attribute
    access reaches the plain component (component_spec, python_func, ...).
    """

    def __init__(self, step: str, component):
        if step not in STEPS:
            raise ValueError(f"step {step!r}: unknown; expected one of {STEPS}")
        self.step, self.component = step, component

    def __call__(self, *args, **kwargs):
        placement = _ACTIVE.get()
        if placement == PLACEMENTS["local"]:
            return self.component(*args, **kwargs)
        kwargs = {**placement.step_args.get(self.step, {}), **kwargs}
        machine = placement.machines.get(self.step)
        if hasattr(self.component, "pipeline_func"):  # a sub-pipeline (GraphComponent)
            return place_graph(self.component, placement.image_for(self.step), machine)(*args, **kwargs)
        comp = with_image(self.component, placement.image_for(self.step))
        if machine is not None and machine.machine_type:
            comp = as_custom_job(comp, machine, placement.service_account, placement.network)
        task = comp(*args, **kwargs)
        if machine is not None and not machine.machine_type:
            _task_settings(task, machine)
        return task

    def __getattr__(self, name):
        return getattr(self.component, name)


def place_pipeline(pipeline, placement: Placement):
    """Re-trace a ``@dsl.pipeline`` function with its steps placed by ``placement``."""
    from kfp import dsl

    with placing(placement):
        return dsl.pipeline(name=pipeline.component_spec.name,
                            description=pipeline.component_spec.description)(pipeline.pipeline_func)


# ---------------------------------------------------------------- command-line flags

def add_placement_args(parser, default: str | None = "a3-highgpu-8g") -> None:
    """--placement, --data-image and --train-image (shared by compile, submit, schedule, component)."""
    parser.add_argument("--placement", default=default, choices=sorted(PLACEMENTS),
                        help="per-step machines and images (pipelines/placement.py; default: "
                             f"{default or 'none, every step its plain component'})")
    parser.add_argument("--data-image", default="",
                        help="container image of the data steps (download, filter_shard, summarize, "
                             "record_history); default: the placement's")
    parser.add_argument("--train-image", default="",
                        help="container image of the training and evaluation steps; default: the placement's")
    parser.add_argument("--nodes", type=int, default=None,
                        help="machines per training step (a multi-replica custom job: workerpool0 = 1, "
                             "workerpool1 = N-1, each launching one process per accelerator); "
                             "default: the placement's (1)")


def placement_from_args(args):
    """The Placement that --placement/--data-image/--train-image name, or None (no placement)."""
    nodes = getattr(args, "nodes", None)
    if args.placement is None and not (args.data_image or args.train_image) and nodes is None:
        return None
    # Vertex commands: custom jobs run as the job's service account, in its network.
    placement = resolve_placement(args.placement or "local", args.data_image, args.train_image,
                                  getattr(args, "service_account", ""), getattr(args, "network", ""))
    return placement if nodes is None else with_nodes(placement, nodes)


def with_nodes(placement: Placement, nodes: int) -> Placement:
    """A copy whose training steps run on ``nodes`` machines each.

    Raises:
        ValueError: ``nodes`` < 1, or a placement whose training steps are not custom jobs
            (only a custom job has several replicas).
    """
    if nodes < 1:
        raise ValueError(f"--nodes {nodes}: expected at least 1 machine per training step")
    plain = [s for s in TRAIN_STEPS if not placement.machines.get(s, Machine()).machine_type]
    if plain:
        raise ValueError(f"--nodes {nodes}: placement {placement.name!r} runs {plain} without a "
                         f"machine_type; expected a placement whose training steps are custom jobs "
                         f"(e.g. a3-highgpu-8g, tpu-v5e-8)")
    return placement.with_training(replica_count=nodes)
