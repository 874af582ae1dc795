"""``clipa run`` checks the whole run before its first step: bad parameters, URL lists
and eval sets end it at once with one line naming the input, exit status 2.

In-process ``pipelines.cli.main`` calls (nothing is started: the run folder is never
made), and one real subprocess for the exit status and the absence of a traceback.
"""
import json
import subprocess
import sys

import pandas as pd
import pytest

from clipa_model.config import StageConfig
from pipelines.cli import main
from pipelines.demo_data import write_eval_set
from pipelines.preflight import PreflightError, check_stage_configs, preflight
from support import REPO_ROOT


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A valid URL list and eval set, and broken eval sets."""
    tmp = tmp_path_factory.mktemp("preflight")
    pd.DataFrame({"url": ["http://example.com/a.jpg"], "caption": ["a cat on a mat"]}
                 ).to_parquet(tmp / "urls.parquet")
    good = tmp / "eval_set"
    write_eval_set(str(good), 1, seed=0, size=32)
    (tmp / "empty").mkdir()
    few = tmp / "few_classes"  # the same images, a class list too short for their labels
    write_eval_set(str(few), 1, seed=0, size=32)
    classes = json.loads((few / "classes.json").read_text())
    classes["classnames"] = classes["classnames"][:2]
    (few / "classes.json").write_text(json.dumps(classes))
    (tmp / "a_file").write_text("not a folder")
    return tmp


def _run(tmp_path, capsys, *extra):
    workdir = tmp_path / "run"
    rc = main(["run", "--recipe", "smoke", "--workdir", str(workdir), *extra])
    err = capsys.readouterr().err
    assert not workdir.exists()  # nothing was made or started
    return rc, err


@pytest.mark.parametrize("param, message", [
    ('stage_overrides={"finetune_224": {"mask_ratio": 1.5}}',
     "stage_overrides finetune_224: StageConfig.mask_ratio=1.5 for stage 'finetune_224': expected in [0, 1)"),
    ('stage_overrides={"pretrain": {"samples": -5}}',
     "StageConfig.samples=-5 for stage 'pretrain': expected positive"),
    ("preset=nope", "pipeline parameter preset='nope': expected one of"),
    ('stage_overrides={"finetune_224": {"image_size": 100}}',
     "stage_overrides finetune_224.image_size (or the recipe's)=100: expected a multiple of the "
     "patch size 14 (stage finetune_224)"),
    ('stage_overrides={"finetune_336": {"batch_size": 1}}',
     "StageConfig.batch_size=1 for stage 'finetune_336': expected at least 2"),
    ("download_image_size=0", "pipeline parameter download_image_size=0: expected at least 1"),
    ("samples_per_shard=0", "pipeline parameter samples_per_shard=0: expected at least 1"),
    ("download_allow_networks=intranet", "download_allow_networks: allow_networks entry 'intranet'"),
])
def test_bad_parameters_stop_the_run_before_any_step(tmp_path, capsys, param, message):
    rc, err = _run(tmp_path, capsys, "--param", param)
    assert rc == 2
    assert err.strip().splitlines() == [err.strip()] and message in err, err


@pytest.mark.parametrize("eval_set, message", [
    ("nonexistent", "eval_set: {tmp}/nonexistent: not found"),
    ("empty", "eval_set: {tmp}/empty: no images"),
    ("few_classes", "few_classes/eval-00000.tar: sample '000000' has label '6'; expected an "
                    "integer in 0..1 (the 2 classes"),
    ("a_file", "eval_set: {tmp}/a_file is a file; expected a folder"),
])
def test_bad_eval_sets_stop_the_run_before_any_step(tmp_path, capsys, data, eval_set, message):
    rc, err = _run(tmp_path, capsys, "--url-list", str(data / "urls.parquet"),
                   "--eval-set", str(data / eval_set))
    assert rc == 2 and message.format(tmp=data) in err, err


def test_a_good_run_passes_and_resolves_every_stage(data):
    stages = preflight({"url_list": str(data / "urls.parquet"), "eval_set": str(data / "eval_set"),
                        "stage_overrides": {"finetune_224": {"mask_ratio": 0.5}}})
    assert [(s.stage, s.image_size) for s in stages] == [
        ("pretrain", 84), ("finetune_224", 224), ("finetune_336", 336)]
    assert stages[1].mask_ratio == 0.5


def test_stage_check_takes_resolved_configs_and_a_preset():
    check_stage_configs([StageConfig(stage="pretrain", image_size=112)], "B/16")
    with pytest.raises(PreflightError, match=r"pretrain\.image_size=84: expected a multiple "
                                             r"of the patch size 16"):
        check_stage_configs([StageConfig(stage="pretrain", image_size=84)], "B/16")


def test_cli_exits_2_with_one_line_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--workdir",
                           str(tmp_path / "run"), "--param",
                           'stage_overrides={"finetune_224": {"image_size": 100}}'],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "Warning" not in ln and ln.strip()
             and "check_for_updates" not in ln]
    assert lines == ["clipa: error: stage_overrides finetune_224.image_size (or the recipe's)=100: "
                     "expected a multiple of the patch size 14 (stage finetune_224)"], proc.stderr
    assert "Traceback" not in proc.stderr
