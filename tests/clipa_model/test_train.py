"""Training stages: LR schedule, a few real steps on tiny shards, the Model artifact, resuming."""
import inspect
import json
import os

import pytest
import torch

from clipa_model.artifacts import MARKER, ArtifactError, read_marker, write_json_atomic, write_marker
from clipa_model.checkpoint import load_model, read_model_config
from clipa_model.config import ConfigError, StageConfig
from clipa_model.model import sincos_table
from clipa_model.recipes import DEMO, SMOKE
from clipa_model.train_loop import lr_at
from clipa_model.train_stage import train_stage
from components.train import finetune, pretrain
from pipelines.demo_data import write_demo_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 small captioned images as a filtered_shards artifact (2 shards)."""
    root = tmp_path_factory.mktemp("demo")
    return write_demo_shards(str(root), 32, seed=0, size=64, shard_size=16)


def _stage(**kw) -> StageConfig:
    base = dict(stage="pretrain", image_size=28, text_len=8, samples=16 * 30, batch_size=16,
                lr=1e-3, warmup_frac=0.1, crop_scale=(0.8, 1.0), log_every=5, num_threads=2)
    return StageConfig(**{**base, **kw})


def test_lr_schedule_warms_up_linearly_then_decays_to_zero():
    steps, warmup, peak = 100, 10, 1e-3
    lrs = [lr_at(s, steps, warmup, peak) for s in range(steps)]
    assert lrs[0] == pytest.approx(peak / warmup)
    assert lrs[warmup - 1] == pytest.approx(peak) and max(lrs) == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup]))  # rising
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))  # falling
    mid = warmup + (steps - warmup) // 2
    assert lrs[mid] == pytest.approx(peak / 2, rel=0.02)  # cosine: half way, half the peak
    assert lrs[-1] < peak * 1e-3
    assert StageConfig(samples=1000, batch_size=100, warmup_frac=0.25).warmup_steps == 3


def test_training_reduces_loss_and_writes_a_complete_model_artifact(shards, tmp_path):
    out = str(tmp_path / "model")
    result = train_stage(shards, out, _stage(), preset="tiny")
    history = [json.loads(line) for line in open(os.path.join(out, "history.jsonl"))]
    assert len(history) == 30 and history[-1]["samples_seen"] == 480
    first = sum(r["loss"] for r in history[:5]) / 5
    last = sum(r["loss"] for r in history[-5:]) / 5
    assert last < first - 0.2
    files = ["checkpoint.pt", "model_config.json", "stage_config.json", "history.jsonl",
             "curve.png"]
    marker_time = os.path.getmtime(os.path.join(out, MARKER))
    for name in files:
        assert os.path.getmtime(os.path.join(out, name)) <= marker_time  # marker written last
    marker = read_marker(out, "model")
    for key in ("stage", "preset", "image_size", "text_len", "mask_ratio", "samples_seen",
                "steps", "seconds", "final_loss"):
        assert key in marker
    assert marker["steps"] == 30 and result["samples_per_s"] > 0
    cfg = json.loads(open(os.path.join(out, "model_config.json")).read())
    assert (cfg["preset"], cfg["image_size"], cfg["text_len"]) == ("tiny", 28, 8)
    assert len(cfg["mean"]) == 3 and cfg["interpolation"] in ("bilinear", "bicubic")
    assert StageConfig.from_dict(json.loads(open(os.path.join(out, "stage_config.json")).read()))
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert "visual.conv1.weight" in state
    # The resolved config sits next to the checkpoints and in the artifact.
    resolved = json.load(open(os.path.join(out, "checkpoints", "resolved_config.json")))
    assert resolved == json.load(open(os.path.join(out, "resolved_config.json")))
    assert (resolved["steps"], resolved["per_rank_batch"], resolved["image_tokens"]) == (30, 16, 5)


def test_finetune_starts_from_the_init_model(shards, tmp_path):
    init = str(tmp_path / "pre")
    train_stage(shards, init, _stage(samples=32), preset="tiny")
    out = str(tmp_path / "ft")
    stage = _stage(stage="finetune_56", image_size=56, text_len=16, mask_ratio=0.3,
                   samples=16, lr=1e-9)
    marker = train_stage(shards, out, stage, init_model_dir=init)
    assert (marker["preset"], marker["image_size"], marker["text_len"]) == ("tiny", 56, 16)
    before = torch.load(os.path.join(init, "checkpoint.pt"), weights_only=True)
    after = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    torch.testing.assert_close(after["visual.conv1.weight"], before["visual.conv1.weight"],
                               atol=1e-5, rtol=0)
    assert after["positional_embedding"].shape[0] == 16
    model, cfg = load_model(out)
    assert not model.training and cfg["image_size"] == 56
    # The finetune's positions are measured in the pretraining's 2 x 2 grid.
    assert read_model_config(init)["pos_grid"] == 2 and cfg["pos_grid"] == 2
    torch.testing.assert_close(after["visual.positional_embedding"], sincos_table(128, 4, 2))
    with pytest.raises(ConfigError, match="preset"):
        train_stage(shards, str(tmp_path / "bad"), stage, preset="B/16", init_model_dir=init)


def test_pos_interpolation_off_keeps_integer_positions_and_on_adopts_an_old_model(shards,
                                                                                  tmp_path):
    init = str(tmp_path / "pre")
    train_stage(shards, init, _stage(samples=16, pos_interpolation=False), preset="tiny")
    assert "pos_grid" not in read_model_config(init)
    ft = dict(stage="finetune_56", image_size=56, samples=16, lr=1e-9)
    off = str(tmp_path / "off")
    train_stage(shards, off, _stage(pos_interpolation=False, **ft), init_model_dir=init)
    table = torch.load(os.path.join(off, "checkpoint.pt"), weights_only=True)[
        "visual.positional_embedding"]
    torch.testing.assert_close(table, sincos_table(128, 4, 4))  # integer indices 0..3
    assert "pos_grid" not in read_model_config(off)
    # A model saved with integer positions (an older artifact): interpolation measures its
    # positions in its own grid from the finetune on, and the artifact records it.
    on = str(tmp_path / "on")
    train_stage(shards, on, _stage(**ft), init_model_dir=init)
    assert read_model_config(on)["pos_grid"] == 2
    table = torch.load(os.path.join(on, "checkpoint.pt"), weights_only=True)[
        "visual.positional_embedding"]
    torch.testing.assert_close(table, sincos_table(128, 4, 2))
    # Loaded at another size, the positions stay in the recorded grid.
    model, _ = load_model(on, image_size=84)
    torch.testing.assert_close(model.visual.positional_embedding.detach(), sincos_table(128, 6, 2))


def test_bad_inputs_fail_with_clear_errors(shards, tmp_path):
    with pytest.raises(ConfigError, match="image_size=30"):
        train_stage(shards, str(tmp_path / "m"), _stage(image_size=30), preset="tiny")
    empty = str(tmp_path / "empty")
    write_json_atomic(os.path.join(empty, "manifest.json"), {"shards": [], "total": 0})
    write_marker(empty, "filtered_shards", count=0, shards=0)
    with pytest.raises(ArtifactError, match="empty dataset"):
        train_stage(empty, str(tmp_path / "m2"), _stage(), preset="tiny")
    with pytest.raises(ArtifactError, match="no clipa_artifact.json"):
        train_stage(str(tmp_path), str(tmp_path / "m3"), _stage(), preset="tiny")


def _defaults(component) -> dict:
    return {name: p.default for name, p in inspect.signature(component.python_func).parameters.items()
            if p.default is not inspect.Parameter.empty}


# Not stage settings: where checkpoints live, live logging, the restart after a divergence
# (checkpoint_every / minutes and zeroshot_every are run-level StageConfig fields: -1 = the recipe's).
LONGRUN_DEFAULTS = dict(checkpoint_root="", checkpoint_every=-1, checkpoint_minutes=-1.0,
                        eval_set=None, zeroshot_every=-1,
                        report_to="tensorboard", resume_from="")


def test_component_defaults_take_everything_from_the_recipe():
    """The components' literal defaults: the demo recipe, and -1 / "" for "the recipe's"."""
    common = dict(recipe="demo", stage_overrides={}, seed=-1, loader_workers=-1,
                  torch_threads=-1, procs_per_node=0, init="", **LONGRUN_DEFAULTS)
    assert _defaults(pretrain) == dict(preset="", **common)
    assert _defaults(finetune) == dict(init_model=None, stage="finetune_224", **common)


def test_smoke_recipe_is_a_smaller_demo():
    for name, stage in SMOKE.stages.items():
        demo = DEMO[name]
        assert stage.samples < demo.samples and stage.image_size == demo.image_size
        assert stage.mask_ratio == demo.mask_ratio and stage.text_len == demo.text_len
    assert SMOKE.n_train < DEMO.n_train and SMOKE.eval_per_class < DEMO.eval_per_class


def test_a_stage_starts_from_an_open_clip_checkpoint(shards, tmp_path):
    """open_clip:NAME:FILE: the architecture is an open_clip config (here the tiny preset's,
    registered with open_clip.add_model_config, as a released CLIPA config would be), FILE
    its weights; the preset is the one with the same dimensions."""
    import open_clip

    from clipa_model.export import open_clip_config
    from support import make_model_artifact

    source = make_model_artifact(tmp_path / "src", image_size=28, text_len=8)
    config = open_clip_config(json.load(open(os.path.join(source, "model_config.json"))))
    (tmp_path / "clipa-tiny-test.json").write_text(json.dumps(config["model_cfg"]))
    open_clip.add_model_config(str(tmp_path / "clipa-tiny-test.json"))
    weights = os.path.join(source, "checkpoint.pt")
    stage = _stage(stage="finetune_56", image_size=56, text_len=16, mask_ratio=0.3, samples=16,
                   lr=1e-9)
    out = str(tmp_path / "ft")
    marker = train_stage(shards, out, stage, init_model_dir=f"open_clip:clipa-tiny-test:{weights}")
    assert (marker["preset"], marker["image_size"], marker["text_len"]) == ("tiny", 56, 16)
    before = torch.load(weights, weights_only=True)
    after = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    torch.testing.assert_close(after["visual.conv1.weight"], before["visual.conv1.weight"],
                               atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="unknown open_clip architecture 'ViT-Q-99'"):
        train_stage(shards, str(tmp_path / "x"), stage, init_model_dir=f"open_clip:ViT-Q-99:{weights}")
    with pytest.raises(ConfigError, match="is none of our presets"):
        train_stage(shards, str(tmp_path / "y"), stage, init_model_dir=f"open_clip:ViT-B-32:{weights}")
    with pytest.raises(ConfigError, match="not a checkpoint"):
        train_stage(shards, str(tmp_path / "z"), stage,
                    init_model_dir=f"open_clip:clipa-tiny-test:{source}/model_config.json")
