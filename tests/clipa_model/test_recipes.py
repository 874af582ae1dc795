"""Recipes as data: built-in names, YAML / JSON files (local and gs://), JSON text, stage
overrides, and the errors bad ones give before any work."""
import json

import pytest
import yaml

from clipa_model import recipes
from clipa_model.config import ConfigError, StageConfig


@pytest.mark.parametrize("name", sorted(recipes.PLAN_RECIPES))
def test_every_built_in_recipe_round_trips_as_data_field_by_field(name, tmp_path):
    recipe = recipes.PLAN_RECIPES[name]
    as_json = json.dumps(recipe.to_dict())
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(json.loads(as_json)))
    for loaded in (recipes.load_recipe(name), recipes.load_recipe(as_json),
                   recipes.load_recipe(str(tmp_path / "r.yaml"))):
        assert loaded == recipe
        for stage, cfg in recipe.items():  # every field, for the error message's sake
            assert loaded[stage].to_dict() == cfg.to_dict()
    for stage in recipe:
        assert recipes.resolve_stage(name, {}, stage) == recipe[stage]


def test_a_recipe_file_starts_from_a_base_and_overrides_win(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: paper_l14_datacomp\n"
                    "data: my-200M\n"
                    "stages:\n"
                    "  pretrain: {samples: 2560000000, accum_steps: 4, grad_checkpointing: true}\n"
                    "  finetune_224: {text_reduction: syntax}\n")
    recipe = recipes.load_recipe(str(path))
    base = recipes.PAPER_L14_DATACOMP
    assert recipe.preset == "L/14" and recipe.data == "my-200M"
    assert recipe["pretrain"] == base["pretrain"].replace(samples=2_560_000_000, accum_steps=4,
                                                          grad_checkpointing=True)
    assert recipe["finetune_224"] == base["finetune_224"].replace(text_reduction="syntax")
    assert recipe["finetune_336"] == base["finetune_336"]
    stage = recipes.resolve_stage(str(path), {"pretrain": {"lr": 1e-3, "crop_scale": [0.5, 1]}},
                                  "pretrain", seed=7)
    assert (stage.lr, stage.crop_scale, stage.seed, stage.accum_steps) == (1e-3, (0.5, 1), 7, 4)
    # An override is JSON text as often as a mapping (a pipeline parameter, a flag).
    assert recipes.resolve_stage("smoke", '{"pretrain": {"samples": 128}}', "pretrain").samples == 128


def test_a_recipe_file_on_gcs(gcs):
    uri = "gs://bkt/recipes/r.json"  # the emulator's default bucket
    with gcs.open(uri, "w") as f:
        json.dump({"base": "smoke", "stages": {"pretrain": {"samples": 320}}}, f)
    assert recipes.load_recipe(uri)["pretrain"].samples == 320


@pytest.mark.parametrize("ref, message", [
    ("paper_h15", r"recipe 'paper_h15': unknown; expected a built-in name \(demo, .*smoke\)"),
    ("/no/such/recipe.yaml", r"recipe file /no/such/recipe.yaml: cannot read it"),
    ('{"stages": {"pretrain": {"sampels": 1}}}', r"stages.pretrain: unknown StageConfig field\(s\) \['sampels'\]"),
    ('{"stages": {"pretrain": {"samples": "many"}}}', r"stages.pretrain.samples='many': expected a int"),
    ('{"presett": "L/14"}', r"unknown Recipe field\(s\) \['presett'\]"),
    ('{"stages": {"pretrain": {"batch_size": 30, "accum_steps": 4}}}',
     r"accum_steps=4 .*expected a divisor of batch_size=30"),
    ("{not json", r"recipe JSON text: cannot parse"),
])
def test_bad_recipes_name_what_is_wrong(ref, message):
    with pytest.raises(ConfigError, match=message):
        recipes.load_recipe(ref)


def test_a_file_that_is_not_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages: [unclosed\n")
    with pytest.raises(ConfigError, match=f"recipe file {path}: not YAML or JSON"):
        recipes.load_recipe(str(path))


@pytest.mark.parametrize("overrides, message", [
    ({"pretrian": {"samples": 1}}, r"unknown stage\(s\) \['pretrian'\]; the recipe has \['pretrain'"),
    ({"pretrain": {"sample": 1}}, r"stage_overrides pretrain: unknown StageConfig field\(s\) \['sample'\]"),
    ({"pretrain": {"grad_checkpointing": "yes"}}, r"grad_checkpointing='yes': expected a bool"),
    ({"pretrain": {"accum_steps": 3}}, r"accum_steps=3 .*divisor of batch_size=64"),
    ("not json", r"stage_overrides 'not json': not JSON"),
])
def test_bad_stage_overrides_name_the_stage_and_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        recipes.resolve_stage("smoke", overrides, "pretrain")


def test_resolve_stage_of_a_stage_the_recipe_lacks():
    with pytest.raises(ConfigError, match="stage 'finetune_336': not in recipe 'paper_h14_70px'"):
        recipes.resolve_stage("paper_h14_70px", {}, "finetune_336")
    assert StageConfig().accum_steps == 1


def test_whole_floats_from_kfp_dict_parameters_count_as_ints():
    """KFP passes a dict parameter through protobuf's Struct: 2000 arrives as 2000.0."""
    stage = recipes.resolve_stage("smoke", {"pretrain": {"samples": 2000.0, "lr": 1}}, "pretrain")
    assert stage.samples == 2000 and isinstance(stage.samples, int) and stage.lr == 1.0
    with pytest.raises(ConfigError, match="samples=2000.5: expected a int"):
        recipes.resolve_stage("smoke", {"pretrain": {"samples": 2000.5}}, "pretrain")
