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
import re
from dataclasses import dataclass, field, replace
from typing import Mapping

from components.clipa_component import DATA_IMAGE, TRAIN_IMAGE

# Steps that run on the data image (img2dataset + Beam); the others use the train image.
DATA_STEPS = frozenset({"download", "filter_shard", "summarize", "record_history"})
STEPS = ("download", "filter_shard", "pretrain", "finetune", "evaluate", "summarize",
         "benchmark", "record_history", "export")
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
        timeout: custom job's run-time limit, e.g. "30d", "12h" ("" = GCPC's 7 days).
        restart_on_worker_restart: restart every worker of the custom job when one is
            restarted (preemption / host maintenance), so they rendezvous again.
        scheduling_strategy: "STANDARD", "SPOT" (preemptible, cheaper) or "FLEX_START"
            (Dynamic Workload Scheduler: waits for capacity).
        max_wait: FLEX_START only: how long to wait for capacity, e.g. "2d" ("" = GCPC's 1 day).
        reservation: "projects/P/zones/Z/reservations/NAME" (that reservation) or "any".
        persistent_resource: id of a Vertex persistent resource to run on.
        retries: KFP retry policy of the step: a failed or preempted step is run again
            (it resumes from its checkpoints) up to this many times.
        tensorboard: Vertex TensorBoard instance, projects/P/locations/R/tensorboards/T;
            the job then writes its events to $AIP_TENSORBOARD_LOG_DIR too.
        base_output_directory: gs:// folder of the custom job's outputs (Vertex derives
            AIP_TENSORBOARD_LOG_DIR, AIP_CHECKPOINT_DIR from it); needed with ``tensorboard``.
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
    timeout: str = ""
    restart_on_worker_restart: bool = False
    scheduling_strategy: str = "STANDARD"
    max_wait: str = ""
    reservation: str = ""
    persistent_resource: str = ""
    retries: int = 0
    tensorboard: str = ""
    base_output_directory: str = ""

    def __post_init__(self) -> None:
        check_custom_job_options(self)


STRATEGIES = ("STANDARD", "SPOT", "FLEX_START")
_TENSORBOARD = re.compile(r"^projects/[^/]+/locations/[^/]+/tensorboards/[^/]+$")
_RESERVATION = re.compile(r"^projects/[^/]+/zones/[^/]+/reservations/[^/]+$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def duration_seconds(text: str, what: str = "duration") -> str:
    """ "30d", "1d12h", "90m", "3600s" or "3600" -> "2592000s" (the API's Duration form).

    Raises:
        ValueError: naming ``what`` and the expected form.
    """
    value = text.strip().lower()
    if value.isdigit():
        return f"{int(value)}s"
    parts = _DURATION.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"{what} {text!r}: expected a duration like 30d, 12h, 90m, 1d12h or "
                         "3600s")
    return f"{round(sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))}s"


def check_custom_job_options(machine: "Machine") -> None:
    """Raise ``ValueError`` naming the field when a Machine's custom-job options are malformed."""
    if machine.scheduling_strategy not in STRATEGIES:
        raise ValueError(f"scheduling_strategy {machine.scheduling_strategy!r}: expected one of "
                         f"{STRATEGIES}")
    for name in ("timeout", "max_wait"):
        if getattr(machine, name):
            duration_seconds(getattr(machine, name), name)
    if machine.max_wait and machine.scheduling_strategy != "FLEX_START":
        raise ValueError(f"max_wait {machine.max_wait!r}: only for scheduling_strategy "
                         "FLEX_START (how long to wait for capacity)")
    if machine.reservation and machine.reservation != "any" and not _RESERVATION.match(
            machine.reservation):
        raise ValueError(f"reservation {machine.reservation!r}: expected "
                         "projects/P/zones/Z/reservations/NAME or 'any'")
    if machine.tensorboard and not _TENSORBOARD.match(machine.tensorboard):
        raise ValueError(f"tensorboard {machine.tensorboard!r}: expected "
                         "projects/P/locations/R/tensorboards/T")
    if machine.tensorboard and not machine.base_output_directory.startswith("gs://"):
        raise ValueError(f"tensorboard {machine.tensorboard!r}: needs a gs:// "
                         "base_output_directory (--base-output-dir) for the job's events")
    if machine.retries < 0:
        raise ValueError(f"retries {machine.retries}: expected >= 0")


# Machine fields that only a custom job (a Machine with machine_type) has.
CUSTOM_JOB_OPTIONS = ("timeout", "restart_on_worker_restart", "scheduling_strategy",
                      "max_wait", "reservation", "persistent_resource", "tensorboard",
                      "base_output_directory")


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
# The export holds the weights about three times over (checkpoint, state dict, safetensors
# bytes): bigG/14's 2.5 B float32 parameters are 10 GB each.
_EXPORT = Machine(cpu_limit="4", memory_limit="64G")


def _gpu(machine_type: str, accelerator: str) -> Placement:
    train = Machine(machine_type=machine_type, accelerator_type=accelerator, accelerator_count=8,
                    boot_disk_size_gb=500)
    return Placement(machine_type, {"download": _CPU_DATA, "filter_shard": _CPU_DATA,
                                    "pretrain": train, "finetune": train,
                                    "evaluate": _GPU_EVAL, "benchmark": _GPU_EVAL, "export": _EXPORT})


PLACEMENTS: dict[str, Placement] = {
    "local": Placement(),
    "vertex-cpu": Placement("vertex-cpu", {s: _CPU_DATA for s in STEPS}),
    "a3-highgpu-8g": _gpu("a3-highgpu-8g", "NVIDIA_H100_80GB"),
    "a2-ultragpu-8g": _gpu("a2-ultragpu-8g", "NVIDIA_A100_80GB"),
    "tpu-v5e-8": Placement(
        "tpu-v5e-8",
        {"download": _CPU_DATA, "filter_shard": _CPU_DATA, "evaluate": _GPU_EVAL,
         "benchmark": _GPU_EVAL, "export": _EXPORT,
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
        network=network, env=[{"name": k, "value": v} for k, v in machine.env] or None,
        **_custom_job_options(machine))
    if machine.tpu_topology:  # GCPC has no argument for it; it is one field of the spec
        specs = job.component_spec.inputs["worker_pool_specs"].default
        for spec in specs:
            spec["machine_spec"]["tpu_topology"] = machine.tpu_topology
    return job


def _custom_job_options(machine: Machine) -> dict:
    """GCPC arguments for ``machine``'s preemption / scheduling / TensorBoard options
    (only those set: the others keep GCPC's defaults)."""
    opts: dict = {"restart_job_on_worker_restart": machine.restart_on_worker_restart,
                  "strategy": machine.scheduling_strategy}
    if machine.timeout:
        opts["timeout"] = duration_seconds(machine.timeout, "timeout")
    if machine.max_wait:
        opts["max_wait_duration"] = duration_seconds(machine.max_wait, "max_wait")
    if machine.reservation == "any":
        opts["reservation_affinity_type"] = "ANY_RESERVATION"
    elif machine.reservation:
        opts.update(reservation_affinity_type="SPECIFIC_RESERVATION",
                    reservation_affinity_key="compute.googleapis.com/reservation-name",
                    reservation_affinity_values=[machine.reservation])
    if machine.persistent_resource:
        opts["persistent_resource_id"] = machine.persistent_resource
    if machine.tensorboard:
        opts["tensorboard"] = machine.tensorboard
    if machine.base_output_directory:
        opts["base_output_directory"] = machine.base_output_directory
    return opts


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
        if machine is not None and machine.retries:
            # Exponential backoff: 1 min, 2, 4, ... at most 1 h between tries.
            task.set_retry(num_retries=machine.retries, backoff_duration="60s",
                           backoff_factor=2.0, backoff_max_duration="3600s")
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


def add_training_job_args(parser) -> None:
    """Custom-job options of the training steps (clipa compile, clipa submit): Machine fields."""
    g = parser.add_argument_group("training custom jobs (long runs: preemption, resubmission)")
    g.add_argument("--timeout", default="",
                   help="run-time limit of each training custom job, e.g. 30d (default: 7d)")
    g.add_argument("--restart-on-worker-restart", action="store_true",
                   help="restart all workers of a training job when one restarts")
    g.add_argument("--scheduling-strategy", default="", type=str.upper,
                   choices=("", *STRATEGIES), metavar="|".join(STRATEGIES),
                   help="STANDARD, SPOT (preemptible) or FLEX_START (default: STANDARD)")
    g.add_argument("--max-wait", default="",
                   help="FLEX_START: how long to wait for capacity, e.g. 2d (default: 1d)")
    g.add_argument("--reservation", default="",
                   help="projects/P/zones/Z/reservations/NAME, or 'any'")
    g.add_argument("--persistent-resource", default="",
                   help="id of a Vertex AI persistent resource to run the training jobs on")
    g.add_argument("--train-retries", type=int, default=0, metavar="N",
                   help="retry a failed or preempted training step N times (it resumes from "
                        "its checkpoints)")
    g.add_argument("--tensorboard", default="",
                   help="Vertex TensorBoard, projects/P/locations/R/tensorboards/T: live "
                        "training curves in Vertex AI")
    g.add_argument("--base-output-dir", default="",
                   help="gs:// folder of the training jobs' outputs (TensorBoard logs); "
                        "default with submit: PIPELINE_ROOT/custom-jobs")


def _training_job_changes(args) -> dict:
    """Machine changes that the ``add_training_job_args`` flags ask for."""
    base = getattr(args, "base_output_dir", "")
    if getattr(args, "tensorboard", "") and not base and getattr(args, "pipeline_root", ""):
        base = f"{args.pipeline_root.rstrip('/')}/custom-jobs"
    given = {"timeout": getattr(args, "timeout", ""),
             "restart_on_worker_restart": getattr(args, "restart_on_worker_restart", False),
             "scheduling_strategy": getattr(args, "scheduling_strategy", ""),
             "max_wait": getattr(args, "max_wait", ""),
             "reservation": getattr(args, "reservation", ""),
             "persistent_resource": getattr(args, "persistent_resource", ""),
             "retries": getattr(args, "train_retries", 0),
             "tensorboard": getattr(args, "tensorboard", ""), "base_output_directory": base}
    return {k: v for k, v in given.items() if v}


def _flag(field_name: str) -> str:
    """The command-line flag of a Machine field (``add_training_job_args``)."""
    names = {"retries": "train-retries", "base_output_directory": "base-output-dir"}
    return "--" + names.get(field_name, field_name.replace("_", "-"))


def with_training_jobs(placement: "Placement | None", changes: dict) -> "Placement | None":
    """``placement`` with ``changes`` on its training machines, checked.

    Raises:
        ValueError: custom-job options for training steps that are no custom jobs
            (no placement, or machines without a machine_type).
    """
    if not changes:
        return placement
    flag = _flag(next(iter(changes)))
    if placement is None or placement == PLACEMENTS["local"]:
        raise ValueError(f"{flag}: applies to placed training steps; give a --placement "
                         "(e.g. a3-highgpu-8g)")
    job_only = [k for k in changes if k in CUSTOM_JOB_OPTIONS]
    bare = [s for s in TRAIN_STEPS if not placement.machines.get(s, Machine()).machine_type]
    if job_only and bare:
        raise ValueError(f"{_flag(job_only[0])}: a custom-job option, but the "
                         f"placement {placement.name!r} runs {bare[0]} without a machine_type "
                         "(not as a custom job)")
    return placement.with_training(**changes)


def placement_from_args(args):
    """The Placement that --placement/--data-image/--train-image name (with --nodes and the
    training custom-job flags applied), or None (no placement)."""
    changes = _training_job_changes(args)
    nodes = getattr(args, "nodes", None)
    if args.placement is None and not (args.data_image or args.train_image) and nodes is None:
        return with_training_jobs(None, changes)
    # Vertex commands: custom jobs run as the job's service account, in its network.
    placement = resolve_placement(args.placement or "local", args.data_image, args.train_image,
                                  getattr(args, "service_account", ""),
                                  getattr(args, "network", ""))
    placement = placement if nodes is None else with_nodes(placement, nodes)
    return with_training_jobs(placement, changes)


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
