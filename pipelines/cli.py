"""`clipa`: run the CLIPA pipeline locally, or compile, submit and schedule it on Vertex AI.

    clipa run                       # the whole pipeline on the embedded synthetic default
    clipa run --recipe smoke        # the same, much smaller (about a minute of training)
    clipa run --url-list urls.parquet --eval-set eval_set/   # your own data
    clipa run --shards 'gs://b/datacomp/shards/*.tar' --eval-set eval_set/  # shards you have
    clipa compile --output pipeline.yaml
    clipa compile --pipeline eval --placement a3-highgpu-8g --train-image IMAGE
    clipa submit --project P --region us-central1 --pipeline-root gs://b/root --param url_list=gs://...
    clipa schedule create --cron "0 3 * * 1" --model ours=gs://... --benchmark zeroshot:gs://...
    clipa component run evaluate --input model=gs://... --input eval_set=gs://... --local
    clipa plan paper_h14 --accelerator a100 --utilization 0.4   # FLOPs, hours and cost
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from clipa_model import recipes
from components.cli_args import key_value, typed_params
from pipelines.data_source import (add_download_parallelism_arg, add_shards_args,
                                   source_from_args)
from pipelines.placement import add_placement_args, placement_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline locally (kfp.local, Beam local runner, CPU)",
                         description="Run download -> filter_shard -> pretrain -> finetune 224 -> "
                                     "finetune 336 -> evaluate on this machine and print a summary.")
    run.add_argument("--recipe", default="demo", choices=sorted(recipes.RECIPES),
                     help="stage settings and demo data size (default: demo)")
    run.add_argument("--url-list", default=None,
                     help="URL list (parquet, csv or jsonl with url and caption columns); "
                          "default: the embedded synthetic dataset served on 127.0.0.1")
    run.add_argument("--eval-set", default=None,
                     help="zero-shot eval set folder (docs/ARTIFACTS.md); required with --url-list")
    run.add_argument("--workdir", default=None,
                     help="folder for this run's data and artifacts (default: runs/<timestamp>)")
    run.add_argument("--param", action="append", default=[], type=key_value("--param"), metavar="KEY=VALUE",
                     help="override one pipeline parameter, e.g. --param pretrain_samples=20000 (repeatable)")
    add_shards_args(run)

    comp = sub.add_parser("compile", help="compile a pipeline to KFP IR YAML (what Vertex AI runs)",
                          description="Compile the training or the eval pipeline. Without --placement "
                                      "every step is its plain component (the checked-in YAML files); "
                                      "with one, steps get machines and images (docs/VERTEX.md).")
    comp.add_argument("--pipeline", default="training", choices=("training", "eval"),
                      help="training (clipa_training) or eval (clipa_benchmarks) (default: training)")
    comp.add_argument("--output", default=None,
                      help="where to write it (default: pipeline.yaml, or eval_pipeline.yaml for --pipeline eval)")
    add_placement_args(comp, default=None)
    add_download_parallelism_arg(comp)
    comp.add_argument("--from-shards", action="store_true",
                      help="compile the variant that starts from existing shards (parameter "
                           "shards) instead of downloading url_list")

    from pipelines.component_run import add_component_parser
    from pipelines.plan_cli import add_plan_parser
    from pipelines.schedule import add_schedule_parser
    from pipelines.vertex import add_submit_parser

    add_plan_parser(sub)
    add_submit_parser(sub)
    add_schedule_parser(sub)
    add_component_parser(sub)
    return parser


def cmd_run(args) -> int:
    from pipelines.local import run_local
    from components.run_report import format_summary

    workdir = args.workdir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    from pipelines.training_pipeline import clipa_training

    overrides = typed_params(args.param, clipa_training.component_spec.inputs)
    result = run_local(os.path.abspath(workdir), args.recipe, args.url_list, args.eval_set, overrides,
                       shards=args.shards, no_filter=args.no_filter)
    print()
    print(format_summary(result.summary))
    print(f"total {result.seconds:.0f}s; report: {result.report_path}")
    return 0


def cmd_compile(args) -> int:
    from pipelines.compile import compile_pipeline

    output = compile_pipeline(args.output, args.pipeline, placement_from_args(args),
                              source_from_args(args))
    print(f"wrote {output}")
    return 0


def cmd_plan(args) -> int:
    from pipelines.plan_cli import run_plan

    return run_plan(args)


# Subcommand -> handler; each takes the parsed arguments and returns the exit status.
def cmd_submit(args) -> int:
    from pipelines.vertex import run_submit

    return run_submit(args)


def cmd_schedule(args) -> int:
    from pipelines.schedule import run_schedule

    return run_schedule(args)


def cmd_component(args) -> int:
    from pipelines.component_run import run_component_cli

    return run_component_cli(args)


COMMANDS = {"run": cmd_run, "compile": cmd_compile, "plan": cmd_plan, "submit": cmd_submit,
            "schedule": cmd_schedule, "component": cmd_component}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's import phones home
    args = build_parser().parse_args(argv)
    from components.download.component import UrlListError

    try:
        return COMMANDS[args.command](args)
    except (UrlListError, ValueError) as e:
        print(f"clipa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
