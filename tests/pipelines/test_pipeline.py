"""The pipeline as users meet it: compiled YAML, the `clipa` CLI, and one real local run."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import open_clip
import pandas as pd
import pytest
import yaml

from components.cli_args import json_items, key_value, typed_params
from pipelines import cli
from pipelines.compile import compile_pipeline
from pipelines.training_pipeline import clipa_training, pipeline_arguments
from clipa_model import recipes
from support import REPO_ROOT



def test_checked_in_pipeline_yaml_is_current(tmp_path):
    fresh = compile_pipeline(str(tmp_path / "pipeline.yaml"))
    with open(fresh) as f:
        expected = f.read()
    with open(os.path.join(REPO_ROOT, "pipeline.yaml")) as f:
        assert f.read() == expected, "pipeline.yaml is stale: run `make compile` and commit it"


def test_compiled_pipeline_chains_all_stages_in_order(tmp_path):
    spec = yaml.safe_load(open(compile_pipeline(str(tmp_path / "p.yaml"))))
    tasks = spec["root"]["dag"]["tasks"]
    deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
    assert deps["filter-shard"] == {"download"}
    assert "filter-shard" in deps["pretrain"]
    assert {"pretrain", "filter-shard"} <= deps["finetune"]
    assert "finetune" in deps["finetune-2"]
    evals = [n for n in tasks if n.startswith("evaluate")]
    assert len(evals) == 3
    assert {"download", "filter-shard", "finetune-2", *evals} <= deps["summarize"]


@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_maps_onto_pipeline_parameters(name):
    args = pipeline_arguments(recipes.RECIPES[name], name)
    inputs = clipa_training.component_spec.inputs
    assert set(args) <= set(inputs) and args["recipe"] == name


def test_demo_recipe_runs_with_the_seed_its_numbers_were_measured_with():
    # The README's demo table is one seed's run; `clipa run` must reproduce that seed,
    # and the recipe's stages carry it too (the pipeline's seed reaches every stage).
    assert pipeline_arguments(recipes.DEMO, "demo")["seed"] == recipes.DEMO.seed != 0
    for recipe in recipes.PLAN_RECIPES.values():
        assert {s.seed for s in recipe.stages.values()} == {recipe.seed}
    default = clipa_training.component_spec.inputs["seed"].default
    assert pipeline_arguments(recipes.PAPER_H14, "paper_h14")["seed"] == default


def test_help_documents_every_option(capsys):
    for argv in (["--help"], ["run", "--help"], ["compile", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--recipe", "--url-list", "--eval-set", "--workdir", "--param", "--output"):
        assert option in text


def test_param_override_is_typed_and_checked():
    inputs = clipa_training.component_spec.inputs
    assert typed_params([("train_procs_per_node", "2"), ("max_aspect_ratio", "2.5"),
                         ("stage_overrides", '{"pretrain": {"samples": 2000}}')], inputs) == {
        "train_procs_per_node": 2, "max_aspect_ratio": 2.5,
        "stage_overrides": {"pretrain": {"samples": 2000}}}
    with pytest.raises(ValueError, match="unknown pipeline parameter 'no_such'"):
        typed_params([("no_such", "1")], inputs)
    with pytest.raises(ValueError, match="expected a Integer"):
        typed_params([("train_procs_per_node", "many")], inputs)


def test_key_value_flags_share_one_parser(capsys):
    """Every CLI's KEY=VALUE flag goes through components.cli_args: same split, same error."""
    assert key_value("--param")("a = b=c") == ("a", "b=c")
    with pytest.raises(SystemExit):
        cli.main(["run", "--param", "no-equals-sign"])
    assert "--param expects KEY=VALUE, got 'no-equals-sign'" in capsys.readouterr().err
    assert json_items([("n", "3"), ("flag", "true"), ("s", "x y")]) == {"n": 3, "flag": True, "s": "x y"}
    with pytest.raises(ValueError, match="unknown StageConfig field 'nope'"):
        json_items([("nope", "1")], {"lr": 1}, what="StageConfig field")


def _no_file(path):
    pass


def _csv_without_url(path):
    pd.DataFrame({"link": ["http://x/a.jpg"], "caption": ["a cat"]}).to_csv(path, index=False)


def _garbage(path):
    path.write_bytes(b"\x00\x01garbage\xff" * 50)


@pytest.mark.parametrize("name, make_file, problem", [
    ("missing.parquet", _no_file, r"not found|does not exist|no such"),
    ("list.csv", _csv_without_url, r"url"),
    ("list.parquet", _garbage, r"parquet|read"),
])
def test_bad_url_list_stops_before_any_work(tmp_path, capsys, name, make_file, problem):
    url_list = tmp_path / name
    make_file(url_list)
    workdir = tmp_path / "run"
    code = cli.main(["run", "--url-list", str(url_list), "--eval-set", str(tmp_path),
                     "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(url_list) in err
    assert re.search(problem, err, flags=re.IGNORECASE), err
    assert not workdir.exists(), "nothing may be written before the URL list is validated"


# The smoke run trains every step as 2 gloo processes; pretraining in fp32 and without
# loader processes so that its weights can be compared with one process (test_scale.py).
TWO_PROCS = ["--param", "train_procs_per_node=2", "--param",
             'stage_overrides={"pretrain": {"precision": "fp32", "num_workers": 0}}']


@pytest.mark.slow
def test_clipa_run_smoke_end_to_end(tmp_path):
    """`clipa run` on the embedded default, smoke recipe: every stage for real via kfp.local,
    each training step as 2 processes."""
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--recipe", "smoke",
                           "--workdir", str(workdir), *TWO_PROCS], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary_files = list(workdir.glob("pipeline_root/*/summarize/summary"))
    assert len(summary_files) == 1
    summary = json.loads(summary_files[0].read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == ["download", "filter_shard", "pretrain", "finetune_224", "finetune_336"]

    demo = recipes.SMOKE
    dl, fl = stages["download"], stages["filter_shard"]
    assert dl["samples_in"] > demo.n_train          # good rows plus the bad ones
    assert dl["failures"] and dl["samples_out"] < dl["samples_in"]   # 404s, HTML bodies
    assert fl["samples_in"] == dl["samples_out"]
    assert fl["dropped"].get("duplicate_sha256", 0) > 0 and fl["dropped"].get("min_side", 0) > 0
    assert 0 < fl["samples_out"] < fl["samples_in"]
    for name in ("pretrain", "finetune_224", "finetune_336"):
        cfg = demo.stages[name]
        assert stages[name]["image_size"] == cfg.image_size
        assert stages[name]["samples_seen"] >= cfg.samples
        assert 0.0 <= stages[name]["top1"] <= stages[name]["top5"] <= 1.0
    assert summary["final"]["top1"] == stages["finetune_336"]["top1"]

    out = proc.stdout
    for name in stages:
        assert name in out
    # The console: a short view (a line per step as it starts and ends), the full log in a file.
    log_path = workdir / "clipa-run.log"
    assert f"full log: {log_path}" in out
    assert len(out.splitlines()) < 60, out
    for task in ("split-url-list", "download-part", "filter-shard", "pretrain-84", "finetune-224",
                 "finetune-336", "evaluate-finetune-336", "summarize"):
        assert re.search(rf"\] {task} done in [\d.]+ s", out), task
    assert re.search(r"pretrain-84 done in .*samples/s", out)
    log = log_path.read_text()
    assert "executor_input" in log and "executor_input" not in out
    assert "final zero-shot top-1" in out and "mean-colour" in out
    # The export: open_clip loads it, and its model card has every stage's zero-shot top-1.
    export = out.split("Hugging Face Hub folder, model card README.md): ")[1].splitlines()[0]
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{export}")
    assert model.visual.image_size == (demo.stages["finetune_336"].image_size,) * 2
    card = open(os.path.join(export, "README.md")).read()
    for name in ("pretrain", "finetune_224", "finetune_336"):
        assert f"| {name} | {stages[name]['top1']:.1%} | {stages[name]['top5']:.1%} |" in card
    report = out.strip().splitlines()[-1].split("report: ")[-1]
    html = open(report).read()
    assert html.count("data:image/png;base64") >= 2 and "finetune_336" in html
    _check_two_process_steps(workdir, demo)


def _check_two_process_steps(workdir, recipe) -> None:
    """Every step trained as world size 2 with its whole recipe stage; pretraining's weights
    equal one process on the same global batches."""
    import torch
    from clipa_model.config import StageConfig
    from test_scale import assert_same_weights, one_process_weights

    run = next((workdir / "pipeline_root").glob("clipa-training-*"))
    for task, name in (("pretrain", "pretrain"), ("finetune", "finetune_224"),
                       ("finetune-2", "finetune_336")):
        resolved = json.loads((run / task / "model" / "resolved_config.json").read_text())
        assert (resolved["world_size"], resolved["procs_per_node"], resolved["nodes"]) == (2, 2, 1)
        expected = recipe[name].replace(**({"precision": "fp32", "num_workers": 0}
                                           if name == "pretrain" else {}))
        assert StageConfig.from_dict(resolved["stage"]) == expected
    stage = StageConfig.from_dict(
        json.loads((run / "pretrain" / "model" / "resolved_config.json").read_text())["stage"])
    got = torch.load(run / "pretrain" / "model" / "checkpoint.pt", weights_only=True)
    # 16 AdamW steps in fp32: two processes sum the gradient in another order than one, and
    # Adam's normalisation turns those 1e-7 differences in near-zero gradients into up to
    # 1.3e-4 of weight (measured), under one step's size (lr 7e-4). A wrong batch or a
    # missing gradient sync moves weights by the size of the whole update (6.2e-3, measured),
    # checked below to stand well clear of the tolerance.
    expected = one_process_weights(str(run / "filter-shard" / "filtered"), stage, 2)
    assert_same_weights(got, expected, atol=5e-4)
    torch.manual_seed(stage.seed)
    from clipa_model.model import build_model
    init = build_model("tiny", stage.image_size, stage.text_len).state_dict()
    update = max((expected[k] - init[k]).abs().max().item() for k in init)
    assert update > 5 * 5e-4, update
