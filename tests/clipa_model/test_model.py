"""The CLIPA model: presets, moving a checkpoint between stages, masking, decay groups."""
import open_clip
import pytest
import torch
from open_clip.pos_embed import get_2d_sincos_pos_embed

from clipa_model.config import ConfigError, StageConfig
from clipa_model.model import (adapt_state_dict, build_model, flops_per_sample, get_tokenizer,
                               load_weights, param_groups, sincos_table)
from clipa_model.presets import PRESETS, get_preset
from clipa_model.recipes import PLAN_RECIPES, RECIPES


def test_every_preset_and_recipe_name_resolves():
    for name in PRESETS:
        assert get_preset(name) is PRESETS[name]
    for recipe in RECIPES.values():  # what the pipeline runs
        get_preset(recipe.preset)
        assert list(recipe) == ["pretrain", "finetune_224", "finetune_336"]
    for recipe in PLAN_RECIPES.values():
        for stage in recipe.stages.values():
            stage.validate(get_preset(recipe.preset).patch_size)
    with pytest.raises(ConfigError, match="preset='X/99'"):
        get_preset("X/99")


def test_paper_presets_follow_the_reference_table():
    # (vision width, depth, heads), (text width, depth, heads), embed dim: docs/PAPER.md
    assert (PRESETS["H/14"].vision_width, PRESETS["H/14"].vision_layers) == (1280, 32)
    assert (PRESETS["L/14"].text_width, PRESETS["L/14"].text_layers) == (768, 12)
    assert PRESETS["B/16"].embed_dim == 512 and PRESETS["S/16"].vision_heads == 6
    tiny = PRESETS["tiny"]
    assert all(s % tiny.patch_size == 0 for s in (84, 224, 336))


def test_one_checkpoint_loads_at_84_224_336_without_missing_keys():
    torch.manual_seed(0)
    pre = build_model("tiny", 84, 8).eval()
    sd = pre.state_dict()
    text = get_tokenizer("tiny", 8)(["a photo of a star.", "a red circle"])  # (2, 8)
    with torch.no_grad():
        ref_text = pre.encode_text(text)
    for size in (224, 336):
        model = build_model("tiny", size, 8).eval()
        result = model.load_state_dict(adapt_state_dict(sd, model), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        # Only the image grid changed: the text tower is untouched.
        with torch.no_grad():
            torch.testing.assert_close(model.encode_text(text), ref_text)
        grid = size // 14
        sincos = torch.from_numpy(get_2d_sincos_pos_embed(model.visual.conv1.out_channels,
                                                          grid, cls_token=True)).float()
        torch.testing.assert_close(model.visual.positional_embedding, sincos)
        assert model.encode_image(torch.zeros(1, 3, size, size)).shape == (1, PRESETS["tiny"].embed_dim)


def test_interpolated_positions_sample_the_pretraining_grid_closer():
    width = PRESETS["tiny"].vision_width
    base = torch.from_numpy(get_2d_sincos_pos_embed(width, 6, cls_token=True)).float()
    # At its own grid the model has open_clip's table, whatever pos_grid says.
    torch.testing.assert_close(build_model("tiny", 84, 8, pos_grid=6).visual.positional_embedding,
                               base)
    # 168 px is a 12 x 12 grid: patch (2a, 2b) sits where the 6 x 6 grid's (a, b) did, and
    # no position lies beyond the pretraining grid's last one.
    fine = build_model("tiny", 168, 8, pos_grid=6).visual.positional_embedding.detach()
    assert fine.shape == (1 + 144, width)
    rows = fine[1:].reshape(12, 12, width)[::2, ::2].reshape(36, width)
    torch.testing.assert_close(rows, base[1:], atol=1e-6, rtol=0)
    integer = build_model("tiny", 168, 8).visual.positional_embedding.detach()
    assert not torch.allclose(integer[1:].reshape(12, 12, width)[::2, ::2].reshape(36, width),
                              base[1:], atol=1e-3)
    # Odd patches fall between, on the same sinusoids (a 3 x 3 grid measured in 6 cells).
    torch.testing.assert_close(sincos_table(width, 3, 6)[1:],
                               base[1:].reshape(6, 6, width)[::2, ::2].reshape(9, width),
                               atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="pos_grid=0"):
        build_model("tiny", 84, 8, pos_grid=0)


def test_text_position_embedding_is_resized_linearly_8_to_32():
    torch.manual_seed(0)
    pre = build_model("tiny", 84, 8)
    fine = build_model("tiny", 224, 32)
    load_weights(fine, pre.state_dict())
    old, new = pre.positional_embedding.detach(), fine.positional_embedding.detach()
    assert new.shape == (32, old.shape[1])
    # align_corners=False linear interpolation: the ends are the old ends, the middle in between.
    torch.testing.assert_close(new[0], old[0])
    torch.testing.assert_close(new[-1], old[-1])
    lo = torch.minimum(old[3], old[4]) - 1e-6
    hi = torch.maximum(old[3], old[4]) + 1e-6
    assert ((new[15] >= lo) & (new[15] <= hi)).all()


def _tokens_entering_encoder(model, size: int) -> int:
    seen = []
    hook = model.visual.transformer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        model.encode_image(torch.zeros(2, 3, size, size))
    hook.remove()
    return seen[0]


def test_patch_masking_drops_tokens_in_train_mode_only():
    model = build_model("tiny", 224, 32, mask_ratio=0.3)  # 16x16 = 256 patches
    model.train()
    assert _tokens_entering_encoder(model, 224) == 1 + int(256 * 0.7)
    model.eval()
    assert _tokens_entering_encoder(model, 224) == 1 + 256


def test_weight_decay_only_on_weight_matrices():
    model = build_model("tiny", 84, 8)
    decay, no_decay, patch = param_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    for name in decay["names"]:
        assert "bias" not in name and "ln" not in name and "embedding" not in name
    for name in ("logit_scale", "token_embedding.weight", "positional_embedding",
                 "visual.class_embedding", "ln_final.weight", "ln_final.bias",
                 "visual.transformer.resblocks.0.attn.in_proj_bias"):
        assert name in no_decay["names"], name
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in decay["names"]
    assert "text_projection" in decay["names"]
    # The patch embedding is a decayed weight matrix with an LR of its own.
    assert patch["names"] == ["visual.conv1.weight"] and patch["weight_decay"] == 0.2
    # The fixed sin-cos embedding is not trained at all.
    assert "visual.positional_embedding" not in decay["names"] + no_decay["names"]


@pytest.mark.parametrize("field, kwargs", [
    ("mask_ratio", dict(mask_ratio=1.0)),
    ("mask_ratio", dict(mask_ratio=-0.1)),
    ("text_len", dict(text_len=0)),
    ("samples", dict(samples=0)),
    ("crop_scale", dict(crop_scale=(0.0, 1.0))),
])
def test_stage_config_errors_name_the_field(field, kwargs):
    with pytest.raises(ConfigError, match=field):
        StageConfig(**kwargs)


def test_image_size_must_tile_into_patches():
    with pytest.raises(ConfigError, match="image_size=100"):
        StageConfig(image_size=100).validate(patch_size=14)
    with pytest.raises(ConfigError, match="image_size=100"):
        build_model("tiny", 100, 8)


def test_flops_follow_the_token_counts():
    f84 = flops_per_sample("tiny", 84, 8)
    f224 = flops_per_sample("tiny", 224, 32)
    f224_masked = flops_per_sample("tiny", 224, 32, mask_ratio=0.3)
    assert f84 < f224_masked < f224
    assert flops_per_sample("tiny", 84, 8, train=False) == pytest.approx(f84 / 3)


def _meta_counts(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters()),
            sum(p.numel() for p in model.parameters() if p.requires_grad))


@pytest.mark.parametrize("name", ["L/14", "H/14", "bigG/14"])
def test_parameter_counts_match_open_clips_clipa_configs(name):
    """Same tensors as open_clip's ViT-*-14-CLIPA; the one difference is the image position
    table: open_clip learns it (257 x width at 224 px), CLIPA-v2 fixes it to sin-cos."""
    preset = PRESETS[name]
    with torch.device("meta"):  # shapes only: bigG has 2.5 B parameters
        ours = build_model(name, 224, 32)
        theirs = open_clip.create_model(preset.open_clip_name, pretrained=None, device="meta")
    (ours_all, ours_trained), (theirs_all, theirs_trained) = _meta_counts(ours), _meta_counts(theirs)
    table = 257 * preset.vision_width
    assert ours_all == theirs_all
    assert theirs_trained - ours_trained == table
    assert theirs.visual.positional_embedding.requires_grad
    assert not ours.visual.positional_embedding.requires_grad
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in theirs.state_dict().items()}


def test_text_tower_is_bidirectional_and_pooled_at_the_last_position():
    model = build_model("tiny", 84, 8).eval()
    assert model.attn_mask is None  # no causal mask
    tokens = get_tokenizer("tiny", 8)(["a red circle"])
    with torch.no_grad():
        base = model.encode_text(tokens)
        changed = tokens.clone()
        changed[0, -1] = 42  # the pooled (last) position sees every token and vice versa
        assert not torch.allclose(model.encode_text(changed), base)
    assert get_preset("H/14").tokenizer == "bert-base-uncased"


def test_checkpoint_of_another_architecture_is_refused_naming_it():
    small = build_model("tiny", 84, 8)
    other = build_model(get_preset("tiny").__class__(**{**get_preset("tiny").__dict__,
                                                         "vision_width": 64}), 84, 8)
    with pytest.raises(ConfigError, match="another architecture.*visual"):
        load_weights(small, other.state_dict(), source="init.pt")


def test_image_tower_is_clipa_v2_bias_free_no_pre_ln_average_pooled_then_ln():
    torch.manual_seed(0)
    model = build_model("tiny", 84, 8).eval()
    visual = model.visual
    assert visual.conv1.bias is None  # bias-free patch embedding
    assert isinstance(visual.ln_pre, torch.nn.Identity)  # no LayerNorm before the encoder
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        # By hand: patches + class token + sin-cos table -> encoder -> mean of the patch
        # tokens (class token excluded) -> LayerNorm -> projection.
        patches = visual.conv1(x).flatten(2).transpose(1, 2)  # (B, 36, C)
        cls = visual.class_embedding.expand(2, 1, -1)
        tokens = torch.cat([cls, patches], dim=1) + visual.positional_embedding  # (B, 37, C)
        out = visual.transformer(tokens)
        expected = visual.ln_post(out[:, 1:].mean(dim=1)) @ visual.proj  # (B, D)
        torch.testing.assert_close(model.encode_image(x), expected, rtol=1e-5, atol=1e-5)
        # The class token is not what is pooled: changing its output changes nothing else.
        assert not torch.allclose(visual.ln_post(out[:, 0]) @ visual.proj, expected, atol=1e-3)
