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
from clipa_model.model import build_model, get_tokenizer, sincos_table
from clipa_model.train_loop import training_summary

CAPTIONS = ["a photo of a red circle.", "blue stripes on a noisy background", "stars"]


def _artifact(tmp_path, preset: str, image_size: int, text_len: int,
              pos_grid: int | None = None) -> str:
    torch.manual_seed(0)
    model = build_model(preset, image_size, text_len, pos_grid=pos_grid)
    with torch.no_grad():  # move every trained weight off its init so a wrong load would show
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    stage = StageConfig(stage="finetune_56", image_size=image_size, text_len=text_len)
    out = str(tmp_path / f"model-{preset}")
    history = [{"step": 1, "samples_seen": 2, "loss": 1.0, "lr": 1e-3, "temperature": 0.07,
                "seconds": 0.1}]
    save_model_artifact(out, model, preset, stage, history, training_summary(history, 0.1))
    return out


@pytest.mark.parametrize("pos_grid", [None, 2])
def test_open_clip_loads_the_export_and_gives_identical_embeddings(tmp_path, pos_grid):
    # pos_grid 2: a 56 px model whose positions are measured in a 28 px pretraining's grid
    # (position interpolation); open_clip builds integer positions and must take ours.
    model_dir = _artifact(tmp_path, "tiny", 56, 16, pos_grid)
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
    table = theirs.visual.positional_embedding.detach()
    torch.testing.assert_close(table, sincos_table(128, 4, pos_grid or 4))

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


def _as_hub_cache(folder, repo_id: str, cache_dir) -> None:
    """Lay ``folder`` out as huggingface_hub's cache holds a downloaded repo: refs/main ->
    snapshots/COMMIT/files, and .no_exist/COMMIT/NAME for a file the Hub answered 404 for
    (transformers' AutoTokenizer asks for a config.json, which an open_clip repo lacks)."""
    import hashlib
    import shutil

    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (repo / ".no_exist" / commit).mkdir(parents=True)
    (repo / ".no_exist" / commit / "config.json").touch()


@pytest.mark.parametrize("preset, image_size, text_len", [("tiny", 56, 16), ("tiny-bert", 28, 8)])
def test_open_clip_loads_the_export_as_a_hugging_face_hub_repo(tmp_path, monkeypatch, preset,
                                                                image_size, text_len):
    """The folder, as the Hub serves it, through open_clip's own ``hf-hub:`` loader (offline).

    Tolerance: none; the weights are the same float32 tensors, so the embeddings are equal.
    """
    import huggingface_hub.constants

    if preset == "tiny-bert":
        pytest.importorskip("transformers")
    repo_id = f"clipa-test/{preset}"
    model_dir = _artifact(tmp_path, preset, image_size, text_len)
    info = export_open_clip(model_dir, str(tmp_path / "export"), repo_id=repo_id)
    cache = tmp_path / "hub-cache"
    _as_hub_cache(info["out_dir"], repo_id, cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # only the cache

    theirs, _, preprocess = open_clip.create_model_and_transforms(f"hf-hub:{repo_id}",
                                                                  cache_dir=str(cache))
    tokenizer = open_clip.get_tokenizer(f"hf-hub:{repo_id}", cache_dir=str(cache))
    ours, cfg = load_model(model_dir)
    theirs.eval()
    tokens = get_tokenizer(preset, text_len)(CAPTIONS)
    torch.testing.assert_close(tokenizer(CAPTIONS), tokens)
    images = normalize(torch.randint(0, 256, (2, 3, image_size, image_size), dtype=torch.uint8),
                       cfg["mean"], cfg["std"])
    with torch.no_grad():
        assert torch.equal(theirs.encode_image(images), ours.encode_image(images))
        assert torch.equal(theirs.encode_text(tokens), ours.encode_text(tokens))
    assert preprocess.transforms[0].size == image_size
