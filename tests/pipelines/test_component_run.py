"""`clipa component run`: one step alone through kfp.local, and its checks before running."""
import json
import os
import re

import pytest

from pipelines.cli import main
from pipelines.component_run import COMPONENTS, get_component, one_step_pipeline, split_inputs
from pipelines.demo_data import write_eval_set
from support import make_model_artifact


def test_every_listed_component_resolves_and_has_inputs():
    for name in COMPONENTS:
        _, comp = get_component(name)
        artifacts, params = split_inputs(comp)
        assert artifacts or params, name


def test_unknown_component_lists_the_known_ones(capsys):
    assert main(["component", "run", "evaluat", "--output-uri", "out", "--local"]) == 2
    err = capsys.readouterr().err
    assert "component 'evaluat': unknown" in err and "evaluate" in err and "pretrain" in err


def test_unknown_and_missing_inputs_are_named():
    with pytest.raises(ValueError, match=r"unknown input\(s\) \['modle'\]"):
        one_step_pipeline("evaluate", {"modle": "x", "eval_set": "y"}, {})
    with pytest.raises(ValueError, match=r"--input NAME=URI for \['eval_set'\]"):
        one_step_pipeline("evaluate", {"model": "x"}, {})


def test_unknown_parameter_names_the_component(tmp_path, capsys):
    rc = main(["component", "run", "pretrain", "--input", "data=x", "--param", "recipes=smoke",
               "--output-uri", str(tmp_path), "--local"])
    assert rc == 2
    assert re.search("unknown pretrain parameter 'recipes'.*recipe", capsys.readouterr().err)


def test_local_run_refuses_a_gs_output():
    with pytest.raises(SystemExit):  # argparse: --output-uri is required
        main(["component", "run", "evaluate", "--local"])
    assert main(["component", "run", "evaluate", "--input", "model=a", "--input", "eval_set=b",
                 "--output-uri", "gs://bkt/out", "--local"]) == 2


def test_one_step_pipeline_imports_inputs_and_types_params():
    pipe = one_step_pipeline("pretrain", {"data": "gs://bkt/filtered"}, {"procs_per_node": 2, "recipe": "smoke"})
    spec = pipe.pipeline_spec
    tasks = spec.root.dag.tasks
    assert set(tasks) == {"importer", "pretrain"}
    imp = tasks["importer"].inputs.parameters["uri"].runtime_value.constant
    assert imp.string_value == "gs://bkt/filtered"
    params = tasks["pretrain"].inputs.parameters
    assert params["procs_per_node"].runtime_value.constant.number_value == 2
    assert tasks["pretrain"].inputs.artifacts["data"].task_output_artifact.producer_task == "importer"


@pytest.mark.slow
def test_evaluate_runs_alone_through_kfp_local(tmp_path, capsys):
    model = make_model_artifact(tmp_path / "model", image_size=28)
    write_eval_set(str(tmp_path / "eval_set"), n_per_class=2, seed=0, size=32)
    out = tmp_path / "out"
    rc = main(["component", "run", "evaluate", "--input", f"model={tmp_path / 'model'}",
               "--input", f"eval_set={tmp_path / 'eval_set'}", "--output-uri", str(out), "--local"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()  # kfp.local logs there too
    printed = dict(line.split(": ", 1) for line in lines if line.startswith(("metrics: ", "report: ")))
    assert set(printed) == {"metrics", "report"}
    assert printed["report"].startswith(str(out)) and printed["report"].endswith("/evaluate/report")
    # kfp.local keeps a Metrics artifact's logged values in the task's executor output.
    task_dir = os.path.dirname(printed["metrics"])
    with open(os.path.join(task_dir, "executor_output.json")) as f:
        logged = json.load(f)["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert 0.0 <= logged["top1"] <= logged["top5"] <= 1.0
    assert logged["count"] == 2 * logged["num_classes"]
    with open(printed["report"]) as f:
        assert "<html" in f.read().lower()
