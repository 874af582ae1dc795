"""The model card of an exported model: recipe, data counts, compute and zero-shot results.

``card_facts`` gathers the facts (JSON-able, saved as ``card.json`` next to the weights);
``render_model_card`` writes them as the Hugging Face Hub ``README.md`` (open_clip's own
``generate_readme`` writes the front matter, details, usage and citation; the tables of the
run follow); ``registry_fields`` turns them into what Vertex AI Model Registry shows
(display name, description, labels).

Compute comes from the planner's FLOP counter (``planner.paper_gflops`` and
``model.flops_per_sample``, the counter behind ``clipa plan`` and the MFU log) applied to
the samples each stage really saw.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from clipa_model.model import flops_per_sample
from clipa_model.planner import paper_gflops
from clipa_model.presets import get_preset

CITATION = [
    "@inproceedings{li2023clipa,\n  title={An Inverse Scaling Law for CLIP Training},\n"
    "  author={Xianhang Li and Zeyu Wang and Cihang Xie},\n  booktitle={NeurIPS},\n  year={2023}\n}",
    "@article{li2023clipav2,\n  title={CLIPA-v2: Scaling CLIP Training with 81.1% Zero-shot ImageNet "
    "Accuracy within a $10,000 Budget; An Extra $4,000 Unlocks 81.8% Accuracy},\n"
    "  author={Xianhang Li and Zeyu Wang and Cihang Xie},\n  journal={arXiv preprint arXiv:2306.15658},\n"
    "  year={2023}\n}",
]
_LABEL_BAD = re.compile(r"[^a-z0-9_-]+")


def stage_facts(preset: str, row: Mapping, stage_config: Mapping) -> dict:
    """One training stage: its recipe, the compute it used and its zero-shot result.

    Args:
        preset: model preset name.
        row: the stage's row of the run summary (components/run_report.build_summary).
        stage_config: the stage's stage_config.json (a StageConfig as dict).

    Returns:
        stage, image_size, text_len, mask_ratio, samples_seen, batch_size, lr,
        warmup_frac, paper_gflops (forward G multiply-adds per sample, CLIPA-v2 Table 3's
        unit), train_flops (2 x 3 x multiply-adds x samples seen), seconds, top1, top5.
    """
    size, text_len, mask = row["image_size"], row["text_len"], float(row.get("mask_ratio") or 0.0)
    per_sample = flops_per_sample(preset, size, text_len, mask)
    return {"stage": row["stage"], "image_size": size, "text_len": text_len, "mask_ratio": mask,
            "samples_seen": int(row["samples_seen"]), "batch_size": stage_config.get("batch_size"),
            "lr": stage_config.get("lr"), "warmup_frac": stage_config.get("warmup_frac"),
            "paper_gflops": paper_gflops(preset, size, text_len, mask),
            "train_flops": per_sample * int(row["samples_seen"]), "seconds": row.get("seconds"),
            "top1": row.get("top1"), "top5": row.get("top5")}


def card_facts(summary: Mapping, stage_configs: Sequence[Mapping], model_config: Mapping,
               name: str, repo_id: str = "", eval_set: str = "") -> dict:
    """Everything the model card says, from the run summary and the stages' configs.

    Args:
        summary: ``build_summary``'s dict (download, filter_shard, then the training stages).
        stage_configs: stage_config.json of each training stage, in the summary's order.
        model_config: model_config.json of the exported model (preset, sizes, preprocessing).
        name: the model's name (card title, Model Registry display name).
        repo_id: Hugging Face Hub repo the folder is meant for ("" if not known yet).
        eval_set: name of the zero-shot evaluation set.

    Returns:
        JSON-able dict: name, repo_id, preset, architecture, image_size, text_len,
        preprocess, data, stages, compute, eval.
    """
    rows = {s["stage"]: s for s in summary["stages"]}
    train_rows = [s for s in summary["stages"] if "samples_seen" in s]
    if len(train_rows) != len(stage_configs):
        raise ValueError(f"{len(stage_configs)} stage configs for {len(train_rows)} training stages "
                         "in the run summary; expected one per stage")
    preset = model_config["preset"]
    stages = [stage_facts(preset, r, c) for r, c in zip(train_rows, stage_configs)]
    dl, fl = rows.get("download", {}), rows.get("filter_shard", {})
    final = summary.get("final", {})
    total_samples = sum(s["samples_seen"] for s in stages)
    return {
        "name": name, "repo_id": repo_id, "preset": preset,
        "architecture": model_config.get("architecture") or {},
        "image_size": model_config["image_size"], "text_len": model_config["text_len"],
        "tokenizer": get_preset(preset).tokenizer,
        "preprocess": {k: model_config.get(k) for k in ("mean", "std", "interpolation")},
        "data": {"urls": dl.get("samples_in"), "downloaded": dl.get("samples_out"),
                 "download_failures": dl.get("failures") or {},
                 "kept_after_filter": fl.get("samples_out"), "dropped": fl.get("dropped") or {}},
        "stages": stages,
        "compute": {"train_flops": sum(s["train_flops"] for s in stages),
                    "samples_seen": total_samples,
                    "avg_paper_gflops": (sum(s["paper_gflops"] * s["samples_seen"] for s in stages)
                                         / total_samples) if total_samples else 0.0,
                    "seconds": sum(s["seconds"] or 0.0 for s in stages)},
        "eval": {"name": eval_set, "count": final.get("eval_count"),
                 "num_classes": final.get("num_classes"), "top1": final.get("top1"),
                 "top5": final.get("top5")},
    }


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _tables(facts: Mapping) -> str:
    """The run's own sections: recipe, zero-shot results, compute, data."""
    ev = facts["eval"]
    where = f" on {ev['name'] or 'the evaluation set'}"
    if ev.get("count"):
        where += f" ({int(ev['count'])} images, {int(ev['num_classes'])} classes)"
    lines = ["", "## Training recipe", "",
             "| stage | image px | text tokens | patch mask | samples seen | batch | peak LR |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['image_size']} | {s['text_len']} | {s['mask_ratio']:.0%} | "
              f"{s['samples_seen']:,} | {s['batch_size']} | {s['lr']} |" for s in facts["stages"]]
    lines += ["", "## Zero-shot results", "", f"Zero-shot classification{where}, after each stage:", "",
              "| stage | top-1 | top-5 |", "|---|---|---|"]
    lines += [f"| {s['stage']} | {_pct(s['top1'])} | {_pct(s['top5'])} |" for s in facts["stages"]]
    c = facts["compute"]
    lines += ["", "## Compute", "",
              "FLOPs from clipa-pipeline's planner (matmuls counted from the token counts; "
              "training = 6 x forward multiply-adds).", "",
              "| stage | GFLOPs per sample (fwd multiply-adds) | training FLOPs | seconds |",
              "|---|---|---|---|"]
    lines += [f"| {s['stage']} | {s['paper_gflops']:.3g} | {s['train_flops']:.3g} | "
              f"{'n/a' if s['seconds'] is None else round(s['seconds'])} |" for s in facts["stages"]]
    lines += [f"| total | {c['avg_paper_gflops']:.3g} (average) | {c['train_flops']:.3g} | "
              f"{round(c['seconds'])} |"]
    d = facts["data"]
    lines += ["", "## Data", "",
              f"- URLs in the list: {d['urls']}", f"- downloaded: {d['downloaded']}",
              f"- kept after filtering: {d['kept_after_filter']}"]
    for what, counts in (("download failures", d["download_failures"]), ("dropped by filter", d["dropped"])):
        if counts:
            lines.append(f"- {what}: " + ", ".join(f"{k} {int(v)}" for k, v in sorted(counts.items())))
    return "\n".join(lines) + "\n"


def render_model_card(facts: Mapping) -> str:
    """README.md for the Hugging Face Hub: open_clip's front matter and sections, then the run's tables."""
    from open_clip.push_to_hf_hub import generate_readme

    ref = f"hf-hub:{facts['repo_id']}" if facts["repo_id"] else "hf-hub:ORG/NAME"
    first, last = facts["stages"][0], facts["stages"][-1]
    card = {
        "tags": ["clip", "clipa", "open_clip", "zero-shot-image-classification"],
        "license": "other",
        "description": (f"A CLIP model trained with the CLIPA recipe by clipa-pipeline: pretrained at "
                        f"{first['image_size']} px with {first['text_len']} text tokens, finetuned up to "
                        f"{last['image_size']} px. Zero-shot top-1 after the last stage: "
                        f"{_pct(facts['eval']['top1'])}."),
        "details": {"Model Type": "Contrastive image-text, zero-shot image classification.",
                    "Preset": facts["preset"], "Image size": facts["image_size"],
                    "Text context length": facts["text_len"], "Tokenizer": facts["tokenizer"],
                    "Samples seen": f"{facts['compute']['samples_seen']:,}",
                    "Training FLOPs": f"{facts['compute']['train_flops']:.3g}",
                    "Papers": ["An Inverse Scaling Law for CLIP Training (arXiv 2305.07017)",
                               "CLIPA-v2 (arXiv 2306.15658)"]},
        "usage": ("```python\nimport open_clip\n\n"
                  f"model, _, preprocess = open_clip.create_model_and_transforms({ref!r})\n"
                  f"tokenizer = open_clip.get_tokenizer({ref!r})\n```\n"),
        "citation": CITATION,
    }
    return generate_readme(card, facts["name"]) + _tables(facts)


def _label(value) -> str:
    """A Vertex AI label value: lowercase letters, digits, _ and -, at most 63 characters."""
    return _LABEL_BAD.sub("-", str(value).lower()).strip("-")[:63]


def registry_fields(facts: Mapping) -> dict:
    """What Vertex AI Model Registry shows: display_name, description, labels.

    The description is the card in one paragraph: each stage's recipe and zero-shot
    top-1, the data counts and the training FLOPs.
    """
    stages = "; ".join(f"{s['stage']} {s['image_size']} px / {s['text_len']} tokens / "
                       f"mask {s['mask_ratio']:.0%}, {s['samples_seen']} samples: "
                       f"top-1 {_pct(s['top1'])}" for s in facts["stages"])
    d, c = facts["data"], facts["compute"]
    description = (f"CLIPA {facts['preset']} (open_clip format). {stages}. Data: {d['urls']} URLs, "
                   f"{d['downloaded']} downloaded, {d['kept_after_filter']} kept. "
                   f"Training compute {c['train_flops']:.3g} FLOPs.")
    labels = {"library": "open_clip", "preset": _label(facts["preset"]),
              "image_size": str(facts["image_size"]), "text_len": str(facts["text_len"])}
    return {"display_name": facts["name"], "description": description, "labels": labels}
