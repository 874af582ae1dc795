"""Stage configs: bad input fails before training naming the field; the CUDA-path options
(bf16 autocast, gradient checkpointing, fused AdamW, torch.compile) are real and, on CPU,
change nothing in the numbers; the temperature is learnable."""
import dataclasses
import json
import math
import os

import pytest
import torch

from clipa_model.artifacts import ArtifactError, write_json_atomic, write_marker
from clipa_model.checkpoint import save_model_artifact
from clipa_model.config import ConfigError, StageConfig
from clipa_model.devices import autocast
from clipa_model.distributed import DistEnv
from clipa_model.model import build_model, get_tokenizer
from clipa_model.presets import IMAGE_MEAN, IMAGE_STD
from clipa_model.train_loop import make_optimizer, training_summary, train_loop
from clipa_model.train_stage import train_stage
from pipelines.demo_data import write_demo_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfg")
    return write_demo_shards(str(root), 16, seed=2, size=48, shard_size=16)


def _stage(**kw) -> StageConfig:
    base = dict(stage="pretrain", image_size=28, text_len=8, samples=32, batch_size=8,
                log_every=1, num_threads=1, checkpoint_minutes=0)
    return StageConfig(**{**base, **kw})


def _unchecked(stage: StageConfig, **changes) -> StageConfig:
    """``stage`` with fields set after validation (as a hand-edited object would be)."""
    stage = dataclasses.replace(stage)
    for k, v in changes.items():
        object.__setattr__(stage, k, v)
    return stage


def _fails_before_training(shards, out, stage, error, field, **kw) -> str:
    with pytest.raises(error) as info:
        train_stage(shards, out, stage, dist_env=DistEnv(), **kw)
    message = str(info.value)
    assert field in message and "\n" not in message  # one line, naming the field
    assert not os.path.exists(out)  # nothing trained, nothing written
    return message


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("field, value, expected", [
    ("mask_ratio", 1.0, "in [0, 1)"),
    ("mask_ratio", 1.5, "in [0, 1)"),
    ("text_len", 0, "at least 2"),
])
def test_impossible_sizes_fail_at_construction_and_in_train_stage(shards, tmp_path, field,
                                                                  value, expected):
    with pytest.raises(ConfigError, match=rf"StageConfig\.{field}="):
        _stage(**{field: value})
    with pytest.raises(ConfigError, match=rf"StageConfig\.{field}="):  # a stage_config.json
        StageConfig.from_dict({**_stage().to_dict(), field: value})
    message = _fails_before_training(shards, str(tmp_path / "m"),
                                     _unchecked(_stage(), **{field: value}), ConfigError,
                                     f"StageConfig.{field}={value!r}")
    assert expected in message


def test_image_size_not_a_multiple_of_the_patch_size(shards, tmp_path):
    message = _fails_before_training(shards, str(tmp_path / "m"), _stage(image_size=30),
                                     ConfigError, "StageConfig.image_size=30", preset="tiny")
    assert "multiple of the patch size 14" in message


def test_empty_dataset(tmp_path):
    empty = str(tmp_path / "empty")
    write_json_atomic(os.path.join(empty, "manifest.json"), {"shards": [], "total": 0})
    write_marker(empty, "filtered_shards", count=0, shards=0)
    message = _fails_before_training(empty, str(tmp_path / "m"), _stage(), ArtifactError,
                                     "empty dataset")
    assert empty in message and "'total' is 0" in message


def _init_artifact(path: str, preset_named: str, model) -> str:
    history = [{"step": 1, "samples_seen": 8, "loss": 1.0, "lr": 1e-3, "temperature": 0.07,
                "seconds": 0.1}]
    save_model_artifact(path, model, preset_named, _stage(), history, training_summary(history, 0.1))
    return path


def test_init_checkpoint_from_another_architecture(shards, tmp_path):
    # model_config.json says "tiny", the weights are tiny-bert's (32,000-row token table).
    init = _init_artifact(str(tmp_path / "init"), "tiny", build_model("tiny-bert", 28, 8))
    message = _fails_before_training(shards, str(tmp_path / "m"), _stage(), ConfigError,
                                     "another architecture", init_model_dir=init)
    assert "token_embedding.weight" in message and "checkpoint.pt" in message
    # An init model of another preset than the one asked for is refused by name too.
    good = _init_artifact(str(tmp_path / "good"), "tiny", build_model("tiny", 28, 8))
    _fails_before_training(shards, str(tmp_path / "m2"), _stage(), ConfigError, "preset='S/16'",
                           preset="S/16", init_model_dir=good)


def test_batch_must_split_evenly_over_the_ranks(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"StageConfig\.batch_size=9 .*world size 2"):
        train_stage(shards, str(tmp_path / "m"), _stage(batch_size=9),
                    dist_env=DistEnv(rank=0, world_size=2))
    assert not os.path.exists(tmp_path / "m")


def test_stage_config_round_trips_and_rejects_unknown_fields():
    stage = _stage(crop_scale=(0.5, 1.0), betas=(0.9, 0.98), grad_checkpointing=True)
    again = StageConfig.from_dict(json.loads(json.dumps(stage.to_dict())))
    assert again == stage and again.crop_scale == (0.5, 1.0)
    with pytest.raises(ConfigError, match="unknown field.*'mask_raito'"):
        StageConfig.from_dict({**stage.to_dict(), "mask_raito": 0.3})


# ---------------------------------------------------------------- device options

def _batches(steps: int, batch: int = 8, size: int = 28):
    g = torch.Generator().manual_seed(7)
    tok = get_tokenizer("tiny", 8)
    words = ["red rings", "blue stripes", "green dots", "a small star", "checkerboard",
             "yellow waves", "zigzag lines", "grid of crosses"]
    return [(torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
             tok(words[:batch])) for _ in range(steps)]


def _count_calls(module: torch.nn.Module, calls: list) -> None:
    """Append to ``calls`` whenever ``module`` runs (a forward or a checkpoint recompute)."""
    forward = module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)
    module.forward = counted


def _losses(stage: StageConfig, mask_ratio: float = 0.0,
            calls: list | None = None) -> tuple[list[float], torch.nn.Module]:
    torch.manual_seed(0)
    model = build_model("tiny", 28, 8, mask_ratio)
    if calls is not None:
        for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
            _count_calls(block, calls)
    torch.manual_seed(1)  # the same patch masks in every run
    history = train_loop(model, _batches(stage.steps), stage, IMAGE_MEAN, IMAGE_STD,
                         device=torch.device("cpu"))
    return [r["loss"] for r in history], model


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_losses():
    stage = _stage(samples=24, precision="fp32", mask_ratio=0.3)
    plain_calls, ckpt_calls = [], []
    plain, _ = _losses(stage, mask_ratio=0.3, calls=plain_calls)
    ckpt, model = _losses(stage.replace(grad_checkpointing=True), mask_ratio=0.3,
                          calls=ckpt_calls)
    assert model.visual.transformer.grad_checkpointing and model.transformer.grad_checkpointing
    # Each residual block runs once per step, or twice with checkpointing (forward, then
    # again in the backward pass); tiny has 4 image and 2 text blocks.
    assert len(plain_calls) == 6 * stage.steps and len(ckpt_calls) == 2 * 6 * stage.steps
    assert ckpt == pytest.approx(plain, rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_torch_compile_gives_the_same_losses_on_cpu():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    stage = _stage(samples=24, precision="fp32")
    plain, _ = _losses(stage)
    compiled, _ = _losses(stage.replace(compile=True))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it really compiled
    assert compiled == pytest.approx(plain, rel=1e-4, abs=1e-5)
    torch._dynamo.reset()


def test_bf16_autocast_runs_matmuls_in_bfloat16_and_fp32_does_not():
    layer = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with autocast("bf16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert layer(x).dtype == torch.float32
    # bf16 training still keeps fp32 weights and reports an fp32 loss.
    losses, model = _losses(_stage(samples=16, precision="bf16"))
    assert all(math.isfinite(v) for v in losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_patch_embedding_trains_at_its_fraction_of_the_lr():
    torch.manual_seed(0)
    init = build_model("tiny", 28, 8).state_dict()
    moved = {}
    for scale in (1.0, 0.25, 0.0):
        _, model = _losses(_stage(samples=8, warmup_frac=0.0, patch_embed_lr_scale=scale))
        moved[scale] = {k: (v - init[k]).abs().max().item()
                        for k, v in model.state_dict().items()}
    patch = "visual.conv1.weight"
    assert moved[0.0][patch] == 0.0  # frozen at its random init
    # Adam's first step is ~lr x sign(grad) per weight: a quarter of the LR, a quarter of the move.
    assert moved[0.25][patch] == pytest.approx(0.25 * moved[1.0][patch], rel=0.05)
    # Every other tensor moves as before, whatever the patch embedding's LR.
    for k in ("visual.transformer.resblocks.0.mlp.c_fc.weight", "token_embedding.weight"):
        assert moved[0.0][k] == moved[1.0][k] > 0
    with pytest.raises(ConfigError, match="patch_embed_lr_scale"):
        _stage(patch_embed_lr_scale=1.5)


def test_adamw_is_fused_on_cuda_and_cpu_and_follows_the_stage():
    model = build_model("tiny", 28, 8)
    stage = _stage(weight_decay=0.2, betas=(0.9, 0.95), lr=3e-4)
    on_cpu = make_optimizer(model, stage, torch.device("cpu"))
    on_cuda = make_optimizer(model, stage, torch.device("cuda"))  # built, never stepped here
    on_xla = make_optimizer(model, stage, torch.device("xla"))  # torch_xla: the plain kernels
    assert on_cpu.defaults["fused"] is True and on_cuda.defaults["fused"] is True
    assert not on_xla.defaults.get("fused")
    assert on_cpu.defaults["betas"] == (0.9, 0.95) and on_cpu.defaults["lr"] == 3e-4
    assert [g["weight_decay"] for g in on_cpu.param_groups] == [0.2, 0.0, 0.2]
    # The fused step is AdamW's: same update as the reference implementation.
    ref = build_model("tiny", 28, 8)
    ref.load_state_dict(model.state_dict())
    plain = torch.optim.AdamW([{k: v for k, v in g.items() if k != "fused"}
                               for g in make_optimizer(ref, stage, torch.device("xla")).param_groups],
                              lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    for m, opt in ((model, on_cpu), (ref, plain)):
        torch.manual_seed(3)
        for p in m.parameters():
            p.grad = torch.randn_like(p) if p.requires_grad else None
        opt.step()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_temperature_is_learnable_from_1_over_0_07():
    model = build_model("tiny", 28, 8)
    assert model.logit_scale.requires_grad
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-5)
    start = model.logit_scale.item()
    _, trained = _losses(_stage(samples=16, precision="fp32", lr=1e-2))
    assert trained.logit_scale.item() != pytest.approx(start, abs=1e-6)
