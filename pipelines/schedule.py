"""`clipa schedule`: periodic benchmark evaluations on Vertex AI (the eval pipeline).

    clipa schedule create --cron "0 3 * * 1" --time-zone Europe/Paris \\
        --model ours=gs://b/runs/42/model --model open_clip:ViT-B-16-CLIPA:gs://b/w/clipa_b16.bin \\
        --benchmark imagenet=zeroshot:gs://b/imagenet-val --history gs://b/history \\
        --project P --region us-central1 --pipeline-root gs://b/root
    clipa schedule list | pause ID | resume ID | delete ID    (ID: number or full resource name)

Each run evaluates every model on every benchmark and appends its rows to the history
(pipelines/eval_pipeline.py). The cron, the time zone, the start/end times and the
benchmark specs are checked here, before anything is sent.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from datetime import datetime

# Cron fields: (name, lowest, highest, names usable instead of numbers).
_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
CRON_FIELDS = (("minute", 0, 59, None), ("hour", 0, 23, None), ("day of month", 1, 31, None),
               ("month", 1, 12, _MONTHS), ("day of week", 0, 7, _DAYS))


def _cron_value(text: str, field: tuple, cron: str) -> int:
    name, low, high, names = field
    if names and text.upper() in names:
        return names.index(text.upper()) + (1 if name == "month" else 0)
    if not text.isdigit():
        raise ValueError(f"cron {cron!r}: {name} {text!r} is not a number"
                         + (f" or one of {','.join(names)}" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"cron {cron!r}: {name} {value} out of range {low}-{high}")
    return value


def validate_cron(cron: str) -> str:
    """Check a 5-field cron (minute hour day-of-month month day-of-week); return it stripped.

    Each field is ``*``, a value, a range ``a-b``, any of them with a step ``/n``, or a
    comma list of those. Raises ValueError naming the field and the expected range.
    """
    parts = cron.split()
    if len(parts) != 5:
        raise ValueError(f"cron {cron!r}: expected 5 fields (minute hour day-of-month month "
                         f"day-of-week), got {len(parts)}; e.g. '0 3 * * 1' is Mondays at 03:00")
    for text, field in zip(parts, CRON_FIELDS):
        for item in text.split(","):
            base, sep, step = item.partition("/")
            if sep and (not step.isdigit() or int(step) == 0):
                raise ValueError(f"cron {cron!r}: {field[0]} step {step!r} must be a positive number")
            if base == "*":
                continue
            low, dash, high = base.partition("-")
            first = _cron_value(low, field, cron)
            if dash and _cron_value(high, field, cron) < first:
                raise ValueError(f"cron {cron!r}: {field[0]} range {base!r} runs backwards")
    return " ".join(parts)


def cron_with_time_zone(cron: str, time_zone: str) -> str:
    """Vertex's form of a cron in a time zone: ``TZ=Europe/Paris 0 3 * * 1``."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    cron = validate_cron(cron)
    if not time_zone or time_zone == "UTC":
        return cron
    try:
        ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"--time-zone {time_zone!r}: expected an IANA time zone such as "
                         "'Europe/Paris' or 'America/New_York'") from None
    return f"TZ={time_zone} {cron}"


def _rfc3339(option: str, text: str) -> str:
    """``text`` if it is an RFC 3339 time with a zone (what Vertex expects), else ValueError."""
    if not text:
        return ""
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ValueError(f"{option} {text!r}: expected an RFC 3339 time with a zone, "
                         "e.g. 2026-01-05T03:00:00Z")
    return text


def eval_parameters(models: list[str], benchmarks: list[str], history: str,
                    batch_size: int, device: str) -> dict:
    """The eval pipeline's parameters, checked (benchmark specs parse, lists not empty)."""
    from clipa_model.eval.benchmarks import parse_benchmark

    if not models:
        raise ValueError("--model: at least one model reference is required")
    if not benchmarks:
        raise ValueError("--benchmark: at least one [NAME=]zeroshot|retrieval:PATH is required")
    for spec in benchmarks:
        parse_benchmark(spec)
    if not history:
        raise ValueError("--history: the parquet history folder (gs://...) is required")
    return {"models": list(models), "benchmarks": list(benchmarks), "history": history,
            "batch_size": batch_size, "device": device}


def create_schedule(target, parameters: dict, cron: str, time_zone: str = "UTC",
                    max_concurrent_runs: int = 1, start_time: str = "", end_time: str = "",
                    display_name: str = "clipa-benchmarks", placement=None):
    """Compile the eval pipeline under ``placement`` and create its Vertex AI schedule.

    Args:
        target: a pipelines.vertex.VertexTarget (project, region, gs:// root, identity).
        parameters: eval_parameters(...) output.
    Returns:
        The created ``aiplatform.PipelineJobSchedule``.
    """
    from pipelines.compile import compile_pipeline
    from pipelines.vertex import build_job, init_vertex

    cron = cron_with_time_zone(cron, time_zone)
    start_time, end_time = _rfc3339("--start-time", start_time), _rfc3339("--end-time", end_time)
    if max_concurrent_runs < 1:
        raise ValueError(f"--max-concurrent-runs {max_concurrent_runs}: expected 1 or more")
    with tempfile.TemporaryDirectory(prefix="clipa-schedule-") as tmp:
        template = compile_pipeline(os.path.join(tmp, "eval_pipeline.yaml"), "eval", placement)
        init_vertex(target)
        job = build_job(template, target, parameters, display_name)
    return job.create_schedule(
        cron=cron, display_name=display_name, start_time=start_time or None,
        end_time=end_time or None, max_concurrent_run_count=max_concurrent_runs,
        service_account=target.service_account or None, network=target.network or None)


def _schedule_name(target, schedule_id: str) -> str:
    """A full resource name from a schedule number or name."""
    if schedule_id.startswith("projects/"):
        return schedule_id
    return f"projects/{target.project}/locations/{target.region}/schedules/{schedule_id}"


def manage_schedule(target, action: str, schedule_id: str = "") -> list:
    """``list`` (returns the schedules of the eval pipeline's kind), ``pause``, ``resume``
    or ``delete`` one schedule. Returns the schedules acted on."""
    from google.cloud import aiplatform

    from pipelines.vertex import init_vertex

    init_vertex(target)
    if action == "list":
        return list(aiplatform.PipelineJobSchedule.list(project=target.project,
                                                        location=target.region))
    if not schedule_id:
        raise ValueError(f"clipa schedule {action}: expected a schedule id (see clipa schedule list)")
    sched = aiplatform.PipelineJobSchedule.get(_schedule_name(target, schedule_id),
                                               project=target.project, location=target.region)
    getattr(sched, action)()
    return [sched]


def add_schedule_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``schedule create|list|pause|resume|delete`` to an argparse ``subparsers`` object."""
    from pipelines.placement import add_placement_args
    from pipelines.vertex import add_vertex_args

    sched = subparsers.add_parser("schedule", help="periodic benchmark evaluations on Vertex AI",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = sched.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="schedule the eval pipeline (clipa_benchmarks)")
    create.add_argument("--cron", required=True,
                        help="5-field cron: minute hour day-of-month month day-of-week, e.g. '0 3 * * 1'")
    create.add_argument("--time-zone", default="UTC", help="IANA time zone of the cron (default: UTC)")
    create.add_argument("--max-concurrent-runs", type=int, default=1,
                        help="runs of this schedule at once (default: 1)")
    create.add_argument("--start-time", default="", help="first run not before, RFC 3339 (default: now)")
    create.add_argument("--end-time", default="", help="no run after, RFC 3339 (default: never)")
    create.add_argument("--model", action="append", default=[],
                        help="model reference: [NAME=]folder, or open_clip:ARCH:FILE (repeatable)")
    create.add_argument("--benchmark", action="append", default=[],
                        help="[NAME=]zeroshot|retrieval:PATH (repeatable)")
    create.add_argument("--history", default="", help="parquet history folder each run appends to")
    create.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    create.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="evaluation device (default: auto)")
    create.add_argument("--display-name", default="clipa-benchmarks", help="the schedule's name")
    add_vertex_args(create)
    add_placement_args(create)
    for action, text in (("list", "list the schedules"), ("pause", "pause a schedule"),
                         ("resume", "resume a paused schedule"), ("delete", "delete a schedule")):
        act = actions.add_parser(action, help=text)
        if action != "list":
            act.add_argument("schedule_id", help="schedule number or full resource name")
        add_vertex_args(act, pipeline_root=False)
    return sched


def run_schedule(args) -> int:
    """``clipa schedule ...``: print what was created, listed or changed."""
    from pipelines.placement import placement_from_args
    from pipelines.vertex import target_from_args

    if args.action == "create":
        target = target_from_args(args)
        if target.enable_caching:
            raise ValueError("--enable-caching: not for schedules; the eval pipeline's steps must "
                             "re-read the models and benchmarks and append on every run")
        params = eval_parameters(args.model, args.benchmark, args.history, args.batch_size, args.device)
        sched = create_schedule(target, params, args.cron, args.time_zone, args.max_concurrent_runs,
                                args.start_time, args.end_time, args.display_name,
                                placement_from_args(args))
        print(f"created {sched.resource_name} ({sched.cron})")
        return 0
    target = target_from_args(args, need_root=False)
    for sched in manage_schedule(target, args.action, getattr(args, "schedule_id", "")):
        gca = sched._gca_resource
        print(json.dumps({"name": gca.name, "display_name": gca.display_name, "cron": gca.cron,
                          "state": gca.state.name if args.action == "list" else f"{args.action} sent"}))
    return 0
