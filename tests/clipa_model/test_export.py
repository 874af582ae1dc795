"""Export to open_clip: safetensors + open_clip_config.json, identical embeddings in open_clip."""
import os

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipa_model.checkpoint import load_model, save_model_artifact
from clipa_model.config import StageConfig
from clipa_model.data import center_resize, normalize
from clipa_model.export import export_open_clip
from clipa_model.model import build_model, get_tokenizer
from clipa_model.train_loop import training_summary

CAPTIONS = ["a photo of a red circle.", "blue stripes on a noisy background", "stars"]


def _artifact(tmp_path, preset: str, image_size: int, text_len: int) -> str:
    torch.manual_seed(0)
    model = build_model(preset, image_size, text_len)
    with torch.no_grad():  # move every weight off its init so a wrong load would show
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    stage = StageConfig(stage="finetune_56", image_size=image_size, text_len=text_len)
    out = str(tmp_path / f"model-{preset}")
    history = [{"step": 1, "samples_seen": 2, "loss": 1.0, "lr": 1e-3, "temperature": 0.07,
                "seconds": 0.1}]
    save_model_artifact(out, model, preset, stage, history, training_summary(history, 0.1))
    return out


def test_open_clip_loads_the_export_and_gives_identical_embeddings(tmp_path):
    model_dir = _artifact(tmp_path, "tiny", 56, 16)
    info = export_open_clip(model_dir, str(tmp_path / "export"))
    assert sorted(os.listdir(info["out_dir"])) == ["open_clip_config.json",
                                                   "open_clip_model.safetensors"]
    theirs, _, preprocess = open_clip.create_model_and_transforms(info["model_name"])
    ours, cfg = load_model(model_dir)
    theirs.eval()

    images = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8)
    x = normalize(images, cfg["mean"], cfg["std"])
    tokens = get_tokenizer("tiny", 16)(CAPTIONS)
    torch.testing.assert_close(open_clip.get_tokenizer(info["model_name"])(CAPTIONS), tokens)
    with torch.no_grad():
        assert torch.equal(theirs.encode_image(x), ours.encode_image(x))
        assert torch.equal(theirs.encode_text(tokens), ours.encode_text(tokens))

    # open_clip's own preprocessing of a square image matches ours (size, mean, std).
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8))
    mine = normalize(torch.from_numpy(center_resize(pil, 56).copy()).permute(2, 0, 1)[None],
                     cfg["mean"], cfg["std"])
    torch.testing.assert_close(preprocess(pil)[None], mine, atol=0.03, rtol=0)


def test_bert_preset_exports_its_vocab_for_open_clips_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    model_dir = _artifact(tmp_path, "tiny-bert", 28, 8)
    info = export_open_clip(model_dir, str(tmp_path / "export-bert"))
    assert "vocab.txt" in info["files"]
    theirs = open_clip.create_model(info["model_name"]).eval()
    ours, _ = load_model(model_dir)
    tokens = get_tokenizer("tiny-bert", 8)(CAPTIONS)
    torch.testing.assert_close(open_clip.get_tokenizer(info["model_name"])(CAPTIONS), tokens)
    with torch.no_grad():
        assert torch.equal(theirs.encode_text(tokens), ours.encode_text(tokens))
