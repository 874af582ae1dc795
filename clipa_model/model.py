"""The CLIPA model, built from open_clip's CLIP code, and moving it between stages.

A stage changes the token counts, never the weights' shapes: the image side (84 -> 224 ->
336) changes the patch grid, whose sin-cos position embedding is recomputed (in cells of
the grid the model was first trained at, ``pos_grid``, when it has one: see
``StageConfig.pos_interpolation``); the text
length (8 -> 32) changes the learned text position embedding, which is resized by linear
interpolation (open_clip's ``resize_text_pos_embed``). Patch masking in finetuning is
``token_reduction.ImageTokenMasking`` in place of open_clip's ``PatchDropout``: active in
train mode only.
"""
from __future__ import annotations

import numpy as np
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, resize_pos_embed, resize_text_pos_embed
from open_clip.pos_embed import get_2d_sincos_pos_embed_from_grid
from torch import nn

from clipa_model.config import ConfigError
from clipa_model.presets import Preset, get_preset
from clipa_model.token_reduction import IMAGE_MASK_FNS, ImageTokenMasking


def check_sizes(preset: Preset, image_size: int, text_len: int, mask_ratio: float = 0.0) -> None:
    """Raise ``ConfigError`` naming the field if the sizes cannot build this preset."""
    if image_size <= 0 or image_size % preset.patch_size:
        raise ConfigError(f"image_size={image_size}: expected a positive multiple of the "
                          f"patch size {preset.patch_size}")
    if text_len <= 1:
        raise ConfigError(f"text_len={text_len}: expected at least 2 (start and end tokens)")
    if not 0.0 <= mask_ratio < 1.0:
        raise ConfigError(f"mask_ratio={mask_ratio}: expected a fraction in [0, 1)")


def build_model(preset: str | Preset, image_size: int, text_len: int,
                mask_ratio: float = 0.0, image_mask: str = "random",
                pos_grid: int | None = None) -> CLIP:
    """Build a freshly initialised CLIPA model.

    Args:
        preset: name in ``presets.PRESETS`` or a ``Preset``.
        image_size: input side in pixels (a multiple of the patch size).
        text_len: text context length in tokens.
        mask_ratio: fraction of patches dropped in train mode (0 disables).
        image_mask: which patches go: "random", "grid" or "block" (token_reduction.py).
        pos_grid: the patch grid whose cells the sin-cos positions are measured in (None:
            integer patch indices, open_clip's table). ``model.pos_grid`` records it.

    Returns:
        ``open_clip.model.CLIP`` in train mode, float32.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    check_sizes(p, image_size, text_len, mask_ratio)
    if image_mask not in IMAGE_MASK_FNS:
        raise ConfigError(f"image_mask={image_mask!r}: expected one of {sorted(IMAGE_MASK_FNS)}")
    if pos_grid is not None and (not isinstance(pos_grid, int) or pos_grid <= 0):
        raise ConfigError(f"pos_grid={pos_grid!r}: expected a positive patch-grid side")
    vision = CLIPVisionCfg(**vision_cfg(p, image_size))
    text = CLIPTextCfg(**text_cfg(p, text_len))
    model = CLIP(embed_dim=p.embed_dim, vision_cfg=vision, text_cfg=text)
    grid = image_size // p.patch_size
    if pos_grid is not None and pos_grid != grid:
        with torch.no_grad():
            model.visual.positional_embedding.copy_(sincos_table(p.vision_width, grid, pos_grid))
    model.pos_grid = pos_grid
    if mask_ratio > 0:  # replaces open_clip's PatchDropout (random only, host-side RNG)
        model.visual.patch_dropout = ImageTokenMasking(mask_ratio, image_mask)
    return model


def sincos_table(width: int, grid: int, pos_grid: int) -> torch.Tensor:
    """The (1 + grid**2, width) sin-cos image position table, class token row (zeros)
    first, for a ``grid`` x ``grid`` patch grid whose positions are measured in cells of a
    ``pos_grid`` x ``pos_grid`` grid over the same image: patch i sits at i * pos_grid / grid.

    With ``pos_grid == grid`` this is open_clip's ``get_2d_sincos_pos_embed`` table; a finer
    grid samples the same sinusoids closer together rather than extending them to
    positions the model never saw (position interpolation, as resampling a learned table).
    """
    coords = np.arange(grid, dtype=np.float32) * np.float32(pos_grid / grid)
    mesh = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, 1, grid, grid)  # w first
    table = get_2d_sincos_pos_embed_from_grid(width, mesh)
    return torch.from_numpy(np.concatenate([np.zeros([1, width]), table])).float()


def pos_grid_of(model: nn.Module) -> int | None:
    """``pos_grid`` of a model from ``build_model`` (through a DDP / compile wrapper)."""
    for m in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if m is not None and hasattr(m, "pos_grid"):
            return m.pos_grid
    return None


def vision_cfg(p: Preset, image_size: int) -> dict:
    """open_clip ``CLIPVisionCfg`` fields of the CLIPA-v2 image tower (no patch dropout)."""
    return dict(layers=p.vision_layers, width=p.vision_width,
                head_width=p.vision_width // p.vision_heads, mlp_ratio=p.vision_mlp_ratio,
                patch_size=p.patch_size, image_size=image_size, no_ln_pre=True,
                pos_embed_type="sin_cos_2d", pool_type="avg", final_ln_after_pool=True)


def text_cfg(p: Preset, text_len: int) -> dict:
    """open_clip ``CLIPTextCfg`` fields of the CLIPA-v2 text tower (bidirectional, last pool)."""
    cfg = dict(context_length=text_len, vocab_size=p.vocab_size, width=p.text_width,
               heads=p.text_heads, layers=p.text_layers, pool_type=p.text_pool,
               no_causal_mask=True)
    if p.tokenizer == "bert-base-uncased":  # what open_clip's CLIPA configs name
        cfg.update(hf_tokenizer_name="bert-base-uncased",
                   tokenizer_kwargs={"strip_sep_token": True})
    return cfg


def adapt_state_dict(state_dict: dict[str, torch.Tensor], model: CLIP) -> dict[str, torch.Tensor]:
    """Fit a checkpoint trained at other token counts to ``model``'s image grid / text length.

    The fixed sin-cos image position embedding is taken from ``model`` (computed for its
    grid); a learned one would be resampled bicubically. The learned text position
    embedding (T_old, C) is linearly interpolated to (T_new, C).

    Returns:
        A new state dict with the same keys, loadable with ``strict=True``.
    """
    sd = dict(state_dict)
    key = "visual.positional_embedding"
    if key in sd and sd[key].shape != model.visual.positional_embedding.shape:
        if model.visual.positional_embedding.requires_grad:  # learned: resample the grid
            resize_pos_embed(sd, model)
        else:  # fixed sin-cos: recompute for the new grid
            sd[key] = model.visual.positional_embedding.detach().clone()
    resize_text_pos_embed(sd, model)
    return sd


def check_architecture(state_dict: dict[str, torch.Tensor], model: CLIP,
                       source: str = "checkpoint") -> None:
    """Raise ``ConfigError`` if ``state_dict`` is not from ``model``'s architecture.

    Position tables may differ in length (they are resized); every other tensor must
    exist on both sides with the same shape.
    """
    own = model.state_dict()
    resized = {"visual.positional_embedding", "positional_embedding"}
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state_dict))
              if k not in resized and state_dict[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {unexpected[:3]}" if unexpected else "",
            f"shape {shapes[:3]}" if shapes else ""]))
        raise ConfigError(f"{source}: weights are from another architecture than the model "
                          f"being built ({detail}); expected the same preset")


def load_weights(model: CLIP, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state_dict`` (any image size / text length) into ``model``.

    Raises:
        ConfigError: a missing / unexpected key or a shape that differs (another preset),
            naming ``source``.
    """
    check_architecture(state_dict, model, source)
    model.load_state_dict(adapt_state_dict(state_dict, model), strict=True)


PATCH_EMBED = "visual.conv1.weight"  # open_clip's patch embedding (a stride-P convolution)


def param_groups(model: nn.Module, weight_decay: float,
                 patch_embed_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups: decay only on weight matrices; the patch embedding in a group of its own.

    Biases, norm gains, embeddings (token, position, class) and the logit scale stay
    undecayed; frozen tensors (the sin-cos position embedding) are left out. The patch
    embedding is a decayed weight matrix whose LR is ``lr_scale`` x the stage's
    (``StageConfig.patch_embed_lr_scale``: why). Always three groups, so an optimizer
    state resumes whatever the scale.

    Returns:
        [{"params": decayed, "weight_decay": weight_decay, "lr_scale": 1.0, "names": [...]},
         {"params": the rest, "weight_decay": 0.0, "lr_scale": 1.0, "names": [...]},
         {"params": [patch embedding], "weight_decay": weight_decay,
          "lr_scale": patch_embed_lr_scale, "names": [PATCH_EMBED]}]
    """
    decay, no_decay, patch = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_embedding = "embedding" in name or name.endswith("class_embedding")
        if name == PATCH_EMBED:
            patch.append((name, p))
        else:
            (decay if p.ndim >= 2 and not is_embedding else no_decay).append((name, p))
    return [{"params": [p for _, p in group], "weight_decay": wd, "lr_scale": scale,
             "names": [n for n, _ in group]}
            for group, wd, scale in ((decay, weight_decay, 1.0), (no_decay, 0.0, 1.0),
                                     (patch, weight_decay, patch_embed_lr_scale))]


def get_tokenizer(preset: str | Preset, text_len: int, reduction: str = "truncate",
                  seed: int = 0, vocab_path: str | None = None):
    """The preset's tokenizer, fitting captions into ``text_len`` tokens.

    Args:
        preset: name or ``Preset`` (its ``tokenizer``: "openai-bpe" or "bert-base-uncased").
        text_len: tokens per caption, start/end included.
        reduction: "truncate" (evaluation), or a training reduction: "random", "block",
            "syntax" (token_reduction.py).
        seed: seeds random / block reductions.
        vocab_path: BERT vocab.txt (default: ``tokenizer.find_bert_vocab``).

    Returns:
        callable(list[str]) -> LongTensor (N, text_len), identical to open_clip's tokenizer
        for the same vocabulary when ``reduction="truncate"``.
    """
    from clipa_model.tokenizer import CaptionTokenizer

    p = get_preset(preset) if isinstance(preset, str) else preset
    return CaptionTokenizer(p.tokenizer, text_len, reduction, seed, vocab_path)


def flops_per_sample(preset: str | Preset, image_size: int, text_len: int,
                     mask_ratio: float = 0.0, train: bool = True) -> float:
    """Matmul FLOPs per sample from the token counts (forward x3 when training).

    Counts 2 FLOPs per multiply-add in the patch embedding, attention projections, attention
    scores, MLPs and output projections; norms, softmax and the loss are ignored.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    grid = (image_size // p.patch_size) ** 2
    n_img = 1 + max(1, int(grid * (1 - mask_ratio)))  # class token + kept patches

    def tower(n: int, width: int, layers: int, mlp_ratio: float) -> float:
        per_layer = n * width * width * (4 + 2 * mlp_ratio) + 2 * n * n * width
        return 2 * layers * per_layer

    fwd = (2 * grid * 3 * p.patch_size ** 2 * p.vision_width  # patch embedding (all patches)
           + tower(n_img, p.vision_width, p.vision_layers, p.vision_mlp_ratio)
           + 2 * p.vision_width * p.embed_dim
           + tower(text_len, p.text_width, p.text_layers, 4.0)
           + 2 * p.text_width * p.embed_dim)
    return 3 * fwd if train else fwd
