"""The run summary and its HTML page, from hand-made stage artifacts."""
from __future__ import annotations

import json

import pytest

from clipa_model.artifacts import ArtifactError, write_marker
from components.run_report import build_summary, format_summary, render_report


def _stage_folders(tmp_path):
    shards, filtered = tmp_path / "shards", tmp_path / "filtered"
    write_marker(str(shards), "shards", count=120, successes=100, failures={"http_404": 15, "not_an_image": 5},
                 shards=["00000.tar"], seconds=3.0)
    write_marker(str(filtered), "filtered_shards", count=90, input_count=100, shards=["shard-00000.tar"],
                 dropped={"min_side": 4, "duplicate_sha256": 6}, seconds=2.0)
    models = []
    for i, (stage, px) in enumerate([("pretrain", 84), ("finetune_224", 224), ("finetune_336", 336)]):
        d = tmp_path / stage
        d.mkdir()
        (d / "history.jsonl").write_text("".join(
            json.dumps({"step": s, "samples_seen": 32 * s, "loss": 3.0 - s / 10 - i}) + "\n" for s in range(1, 6)))
        write_marker(str(d), "model", stage=stage, preset="tiny", image_size=px, text_len=8 if i == 0 else 32,
                     mask_ratio=0.0 if i == 0 else 0.3, samples_seen=160, steps=5, seconds=10.0 + i, final_loss=2.5 - i)
        models.append(str(d))
    evals = [{"top1": t, "top5": t + .3, "colour_baseline_top1": .11, "count": 200, "seconds": 1.0}
             for t in (.3, .45, .5)]
    return str(shards), str(filtered), models, evals


def test_summary_has_one_row_per_stage_with_counts_and_accuracy(tmp_path):
    summary = build_summary(*_stage_folders(tmp_path))
    rows = {s["stage"]: s for s in summary["stages"]}
    assert list(rows) == ["download", "filter_shard", "pretrain", "finetune_224", "finetune_336"]
    assert (rows["download"]["samples_in"], rows["download"]["samples_out"]) == (120, 100)
    assert (rows["filter_shard"]["samples_in"], rows["filter_shard"]["samples_out"]) == (100, 90)
    assert rows["finetune_336"]["top1"] == .5 and rows["pretrain"]["top1"] == .3
    assert summary["final"] == {"top1": .5, "top5": .8, "colour_baseline_top1": .11,
                                "eval_count": 200, "num_classes": None}

    text = format_summary(summary)
    assert "finetune_336" in text and "50.0%" in text and "http_404=15" in text
    assert "baseline top-1 11.0%" in text


def test_report_page_embeds_curves_and_accuracy_plots(tmp_path):
    page = render_report(build_summary(*_stage_folders(tmp_path)))
    assert page.count("data:image/png;base64") == 2
    assert "duplicate_sha256" in page and "finetune_224" in page


def test_summary_refuses_an_unfinished_stage_folder(tmp_path):
    shards, filtered, models, evals = _stage_folders(tmp_path)
    (tmp_path / "finetune_336" / "clipa_artifact.json").unlink()  # killed before its marker
    with pytest.raises(ArtifactError, match="finetune_336.*no clipa_artifact.json"):
        build_summary(shards, filtered, models, evals)
