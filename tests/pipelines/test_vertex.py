"""`clipa submit`, `clipa schedule`, `clipa component run` on "Vertex AI": the real
google-cloud-aiplatform SDK talks REST to a recording server on 127.0.0.1, and its
pipeline-root bucket checks go to a GCS emulator (STORAGE_EMULATOR_HOST).

The one call with no local endpoint is the SDK's project-number lookup through Google's
resource manager (its bucket-ownership check); the tests replace
``resource_manager_utils.get_project_number`` with the emulator's project number (1234).
"""
import io
import json
import logging
import re
import tarfile

import pandas as pd
import pytest
from PIL import Image
from google.auth.credentials import AnonymousCredentials
from google.cloud import aiplatform
from google.cloud.aiplatform import initializer
from google.cloud.aiplatform.utils import resource_manager_utils

from clipa_model import recipes
from gcs_emulator import start_emulator
from pipelines.cli import main
from pipelines.schedule import cron_with_time_zone, validate_cron
from recording_server import recording_vertex

PROJECT, REGION, SA = "proj", "us-central1", "runner@proj.iam.gserviceaccount.com"
NETWORK = "projects/1234/global/networks/vpc"
WHERE = ["--project", PROJECT, "--region", REGION]
EMULATOR_PROJECT_NUMBER = "1234"  # what gcp-storage-emulator reports for its buckets


@pytest.fixture
def vertex(monkeypatch):
    """(recorded state, gcs filesystem): the SDK aimed at the recorder and the emulator."""
    # aiplatform.init is bound to the one global config: restore its settings afterwards.
    saved = dict(vars(initializer.global_config))
    monkeypatch.setattr(resource_manager_utils, "get_project_number",
                        lambda project, credentials=None: {PROJECT: EMULATOR_PROJECT_NUMBER}.get(project, "999"))
    with start_emulator("bkt") as (fs, gcs_endpoint), recording_vertex() as (url, state):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
        aiplatform.init(project=PROJECT, location=REGION, api_endpoint=url, api_transport="rest",
                        credentials=AnonymousCredentials())
        _put_run_data(fs)
        try:
            yield state, fs
        finally:
            vars(initializer.global_config).clear()
            vars(initializer.global_config).update(saved)


def _put_run_data(fs) -> None:
    """The URL lists and eval sets the submits name, in the emulator: ``clipa submit``
    reads them before sending (pipelines/preflight.py)."""
    urls = io.BytesIO()
    pd.DataFrame({"url": ["https://example.com/a.jpg"], "caption": ["a cat on a mat"]}).to_parquet(urls)
    image = io.BytesIO()
    Image.new("RGB", (8, 8)).save(image, format="JPEG")
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for name, data in (("0.jpg", image.getvalue()), ("0.cls", b"0")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for name in ("urls.parquet", "u.parquet"):
        fs.pipe(f"bkt/{name}", urls.getvalue())
    for name in ("eval_set", "e"):
        fs.pipe(f"bkt/{name}/000.tar", shard.getvalue())


def _submit_args(*extra):
    return ["submit", *WHERE, "--pipeline-root", "gs://bkt/root", "--param", "url_list=gs://bkt/urls.parquet",
            "--param", "eval_set=gs://bkt/eval_set", *extra]


def test_submit_sends_the_placed_pipeline(vertex, capsys, caplog):
    state, _ = vertex
    overrides = {"pretrain": {"samples": 5000}, "finetune_224": {"lr": 0.0002}}
    rc = main(_submit_args("--param", "stage_overrides=" + json.dumps(overrides),
                           "--service-account", SA, "--network", NETWORK, "--label", "team=vision",
                           "--label", "run=nightly", "--no-caching", "--train-image", "reg/train:3",
                           "--job-id", "clipa-test-1"))
    assert rc == 0
    (req,) = state.of("POST", "/pipelineJobs")
    assert req.path == f"/v1/projects/{PROJECT}/locations/{REGION}/pipelineJobs"
    assert req.query["pipelineJobId"] == "clipa-test-1"
    job = req.body
    rc_ = job["runtimeConfig"]
    assert rc_["gcsOutputDirectory"] == "gs://bkt/root"
    values = rc_["parameterValues"]
    assert values.pop("recipe") == json.dumps(recipes.DEMO.to_dict(), sort_keys=True)  # carried whole
    assert values == {"url_list": "gs://bkt/urls.parquet", "eval_set": "gs://bkt/eval_set",
                      "stage_overrides": overrides, "seed": recipes.DEMO.seed,
                      "download_image_size": recipes.DEMO.image_px}
    assert job["serviceAccount"] == SA and job["network"] == NETWORK
    assert job["labels"] == {"team": "vision", "run": "nightly"}
    spec = job["pipelineSpec"]
    assert spec["pipelineInfo"]["name"] == "clipa-training"
    assert all(t["cachingOptions"].get("enableCache") is not True for t in spec["root"]["dag"]["tasks"].values())
    pools = spec["components"]["comp-pretrain"]["inputDefinitions"]["parameters"]["worker_pool_specs"]
    (pool,) = pools["defaultValue"]
    assert pool["machine_spec"]["machine_type"] == "a3-highgpu-8g"
    assert pool["machine_spec"]["accelerator_count"] == 8
    assert pool["container_spec"]["image_uri"] == "reg/train:3"
    # Custom jobs do not inherit the job's identity: it is compiled into them.
    custom = spec["components"]["comp-pretrain"]["inputDefinitions"]["parameters"]
    assert custom["service_account"]["defaultValue"] == SA and custom["network"]["defaultValue"] == NETWORK
    link = capsys.readouterr().out.strip().splitlines()[-1]
    assert link == ("https://console.cloud.google.com/vertex-ai/locations/us-central1/pipelines/runs/"
                    "clipa-test-1?project=proj")
    # The bucket check reached the emulator and found the bucket owned by the project.
    assert "pipeline output artifacts" not in caplog.text


def test_submit_creates_a_missing_pipeline_root_bucket(vertex):
    state, fs = vertex
    assert main(["submit", *WHERE, "--pipeline-root", "gs://fresh-root/runs", "--service-account", SA,
                 "--param", "url_list=gs://bkt/u.parquet", "--param", "eval_set=gs://bkt/e"]) == 0
    fs.invalidate_cache()
    assert fs.exists("fresh-root")  # created by the SDK, through the emulator
    assert state.of("POST", "/pipelineJobs")[0].body["runtimeConfig"]["gcsOutputDirectory"] == "gs://fresh-root/runs"


def test_submit_logs_a_bucket_of_another_project(vertex, caplog):
    state, _ = vertex
    caplog.set_level(logging.ERROR)
    assert main(["submit", "--project", "other", "--region", REGION, "--pipeline-root", "gs://bkt/root",
                 "--param", "url_list=gs://bkt/u.parquet", "--param", "eval_set=gs://bkt/e"]) == 0
    assert "does not belong to project" in caplog.text  # the ownership check ran


def test_dry_run_prints_exactly_what_submit_sends(vertex, capsys):
    state, _ = vertex
    args = _submit_args("--service-account", SA, "--label", "a=b", "--job-id", "clipa-same")
    assert main([*args, "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert state.requests == []  # nothing sent
    assert main(args) == 0
    (req,) = state.of("POST", "/pipelineJobs")
    assert printed["parent"] == f"projects/{PROJECT}/locations/{REGION}"
    assert printed["pipelineJobId"] == req.query["pipelineJobId"] == "clipa-same"
    assert printed["pipelineJob"] == req.body


@pytest.mark.parametrize("args, message", [
    (["submit", "--region", REGION, "--pipeline-root", "gs://b/r"], "--project: required"),
    (["submit", "--project", PROJECT, "--pipeline-root", "gs://b/r"], "--region: required"),
    (["submit", *WHERE], "--pipeline-root: required"),
    (["submit", *WHERE, "--pipeline-root", "/tmp/root"], "--pipeline-root '/tmp/root': expected a gs://"),
    (["submit", *WHERE, "--pipeline-root", "gs://b/r", "--param", "url_list=u"], "missing parameter(s) eval_set"),
    (["schedule", "create", *WHERE, "--pipeline-root", "gs://b/r", "--cron", "0 3 * *", "--model", "m",
      "--benchmark", "zeroshot:gs://b/e", "--history", "gs://b/h"], "expected 5 fields"),
    (["schedule", "create", *WHERE, "--pipeline-root", "gs://b/r", "--cron", "0 24 * * 1", "--model", "m",
      "--benchmark", "zeroshot:gs://b/e", "--history", "gs://b/h"], "hour 24 out of range 0-23"),
    (["schedule", "create", *WHERE, "--pipeline-root", "gs://b/r", "--cron", "0 3 * * 1", "--model", "m",
      "--benchmark", "zeroshot:gs://b/e", "--history", "gs://b/h", "--time-zone", "Mars/Base"],
     "--time-zone 'Mars/Base'"),
    (["schedule", "create", *WHERE, "--pipeline-root", "gs://b/r", "--cron", "0 3 * * 1", "--model", "m",
      "--benchmark", "imagenet:gs://b/e", "--history", "gs://b/h"], "expected [NAME=]TASK:PATH"),
    (["schedule", "create", *WHERE, "--pipeline-root", "gs://b/r", "--cron", "0 3 * * 1", "--model", "m",
      "--benchmark", "zeroshot:gs://b/e", "--history", "gs://b/h", "--start-time", "tomorrow"],
     "--start-time 'tomorrow': expected an RFC 3339 time"),
    (["schedule", "create", *WHERE, "--pipeline-root", "gs://b/r", "--cron", "0 3 * * 1", "--model", "m",
      "--benchmark", "zeroshot:gs://b/e", "--history", "gs://b/h", "--enable-caching"],
     "--enable-caching: not for schedules"),
    (["schedule", "pause", "7", "--region", REGION], "--project: required"),
])
def test_bad_input_fails_before_anything_is_sent(vertex, capsys, args, message):
    state, _ = vertex
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert state.requests == []


def test_unknown_param_fails_before_anything_is_sent(vertex, capsys):
    state, _ = vertex
    assert main(_submit_args("--param", "pretrain_sample=3")) == 2
    assert "unknown pipeline parameter 'pretrain_sample'" in capsys.readouterr().err
    assert state.requests == []


@pytest.mark.parametrize("param, message", [
    ('stage_overrides={"finetune_224": {"mask_ratio": 1.5}}', "StageConfig.mask_ratio=1.5 for stage "
                                                              "'finetune_224': expected in [0, 1)"),
    ("preset=nope", "pipeline parameter preset='nope'"),
    ("eval_set=gs://bkt/missing", "eval_set: gs://bkt/missing: not found"),
    ("url_list=gs://bkt/missing.parquet", "url_list: gs://bkt/missing.parquet: URL list not found"),
])
def test_a_run_that_would_fail_in_a_step_is_not_sent(vertex, capsys, param, message):
    state, _ = vertex
    assert main(_submit_args("--param", param)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert state.requests == []


def test_schedule_create_list_pause_resume_delete(vertex, capsys):
    state, _ = vertex
    assert main(["schedule", "create", *WHERE, "--pipeline-root", "gs://bkt/evals", "--cron", "30 3 * * MON",
                 "--time-zone", "Europe/Paris", "--max-concurrent-runs", "2",
                 "--start-time", "2026-01-05T00:00:00Z", "--end-time", "2026-12-31T00:00:00Z",
                 "--model", "ours=gs://bkt/runs/1/model", "--model", "open_clip:ViT-B-16:gs://bkt/w.bin",
                 "--benchmark", "imagenet=zeroshot:gs://bkt/imagenet-val", "--history", "gs://bkt/history",
                 "--service-account", SA, "--network", NETWORK, "--label", "kind=bench"]) == 0
    (req,) = state.of("POST", "/schedules")
    sched = req.body
    assert sched["cron"] == "TZ=Europe/Paris 30 3 * * MON"
    assert sched["maxConcurrentRunCount"] == "2"
    assert sched["startTime"] == "2026-01-05T00:00:00Z" and sched["endTime"] == "2026-12-31T00:00:00Z"
    job = sched["createPipelineJobRequest"]["pipelineJob"]
    assert job["serviceAccount"] == SA and job["network"] == NETWORK and job["labels"] == {"kind": "bench"}
    assert job["pipelineSpec"]["pipelineInfo"]["name"] == "clipa-benchmarks"
    assert job["runtimeConfig"]["gcsOutputDirectory"] == "gs://bkt/evals"
    assert job["runtimeConfig"]["parameterValues"] == {
        "models": ["ours=gs://bkt/runs/1/model", "open_clip:ViT-B-16:gs://bkt/w.bin"],
        "benchmarks": ["imagenet=zeroshot:gs://bkt/imagenet-val"], "history": "gs://bkt/history",
        "batch_size": 256, "device": "auto"}
    name = f"projects/{PROJECT}/locations/{REGION}/schedules/1"
    assert f"created {name}" in capsys.readouterr().out

    assert main(["schedule", "list", *WHERE]) == 0
    # Objects anywhere in the output: a thread left by an earlier test (img2dataset's
    # progress) can write to the captured stdout on the same line.
    listed = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", capsys.readouterr().out)]
    assert listed == [{"name": name, "display_name": "clipa-benchmarks",
                       "cron": "TZ=Europe/Paris 30 3 * * MON", "state": "ACTIVE"}]
    assert main(["schedule", "pause", "1", *WHERE]) == 0
    assert state.schedules[name]["state"] == "PAUSED"
    assert state.of("POST", "/schedules/1:pause")
    assert main(["schedule", "resume", name, *WHERE]) == 0
    assert state.schedules[name]["state"] == "ACTIVE"
    assert main(["schedule", "delete", "1", *WHERE]) == 0
    assert state.of("DELETE", "/schedules/1") and name not in state.schedules


def test_submit_dry_run_carries_the_whole_recipe(vertex, capsys, tmp_path):
    state, _ = vertex
    assert main([*_submit_args("--recipe", "paper_h14", "--nodes", "2"), "--dry-run"]) == 0
    job = json.loads(capsys.readouterr().out)["pipelineJob"]
    assert state.requests == []
    sent = json.loads(job["runtimeConfig"]["parameterValues"]["recipe"])
    for name, stage in recipes.PAPER_H14.items():  # every field of every stage, as JSON
        assert sent["stages"][name] == json.loads(json.dumps(stage.to_dict()))
    assert sent["preset"] == "H/14" and recipes.load_recipe(json.dumps(sent)) == recipes.PAPER_H14
    pools = job["pipelineSpec"]["components"]["comp-pretrain"]["inputDefinitions"]["parameters"][
        "worker_pool_specs"]["defaultValue"]
    assert [p["replica_count"] for p in pools] == [1, 1]
    # A local recipe file travels as its content; a bad override stops before anything is sent.
    mine = tmp_path / "mine.yaml"
    mine.write_text("base: paper_h14\nstages:\n  pretrain: {accum_steps: 8}\n")
    assert main([*_submit_args("--recipe", str(mine)), "--dry-run"]) == 0
    values = json.loads(capsys.readouterr().out)["pipelineJob"]["runtimeConfig"]["parameterValues"]
    assert recipes.load_recipe(values["recipe"])["pretrain"].accum_steps == 8
    assert main([*_submit_args("--recipe", "paper_h14", "--param",
                               'stage_overrides={"pretrain": {"acum_steps": 8}}')]) == 2
    assert "unknown StageConfig field(s) ['acum_steps']" in capsys.readouterr().err
    assert state.requests == []


def test_component_runs_alone_on_vertex(vertex, capsys):
    state, _ = vertex
    overrides = {"finetune_336": {"samples": 2048, "mask_ratio": 0.5}}
    assert main(["component", "run", "finetune", *WHERE, "--input", "data=gs://bkt/filtered",
                 "--input", "init_model=gs://bkt/pretrain/model", "--recipe", "paper_h14",
                 "--param", "stage=finetune_336", "--param", "stage_overrides=" + json.dumps(overrides),
                 "--output-uri", "gs://bkt/reruns", "--nodes", "2",
                 "--placement", "a2-ultragpu-8g", "--service-account", SA]) == 0
    (req,) = state.of("POST", "/pipelineJobs")
    job = req.body
    assert job["runtimeConfig"]["gcsOutputDirectory"] == "gs://bkt/reruns"
    assert job["serviceAccount"] == SA
    spec = job["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    uris = {t["inputs"]["parameters"]["uri"]["runtimeValue"]["constant"]
            for n, t in tasks.items() if n.startswith("importer")}
    assert uris == {"gs://bkt/filtered", "gs://bkt/pretrain/model"}
    params = tasks["finetune"]["inputs"]["parameters"]
    assert params["stage_overrides"]["runtimeValue"]["constant"] == overrides
    recipe = params["recipe"]["runtimeValue"]["constant"]  # the whole recipe, as JSON text
    assert recipes.load_recipe(recipe) == recipes.PAPER_H14
    pools = spec["components"]["comp-finetune"]["inputDefinitions"]["parameters"]["worker_pool_specs"]["defaultValue"]
    assert [p["replica_count"] for p in pools] == [1, 1]  # --nodes 2: workerpool0 + workerpool1
    for pool in pools:
        assert pool["machine_spec"] == {"machine_type": "a2-ultragpu-8g",
                                        "accelerator_type": "NVIDIA_A100_80GB", "accelerator_count": 8}
    assert capsys.readouterr().out.strip().endswith(f"?project={PROJECT}")


def test_component_run_on_vertex_needs_a_gs_output(vertex, capsys):
    state, _ = vertex
    assert main(["component", "run", "evaluate", *WHERE, "--input", "model=gs://b/m",
                 "--input", "eval_set=gs://b/e", "--output-uri", "out/"]) == 2
    assert "--pipeline-root 'out/': expected a gs://" in capsys.readouterr().err
    assert state.requests == []


@pytest.mark.parametrize("cron", ["* * * * *", "*/15 0-6,22 1 JAN-MAR mon-fri", "0 3 1-31/2 12 7",
                                  "  5   4 * * SUN "])
def test_valid_crons_pass(cron):
    assert validate_cron(cron) == " ".join(cron.split())


@pytest.mark.parametrize("cron, message", [
    ("60 * * * *", "minute 60 out of range 0-59"),
    ("* * 0 * *", "day of month 0 out of range 1-31"),
    ("* * * 13 *", "month 13 out of range 1-12"),
    ("* * * * 8", "day of week 8 out of range 0-7"),
    ("* * * * FUN", "day of week 'FUN' is not a number or one of SUN"),
    ("*/0 * * * *", "minute step '0' must be a positive number"),
    ("0 9-5 * * *", "hour range '9-5' runs backwards"),
    ("@daily", "expected 5 fields"),
])
def test_malformed_crons_are_named(cron, message):
    with pytest.raises(ValueError) as err:
        validate_cron(cron)
    assert message in str(err.value) and repr(cron) in str(err.value)


def test_time_zone_prefix():
    assert cron_with_time_zone("0 3 * * 1", "UTC") == "0 3 * * 1"
    assert cron_with_time_zone("0 3 * * 1", "America/New_York") == "TZ=America/New_York 0 3 * * 1"


def test_submit_with_dataflow_runs_filter_shard_on_dataflow(vertex):
    state, _ = vertex
    assert main(_submit_args("--dataflow", "--dataflow-max-workers", "32", "--data-image", "reg/data:5")) == 0
    spec = state.of("POST", "/pipelineJobs")[0].body["pipelineSpec"]
    params = {k: v["runtimeValue"]["constant"]
              for k, v in spec["root"]["dag"]["tasks"]["filter-shard"]["inputs"]["parameters"].items()
              if "runtimeValue" in v}
    assert params["runner"] == "DataflowRunner"
    assert params["dataflow_project"] == PROJECT and params["dataflow_region"] == REGION
    assert params["dataflow_temp_location"] == "gs://bkt/root/dataflow-tmp"
    assert params["dataflow_max_workers"] == 32 and params["dataflow_container_image"] == "reg/data:5"


TENSORBOARD = f"projects/{PROJECT}/locations/{REGION}/tensorboards/77"
RESERVATION = f"projects/{PROJECT}/zones/us-central1-a/reservations/h100s"


def test_dry_run_carries_the_long_run_options_of_the_training_jobs(vertex, capsys):
    state, _ = vertex
    assert main(_submit_args("--timeout", "30d", "--scheduling-strategy", "spot",
                             "--restart-on-worker-restart", "--train-retries", "3",
                             "--tensorboard", TENSORBOARD, "--reservation", RESERVATION,
                             "--persistent-resource", "pool-1", "--dry-run")) == 0
    assert state.requests == []
    spec = json.loads(capsys.readouterr().out)["pipelineJob"]["pipelineSpec"]
    tasks = spec["root"]["dag"]["tasks"]
    for step in ("pretrain", "finetune", "finetune-2"):
        assert tasks[step]["retryPolicy"] == {"maxRetryCount": 3, "backoffDuration": "60s",
                                              "backoffFactor": 2.0,
                                              "backoffMaxDuration": "3600s"}, step
        params = spec["components"][tasks[step]["componentRef"]["name"]]["inputDefinitions"]["parameters"]
        job = {k: params[k]["defaultValue"] for k in (
            "timeout", "strategy", "restart_job_on_worker_restart", "tensorboard",
            "base_output_directory", "persistent_resource_id")}
        assert job == {"timeout": "2592000s", "strategy": "SPOT",
                       "restart_job_on_worker_restart": True, "tensorboard": TENSORBOARD,
                       "base_output_directory": "gs://bkt/root/custom-jobs",
                       "persistent_resource_id": "pool-1"}, step
        (pool,) = params["worker_pool_specs"]["defaultValue"]
        assert pool["machine_spec"]["reservation_affinity"] == {
            "reservation_affinity_type": "SPECIFIC_RESERVATION",
            "key": "compute.googleapis.com/reservation-name", "values": [RESERVATION]}
    assert "retryPolicy" not in tasks["evaluate"]  # only the training steps
    evaluate = spec["components"]["comp-evaluate"]["inputDefinitions"]["parameters"]
    assert evaluate["timeout"]["defaultValue"] == "604800s"  # GCPC's default, untouched
    assert evaluate["strategy"]["defaultValue"] == "STANDARD"


def test_flex_start_waits_as_long_as_asked(vertex, capsys):
    assert main(_submit_args("--scheduling-strategy", "FLEX_START", "--max-wait", "2d12h",
                             "--dry-run")) == 0
    spec = json.loads(capsys.readouterr().out)["pipelineJob"]["pipelineSpec"]
    params = spec["components"]["comp-pretrain"]["inputDefinitions"]["parameters"]
    assert params["strategy"]["defaultValue"] == "FLEX_START"
    assert params["max_wait_duration"]["defaultValue"] == "216000s"


@pytest.mark.parametrize("args, message", [
    (["--timeout", "30x"], "timeout '30x': expected a duration like 30d"),
    (["--max-wait", "2d"], "max_wait '2d': only for scheduling_strategy FLEX_START"),
    (["--tensorboard", "tb-7"], "tensorboard 'tb-7': expected projects/P/locations/R/tensorboards/T"),
    (["--reservation", "h100s"], "reservation 'h100s': expected projects/P/zones/Z/reservations/NAME"),
    (["--placement", "vertex-cpu", "--timeout", "30d"], "--timeout: a custom-job option, but the "
                                                        "placement 'vertex-cpu' runs pretrain"),
])
def test_bad_long_run_options_fail_before_anything_is_sent(vertex, capsys, args, message):
    state, _ = vertex
    assert main(_submit_args(*args)) == 2
    assert message in capsys.readouterr().err
    assert state.requests == []


def test_compile_names_the_missing_placement_or_output_folder(capsys, tmp_path):
    out = str(tmp_path / "p.yaml")
    assert main(["compile", "--output", out, "--train-retries", "2"]) == 2
    assert "--train-retries: applies to placed training steps; give a --placement" in capsys.readouterr().err
    assert main(["compile", "--output", out, "--placement", "a3-highgpu-8g",
                 "--tensorboard", TENSORBOARD]) == 2
    assert "needs a gs:// base_output_directory (--base-output-dir)" in capsys.readouterr().err
