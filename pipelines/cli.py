"""`clipa`: run the CLIPA pipeline locally, or compile it for Vertex AI Pipelines.

    clipa run                       # the whole pipeline on the embedded synthetic default
    clipa run --recipe smoke        # the same, much smaller (about a minute of training)
    clipa run --url-list urls.parquet --eval-set eval_set/   # your own data
    clipa compile --output pipeline.yaml
    clipa plan paper_h14 --accelerator a100 --utilization 0.4   # FLOPs, hours and cost
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from clipa_model import recipes


def _parse_param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param expects KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def _coerce(params: list[tuple[str, str]]) -> dict:
    """Turn KEY=VALUE strings into the pipeline parameters' own types."""
    from pipelines.training_pipeline import clipa_training

    inputs = clipa_training.component_spec.inputs
    casts = {"Integer": int, "Float": float, "String": str,
             "Boolean": lambda v: v.lower() in ("1", "true", "yes")}
    out = {}
    for key, value in params:
        if key not in inputs:
            raise SystemExit(f"clipa: unknown pipeline parameter {key!r}; known: {', '.join(sorted(inputs))}")
        cast = casts.get(inputs[key].type, str)
        try:
            out[key] = cast(value)
        except ValueError:
            raise SystemExit(f"clipa: --param {key}={value!r}: expected a {inputs[key].type}") from None
    return out


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
    run.add_argument("--param", action="append", default=[], type=_parse_param, metavar="KEY=VALUE",
                     help="override one pipeline parameter, e.g. --param pretrain_samples=20000 (repeatable)")

    comp = sub.add_parser("compile", help="compile the pipeline to KFP IR YAML (what Vertex AI runs)")
    comp.add_argument("--output", default="pipeline.yaml", help="where to write it (default: pipeline.yaml)")

    from pipelines.plan_cli import add_plan_parser

    add_plan_parser(sub)
    return parser


def cmd_run(args) -> int:
    from pipelines.local import run_local
    from components.report import format_summary

    workdir = args.workdir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    overrides = _coerce(args.param)
    result = run_local(os.path.abspath(workdir), args.recipe, args.url_list, args.eval_set, overrides)
    print()
    print(format_summary(result.summary))
    print(f"total {result.seconds:.0f}s; report: {result.report_path}")
    return 0


def cmd_compile(args) -> int:
    from pipelines.compile import compile_pipeline

    compile_pipeline(args.output)
    print(f"wrote {args.output}")
    return 0


def cmd_plan(args) -> int:
    from pipelines.plan_cli import run_plan

    return run_plan(args)


# Subcommand -> handler; each takes the parsed arguments and returns the exit status.
COMMANDS = {"run": cmd_run, "compile": cmd_compile, "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's import phones home
    args = build_parser().parse_args(argv)
    from components.download import UrlListError

    try:
        return COMMANDS[args.command](args)
    except (UrlListError, ValueError) as e:
        print(f"clipa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
