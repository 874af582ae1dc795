"""filter_shard's settings have one definition, FilterConfig: the command line derives its
flags from it, and the component's and the training pipeline's defaults agree with it."""
import dataclasses
import inspect

import pytest

from components.filter_shard.component import COMPONENT_OFF, config_from_parameters, filter_shard
from components.filter_shard.options import parse_args
from components.filter_shard.samples import FILTER_PRESETS, FilterConfig

FIELDS = [f.name for f in dataclasses.fields(FilterConfig)]


def _component_defaults() -> dict:
    params = inspect.signature(filter_shard.python_func).parameters
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}


def test_component_parameters_are_filter_config_with_the_same_defaults():
    defaults = _component_defaults()
    assert set(FIELDS) <= set(defaults), "every FilterConfig field is a component parameter"
    settings = {k: defaults[k] for k in FIELDS}
    assert config_from_parameters(defaults["filter_preset"], **settings) == FilterConfig()
    for name, off in COMPONENT_OFF.items():
        assert getattr(FilterConfig(), name) is None and defaults[name] == off
    assert defaults["filter_preset"] == "" and set(FILTER_PRESETS) == {"datacomp_basic"}


def test_command_line_has_a_flag_per_field_and_leaves_defaults_to_the_config():
    base = parse_args(["--input", "i", "--output", "o"], "t")
    assert set(base) & set(FIELDS) == set()  # nothing given: FilterConfig decides
    given = parse_args(["--input", "i", "--output", "o", "--preset", "datacomp_basic",
                        "--min-image-side", "150", "--no-dedup-url", "--full-decode",
                        "--uid-list", "u.npy", "--clip-top-fraction", "0.3",
                        "--eval-phash-distance", "2"], "t")
    preset = given.pop("preset")
    cfg = FilterConfig.from_preset(preset, **{k: v for k, v in given.items() if k in FIELDS})
    assert (cfg.min_image_side, cfg.english_only, cfg.dedup_url, cfg.full_decode) == (150, True, False, True)
    assert (cfg.uid_list, cfg.clip_top_fraction, cfg.eval_phash_distance) == ("u.npy", 0.3, 2)
    for name in FIELDS:  # every field can be set from the command line
        flag = f"--{name.replace('_', '-')}"
        on = isinstance(getattr(FilterConfig(), name), bool) and getattr(FilterConfig(), name)
        assert (f"--no-{name.replace('_', '-')}" if on else flag) in _help()


def _help() -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        parse_args(["--help"], "t")
    return buf.getvalue()


def test_training_pipeline_filter_parameters_match_filter_config():
    from pipelines.training_pipeline import clipa_training

    inputs = clipa_training.component_spec.inputs
    shared = [name for name in FIELDS if name in inputs]
    assert {"samples_per_shard", "min_image_side", "min_caption_words"} <= set(shared)
    for name in shared:
        assert inputs[name].default == getattr(FilterConfig(), name), name
    assert inputs["filter_preset"].default == ""
