"""`clipa submit`: compile the training pipeline under a placement and submit it to Vertex AI.

    clipa submit --project P --region us-central1 --pipeline-root gs://bucket/root \\
        --param url_list=gs://bucket/urls.parquet --param eval_set=gs://bucket/eval_set \\
        --placement a3-highgpu-8g --train-image us-docker.pkg.dev/P/clipa/clipa-train:0.1.0
    clipa submit ... --dry-run      # print the exact CreatePipelineJob request, send nothing

The job is a google-cloud-aiplatform ``PipelineJob``; the shared pieces (the Vertex
options, their checks, ``aiplatform.init``, building a job from a compiled template) are
used by ``clipa schedule`` and ``clipa component run`` too. Every check runs before
anything is sent: a missing project / region / pipeline root, a pipeline root that is
not gs://, an unknown or missing pipeline parameter.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass, field

from components.cli_args import key_value, typed_params


@dataclass(frozen=True)
class VertexTarget:
    """Where and as whom a pipeline runs on Vertex AI."""
    project: str
    region: str
    pipeline_root: str
    service_account: str = ""
    network: str = ""
    labels: dict = field(default_factory=dict)
    enable_caching: bool | None = None  # None: the compiled per-task settings
    api_endpoint: str = ""


def add_vertex_args(parser: argparse.ArgumentParser, pipeline_root: bool = True) -> None:
    """The options that say where a job runs (project, region, root, identity, labels)."""
    parser.add_argument("--project", default=os.environ.get("CLIPA_PROJECT", ""),
                        help="Google Cloud project id (default: $CLIPA_PROJECT)")
    parser.add_argument("--region", default=os.environ.get("CLIPA_REGION", ""),
                        help="Vertex AI region, e.g. us-central1 (default: $CLIPA_REGION)")
    if pipeline_root:
        parser.add_argument("--pipeline-root", default=os.environ.get("CLIPA_PIPELINE_ROOT", ""),
                            help="gs:// folder for the run's artifacts (default: $CLIPA_PIPELINE_ROOT)")
    parser.add_argument("--service-account", default="",
                        help="service account the steps run as (default: the project's Compute default)")
    parser.add_argument("--network", default="",
                        help="VPC network to peer with, projects/NUMBER/global/networks/NAME")
    parser.add_argument("--label", action="append", default=[], type=key_value("--label"), metavar="KEY=VALUE",
                        help="label of the job (repeatable)")
    parser.add_argument("--api-endpoint", default="",
                        help="Vertex AI API endpoint (default: REGION-aiplatform.googleapis.com)")
    if pipeline_root:
        cache = parser.add_mutually_exclusive_group()
        cache.add_argument("--enable-caching", dest="enable_caching", action="store_true", default=None,
                           help="reuse the outputs of steps already run with the same inputs (resume)")
        cache.add_argument("--no-caching", dest="enable_caching", action="store_false",
                           help="run every step again")


def target_from_args(args, need_root: bool = True) -> VertexTarget:
    """A checked VertexTarget from parsed options.

    Raises:
        ValueError: naming the missing or malformed option.
    """
    missing = [opt for opt, value in (("--project", args.project), ("--region", args.region))
               if not value]
    root = getattr(args, "pipeline_root", "") or ""
    if need_root and not root:
        missing.append("--pipeline-root")
    if missing:
        raise ValueError(f"{', '.join(missing)}: required for Vertex AI (or set $CLIPA_PROJECT, "
                         "$CLIPA_REGION, $CLIPA_PIPELINE_ROOT)")
    if root and not root.startswith("gs://"):
        raise ValueError(f"--pipeline-root {root!r}: expected a gs:// folder (Vertex AI keeps "
                         "artifacts in Cloud Storage)")
    return VertexTarget(args.project, args.region, root.rstrip("/"), args.service_account,
                        args.network, dict(args.label), getattr(args, "enable_caching", None),
                        args.api_endpoint)


def init_vertex(target: VertexTarget, dry_run: bool = False) -> None:
    """``aiplatform.init`` for ``target``.

    Settings made by an earlier ``aiplatform.init`` (credentials, transport, endpoint)
    stay unless ``target`` names them. A dry run needs no login: it uses anonymous
    credentials, since nothing is sent.
    """
    from google.cloud import aiplatform

    kwargs = {"project": target.project, "location": target.region}
    if target.api_endpoint:
        kwargs["api_endpoint"] = target.api_endpoint
    if dry_run:
        from google.auth.credentials import AnonymousCredentials
        kwargs["credentials"] = AnonymousCredentials()
    aiplatform.init(**kwargs)


def build_job(template_path: str, target: VertexTarget, parameter_values: dict,
              display_name: str = "", job_id: str = ""):
    """An unsent ``aiplatform.PipelineJob`` of the compiled ``template_path`` for ``target``.

    The service account and network are set on the job here, as ``submit`` would set them,
    so that ``request_of`` shows what is sent.
    """
    from google.cloud import aiplatform

    job = aiplatform.PipelineJob(
        display_name=display_name or "clipa", template_path=template_path,
        job_id=job_id or None, pipeline_root=target.pipeline_root,
        parameter_values=parameter_values, enable_caching=target.enable_caching,
        labels=target.labels or None, project=target.project, location=target.region)
    if target.service_account:
        job._gca_resource.service_account = target.service_account
    if target.network:
        job._gca_resource.network = target.network
    return job


def request_of(job) -> dict:
    """The CreatePipelineJob request that ``job.submit()`` sends, as JSON-ready data."""
    from google.protobuf import json_format

    return {"parent": job._parent, "pipelineJobId": job.job_id,
            "pipelineJob": json_format.MessageToDict(job._gca_resource._pb)}


def submit_job(job, target: VertexTarget) -> str:
    """Send ``job``; return its console link."""
    job.submit(service_account=target.service_account or None, network=target.network or None)
    return job._dashboard_uri()


def check_parameters(pipeline, values: dict) -> None:
    """Fail before sending when a required parameter of ``pipeline`` has no value."""
    inputs = pipeline.component_spec.inputs or {}
    missing = [k for k, spec in inputs.items() if spec.default is None and not spec.optional
               and k not in values]
    if missing:
        raise ValueError(f"pipeline {pipeline.name!r}: missing parameter(s) {', '.join(sorted(missing))}; "
                         "give them with --param KEY=VALUE")


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``submit`` subcommand to an argparse ``subparsers`` object."""
    from pipelines.placement import add_placement_args, add_training_job_args

    sub = subparsers.add_parser(
        "submit", help="compile and submit the training pipeline to Vertex AI Pipelines",
        description="Compile clipa_training under a placement (per-step machines and images) and "
                    "submit it as a Vertex AI PipelineJob; prints the job's console link.")
    add_vertex_args(sub)
    add_placement_args(sub)
    add_training_job_args(sub)
    sub.add_argument("--param", action="append", default=[], type=key_value("--param"), metavar="KEY=VALUE",
                     help="a pipeline parameter, e.g. --param url_list=gs://b/urls.parquet (repeatable; "
                          "url_list and eval_set are required)")
    from pipelines.training_args import add_recipe_arg

    add_recipe_arg(sub, default=None)
    from pipelines.data_source import add_download_parallelism_arg, add_shards_args

    add_shards_args(sub)
    add_download_parallelism_arg(sub)
    sub.add_argument("--dataflow", action="store_true",
                     help="run filter_shard's Beam pipeline on Dataflow (in --project/--region, temp files "
                          "under PIPELINE_ROOT/dataflow-tmp, workers on the data image)")
    sub.add_argument("--dataflow-machine-type", default="", help="Dataflow worker machine type (default: Dataflow's)")
    sub.add_argument("--dataflow-max-workers", type=int, default=0,
                     help="Dataflow autoscaling ceiling (default: Dataflow's)")
    sub.add_argument("--display-name", default="", help="the job's display name (default: clipa-training)")
    sub.add_argument("--job-id", default="", help="the job's id (default: clipa-training-TIMESTAMP)")
    sub.add_argument("--dry-run", action="store_true",
                     help="print the exact CreatePipelineJob request as JSON and send nothing")
    sub.add_argument("--no-data-check", action="store_true",
                     help="check the parameters only, not the URL list and eval set (for paths "
                          "this machine cannot read)")
    return sub


def run_submit(args) -> int:
    """``clipa submit``: check, compile, build the job, then print or send it."""
    from pipelines.placement import placement_from_args
    from pipelines.compile import compile_pipeline, get_pipeline

    target = target_from_args(args)
    pipeline = get_pipeline("training")
    from pipelines.data_source import shards_arguments, source_from_args

    source = source_from_args(args)
    if args.shards:  # fail here when nothing matches (each tar is checked by import_shards)
        from components.filter_shard.existing import resolve_shards
        resolve_shards(args.shards)
    values = {**shards_arguments(args), **typed_params(args.param, pipeline.component_spec.inputs)}
    check_parameters(pipeline, values)
    from pipelines.training_args import recipe_parameters

    values = recipe_parameters(values, args.recipe)
    from pipelines.preflight import preflight

    preflight(values, check_data=not args.no_data_check)  # before anything is compiled or sent
    placement = placement_from_args(args)
    if args.dataflow:
        from pipelines.placement import with_dataflow
        placement = with_dataflow(placement, target.project, target.region,
                                  f"{target.pipeline_root}/dataflow-tmp", args.dataflow_machine_type,
                                  args.dataflow_max_workers)
    with tempfile.TemporaryDirectory(prefix="clipa-submit-") as tmp:
        template = compile_pipeline(os.path.join(tmp, "pipeline.yaml"), "training", placement,
                                    source)
        init_vertex(target, dry_run=args.dry_run)
        job = build_job(template, target, values, args.display_name or pipeline.name, args.job_id)
    if args.dry_run:
        print(json.dumps(request_of(job), indent=2, sort_keys=True))
        return 0
    print(submit_job(job, target))
    return 0
