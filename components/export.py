"""Export step: the trained model as an open_clip / Hugging Face Hub folder with its model card.

    python -m components.export MODEL OUT_DIR [--name NAME] [--repo-id ORG/NAME]

OUT_DIR is what ``hf upload ORG/NAME OUT_DIR`` publishes and what
``open_clip.create_model_and_transforms("hf-hub:ORG/NAME")`` (or ``"local-dir:OUT_DIR"``)
loads:

    open_clip_model.safetensors, open_clip_config.json   (clipa_model/export.py)
    vocab.txt, tokenizer_config.json, ...                (BERT-tokenizer presets only)
    README.md    the model card: recipe, data counts, compute, zero-shot results per stage
    card.json    the same facts as JSON
    clipa_artifact.json   marker, kind "open_clip_export", written last

The work is ``run_export``, a plain function; the KFP component ``export`` maps the
training pipeline's artifacts onto it and returns what Vertex AI Model Registry shows
(the folder's URI, a description, labels), which the pipeline hands to
google-cloud-pipeline-components' ``ModelUploadOp`` when a serving image is given.
No ``from __future__ import annotations`` here: KFP reads the artifact annotations as objects.
"""
import argparse
import json
import os
from typing import Mapping, NamedTuple, Sequence

from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components.clipa_component import TRAIN_IMAGE, clipa_component


def check_inputs(model_dirs: Sequence[str], evals: Sequence[Mapping] | None,
                 shards_dir: str | None, filtered_dir: str | None) -> None:
    """Fail, naming the input, unless every folder is the finished artifact the step expects.

    Raises:
        ArtifactError: a model folder is not a finished Model artifact, or the data
            folders are not download / filter_shard outputs.
        ValueError: evals not one mapping per model.
    """
    from clipa_model.artifacts import read_marker

    if not model_dirs:
        raise ValueError("model_dirs: expected at least one Model artifact folder")
    for model_dir in model_dirs:
        read_marker(model_dir, "model")
    if evals is not None and (len(evals) != len(model_dirs)
                              or not all(isinstance(e, Mapping) for e in evals)):
        raise ValueError(f"evals: expected one metrics mapping per model ({len(model_dirs)}), "
                         f"got {evals!r}")
    if (shards_dir is None) != (filtered_dir is None):
        raise ValueError("shards_dir and filtered_dir: give both (data counts) or neither")
    if shards_dir is not None:
        read_marker(shards_dir, "shards")
        read_marker(filtered_dir, "filtered_shards")


def _models_only_summary(model_dirs: Sequence[str], evals: Sequence[Mapping]) -> dict:
    """A run summary without data rows, for a model exported outside the pipeline."""
    from clipa_model.artifacts import read_marker

    rows = []
    for model_dir, ev in zip(model_dirs, evals):
        mk = read_marker(model_dir, "model")
        rows.append({k: mk.get(k) for k in ("stage", "image_size", "text_len", "mask_ratio",
                                           "samples_seen", "seconds")}
                    | {"top1": ev.get("top1"), "top5": ev.get("top5")})
    last = evals[-1] if evals else {}
    return {"stages": rows, "final": {"top1": last.get("top1"), "top5": last.get("top5"),
                                      "eval_count": last.get("count"),
                                      "num_classes": last.get("num_classes")}}


def run_export(model_dirs: Sequence[str], out_dir: str, evals: Sequence[Mapping] | None = None,
               shards_dir: str | None = None, filtered_dir: str | None = None,
               name: str = "", repo_id: str = "", eval_set: str = "") -> dict:
    """Export the last of ``model_dirs`` with a model card covering every stage.

    Every input is checked before anything is written.

    Args:
        model_dirs: Model artifacts of the training stages in order; the last is exported.
        out_dir: folder to create (local, or any fsspec URL).
        evals: zero-shot metrics (top1, top5, count, num_classes) of each model.
        shards_dir, filtered_dir: the download and filter_shard outputs (data counts).
        name: model name (card title, Model Registry display name); default
            "clipa-PRESET-SIZE".
        repo_id: Hugging Face Hub repo the folder is for ("ORG/NAME"; see clipa_model/export.py).
        eval_set: name of the evaluation set the metrics are on.

    Returns:
        {"out_dir", "files", "facts" (card.json), "registry" (display_name, description, labels)}.
    """
    from clipa_model.artifacts import join, read_json, write_json_atomic, write_marker
    from clipa_model.checkpoint import _write_bytes, read_model_config
    from clipa_model.export import export_open_clip
    from clipa_model.model_card import card_facts, registry_fields, render_model_card
    from components.run_report import build_summary

    check_inputs(model_dirs, evals, shards_dir, filtered_dir)
    evals = list(evals) if evals is not None else [{} for _ in model_dirs]
    if shards_dir is not None:
        summary = build_summary(shards_dir, filtered_dir, model_dirs, evals)
    else:
        summary = _models_only_summary(model_dirs, evals)
    model_cfg = read_model_config(model_dirs[-1])
    name = name or f"clipa-{model_cfg['preset'].replace('/', '-').lower()}-{model_cfg['image_size']}"
    stage_configs = [read_json(join(d, "stage_config.json")) for d in model_dirs]
    facts = card_facts(summary, stage_configs, model_cfg, name, repo_id, eval_set)

    info = export_open_clip(model_dirs[-1], out_dir, repo_id)
    _write_bytes(join(out_dir, "README.md"), render_model_card(facts).encode())
    write_json_atomic(join(out_dir, "card.json"), facts)
    registry = registry_fields(facts)
    write_marker(out_dir, "open_clip_export", name=name, repo_id=repo_id,
                 preset=facts["preset"], image_size=facts["image_size"], text_len=facts["text_len"],
                 top1=facts["eval"]["top1"])
    return {"out_dir": out_dir, "files": info["files"] + ["README.md", "card.json"],
            "facts": facts, "registry": registry}


@clipa_component(TRAIN_IMAGE)
def export(pretrain_model: Input[Model], finetune_224_model: Input[Model],
           finetune_336_model: Input[Model], pretrain_eval: Input[Metrics],
           finetune_224_eval: Input[Metrics], finetune_336_eval: Input[Metrics],
           shards: Input[Dataset], filtered: Input[Dataset], eval_set: Input[Dataset],
           exported: Output[Model], name: str = "", repo_id: str = ""
           ) -> NamedTuple("Registry", artifact_uri=str, display_name=str, description=str, labels=dict):
    """The final model as an open_clip / Hugging Face Hub folder with its model card.

    Outputs:
        exported: open_clip_model.safetensors, open_clip_config.json, README.md (model
            card), card.json (tokenizer files for BERT presets).
        artifact_uri, display_name, description, labels: the folder's URI, the model's
            name and the card's summary, for Vertex AI Model Registry.
    """
    import os

    from components.export import run_export

    models = [pretrain_model.path, finetune_224_model.path, finetune_336_model.path]
    evals = [dict(m.metadata) for m in (pretrain_eval, finetune_224_eval, finetune_336_eval)]
    result = run_export(models, exported.path, evals, shards.path, filtered.path, name, repo_id,
                        os.path.basename(eval_set.uri.rstrip("/")))
    reg = result["registry"]
    exported.metadata.update(name=reg["display_name"], repo_id=repo_id, framework="open_clip")
    return (exported.uri, reg["display_name"], reg["description"], reg["labels"])


def main(argv: list[str] | None = None) -> None:
    """Command line: export one Model artifact (its own stage only on the card)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="Model artifact folder (local or gs://)")
    ap.add_argument("out_dir", help="folder to create")
    ap.add_argument("--name", default="", help="model name (default clipa-PRESET-SIZE)")
    ap.add_argument("--repo-id", default="", help="Hugging Face Hub repo it is for, ORG/NAME")
    args = ap.parse_args(argv)
    result = run_export([args.model], args.out_dir, name=args.name, repo_id=args.repo_id)
    print(json.dumps({"out_dir": os.path.abspath(result["out_dir"]), "files": result["files"],
                      **result["registry"]}, indent=2))


if __name__ == "__main__":
    main()
