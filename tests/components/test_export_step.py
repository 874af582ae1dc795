"""The export step: an open_clip / Hub folder with a model card that covers every stage."""
import json
import os

import open_clip
import pytest

from clipa_model.artifacts import ArtifactError, read_marker
from clipa_model.model import flops_per_sample
from components.export import main, run_export
from support import RUN_STAGES, make_run_artifacts

STAGES = RUN_STAGES


@pytest.fixture
def run(tmp_path):
    return make_run_artifacts(tmp_path)


def test_export_writes_a_hub_folder_with_a_card_of_every_stage(tmp_path, run):
    out = str(tmp_path / "export")
    result = run_export(run["models"], out, run["evals"], run["shards"], run["filtered"],
                        repo_id="org/clipa-tiny", eval_set="textures")
    assert {"open_clip_model.safetensors", "open_clip_config.json", "README.md",
            "card.json"} <= set(os.listdir(out))
    assert read_marker(out, "open_clip_export")["repo_id"] == "org/clipa-tiny"

    card = open(os.path.join(out, "README.md")).read()
    assert card.startswith("---\n") and "library_name: open_clip\n" in card
    assert "hf-hub:org/clipa-tiny" in card
    for stage, size, text_len, mask, samples, top1, top5 in STAGES:
        assert f"| {stage} | {100 * top1:.1f}% | {100 * top5:.1f}% |" in card
        assert f"| {stage} | {size} | {text_len} | {mask:.0%} | {samples:,} | 8 | 0.001 |" in card
    assert "(200 images, 10 classes)" in card and "textures" in card
    assert "URLs in the list: 120" in card and "kept after filtering: 80" in card
    assert "http_404 20" in card and "min_side 20" in card

    facts = json.load(open(os.path.join(out, "card.json")))
    flops = [flops_per_sample("tiny", s[1], s[2], s[3]) * s[4] for s in STAGES]
    assert [s["train_flops"] for s in facts["stages"]] == pytest.approx(flops)
    assert facts["compute"]["train_flops"] == pytest.approx(sum(flops))
    assert facts["data"] == {"urls": 120, "downloaded": 100, "download_failures": {"http_404": 20},
                             "kept_after_filter": 80, "dropped": {"min_side": 20}}

    # The exported model is the last stage's, at its own size.
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert model.visual.image_size == (56, 56) and model.context_length == 16

    reg = result["registry"]
    assert reg["display_name"] == "clipa-tiny-56"
    assert "finetune_336 56 px / 16 tokens / mask 40%, 8 samples: top-1 43.8%" in reg["description"]
    assert "120 URLs, 100 downloaded, 80 kept" in reg["description"]
    assert reg["labels"] == {"library": "open_clip", "preset": "tiny", "image_size": "56",
                             "text_len": "16"}


@pytest.mark.parametrize("what, problem", [
    ("model", "not a finished clipa artifact"),
    ("model_is_data", "holds a 'filtered_shards' artifact, expected 'model'"),
    ("shards_is_filtered", "holds a 'filtered_shards' artifact, expected 'shards'"),
    ("evals", "expected one metrics mapping per model"),
])
def test_bad_input_fails_before_anything_is_written(tmp_path, run, what, problem):
    models, evals, shards = list(run["models"]), run["evals"], run["shards"]
    if what == "model":
        models[1] = str(tmp_path / "not-a-model")
        os.makedirs(models[1])
    elif what == "model_is_data":
        models[-1] = run["filtered"]
    elif what == "shards_is_filtered":
        shards = run["filtered"]
    else:
        evals = evals[:2]
    out = tmp_path / "export"
    with pytest.raises((ArtifactError, ValueError), match=problem) as err:
        run_export(models, str(out), evals, shards, run["filtered"])
    if what == "model":
        assert "not-a-model" in str(err.value)
    assert not out.exists()


def test_cli_exports_one_model(tmp_path, run, capsys):
    out = tmp_path / "alone"
    main([run["models"][0], str(out), "--name", "my-clipa"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["display_name"] == "my-clipa" and printed["out_dir"] == str(out)
    card = (out / "README.md").read_text()
    assert "# Model card for my-clipa" in card and "| pretrain | n/a | n/a |" in card
