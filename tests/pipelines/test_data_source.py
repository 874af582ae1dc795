"""The data source of the training pipeline, a compile-time choice: download with a
compiled-in parallelism, or existing shards (`--shards`, `--no-filter`)."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from pipelines import cli
from pipelines.demo_data import write_demo_shards, write_eval_set


def _compiled(tmp_path, *flags) -> str:
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--output", str(out), *flags]) == 0
    return out.read_text()


def test_download_parallelism_is_compiled_in(tmp_path):
    assert "parallelismLimit: 16" in _compiled(tmp_path)
    text = _compiled(tmp_path, "--download-parallelism", "48")
    assert "parallelismLimit: 48" in text and "parallelismLimit: 16" not in text
    assert cli.main(["compile", "--output", str(tmp_path / "x.yaml"),
                     "--download-parallelism", "0"]) == 2


def test_from_shards_variant_imports_instead_of_downloading(tmp_path):
    spec = yaml.safe_load(_compiled(tmp_path, "--from-shards"))
    tasks = spec["root"]["dag"]["tasks"]
    assert "import-shards" in tasks and "download" not in tasks
    assert tasks["filter-shard"]["inputs"]["artifacts"]["shards"]["taskOutputArtifact"][
        "producerTask"] == "import-shards"
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"shards", "no_filter", "filter_preset", "uid_list", "decontaminate"} <= set(params)


@pytest.mark.parametrize("flags, message", [
    (["--shards", "{tmp}/nothing/*.tar", "--eval-set", "{tmp}"], "matches no .tar file"),
    (["--no-filter"], "--no-filter needs --shards"),
    (["--shards", "{tmp}/shards", "--url-list", "{tmp}/u.parquet", "--eval-set", "{tmp}"],
     "--shards replaces --url-list"),
])
def test_bad_shards_flags_stop_before_any_work(tmp_path, capsys, flags, message):
    workdir = tmp_path / "run"
    code = cli.main(["run", "--workdir", str(workdir),
                     *[f.format(tmp=tmp_path) for f in flags]])
    assert code == 2 and message in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.slow
def test_clipa_run_from_existing_shards_end_to_end(tmp_path):
    """`clipa run --shards --no-filter` through kfp.local: import_shards -> filter_shard
    (pass-through) -> training on the tars as they are."""
    shards = write_demo_shards(str(tmp_path / "demo"), 256, seed=3, shard_size=64)
    write_eval_set(str(tmp_path / "eval"), 4, seed=3)
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--recipe", "smoke",
                           "--shards", shards + "/shard-*.tar", "--no-filter",
                           "--eval-set", str(tmp_path / "eval"),
                           "--workdir", str(workdir)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads(next(workdir.glob("pipeline_root/*/summarize/summary")).read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages)[:2] == ["import_shards", "filter_shard"]
    assert stages["import_shards"]["samples_in"] == 256  # from the shards' sizes.json
    assert stages["filter_shard"]["samples_out"] == 256 and not stages["filter_shard"]["dropped"]
    assert stages["finetune_336"]["samples_seen"] > 0
