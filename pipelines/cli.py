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
import contextlib
import logging
import os
import sys
import time

from clipa_model import recipes
from components.cli_args import key_value, typed_params
from pipelines.data_source import (add_download_parallelism_arg, add_shards_args,
                                   source_from_args)
from pipelines.placement import add_placement_args, add_training_job_args, placement_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline locally (kfp.local, Beam local runner, CPU)",
                         description="Run download -> filter_shard -> pretrain -> finetune 224 -> "
                                     "finetune 336 -> evaluate on this machine and print a summary.")
    run.add_argument("--recipe", default="demo",
                     help="stage settings and demo data size: a built-in name "
                          f"({', '.join(sorted(recipes.RECIPES))}) or a .yaml/.json recipe file "
                          "(default: demo)")
    run.add_argument("--force-long-run", action="store_true",
                     help="run even if `clipa plan` prices the recipe above a day of this machine")
    run.add_argument("--url-list", default=None,
                     help="URL list (parquet, csv or jsonl with url and caption columns); "
                          "default: the embedded synthetic dataset served on 127.0.0.1")
    run.add_argument("--eval-set", default=None,
                     help="zero-shot eval set folder (docs/ARTIFACTS.md); required with --url-list")
    run.add_argument("--workdir", default=None,
                     help="folder for this run's data and artifacts (default: runs/<timestamp>)")
    run.add_argument("--param", action="append", default=[], type=key_value("--param"), metavar="KEY=VALUE",
                     help="override one pipeline parameter, e.g. --param train_procs_per_node=2 or "
                          "--param stage_overrides='{\"pretrain\": {\"samples\": 2000}}' (repeatable)")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show kfp.local's full output live (it always goes to WORKDIR/clipa-run.log)")
    run.add_argument("--report-to", default=None, metavar="tensorboard,wandb",
                     help="live metrics of the training stages: tensorboard, wandb, both "
                          "comma-separated, or none (default: tensorboard; the report_to parameter)")
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
    add_training_job_args(comp)
    from pipelines.training_args import add_recipe_arg

    add_recipe_arg(comp, default=None)
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
    from components.run_report import format_summary
    from pipelines.local import run_local
    from pipelines.training_pipeline import clipa_training

    workdir = os.path.abspath(args.workdir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    overrides = typed_params(args.param, clipa_training.component_spec.inputs)
    if args.report_to is not None:
        overrides["report_to"] = args.report_to
    if "report_to" in overrides:  # a typo fails now, not after download and filter
        from clipa_model.live_log import parse_report_to
        parse_report_to(overrides["report_to"])
    log_path = os.path.join(workdir, LOG_NAME)
    with _run_log(log_path, args.verbose) as view:
        print(f"clipa run: recipe {args.recipe}, workdir {workdir}; full log: {log_path}", flush=True)
        result = run_local(workdir, args.recipe, args.url_list, args.eval_set, overrides, view,
                           args.force_long_run, shards=args.shards, no_filter=args.no_filter)
    print()
    print(format_summary(result.summary))
    print(f"exported model (open_clip / Hugging Face Hub folder, model card README.md): {result.export_path}")
    print(f"total {result.seconds:.0f}s; report: {result.report_path}")
    return 0


LOG_NAME = "clipa-run.log"


@contextlib.contextmanager
def _run_log(log_path: str, verbose: bool):
    """A ``LiveView`` on stdout whose full log is ``log_path``; this process's own log
    records go to that file too (warnings and errors also to the console).

    The log file is opened only once the run starts: a run refused by its checks leaves no
    folder behind.
    """
    from pipelines.console import LiveView

    class _LazyFile:  # the workdir exists only after run_local's checks passed
        def __init__(self):
            self.f = None

        def write(self, text):
            if self.f is None:
                os.makedirs(os.path.dirname(log_path), exist_ok=True)
                self.f = open(log_path, "a", buffering=1)
            return self.f.write(text)

        def flush(self):
            if self.f is not None:
                self.f.flush()

    log_file = _LazyFile()
    view = LiveView(log_file, sys.stdout, verbose=verbose)
    root = logging.getLogger()
    saved = root.handlers[:]
    file_handler = logging.StreamHandler(view)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.DEBUG if verbose else logging.WARNING)
    root.handlers = [file_handler, console]
    try:
        yield view
    finally:
        root.handlers = saved
        if log_file.f is not None:
            log_file.f.close()


def cmd_compile(args) -> int:
    from pipelines.compile import compile_pipeline

    defaults = {}
    if args.recipe:  # the compiled pipeline's defaults run that recipe
        from pipelines.training_args import check_training_parameters, recipe_value
        from pipelines.training_pipeline import pipeline_arguments

        if args.pipeline != "training":
            raise ValueError(f"--recipe: only the training pipeline takes a recipe, not {args.pipeline!r}")
        defaults = pipeline_arguments(recipes.load_recipe(args.recipe), recipe_value(args.recipe, inline=True))
        check_training_parameters(defaults)
    output = compile_pipeline(args.output, args.pipeline, placement_from_args(args),
                              source_from_args(args), defaults)
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
    if (sys.argv[1:] if argv is None else argv)[:1] == ["run"]:
        # A local run's processes and temporary folders end with it, a SIGKILL included;
        # entered before the parser's imports, which make temporary folders too.
        from pipelines.process_guard import guarded_tasks

        with guarded_tasks():
            return _dispatch(build_parser().parse_args(argv))
    return _dispatch(build_parser().parse_args(argv))


def _dispatch(args) -> int:
    """Run the subcommand; an expected input error is one line and exit status 2."""
    from components.download.component import UrlListError

    try:
        return COMMANDS[args.command](args)
    except (UrlListError, ValueError) as e:
        print(f"clipa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
