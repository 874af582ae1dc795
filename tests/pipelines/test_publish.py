"""Publishing: the export step in the training DAG and its Vertex AI Model Registry upload.

On Vertex the upload is google-cloud-pipeline-components' ModelUploadOp: its container runs
GCPC's launcher with the arguments compiled into the pipeline. Here the same launcher
runs in-process with exactly those arguments (the compiled executor's command, placeholders
resolved by kfp.local's resolver from an executor input built as Vertex builds it), fed
by a real export written to the GCS emulator, and sends its request to the recording
server. GCPC's launcher hard-codes https://REGION-aiplatform.googleapis.com; the test
reroutes that one host to the recorder, and the launcher's Google credentials are a
service-account key whose token endpoint is the recorder.
"""
import json
import os

import fsspec
import pytest
import requests
import yaml
from google_cloud_pipeline_components.container.v1.gcp_launcher import lro_remote_runner
from google_cloud_pipeline_components.container.v1.model.upload_model import launcher
from kfp.local import placeholder_utils

from pipelines.compile import compile_pipeline
from pipelines.placement import get_placement
from recording_server import recording_vertex
from support import RUN_STAGES, make_run_artifacts

PROJECT, REGION = "proj", "europe-west4"
SERVING = "europe-docker.pkg.dev/proj/serve/clip-server:1"


class _Rerouted:
    """``requests`` with the Vertex AI host of ``region`` sent to ``endpoint`` instead."""

    def __init__(self, region: str, endpoint: str):
        self.prefix, self.endpoint = f"https://{region}-aiplatform.googleapis.com", endpoint

    def __getattr__(self, method):
        def call(url, **kwargs):
            return getattr(requests, method)(url.replace(self.prefix, self.endpoint), **kwargs)
        return call


def _service_account_key(folder, endpoint: str) -> str:
    """A service-account key file (fresh RSA key) whose token endpoint is the recorder."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    path = folder / "key.json"
    path.write_text(json.dumps({"type": "service_account", "project_id": PROJECT, "private_key_id": "k1",
                                "private_key": pem, "client_email": f"runner@{PROJECT}.iam.gserviceaccount.com",
                                "client_id": "1", "token_uri": f"{endpoint}/token"}))
    return str(path)


def _upload_task(tmp_path):
    """The model-upload executor and its task's inputs, from the pipeline as `clipa submit` compiles it."""
    path = compile_pipeline(str(tmp_path / "p.yaml"), "training", get_placement("a3-highgpu-8g"))
    spec = yaml.safe_load(open(path))
    branch = spec["components"]["comp-condition-1"]["dag"]["tasks"]
    task = branch["model-upload"]
    component = spec["components"][task["componentRef"]["name"]]
    executor = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
    defaults = {k: v.get("defaultValue") for k, v in
                component["inputDefinitions"]["parameters"].items() if "defaultValue" in v}
    root_if = spec["root"]["dag"]["tasks"]["condition-1"]["triggerPolicy"]["condition"]
    return executor, task, defaults, branch["importer-2"], spec, root_if


def _executor_input(task, defaults, registry, export_uri, serving, out_dir) -> dict:
    """What Vertex hands the upload container: parameters from the export step's outputs and
    the pipeline's location / project, the importer's artifact, the output locations."""
    from_export = {"display_name": registry["display_name"], "description": registry["description"],
                   "labels": registry["labels"]}
    params = {**defaults, "project": PROJECT}
    for name, source in task["inputs"]["parameters"].items():
        if "runtimeValue" in source:  # a placeholder Vertex resolves: the job's location
            assert source["runtimeValue"]["constant"] == "{{$.pipeline_google_cloud_location}}"
            params[name] = REGION
        else:
            params[name] = from_export[name]
    model = {"uri": export_uri, "metadata": {"containerSpec": {"imageUri": serving}},
             "type": {"schemaTitle": "google.UnmanagedContainerModel"}, "name": "serving-model"}
    return {"inputs": {"parameterValues": params,
                       "artifacts": {"unmanaged_container_model": {"artifacts": [model]}}},
            "outputs": {"artifacts": {"model": {"artifacts": [
                            {"name": "model", "type": {"schemaTitle": "google.VertexModel"}, "uri": ""}]}},
                        "parameters": {"gcp_resources": {"outputFile": str(out_dir / "gcp_resources")}},
                        "outputFile": str(out_dir / "executor_output.json")}}


@pytest.fixture
def exported(gcs, tmp_path):
    """A real export of three stages, written to gs:// on the emulator."""
    from components.export import run_export

    run = make_run_artifacts(tmp_path)
    uri = "gs://bkt/root/job/export/exported"
    result = run_export(run["models"], uri, run["evals"], run["shards"], run["filtered"],
                        name="clipa-tiny-demo", eval_set="textures")
    return uri, result


def test_model_upload_request_carries_the_model_card(exported, tmp_path, monkeypatch):
    uri, result = exported
    executor, task, defaults, importer, spec, condition = _upload_task(tmp_path)
    # Only with a serving image; the importer turns the folder into a model served by it.
    assert "registry_serving_image" in condition and "!= ''" in condition
    assert importer["inputs"]["parameters"]["metadata"]["componentInputParameter"] == \
        "pipelinechannel--registry_serving_image"
    assert executor["command"][-1] == "google_cloud_pipeline_components.container.v1.model.upload_model.launcher"
    # The export itself runs on the train image with room for a large model's weights.
    export = spec["deploymentSpec"]["executors"]["exec-export"]["container"]
    assert export["image"] == get_placement("a3-highgpu-8g").train_image
    assert export["resources"]["resourceMemoryLimit"] == "64G"

    registry = result["registry"]
    executor_input = _executor_input(task, defaults, registry, uri, SERVING, tmp_path)
    args = placeholder_utils.replace_placeholders(
        executor["args"], executor_input, pipeline_resource_name="clipa-training-1",
        task_resource_name="model-upload", pipeline_root="gs://bkt/root", unique_pipeline_id="job-1")

    with recording_vertex() as (endpoint, state):
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", _service_account_key(tmp_path, endpoint))
        monkeypatch.setattr(lro_remote_runner, "requests", _Rerouted(REGION, endpoint))
        launcher.main(args)

    (token,) = state.of("POST", "/token")  # the launcher signed in with the key
    assert token.body["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    (req,) = state.of("POST", "/models:upload")
    assert req.path == f"/v1/projects/{PROJECT}/locations/{REGION}/models:upload"
    model = req.body["model"]
    assert model["display_name"] == "clipa-tiny-demo"
    assert model["description"] == registry["description"]
    for stage, *_, top1, _top5 in RUN_STAGES:
        assert f"{stage} " in model["description"] and f"top-1 {100 * top1:.1f}%" in model["description"]
    assert registry["labels"].items() <= model["labels"].items()
    assert model["artifact_uri"] == uri
    assert model["container_spec"] == {"image_uri": SERVING}
    # The launcher recorded the new model version as the step's output artifact.
    out = json.load(open(tmp_path / "executor_output.json"))
    (vertex_model,) = out["artifacts"]["model"]["artifacts"]
    assert vertex_model["metadata"]["resourceName"] == f"projects/{PROJECT}/locations/{REGION}/models/1@1"
    # What the model folder at artifact_uri holds: the open_clip weights and the card.
    assert {"open_clip_model.safetensors", "open_clip_config.json", "README.md"} <= \
        {os.path.basename(p) for p in fsspec.filesystem("gs").ls(uri)}


def test_local_run_refuses_a_registry_upload_before_any_work(tmp_path):
    from pipelines.local import run_local

    with pytest.raises(ValueError, match="registry_serving_image: the Model Registry upload runs on Vertex AI only"):
        run_local(str(tmp_path / "run"), "smoke", overrides={"registry_serving_image": SERVING})
    assert not (tmp_path / "run").exists()


def test_export_ends_the_dag_after_every_stage_and_evaluation(tmp_path):
    spec = yaml.safe_load(open(compile_pipeline(str(tmp_path / "p.yaml"))))
    tasks = spec["root"]["dag"]["tasks"]
    deps = set(tasks["export"].get("dependentTasks", []))
    assert {"download", "filter-shard", "importer", "pretrain", "finetune", "finetune-2"} <= deps
    assert {n for n in tasks if n.startswith("evaluate")} <= deps
    # The upload branch waits for the export and runs only with a serving image.
    assert "export" in tasks["condition-1"]["dependentTasks"]
    assert tasks["condition-1"]["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--registry_serving_image'] != ''"
