"""Model presets: short size names ("tiny", "B/16", "H/14") decoded by one lookup table.

The paper sizes follow CLIPA-v2 (open_clip's ``ViT-*-CLIPA`` configs): avg pooling of the
patch tokens then LayerNorm, no LayerNorm before the encoder, fixed 2D sin-cos position
embeddings (recomputed for any grid), a bidirectional text encoder pooled at its last
position, a BERT uncased tokenizer. ``tiny`` is the same code path shrunk for a CPU, with
open_clip's bundled BPE tokenizer (no download) and patch 14, so 84, 224 and 336 px all
tile exactly (6x6, 16x16, 24x24 patches).

A /16 preset needs image sizes that are multiples of 16 (CLIPA v1 pretrained B/16 at 112).

Parameter counts of L/14, H/14 and bigG/14 equal open_clip's ``ViT-*-14-CLIPA`` configs
(``open_clip_name``); the only difference is the image position table, which open_clip
learns (257 x width at 224 px) and CLIPA-v2 fixes to 2D sin-cos (same shape, not trained).
tests/clipa_model/test_model.py checks both statements.
"""
from __future__ import annotations

from dataclasses import dataclass

from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from clipa_model.config import ConfigError


@dataclass(frozen=True)
class Preset:
    """Architecture of one model size (image size and text length come from the stage).

    Attributes:
        embed_dim: joint embedding width.
        patch_size: image patch side in pixels.
        vision_width, vision_layers, vision_heads, vision_mlp_ratio: image tower.
        text_width, text_layers, text_heads: text tower.
        vocab_size: rows of the token embedding.
        tokenizer: "openai-bpe" (open_clip's bundled vocab) or "bert-base-uncased".
        text_pool: text pooling, "last" (CLIPA) or "argmax" (CLIP's end token).
        open_clip_name: the matching open_clip model config, if any (for comparison).
    """

    embed_dim: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_width: int
    text_layers: int
    text_heads: int
    vision_mlp_ratio: float = 4.0
    vocab_size: int = 32_000
    tokenizer: str = "bert-base-uncased"
    text_pool: str = "last"
    open_clip_name: str = ""


_BPE = dict(vocab_size=49_408, tokenizer="openai-bpe")

PRESETS: dict[str, Preset] = {
    # CPU demo and tests: ~3.5 M parameters outside the token embedding.
    "tiny": Preset(embed_dim=128, patch_size=14, vision_width=128, vision_layers=4,
                   vision_heads=2, text_width=128, text_layers=2, text_heads=2, **_BPE),
    # The paper's sizes (docs/PAPER.md, architecture table).
    "S/16": Preset(384, 16, 384, 12, 6, 384, 12, 6),
    "B/16": Preset(512, 16, 768, 12, 12, 512, 12, 8),
    "L/14": Preset(768, 14, 1024, 24, 16, 768, 12, 12, open_clip_name="ViT-L-14-CLIPA"),
    "H/14": Preset(1024, 14, 1280, 32, 16, 1024, 24, 16, open_clip_name="ViT-H-14-CLIPA"),
    # MLP 8192 wide: int(1664 * 8192 / 1664) == 8192, like open_clip's mlp_ratio 4.9231.
    "bigG/14": Preset(1280, 14, 1664, 48, 16, 1280, 32, 20, vision_mlp_ratio=8192 / 1664,
                      open_clip_name="ViT-bigG-14-CLIPA"),
    # Wider image towers of the tiny model (heads of 64 channels, same depth and text tower):
    # the model sizes of the inverse-scaling law in miniature (bench/bench_token_scaling.py).
    "tiny-w192": Preset(embed_dim=128, patch_size=14, vision_width=192, vision_layers=4,
                        vision_heads=3, text_width=128, text_layers=2, text_heads=2, **_BPE),
    "tiny-w256": Preset(embed_dim=128, patch_size=14, vision_width=256, vision_layers=4,
                        vision_heads=4, text_width=128, text_layers=2, text_heads=2, **_BPE),
    # The tiny model with CLIPA-v2's BERT tokenizer (32,000-row embedding, vocab.txt needed).
    "tiny-bert": Preset(embed_dim=128, patch_size=14, vision_width=128, vision_layers=4,
                        vision_heads=2, text_width=128, text_layers=2, text_heads=2),
}

# Preprocessing stored with every checkpoint (model_config.json).
IMAGE_MEAN = tuple(OPENAI_DATASET_MEAN)
IMAGE_STD = tuple(OPENAI_DATASET_STD)
INTERPOLATION = "bilinear"


def get_preset(name: str) -> Preset:
    """Look up a preset by its short name; the error lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset={name!r}: unknown model preset; expected one of "
                          f"{sorted(PRESETS)}") from None
