"""One training stage end to end: inputs checked, model built or loaded, resumed, trained, saved.

``train_stage`` is what every process of a training step runs (``stage_worker``, started by
``launch.launch`` from the KFP steps of ``components.train`` and its command line):

1. check everything before any work: the data (empty dataset), the stage config (sizes,
   masks, batch divisible by the world size), the init model's architecture;
2. build the model (seeded) or load the init model at this stage's token counts;
3. resume from the newest checkpoint in the stage's checkpoint folder if any: the folder
   under ``checkpoint_root`` keyed by the stage's identity (stage_identity.py), else
   OUTPUT/checkpoints; a checkpoint of other data / init model is refused, not resumed;
4. train (``train.train_loop``), checkpointing every N steps / M minutes, with live
   TensorBoard events, history.jsonl and zero-shot probes (live_log.py); a non-finite
   loss stops the stage, naming the step and the last good checkpoint;
5. rank 0 writes the Model artifact (marker last) and deletes the step checkpoints.
"""
from __future__ import annotations

import logging
import time

import torch

from clipa_model import devices, resume
from clipa_model.artifacts import join
from clipa_model.checkpoint import load_model, model_config, read_model_config, save_model_artifact
from clipa_model.config import ConfigError, StageConfig
from clipa_model.data import list_train_shards, train_batches
from clipa_model.distributed import (DistEnv, all_gather_object, barrier, init_process_group,
                                     resolve_dist_env, xla_dist_env)
from clipa_model.eval.models import OPEN_CLIP_PREFIX
from clipa_model.launch import NodeLayout
from clipa_model.model import build_model, flops_per_sample, get_tokenizer, pos_grid_of
from clipa_model.planner import resolved_config
from clipa_model.presets import IMAGE_MEAN, IMAGE_STD, get_preset
from clipa_model.live_log import LiveLog, TimedBatches, ZeroShotProbe, parse_report_to
from clipa_model.stage_identity import data_identity, init_model_identity, stage_identity, stage_key
from clipa_model.train_loop import (DivergenceError, make_optimizer, set_threads,
                                    training_summary, train_loop)

log = logging.getLogger("clipa.train")


def init_model(stage: StageConfig, preset: str | None, init_model_dir: str | None):
    """A fresh model (seeded), or the init model rebuilt at this stage's sizes.

    Args:
        init_model_dir: a Model artifact folder, or ``open_clip:NAME:FILE`` (an open_clip
            architecture of one of our presets and its weights file, local or gs://).

    Returns:
        (model, preset name).

    Raises:
        ConfigError: a stage the preset cannot run, or an init model of another preset.
    """
    if init_model_dir and init_model_dir.startswith(OPEN_CLIP_PREFIX):
        return _init_from_open_clip(stage, preset, init_model_dir)
    if not init_model_dir:
        preset = preset or "tiny"
        stage.validate(get_preset(preset).patch_size)
        torch.manual_seed(stage.seed)
        own_grid = stage.image_size // get_preset(preset).patch_size
        return build_model(preset, stage.image_size, stage.text_len, stage.mask_ratio,
                           stage.image_mask, own_grid if stage.pos_interpolation else None), preset
    init_cfg = read_model_config(init_model_dir)
    init_preset = init_cfg["preset"]
    if preset is not None and preset != init_preset:
        raise ConfigError(f"preset={preset!r} differs from the init model's "
                          f"{init_preset!r} ({init_model_dir}); leave preset unset to finetune")
    stage.validate(get_preset(init_preset).patch_size)
    model, _ = load_model(init_model_dir, stage.image_size, stage.text_len, stage.mask_ratio,
                          stage.image_mask)
    if model.pos_grid is None and stage.pos_interpolation:
        # A model saved with integer positions: measure them in its own grid from now on.
        init_grid = init_cfg["image_size"] // get_preset(init_preset).patch_size
        model = _with_pos_grid(model, init_preset, stage, init_grid)
    return model, init_preset


def _with_pos_grid(model, preset: str, stage: StageConfig, pos_grid: int):
    """``model``'s weights in a model at the stage's sizes whose positions use ``pos_grid``."""
    from clipa_model.model import load_weights

    rebuilt = build_model(preset, stage.image_size, stage.text_len, stage.mask_ratio,
                          stage.image_mask, pos_grid)
    state = {k: v for k, v in model.state_dict().items() if k != "visual.positional_embedding"}
    state["visual.positional_embedding"] = rebuilt.visual.positional_embedding.detach().clone()
    load_weights(rebuilt, state)
    return rebuilt


def _init_from_open_clip(stage: StageConfig, preset: str | None, ref: str):
    """Our model at the stage's sizes with an open_clip checkpoint's weights (e.g. CLIPA-v2's)."""
    from clipa_model.eval.models import ModelRefError, open_clip_state_dict
    from clipa_model.model import load_weights
    from clipa_model.presets import PRESETS

    try:
        config, state_dict = open_clip_state_dict(ref)
    except ModelRefError as e:
        raise ConfigError(str(e)) from None
    # By architecture, not name: ViT-H-14-CLIPA-336 is our H/14 as much as ViT-H-14-CLIPA.
    matches = [p for p in PRESETS if _open_clip_dims(config) == _preset_dims(p)]
    if not matches:
        raise ConfigError(f"{ref}: its architecture ({_open_clip_dims(config)}) is none of our "
                          f"presets {sorted(PRESETS)}; expected a CLIPA-v2 ViT of one of them")
    if preset is not None and preset != matches[0]:
        raise ConfigError(f"preset={preset!r} differs from {ref}'s {matches[0]!r}; leave it unset")
    stage.validate(get_preset(matches[0]).patch_size)
    # Its positions are measured in the grid it was trained at when interpolating.
    grid = config["vision_cfg"]["image_size"] // config["vision_cfg"]["patch_size"]
    model = build_model(matches[0], stage.image_size, stage.text_len, stage.mask_ratio,
                        stage.image_mask, grid if stage.pos_interpolation else None)
    load_weights(model, state_dict, source=ref)
    return model, matches[0]


def _open_clip_dims(config: dict) -> tuple:
    v, t = config["vision_cfg"], config["text_cfg"]
    return (config["embed_dim"], v["patch_size"], v["width"], v["layers"], t["width"],
            t["layers"], t["vocab_size"], t.get("pool_type", "argmax"))


def _preset_dims(name: str) -> tuple:
    p = get_preset(name)
    return (p.embed_dim, p.patch_size, p.vision_width, p.vision_layers, p.text_width,
            p.text_layers, p.vocab_size, p.text_pool)


def _to_cpu(obj):
    """Tensors of a (nested) state moved to the CPU, for saving from CUDA / XLA."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


class _StageCheckpoints:
    """Saving and restoring the resumable state of one stage.

    Args:
        identity: ``stage_identity`` plus its "key" and "data_ref" / "init_model_ref" (the
            paths, for messages); saved with every checkpoint and checked on resume.
    """

    def __init__(self, ckpt_dir, stage, model, model_cfg, device, dist_env, identity):
        self.ckpt_dir, self.stage, self.model = ckpt_dir, stage, model
        self.model_cfg, self.device, self.dist_env = model_cfg, device, dist_env
        self.identity = identity
        self.timer = resume.Checkpointer(ckpt_dir, stage)

    def restore(self, optimizer, resume_from: str | None = None) -> tuple[int, list]:
        """Load the newest checkpoint into model, optimizer and RNG: (start step, history).

        The stage's own folder first; else ``resume_from`` (a checkpoint folder of this
        stage with another ``lr``: the restart after a divergence).
        """
        source, state, may_change = self.ckpt_dir, resume.load_latest(self.ckpt_dir), frozenset()
        if state is None and resume_from:
            source, state, may_change = resume_from, resume.load_latest(resume_from), {"lr"}
            if state is None:
                raise ConfigError(f"resume_from={resume_from!r}: no step-N.pt checkpoint there")
        if state is None:
            return 0, []
        resume.check_resumable(state, self.stage, self.model_cfg, self.dist_env.world_size,
                               source, self.identity, frozenset(may_change))
        self.model.load_state_dict(state["model"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        devices.set_rng_state(state["rng"][self.dist_env.rank], self.device)
        log.info("%s: resumed from step %d (%s)", self.stage.stage, state["step"], source)
        return state["step"], state["history"]

    def due(self, step: int) -> bool:
        due = self.timer.due(step)
        if self.dist_env.world_size > 1 and self.stage.checkpoint_minutes > 0:
            due = all_gather_object(due, self.dist_env)[0]  # rank 0's clock decides
        return due

    def save(self, step: int, optimizer, history: list) -> None:
        rngs = all_gather_object(devices.rng_state(self.device), self.dist_env)
        if self.dist_env.is_main:
            self.timer.save({"step": step, "model": _to_cpu(self.model.state_dict()),
                             "optimizer": _to_cpu(optimizer.state_dict()),
                             "schedule": {"kind": "warmup_cosine", "step": step,
                                          "steps": self.stage.steps,
                                          "warmup_steps": self.stage.warmup_steps},
                             "history": history, "rng": _to_cpu(rngs),
                             "stage": self.stage.to_dict(), "model_config": self.model_cfg,
                             "world_size": self.dist_env.world_size,
                             "identity": self.identity})
        barrier(self.dist_env)

    def diverged(self, error: DivergenceError) -> ConfigError:
        """Drop the checkpoints whose weights gave (or may give) the non-finite loss and
        say which one a restart with a lower ``lr`` continues from."""
        # Row ``step`` s scored the weights after s - 1 updates: checkpoints from s - 1 on
        # hold the weights that diverged.
        if self.dist_env.is_main:
            resume.remove_checkpoints_from(self.ckpt_dir, error.step - 1)
        good = resume.list_checkpoints(self.ckpt_dir)
        where = (f"the last good checkpoint is {good[-1][1]} (step {good[-1][0]}); restart "
                 f"from it with a lower lr: resume_from={self.ckpt_dir!r} (components.train "
                 f"--resume-from) and e.g. lr={self.stage.lr / 2:g}" if good else
                 "no checkpoint precedes it; restart with a lower lr")
        return ConfigError(f"{error}, lr={self.stage.lr:g}; stopped. {where}")


def check_batch(stage: StageConfig, world_size: int) -> None:
    """Raise ConfigError unless the global batch splits into world_size x accum_steps equal parts."""
    parts = world_size * stage.accum_steps
    if stage.batch_size % parts:
        raise ConfigError(f"StageConfig.batch_size={stage.batch_size} for stage {stage.stage!r}: "
                          f"expected a multiple of world size {world_size} x accum_steps "
                          f"{stage.accum_steps} = {parts}")


def checkpoint_folder(output_dir: str, identity: dict, checkpoint_dir: str | None = None,
                      checkpoint_root: str | None = None) -> str:
    """Where a stage keeps its resumable checkpoints.

    ``checkpoint_dir`` as given; else ``CHECKPOINT_ROOT/<stage>-<key>`` (outlives the job:
    a resubmission with the same inputs finds it); else OUTPUT/checkpoints.
    """
    if checkpoint_dir:
        return checkpoint_dir
    if checkpoint_root:
        return join(checkpoint_root, stage_key(identity))
    return join(output_dir, "checkpoints")


def train_stage(data_dir: str, output_dir: str, stage: StageConfig, preset: str | None = None,
                init_model_dir: str | None = None, checkpoint_dir: str | None = None,
                dist_env: DistEnv | None = None, layout: NodeLayout | None = None, *,
                checkpoint_root: str | None = None, resume_from: str | None = None,
                eval_set: str | None = None, report_to: str | tuple = ("tensorboard",)) -> dict:
    """Train one stage on a ``filtered_shards`` artifact and write a ``model`` artifact.

    Args:
        data_dir: filtered_shards folder; output_dir: Model artifact folder to create.
        stage: sizes, samples, global batch size, optimizer and device settings.
        preset: preset of a fresh model ("tiny" when unset; must match ``init_model_dir``).
        init_model_dir: Model artifact to start from (finetuning).
        checkpoint_dir: resumable checkpoints (local or gs://), used as given.
        dist_env: rank layout (default: from torchrun / Vertex AI environment variables).
        checkpoint_root: folder under which the checkpoints go in a folder keyed by the
            stage's identity (``checkpoint_folder``); neither: OUTPUT/checkpoints.
        resume_from: checkpoint folder to continue with another ``lr`` (after a divergence)
            when the stage's own folder has none.
        eval_set: eval set for zero-shot probes every ``stage.zeroshot_every`` samples.
        report_to: "tensorboard" and/or "wandb" (live_log.py).
        layout: the launch (nodes, processes per node), recorded in resolved_config.json.

    Returns:
        The model marker plus "samples_per_s", "data_count", "resumed_from" and
        "checkpoint_dir".

    Raises:
        ConfigError: bad inputs (before any work), a checkpoint of other inputs, or a
            diverged loss (naming the step and the checkpoint to restart from).
    """
    _, data_count = list_train_shards(data_dir)  # fails early on a bad / empty artifact
    report_to = parse_report_to(report_to)
    if stage.zeroshot_every and not eval_set:
        raise ConfigError(f"StageConfig.zeroshot_every={stage.zeroshot_every} for stage "
                          f"{stage.stage!r}: expected an eval set (eval_set) to probe")
    dist_env = dist_env or resolve_dist_env()
    check_batch(stage, dist_env.world_size)
    device = devices.select_device(stage.device, dist_env.local_rank)
    init_process_group(dist_env, device.type)
    set_threads(stage)
    model, preset = init_model(stage, preset, init_model_dir)
    probe = ZeroShotProbe(eval_set, preset, stage.image_size, stage.text_len) if (
        stage.zeroshot_every and dist_env.is_main) else None
    model.to(device)
    identity = stage_identity(stage, preset, data_identity(data_dir),
                              init_model_identity(init_model_dir))
    ckpt_dir = checkpoint_folder(output_dir, identity, checkpoint_dir, checkpoint_root)
    identity = {**identity, "key": stage_key(identity), "data_ref": data_dir,
                "init_model_ref": init_model_dir}
    model_cfg = model_config(preset, stage.image_size, stage.text_len, pos_grid_of(model))
    ckpts = _StageCheckpoints(ckpt_dir, stage, model, model_cfg, device, dist_env, identity)
    layout = layout or NodeLayout(device.type, dist_env.world_size)
    run = _StageRun(data_dir, output_dir, stage, preset, model, device, dist_env, data_count,
                    layout)
    return run.train(ckpts, probe, report_to, resume_from)


class _StageRun:
    """The part of ``train_stage`` after the checks: resume, train, save."""

    def __init__(self, data_dir, output_dir, stage, preset, model, device, dist_env, data_count,
                 layout: NodeLayout):
        self.data_dir, self.output_dir, self.stage, self.preset = data_dir, output_dir, stage, preset
        self.model, self.device, self.dist_env, self.data_count = model, device, dist_env, data_count
        self.layout = layout

    def train(self, ckpts: _StageCheckpoints, probe, report_to, resume_from) -> dict:
        stage, dist_env, model, device = self.stage, self.dist_env, self.model, self.device
        optimizer = make_optimizer(model, stage, device)
        resolved = resolved_config(stage, self.preset, dist_env.world_size, str(device),
                                   self.data_count, nodes=self.layout.nodes,
                                   procs_per_node=self.layout.procs_per_node)
        torch.manual_seed(stage.seed + dist_env.rank)  # patch masks (restored on resume)
        start_step, history = ckpts.restore(optimizer, resume_from)
        if dist_env.is_main:
            resume.write_resolved_config(ckpts.ckpt_dir, resolved)
            resume.write_identity(ckpts.ckpt_dir, ckpts.identity)
        batches = TimedBatches(self._batches(start_step))
        live = LiveLog(self.output_dir, stage, start_step, history, report_to, dist_env.is_main,
                       batches, probe, run_id=ckpts.identity["key"], config=resolved)
        flops = flops_per_sample(self.preset, stage.image_size, stage.text_len, stage.mask_ratio)
        self._log_start(flops)
        t0 = time.perf_counter()
        try:
            history = train_loop(model, batches, stage, IMAGE_MEAN, IMAGE_STD, flops,
                                 live.attach(model, device), device=device, dist_env=dist_env,
                                 optimizer=optimizer, start_step=start_step, history=history,
                                 checkpoint=ckpts.save, checkpoint_due=ckpts.due)
        except DivergenceError as e:
            raise ckpts.diverged(e) from None
        finally:
            live.close()
        summary = training_summary(history, time.perf_counter() - t0, start_step * stage.batch_size)
        marker = {"stage": stage.stage, "preset": self.preset, **summary}
        if dist_env.is_main:
            marker = save_model_artifact(self.output_dir, model, self.preset, stage, history,
                                         summary, resolved)
            resume.remove_checkpoints(ckpts.ckpt_dir)
        barrier(dist_env)
        return {**marker, "samples_per_s": summary["samples_per_s"], "data_count": self.data_count,
                "resumed_from": start_step, "checkpoint_dir": ckpts.ckpt_dir}

    def _batches(self, start_step: int):
        stage, dist_env = self.stage, self.dist_env
        tokenizer = get_tokenizer(self.preset, stage.text_len, stage.text_reduction, stage.seed)
        return train_batches(self.data_dir, stage.image_size, stage.batch_size // dist_env.world_size,
                             stage.steps, tokenizer, stage.crop_scale, stage.seed,
                             stage.num_workers, rank=dist_env.rank,
                             world_size=dist_env.world_size, start_step=start_step)

    def _log_start(self, flops: float) -> None:
        stage = self.stage
        log.info("%s: %s at %d px, %d tokens, mask %.2f (%s), text %s; %d samples in %d steps of %d "
                 "on %d x %s (%.2f epochs of %d); %.2f GFLOP/sample", stage.stage, self.preset,
                 stage.image_size, stage.text_len, stage.mask_ratio, stage.image_mask,
                 stage.text_reduction, stage.samples, stage.steps, stage.batch_size,
                 self.dist_env.world_size, self.device,
                 stage.steps * stage.batch_size / self.data_count, self.data_count, flops / 1e9)


def stage_worker(data_dir: str, output_dir: str, stage: StageConfig, preset: str | None,
                 init_model_dir: str | None, checkpoint_dir: str | None,
                 layout: NodeLayout, options: dict | None = None) -> dict:
    """One process of a launched stage (``launch.launch`` runs it on every rank).

    Takes its rank from torchrun's variables (CUDA / CPU) or from the PJRT runtime (xla);
    rank 0 logs at INFO, the others only warnings. ``options``: ``train_stage``'s keyword
    options (checkpoint_root, resume_from, eval_set, report_to).
    """
    dist_env = xla_dist_env() if layout.device == "xla" else resolve_dist_env()
    logging.basicConfig(level=logging.INFO if dist_env.is_main else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    return train_stage(data_dir, output_dir, stage, preset, init_model_dir, checkpoint_dir,
                       dist_env=dist_env, layout=layout, **(options or {}))
