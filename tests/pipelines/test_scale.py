"""The scale path, simulated here for real: several training processes per step (gloo), two
"nodes" on 127.0.0.1 started as a Vertex AI custom job starts them, compiled multi-node worker
pools, and every bad input stopped before work.

Equality with one process: the reference trains one process on the same global batches (each
step's batch = every rank's rows, in rank order) from the same init, fp32. Tolerance: rtol
and atol 1e-4 on every weight (the attention key bias excepted: its true gradient is 0, so
Adam turns reduction-order noise into +-lr steps; tests/clipa_model/test_distributed.py).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from clipa_model.config import StageConfig
from clipa_model.data import train_batches
from clipa_model.distributed import DistEnv
from clipa_model.model import get_tokenizer
from clipa_model.presets import IMAGE_MEAN, IMAGE_STD
from clipa_model.train_loop import train_loop
from clipa_model.train_stage import init_model
from pipelines.cli import main
from pipelines.compile import compile_pipeline
from pipelines.demo_data import write_demo_shards
from pipelines.placement import get_placement, with_nodes
from support import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_process_weights(data_dir: str, stage: StageConfig, world_size: int,
                        preset: str = "tiny") -> dict:
    """Train one process on the global batches that ``world_size`` ranks would see together."""
    tok = get_tokenizer(preset, stage.text_len, stage.text_reduction, stage.seed)
    per_rank = [list(train_batches(data_dir, stage.image_size, stage.batch_size // world_size,
                                   stage.steps, tok, stage.crop_scale, stage.seed,
                                   stage.num_workers, rank=r, world_size=world_size))
                for r in range(world_size)]
    batches = [(torch.cat([b[0] for b in step]), torch.cat([b[1] for b in step]))
               for step in zip(*per_rank)]
    model, _ = init_model(stage, preset, None)
    train_loop(model, batches, stage.replace(accum_steps=1), IMAGE_MEAN, IMAGE_STD,
               device=torch.device("cpu"), dist_env=DistEnv())
    return model.state_dict()


def assert_same_weights(got: dict, expected: dict, atol: float = 1e-4) -> None:
    for key, value in expected.items():
        mine = got[key]
        if key.endswith("attn.in_proj_bias"):  # drop the key third (see the module docstring)
            width = value.shape[0] // 3
            value, mine = (torch.cat([t[:width], t[2 * width:]]) for t in (value, mine))
        torch.testing.assert_close(mine, value, rtol=1e-4, atol=atol, msg=key)


# ---------------------------------------------------------------- compiled worker pools

def _pools(spec: dict, component: str) -> list:
    return spec["components"][component]["inputDefinitions"]["parameters"]["worker_pool_specs"]["defaultValue"]


def test_four_nodes_compile_to_one_plus_three_replicas_running_the_launcher(tmp_path):
    out = tmp_path / "a3.yaml"
    assert main(["compile", "--placement", "a3-highgpu-8g", "--nodes", "4", "--output", str(out)]) == 0
    spec = yaml.safe_load(out.read_text())
    for comp in ("comp-pretrain", "comp-finetune", "comp-finetune-2"):
        pools = _pools(spec, comp)
        assert [p["replica_count"] for p in pools] == [1, 3]
        for pool in pools:
            assert pool["machine_spec"] == {"machine_type": "a3-highgpu-8g",
                                            "accelerator_type": "NVIDIA_H100_80GB",
                                            "accelerator_count": 8}
            command = "\n".join(pool["container_spec"]["command"])
            assert "launch_training_step(" in command  # the component body launches its ranks
            assert pool["container_spec"]["args"][-2:] == ["--function_to_execute",
                                                          comp.removeprefix("comp-").rstrip("-2")]
    (evaluate,) = _pools(spec, "comp-evaluate")  # evaluation stays one machine
    assert evaluate["replica_count"] == 1


def test_tpu_placement_trains_on_xla_on_every_node(tmp_path):
    out = tmp_path / "tpu.yaml"
    assert main(["compile", "--placement", "tpu-v5e-8", "--nodes", "2", "--output", str(out)]) == 0
    for pool in _pools(yaml.safe_load(out.read_text()), "comp-pretrain"):
        # PJRT_DEVICE makes StageConfig.device "auto" pick xla (launch.device_type; the XLA
        # lane, tests/xla, runs that path with PJRT_DEVICE=CPU).
        assert {"name": "PJRT_DEVICE", "value": "TPU"} in pool["container_spec"]["env"]
        assert pool["machine_spec"]["tpu_topology"] == "2x4"


@pytest.mark.parametrize("argv, message", [
    (["compile", "--placement", "a3-highgpu-8g", "--nodes", "0"], "--nodes 0: expected at least 1"),
    (["compile", "--placement", "vertex-cpu", "--nodes", "2"],
     "--nodes 2: placement 'vertex-cpu' runs .*without a machine_type"),
    (["compile", "--recipe", "paper_h15"], "recipe 'paper_h15': unknown"),
])
def test_bad_compile_flags(argv, message, tmp_path, capsys):
    assert main([*argv, "--output", str(tmp_path / "x.yaml")]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.yaml").exists()


def test_compile_with_a_recipe_makes_it_the_default(tmp_path):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--recipe", "paper_l14_datacomp", "--output", str(out)]) == 0
    params = yaml.safe_load(out.read_text())["root"]["inputDefinitions"]["parameters"]
    from clipa_model.recipes import PAPER_L14_DATACOMP, load_recipe

    assert load_recipe(params["recipe"]["defaultValue"]) == PAPER_L14_DATACOMP


# ---------------------------------------------------------------- local runs: bad input, the guard

def _run(tmp_path, *extra) -> int:
    return main(["run", "--workdir", str(tmp_path / "run"), *extra])


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "smok"], "recipe 'smok': unknown; expected a built-in name"),
    (["--recipe", "/nowhere/r.yaml"], "recipe file /nowhere/r.yaml: cannot read it"),
    (["--param", 'stage_overrides={"pretrian": {"samples": 2}}'], r"unknown stage\(s\) \['pretrian'\]"),
    (["--param", 'stage_overrides={"pretrain": {"sample": 2}}'],
     r"stage_overrides pretrain: unknown StageConfig field\(s\) \['sample'\]"),
    (["--param", f"train_procs_per_node={(os.cpu_count() or 1) + 1}"],
     rf"train_procs_per_node={(os.cpu_count() or 1) + 1}: this node has only {os.cpu_count()} CPU cores"),
    (["--param", 'stage_overrides={"finetune_224": {"accum_steps": 3}}'],
     "accum_steps=3 .*divisor of batch_size=32"),
    (["--param", "train_procs_per_node=2", "--param", 'stage_overrides={"pretrain": {"batch_size": 15, "accum_steps": 5}}'],
     "batch_size=15 for stage 'pretrain': expected a multiple of world size 2 x accum_steps 5 = 10"),
])
def test_bad_training_input_stops_clipa_run_before_any_work(tmp_path, capsys, extra, message):
    import re

    if "train_procs_per_node=2" in extra and (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores for 2 processes")
    assert _run(tmp_path, "--recipe", "smoke", *extra) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_a_local_run_priced_above_a_day_stops_and_prints_the_plan(tmp_path, capsys):
    assert _run(tmp_path, "--recipe", "paper_h14", "--url-list", "u.parquet", "--eval-set", "e") == 2
    err = capsys.readouterr().err
    assert "more than 24; nothing was started" in err and "--force-long-run" in err
    assert "finetune_336" in err and "total" in err  # the plan's table
    assert not (tmp_path / "run").exists()
    # The smoke recipe fits: the guard lets it through (then the URL list check stops it).
    assert _run(tmp_path, "--recipe", "smoke", "--url-list", str(tmp_path / "none.parquet"),
                "--eval-set", "e") == 2
    assert "--force-long-run" not in capsys.readouterr().err


# ---------------------------------------------------------------- two nodes on 127.0.0.1

def _executor_input(data_dir: str, out_dir: str, params: dict) -> dict:
    """What Vertex AI hands the custom job's container for the pretrain step."""
    def artifact(name, kind, uri):
        return {"artifacts": [{"name": name, "type": {"schemaTitle": kind}, "uri": uri,
                               "metadata": {}}]}

    return {"inputs": {"parameterValues": params,
                       "artifacts": {"data": artifact("data", "system.Dataset", data_dir)}},
            "outputs": {"artifacts": {"model": artifact("model", "system.Model",
                                                        os.path.join(out_dir, "model")),
                                      "metrics": artifact("metrics", "system.Metrics",
                                                          os.path.join(out_dir, "metrics"))},
                        "outputFile": os.path.join(out_dir, "executor_output.json")}}


def _cluster_spec(ports: list[int], node: int) -> str:
    pools = {"workerpool0": [f"127.0.0.1:{ports[0]}"],
             "workerpool1": [f"127.0.0.1:{p}" for p in ports[1:]]}
    task = {"type": "workerpool0", "index": 0} if node == 0 else {"type": "workerpool1", "index": node - 1}
    return json.dumps({"cluster": pools, "environment": "cloud", "task": task,
                       "job": {"worker_pool_specs": []}})


# The recipe file sets the stage's sizes, stage_overrides the accumulation and precision:
# both must reach the step.
TWO_NODE_RECIPE = """base: smoke
stages:
  pretrain: {samples: 96, batch_size: 32, image_size: 28, num_workers: 0, num_threads: 1,
             log_every: 2, crop_scale: [0.8, 1.0], checkpoint_minutes: 0}
"""
TWO_NODE_OVERRIDES = {"pretrain": {"accum_steps": 4, "precision": "fp32"}}


@pytest.mark.slow
def test_two_nodes_of_two_processes_train_like_one_process(tmp_path):
    """Each node runs the compiled custom job's container command with its CLUSTER_SPEC:
    2 nodes x 2 gloo processes = world size 4, with accum_steps 4 on top."""
    data = write_demo_shards(str(tmp_path / "data"), 48, seed=0, size=48, shard_size=16)
    yaml_path = compile_pipeline(str(tmp_path / "p.yaml"), "training",
                                 with_nodes(get_placement("a3-highgpu-8g"), 2))
    pools = _pools(yaml.safe_load(open(yaml_path)), "comp-pretrain")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(TWO_NODE_RECIPE)
    params = {"recipe": str(recipe_file), "stage_overrides": TWO_NODE_OVERRIDES, "preset": "", "seed": -1,
              "loader_workers": -1, "torch_threads": -1, "procs_per_node": 2, "init": ""}
    executor_input = json.dumps(_executor_input(data, str(tmp_path / "out"), params))
    ports = [_free_port(), _free_port()]
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]  # python3 = ours
    procs = []
    for node, pool in enumerate(pools):
        spec = pool["container_spec"]
        args = [executor_input if a == "{{$.json_escape[1]}}" else a for a in spec["args"]]
        env = {**os.environ, "PATH": path, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT,
               "CLUSTER_SPEC": _cluster_spec(ports, node)}
        env.update({e["name"]: e["value"] for e in spec.get("env") or []})
        procs.append(subprocess.Popen([*spec["command"], *args], env=env, cwd=str(tmp_path),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-4000:] + outs[1][-4000:]
    model_dir = tmp_path / "out" / "model"
    resolved = json.loads((model_dir / "resolved_config.json").read_text())
    assert (resolved["world_size"], resolved["nodes"], resolved["procs_per_node"]) == (4, 2, 2)
    assert (resolved["per_rank_batch"], resolved["micro_batch"]) == (8, 2)
    # Only the primary node wrote the step's output file (kfp's executor checks CLUSTER_SPEC).
    logged = json.loads((tmp_path / "out" / "executor_output.json").read_text())
    assert logged["artifacts"]["metrics"]["artifacts"][0]["metadata"]["samples_seen"] == 96
    stage = StageConfig.from_dict(resolved["stage"])
    from clipa_model.recipes import load_recipe

    assert stage == load_recipe(str(recipe_file))["pretrain"].replace(**TWO_NODE_OVERRIDES["pretrain"])
    assert (stage.samples, stage.image_size, stage.accum_steps) == (96, 28, 4)
    expected = one_process_weights(data, stage, world_size=4)
    assert_same_weights(torch.load(model_dir / "checkpoint.pt", weights_only=True), expected)
