"""Placement: per-step machines and images at compile time; the checked-in eval_pipeline.yaml."""
import os

import pytest
import yaml

from pipelines.cli import main
from pipelines.compile import compile_pipeline
from pipelines.placement import PLACEMENTS, Machine, Placement, get_placement, resolve_placement
from support import REPO_ROOT



def _compile(tmp_path, pipeline="training", placement=None) -> dict:
    path = compile_pipeline(str(tmp_path / f"{pipeline}.yaml"), pipeline, placement)
    with open(path) as f:
        return yaml.safe_load(f)


def _executors(spec: dict) -> dict:
    return {name: ex.get("container", {}) for name, ex in spec["deploymentSpec"]["executors"].items()}


def _worker_pools(spec: dict, component: str) -> list:
    return spec["components"][component]["inputDefinitions"]["parameters"]["worker_pool_specs"]["defaultValue"]


def test_checked_in_eval_pipeline_yaml_is_current(tmp_path):
    fresh = compile_pipeline(str(tmp_path / "eval_pipeline.yaml"), "eval")
    with open(fresh) as f:
        expected = f.read()
    with open(os.path.join(REPO_ROOT, "eval_pipeline.yaml")) as f:
        assert f.read() == expected, "eval_pipeline.yaml is stale: run `clipa compile --pipeline eval`"


def test_local_placement_compiles_exactly_the_plain_pipeline(tmp_path):
    plain = _compile(tmp_path)
    placed = compile_pipeline(str(tmp_path / "local.yaml"), "training", PLACEMENTS["local"])
    with open(placed) as f:
        assert yaml.safe_load(f) == plain
    assert not any("resources" in c for c in _executors(plain).values())


def test_a3_placement_runs_training_as_h100_custom_jobs(tmp_path):
    spec = _compile(tmp_path, placement=resolve_placement("a3-highgpu-8g", "reg/data:7", "reg/train:7"))
    execs = _executors(spec)
    for comp in ("comp-pretrain", "comp-finetune", "comp-finetune-2"):
        (pool,) = _worker_pools(spec, comp)
        assert pool["machine_spec"] == {"machine_type": "a3-highgpu-8g",
                                        "accelerator_type": "NVIDIA_H100_80GB", "accelerator_count": 8}
        assert pool["container_spec"]["image_uri"] == "reg/train:7"
        assert pool["disk_spec"]["boot_disk_size_gb"] == 500
    assert execs["exec-pretrain"]["image"].startswith("gcr.io/ml-pipeline/google-cloud-pipeline-components")
    (ev,) = _worker_pools(spec, "comp-evaluate")
    assert ev["machine_spec"]["accelerator_type"] == "NVIDIA_L4"
    # Data steps (inside the download sub-pipeline too) get the data image and CPU settings.
    for name in ("exec-split-url-list", "exec-download-part", "exec-merge-download", "exec-filter-shard"):
        assert execs[name]["image"] == "reg/data:7"
        assert execs[name]["resources"]["resourceCpuLimit"] == "8"
        assert execs[name]["resources"]["resourceMemoryLimit"] == "32G"
    assert execs["exec-summarize"]["image"] == "reg/data:7" and "resources" not in execs["exec-summarize"]


def test_tpu_placement_sets_topology_and_pjrt(tmp_path):
    spec = _compile(tmp_path, placement=get_placement("tpu-v5e-8"))
    (pool,) = _worker_pools(spec, "comp-pretrain")
    assert pool["machine_spec"] == {"machine_type": "ct5lp-hightpu-8t", "tpu_topology": "2x4"}
    assert {"name": "PJRT_DEVICE", "value": "TPU"} in pool["container_spec"]["env"]
    assert "clipa-train-tpu:" in pool["container_spec"]["image_uri"]


def test_task_settings_placement_sets_accelerators(tmp_path):
    gpu = Machine(cpu_limit="4", memory_limit="16G", accelerator_type="NVIDIA_L4", accelerator_count=2)
    placement = Placement("custom", {"benchmark": gpu}, train_image="reg/train:9")
    execs = _executors(_compile(tmp_path, "eval", placement))
    res = execs["exec-benchmark"]["resources"]
    assert res["accelerator"]["resourceType"] == "NVIDIA_L4" and res["accelerator"]["resourceCount"] == "2"
    assert res["resourceCpuLimit"] == "4" and execs["exec-benchmark"]["image"] == "reg/train:9"
    assert "resources" not in execs["exec-record-history"]


def test_custom_job_cannot_place_the_download_sub_pipeline(tmp_path):
    placement = Placement("bad", {"download": Machine(machine_type="n2-standard-8")})
    with pytest.raises(ValueError, match="sub-pipeline 'download'.*custom job"):
        _compile(tmp_path, placement=placement)


def test_compile_cli_placement_and_images(tmp_path, capsys):
    out = tmp_path / "eval.yaml"
    assert main(["compile", "--pipeline", "eval", "--placement", "vertex-cpu",
                 "--data-image", "reg/d:1", "--output", str(out)]) == 0
    execs = _executors(yaml.safe_load(out.read_text()))
    assert execs["exec-record-history"]["image"] == "reg/d:1"
    assert execs["exec-benchmark"]["resources"]["resourceCpuLimit"] == "8"
    with pytest.raises(SystemExit):
        main(["compile", "--placement", "h100-please"])
    assert "invalid choice: 'h100-please'" in capsys.readouterr().err


def test_unknown_placement_lists_the_presets():
    with pytest.raises(ValueError, match="placement 'x': unknown; expected one of .*a3-highgpu-8g"):
        get_placement("x")
