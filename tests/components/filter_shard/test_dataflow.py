"""filter_shard on Dataflow, without Google Cloud: real Beam options, and the DataflowRunner
translating the real pipeline into the job it would submit (Beam's ``dry_run``: every
step up to the submit request runs, offline: option validation, pickling each DoFn,
the portable pipeline proto with its worker environment)."""
import os

import pytest
from apache_beam.options.pipeline_options import (
    GoogleCloudOptions, PipelineOptions, SetupOptions, StandardOptions, WorkerOptions)
from apache_beam.portability.api import beam_runner_api_pb2

from components.clipa_component import DATA_IMAGE
from components.filter_shard.options import dataflow_options, parse_args
from components.filter_shard.samples import FilterConfig
from components.filter_shard.component import make_pipeline
from support import REPO_ROOT

CLOUD = dict(project="clipa-proj", region="europe-west4", temp_location="gs://clipa-bucket/tmp")
TARS = [f"gs://clipa-bucket/shards/{i:05d}.tar" for i in range(3)]


def _docker_images(proto) -> set:
    """Container images of the translated pipeline's Docker environments."""
    return {beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
            for env in proto.components.environments.values()
            if env.urn == "beam:env:docker:v1"}


def test_dataflow_runner_translates_the_pipeline_offline():
    options = dataflow_options(**CLOUD, machine_type="n2-standard-8", max_num_workers=40,
                               sdk_container_image=DATA_IMAGE, dry_run=True)
    p = make_pipeline(TARS, "gs://clipa-bucket/filtered", FilterConfig(english_only=True),
                      "DataflowRunner", options)
    result = p.run()  # dry_run: the job is built, not submitted
    proto = p.runner.proto_pipeline
    assert _docker_images(proto) == {DATA_IMAGE}  # the workers run the data image
    names = {t.unique_name for t in proto.components.transforms.values()}
    assert {"TarPaths", "CheckShard", "DedupSha256", "DedupUrl", "DedupKey", "Place",
            "ByShard", "Write"} <= names
    job_options = result.job.options
    cloud, worker = job_options.view_as(GoogleCloudOptions), job_options.view_as(WorkerOptions)
    assert (cloud.project, cloud.region) == ("clipa-proj", "europe-west4")
    assert cloud.temp_location.startswith("gs://clipa-bucket/tmp/")  # + the job's own folder
    assert (worker.machine_type, worker.max_num_workers) == ("n2-standard-8", 40)


def test_each_way_of_shipping_the_project_is_a_real_beam_option(tmp_path):
    wheel = tmp_path / "clipa_pipeline-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    for how, check in (
            ({"extra_packages": (str(wheel),)},
             lambda o: o.view_as(SetupOptions).extra_packages == [str(wheel)]),
            ({"setup_file": os.path.join(REPO_ROOT, "pyproject.toml")},
             lambda o: o.view_as(SetupOptions).setup_file == os.path.join(REPO_ROOT, "pyproject.toml")),
            ({"sdk_container_image": "eu-docker.pkg.dev/p/clipa/clipa-data:1"},
             lambda o: o.view_as(WorkerOptions).sdk_container_image
             == "eu-docker.pkg.dev/p/clipa/clipa-data:1")):
        options = PipelineOptions(flags=[], **dataflow_options(**CLOUD, **how))
        assert check(options), how
        assert options.view_as(SetupOptions).save_main_session is False


def test_command_line_builds_dataflow_options_with_a_setup_file():
    kwargs = parse_args(["--input", "gs://b/in", "--output", "gs://b/out",
                         "--runner", "DataflowRunner", "--project", "p", "--region", "us-east1",
                         "--temp-location", "gs://clipa-bucket/tmp",
                         "--setup-file", os.path.join(REPO_ROOT, "pyproject.toml"),
                         "--option", "service_account_email=sa@p.iam.gserviceaccount.com"], "t")
    options = PipelineOptions(flags=[], **kwargs["pipeline_options"])
    assert options.view_as(SetupOptions).setup_file.endswith("pyproject.toml")
    assert options.view_as(GoogleCloudOptions).service_account_email == "sa@p.iam.gserviceaccount.com"
    assert kwargs["runner"] == "DataflowRunner"
    local = parse_args(["--input", "in", "--output", "out"], "t")
    assert local["runner"] == "FnApiRunner" and local["pipeline_options"] == {}
    assert PipelineOptions(flags=[]).view_as(StandardOptions).runner is None


@pytest.mark.parametrize("how, message", [
    ({}, "need this package"),
    ({"extra_packages": ("dist/nope.whl",)}, r"'dist/nope.whl' does not exist"),
    ({"setup_file": "README.md"}, r"setup_file='README.md'; expected .*pyproject.toml"),
    ({"setup_file": "/nope/pyproject.toml"}, "setup_file='/nope/pyproject.toml'"),
])
def test_shipping_mistakes_name_the_option(how, message):
    with pytest.raises(ValueError, match=message):
        dataflow_options(**CLOUD, **how)


@pytest.mark.parametrize("missing, message", [
    ({"project": ""}, "Dataflow needs project="), ({"region": ""}, "Dataflow needs region="),
    ({"temp_location": "/tmp/x"}, r"temp_location='/tmp/x'; expected a gs:// folder")])
def test_cloud_settings_are_checked_before_submitting(missing, message):
    with pytest.raises(ValueError, match=message):
        dataflow_options(**{**CLOUD, **missing}, sdk_container_image=DATA_IMAGE)
