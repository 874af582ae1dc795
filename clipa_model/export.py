"""Export a Model artifact in open_clip's own format: safetensors + open_clip_config.json.

The folder is also a Hugging Face Hub model repository as open_clip reads one
(``hf-hub:ORG/NAME``: open_clip_config.json and open_clip_model.safetensors at the root,
tokenizer files beside them when the tokenizer is not open_clip's bundled BPE):

    OUT/
        open_clip_model.safetensors   the weights (state dict of open_clip's CLIP)
        open_clip_config.json         {"model_cfg": ..., "preprocess_cfg": ...}
        vocab.txt, tokenizer_config.json, special_tokens_map.json   (BERT presets only)

Load it without this package::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:OUT")
    tokenizer = open_clip.get_tokenizer("local-dir:OUT")
    # or, once uploaded (``hf upload ORG/NAME OUT``): "hf-hub:ORG/NAME"

The model config spells out the CLIPA-v2 settings (sin-cos position embedding, no pre-LN,
average pooling, bidirectional text pooled at the last position), so open_clip builds the
same network and the embeddings are identical (tests/clipa_model/test_export.py). Patch masking is a
training tool and is not exported.
"""
from __future__ import annotations

import os

from clipa_model.artifacts import join, write_json_atomic
from clipa_model.checkpoint import _write_bytes, load_model
from clipa_model.model import text_cfg, vision_cfg
from clipa_model.presets import get_preset

WEIGHTS = "open_clip_model.safetensors"
CONFIG = "open_clip_config.json"


def open_clip_config(model_cfg: dict, repo_id: str = "") -> dict:
    """open_clip_config.json for a model_config.json (preset, sizes, preprocessing).

    Args:
        model_cfg: model_config.json of the Model artifact.
        repo_id: Hugging Face Hub repo ("ORG/NAME") the folder will be uploaded to. With a
            BERT tokenizer, open_clip's ``hf-hub:`` loader reads the tokenizer from the repo
            named in ``hf_tokenizer_name``: the repo itself when given (its vocab.txt),
            else bert-base-uncased. ``local-dir:`` always reads the folder's own files.
    """
    p = get_preset(model_cfg["preset"])
    text = text_cfg(p, model_cfg["text_len"])
    if repo_id and "hf_tokenizer_name" in text:
        text["hf_tokenizer_name"] = repo_id
    return {
        "model_cfg": {"embed_dim": p.embed_dim,
                      "vision_cfg": vision_cfg(p, model_cfg["image_size"]),
                      "text_cfg": text},
        "preprocess_cfg": {"size": model_cfg["image_size"], "mean": list(model_cfg["mean"]),
                           "std": list(model_cfg["std"]),
                           "interpolation": model_cfg.get("interpolation", "bilinear"),
                           "resize_mode": "shortest"},
    }


def _write_bert_tokenizer(out_dir: str) -> list[str]:
    """The BERT vocab and the two small JSONs Hugging Face's AutoTokenizer reads."""
    from clipa_model.tokenizer import find_bert_vocab

    with open(find_bert_vocab(), "rb") as f:
        _write_bytes(join(out_dir, "vocab.txt"), f.read())
    write_json_atomic(join(out_dir, "tokenizer_config.json"),
                      {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                       "model_max_length": 512})
    write_json_atomic(join(out_dir, "special_tokens_map.json"),
                      {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                       "unk_token": "[UNK]", "mask_token": "[MASK]"})
    return ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]


def export_open_clip(model_dir: str, out_dir: str, repo_id: str = "") -> dict:
    """Write ``model_dir`` (a Model artifact) to ``out_dir`` in open_clip's local-dir / Hub format.

    Args:
        model_dir: Model artifact folder (local or gs://).
        out_dir: folder to create; local for ``open_clip`` to load it, or any fsspec URL.
        repo_id: the Hugging Face Hub repo it is meant for (see ``open_clip_config``).

    Returns:
        {"out_dir", "model_name" ("local-dir:OUT"), "files", "preset", "image_size",
         "text_len", "open_clip_config"}.
    """
    from safetensors.torch import save

    model, cfg = load_model(model_dir)
    if "://" not in out_dir:
        os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _write_bytes(join(out_dir, WEIGHTS), save(state, metadata={"format": "pt"}))
    config = open_clip_config(cfg, repo_id)
    files = [WEIGHTS, CONFIG]
    if get_preset(cfg["preset"]).tokenizer == "bert-base-uncased":
        files += _write_bert_tokenizer(out_dir)
    write_json_atomic(join(out_dir, CONFIG), config)  # last: the folder is complete
    return {"out_dir": out_dir, "model_name": f"local-dir:{out_dir}", "files": files,
            "preset": cfg["preset"], "image_size": cfg["image_size"],
            "text_len": cfg["text_len"], "open_clip_config": config}
