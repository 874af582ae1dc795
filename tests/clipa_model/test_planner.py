"""The compute planner and the paper recipes: CLIPA-v2 Table 3, LR scaling, `clipa plan`."""
import argparse
import json

import pytest

from clipa_model.config import StageConfig
from clipa_model.planner import ACCELERATORS, paper_gflops, plan_recipe, resolved_config
from clipa_model.recipes import DEMO, PAPER_H14, PLAN_RECIPES, paper_stage
from pipelines.plan_cli import add_plan_parser, run_plan


def test_h14_reproduces_clipa_v2_table_3():
    # Table 3 counts forward multiply-adds per image-text pair, in G.
    assert paper_gflops("H/14", 224, 32) == pytest.approx(177.0, rel=0.03)
    assert paper_gflops("H/14", 336, 32, 0.4) == pytest.approx(237.8, rel=0.03)
    # The paper prints 135.9 G for 30% masking at 224 px, which its other rows do not
    # support: 30% of 256 patches leaves 179 (+ class token), 125.8 G. 135.9 G is what
    # ~24% masking costs (25%: 134.4 G, within 1.1%).
    assert paper_gflops("H/14", 224, 32, 0.3) == pytest.approx(125.8, rel=0.005)
    assert paper_gflops("H/14", 224, 32, 0.25) == pytest.approx(135.9, rel=0.03)


def test_paper_stage_scales_lr_with_batch_and_converts_warmup_steps():
    s = paper_stage("pretrain", 84, 8, 12_800_000_000, 65_536, 8e-6, 3_200)
    assert s.lr == pytest.approx(2.048e-3) and s.warmup_steps == 3_200
    assert s.betas == (0.9, 0.95) and s.weight_decay == 0.2
    pre, ft224, ft336 = (PAPER_H14[k] for k in ("pretrain", "finetune_224", "finetune_336"))
    assert (pre.image_size, pre.text_len, pre.text_reduction) == (84, 8, "syntax")
    assert ft224.lr == pytest.approx(4e-7 * 32_768 / 256) and ft224.mask_ratio == 0.3
    assert ft336.lr == pytest.approx(1e-7 * 16_384 / 256) and ft336.warmup_steps == 1_600
    assert (ft336.image_size, ft336.mask_ratio, ft336.image_mask) == (336, 0.4, "random")


def test_plan_totals_hours_and_cost():
    plan = plan_recipe(PAPER_H14, "a100", 0.5, price_per_hour=2.0)
    stages = plan["stages"]
    assert [s["stage"] for s in stages] == ["pretrain", "finetune_224", "finetune_336"]
    total = plan["total"]
    assert total["train_flops"] == pytest.approx(sum(s["train_flops"] for s in stages))
    hours = total["train_flops"] / (ACCELERATORS["a100"].peak_flops * 0.5) / 3600
    assert total["accelerator_hours"] == pytest.approx(hours)
    assert total["cost"] == pytest.approx(2.0 * hours)
    # Training FLOPs are 6x the paper's unit; the finetunes average 156 G in the paper.
    assert stages[2]["train_flops_per_sample"] == pytest.approx(6e9 * stages[2]["paper_gflops"])
    assert stages[0]["paper_gflops"] < stages[1]["paper_gflops"] < stages[2]["paper_gflops"]
    with pytest.raises(ValueError, match="utilization"):
        plan_recipe(PAPER_H14, "a100", 1.5)


def _args(*argv):
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["plan", *argv])


def test_clipa_plan_prints_every_stage(capsys):
    assert run_plan(_args("paper_h14", "--accelerator", "tpu-v4", "--price", "1.5")) == 0
    out = capsys.readouterr().out
    for word in ("pretrain", "finetune_224", "finetune_336", "total", "tpu-v4", "$1.50"):
        assert word in out
    assert run_plan(_args("demo", "--json")) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["preset"] == DEMO.preset and len(plan["stages"]) == 3
    for name in PLAN_RECIPES:  # every named recipe plans
        plan_recipe(PLAN_RECIPES[name])


def test_resolved_config_holds_the_derived_values():
    stage = StageConfig(image_size=224, text_len=32, mask_ratio=0.3, samples=1000, batch_size=64)
    r = resolved_config(stage, "H/14", world_size=8, device="cuda:0", data_count=500)
    assert r["per_rank_batch"] == 8 and r["steps"] == 16 and r["epochs"] == 2.0
    assert r["image_tokens"] == 1 + 179 and r["text_tokens"] == 32
    assert r["paper_gflops_per_sample"] == pytest.approx(125.8, rel=0.005)


def test_plan_reads_utilization_per_preset_and_stage_from_one_table(monkeypatch):
    from clipa_model import planner

    plan = plan_recipe(PAPER_H14, "h100")
    assert plan["utilization"] is None
    assert {(s["utilization"], s["utilization_source"]) for s in plan["stages"]} == {
        (planner.DEFAULT_UTILIZATION, "assumed")}
    monkeypatch.setitem(planner.UTILIZATION, ("h100", "H/14", "finetune_224"), 0.5)
    stages = {s["stage"]: s for s in plan_recipe(PAPER_H14, "h100")["stages"]}
    assert (stages["finetune_224"]["utilization"], stages["finetune_224"]["utilization_source"]) == (0.5, "measured")
    base = {s["stage"]: s for s in plan["stages"]}
    assert stages["finetune_224"]["accelerator_hours"] == pytest.approx(
        base["finetune_224"]["accelerator_hours"] * planner.DEFAULT_UTILIZATION / 0.5)
    assert stages["pretrain"] == base["pretrain"]
    # This machine's CPU prices the guard of local runs: the demo fits a day, the paper does not.
    cpu = planner.local_cpu(2)
    assert cpu.peak_flops == 2 * planner.CPU_CORE_FLOPS
    assert plan_recipe(DEMO, cpu, 1.0)["total"]["accelerator_hours"] < 1
    assert plan_recipe(PAPER_H14, cpu, 1.0)["total"]["accelerator_hours"] > 1e6
