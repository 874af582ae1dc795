"""`clipa plan RECIPE`: FLOPs, accelerator-hours and cost of a recipe, before spending them.

    clipa plan paper_h14                                  # A100s, MFU from the table, list price
    clipa plan paper_h14 --accelerator tpu-v4 --utilization 0.5 --price 2.0
    clipa plan --recipe my_recipe.yaml --json             # a recipe file (or gs:// URI)

Wired into ``pipelines/cli.py`` with ``add_plan_parser(sub)`` and the "plan" -> ``run_plan``
entry of its command table.
"""
from __future__ import annotations

import argparse
import json
import sys

from clipa_model.planner import ACCELERATORS, DEFAULT_UTILIZATION, plan_recipe
from clipa_model.recipes import PLAN_RECIPES, load_recipe


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to an argparse ``subparsers`` object."""
    plan = subparsers.add_parser(
        "plan", help="training FLOPs, accelerator-hours and cost of a recipe",
        description="Per stage: FLOPs per sample (the paper's forward multiply-add unit and "
                    "real training FLOPs), total FLOPs, accelerator-hours and cost.")
    plan.add_argument("recipe", nargs="?", default=None,
                      help=f"built-in recipe ({', '.join(sorted(PLAN_RECIPES))}) or a "
                           ".yaml/.json recipe file; same as --recipe")
    plan.add_argument("--recipe", dest="recipe_option", default=None,
                      help="built-in recipe name or a .yaml/.json recipe file (local or gs://)")
    plan.add_argument("--accelerator", default="a100", choices=sorted(ACCELERATORS),
                      help="accelerator whose bf16 peak sets the hours (default: a100)")
    plan.add_argument("--utilization", type=float, default=None,
                      help="model FLOPs utilisation, a fraction in (0, 1] (default: per preset "
                           "and stage from clipa_model/planner.py's UTILIZATION table, "
                           f"{DEFAULT_UTILIZATION} where unmeasured)")
    plan.add_argument("--price", type=float, default=None,
                      help="USD per accelerator-hour (default: a rough list price)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    return plan


def _num(x: float) -> str:
    """Thousands separators for big numbers, 3 significant digits for small ones."""
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_plan(plan: dict) -> str:
    """The plan as a table: one row per stage, then the totals."""
    head = (f"{'stage':<14}{'px':>5}{'tok':>5}{'mask':>6}{'samples':>16}{'batch':>8}"
            f"{'GFLOPs*':>9}{'train TFLOP':>13}{'total FLOPs':>13}{'acc-h':>11}{'cost $':>12}")
    head += f"{'MFU':>11}"
    lines = [head, "-" * len(head)]
    for s in plan["stages"]:
        lines.append(f"{s['stage']:<14}{s['image_size']:>5}{s['text_len']:>5}"
                     f"{s['mask_ratio']:>6.0%}{s['samples']:>16,}{s['batch_size']:>8,}"
                     f"{s['paper_gflops']:>9.4g}{s['train_flops_per_sample'] / 1e12:>13.4g}"
                     f"{s['train_flops']:>13.3e}{_num(s['accelerator_hours']):>11}"
                     f"{_num(s['cost']):>12}{s['utilization']:>5.0%} {s['utilization_source']:<8}")
    t = plan["total"]
    lines += ["-" * len(head),
              f"{'total':<14}{'':>16}{t['samples']:>16,}{'':>8}{t['avg_paper_gflops']:>9.4g}"
              f"{'':>13}{t['train_flops']:>13.3e}{_num(t['accelerator_hours']):>11}"
              f"{_num(t['cost']):>12}",
              "",
              f"{plan['preset']} on {plan['accelerator']} at {_mfu(plan)}, "
              f"${plan['price_per_hour']:.2f} per accelerator-hour.",
              "* GFLOPs per sample in the CLIPA papers' unit: forward multiply-adds. Training "
              "FLOPs are 6x that (2 per multiply-add, forward + backward)."]
    return "\n".join(lines)


def _mfu(plan: dict) -> str:
    if plan["utilization"] is not None:
        return f"{plan['utilization']:.0%} utilisation"
    return ("the MFU per stage of the UTILIZATION table (clipa_model/planner.py; 'assumed' = "
            "not measured)")


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan of the recipe ``args`` name; returns the exit status."""
    ref = args.recipe_option or args.recipe
    if ref is None:
        raise ValueError("clipa plan: give a recipe (a built-in name or a .yaml/.json file)")
    plan = plan_recipe(load_recipe(ref), args.accelerator, args.utilization, args.price)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m pipelines.plan_cli RECIPE [options]``)."""
    parser = argparse.ArgumentParser(prog="clipa")
    add_plan_parser(parser.add_subparsers(dest="command", required=True))
    return run_plan(parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    raise SystemExit(main())
