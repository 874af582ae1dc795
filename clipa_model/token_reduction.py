"""Token reduction, the heart of CLIPA: fewer image patches and text tokens per sample.

Image (CLIPA v1 ablations; docs/PAPER.md):

- ``resize`` (the default and the best): a smaller ``image_size`` gives fewer patches while
  keeping the whole image. It is the stage's image size, applied by the data loader.
- ``random`` / ``grid`` / ``block`` masking keep ``num_kept(N, mask_ratio)`` of the N patch
  tokens, in training only (``ImageTokenMasking`` is the identity in eval mode). CLIPA-v2
  finetunes with random masking on top of resizing (30% at 224 px, 40% at 336 px).

Every image strategy returns the kept patch indices (B, K), sorted, with K fixed by the mask
ratio: static shapes, no host synchronisation, so the same code runs under torch_xla.

Text, applied by the tokenizer to training captions only (evaluation truncates):

- ``truncate`` keeps the first tokens; ``random`` keeps a random subset in order; ``block``
  keeps a random contiguous window; ``syntax`` keeps nouns, then adjectives, then verbs,
  then the rest, in their original order, and only when the caption is over budget.

Syntax masking needs part-of-speech tags offline. NLTK's tagger (what the CLIPA code calls)
downloads its model at run time, which these machines cannot do; TextBlob's ``PatternTagger``
(the Brill-style lexicon + contextual-rule tagger of CLiPS Pattern) ships its lexicon in
the wheel, runs in ~30 us per caption and emits the same Penn Treebank tags, so the CLIPA
priority rule (NN* > JJ* > VB* > others) applies unchanged.
"""
from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Sequence

import torch
from torch import nn

from clipa_model.config import IMAGE_MASKS


# ---------------------------------------------------------------- image

def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches kept at ``mask_ratio``: ``max(1, int(N * (1 - ratio)))`` (open_clip's rule)."""
    return max(1, int(num_patches * (1.0 - mask_ratio)))


def _patch_rows_cols(grid: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch in raster order: two (N,) long tensors."""
    idx = torch.arange(grid * grid, device=device)
    return idx // grid, idx % grid


def _smallest_k(keys: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, N) keys -> (B, K) indices of the K smallest keys, in ascending index order."""
    return keys.argsort(dim=1)[:, :keep].sort(dim=1).values


def random_keep_indices(batch: int, grid: int, keep: int, device=None) -> torch.Tensor:
    """Random masking: K patches drawn uniformly without replacement per sample.

    Returns:
        (B, K) long, sorted patch indices into the (grid x grid) raster.
    """
    return _smallest_k(torch.rand(batch, grid * grid, device=device), keep)


def grid_keep_indices(batch: int, grid: int, keep: int, device=None) -> torch.Tensor:
    """Grid masking: a regular pattern over 2x2 cells of patches.

    Each sample ranks the four positions inside a 2x2 cell at random and keeps whole
    positions in that order, so 75% masking keeps one patch per cell (all at the same
    offset: CLIPA's grid), 50% two and 25% three. A ratio between those fills the next
    position in a random subset of cells.

    Returns:
        (B, K) long, sorted patch indices.
    """
    rows, cols = _patch_rows_cols(grid, device)
    slot = (rows % 2) * 2 + (cols % 2)  # (N,) position inside the 2x2 cell
    slot_rank = torch.rand(batch, 4, device=device).argsort(dim=1).argsort(dim=1)  # (B, 4)
    keys = slot_rank[:, slot].float() + 0.5 * torch.rand(batch, grid * grid, device=device)
    return _smallest_k(keys, keep)


def block_keep_indices(batch: int, grid: int, keep: int, device=None) -> torch.Tensor:
    """Block masking: one contiguous block of K patches at a random place per sample.

    The block is ``ceil(sqrt(K))`` rows by ``ceil(K / rows)`` columns; its first K patches
    in raster order are kept (the last row may be partly filled).

    Returns:
        (B, K) long, sorted patch indices.
    """
    n = grid * grid
    block_h = min(grid, math.ceil(math.sqrt(keep)))
    block_w = math.ceil(keep / block_h)
    top = torch.randint(0, grid - block_h + 1, (batch, 1), device=device)
    left = torch.randint(0, grid - block_w + 1, (batch, 1), device=device)
    rows, cols = _patch_rows_cols(grid, device)
    inside = (rows >= top) & (rows < top + block_h) & (cols >= left) & (cols < left + block_w)
    order_in_block = (rows - top) * block_w + (cols - left)  # (B, N) raster order in block
    keys = torch.where(inside, order_in_block, n + torch.arange(n, device=device))
    return _smallest_k(keys, keep)


# The image-mask registry: config.IMAGE_MASKS names exactly these (a test checks it).
IMAGE_MASK_FNS = {"random": random_keep_indices, "grid": grid_keep_indices,
                  "block": block_keep_indices}


class ImageTokenMasking(nn.Module):
    """Drop image patch tokens in training; the class token always stays.

    Replaces open_clip's ``PatchDropout`` in ``VisionTransformer`` (called after the
    position embedding is added, before the encoder). Draws on the tokens' own device.

    Args:
        mask_ratio: fraction of patches dropped, in [0, 1).
        strategy: "random", "grid" or "block".
    """

    def __init__(self, mask_ratio: float, strategy: str = "random"):
        super().__init__()
        if strategy not in IMAGE_MASK_FNS:
            raise ValueError(f"image_mask={strategy!r}: expected one of {IMAGE_MASKS}")
        self.mask_ratio, self.strategy = mask_ratio, strategy

    def extra_repr(self) -> str:
        return f"mask_ratio={self.mask_ratio}, strategy={self.strategy!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, C) -> (B, 1 + K, C) in train mode; unchanged in eval mode."""
        if not self.training or self.mask_ratio == 0.0:
            return x
        batch, n, width = x.shape[0], x.shape[1] - 1, x.shape[2]
        grid = math.isqrt(n)
        keep = IMAGE_MASK_FNS[self.strategy](batch, grid, num_kept(n, self.mask_ratio), x.device)
        patches = torch.gather(x[:, 1:], 1, keep.unsqueeze(-1).expand(-1, -1, width))
        return torch.cat([x[:, :1], patches], dim=1)


# ---------------------------------------------------------------- text

def truncate_tokens(tokens: Sequence[int], budget: int, rng: random.Random | None = None) -> list:
    """Keep the first ``budget`` tokens."""
    return list(tokens[:budget])


def random_mask_tokens(tokens: Sequence[int], budget: int, rng: random.Random) -> list:
    """Keep ``budget`` tokens drawn at random, in their original order."""
    if len(tokens) <= budget:
        return list(tokens)
    kept = sorted(rng.sample(range(len(tokens)), budget))
    return [tokens[i] for i in kept]


def block_mask_tokens(tokens: Sequence[int], budget: int, rng: random.Random) -> list:
    """Keep a random contiguous window of ``budget`` tokens."""
    if len(tokens) <= budget:
        return list(tokens)
    start = rng.randint(0, len(tokens) - budget)  # inclusive upper bound
    return list(tokens[start:start + budget])


def syntax_priority(tag: str) -> int:
    """CLIPA's syntax order of a Penn Treebank tag: nouns 0, adjectives 1, verbs 2, rest 3."""
    for rank, prefix in enumerate(("NN", "JJ", "VB")):
        if tag.startswith(prefix):
            return rank
    return 3


def syntax_mask_words(tags: Sequence[str], token_counts: Sequence[int], budget: int) -> list[int]:
    """Which words to keep so that their tokens fit ``budget``, by syntax priority.

    Words are taken by (priority, position): all nouns first, then adjectives, verbs and the
    rest; a word whose tokens no longer fit is skipped. Nothing is dropped when the whole
    caption fits.

    Args:
        tags: Penn Treebank tag of each word.
        token_counts: tokens each word becomes (sub-word pieces).
        budget: tokens available for the caption (start/end tokens excluded).

    Returns:
        Indices of the kept words in their original order.
    """
    if sum(token_counts) <= budget:
        return list(range(len(tags)))
    order = sorted(range(len(tags)), key=lambda i: (syntax_priority(tags[i]), i))
    kept, used = [], 0
    for i in order:
        if used + token_counts[i] <= budget:
            kept.append(i)
            used += token_counts[i]
    return sorted(kept)


@lru_cache(maxsize=1)
def _pattern_tagger():
    from textblob.en.taggers import PatternTagger  # lexicon ships in the wheel

    return PatternTagger()


def pos_tag(text: str) -> list[tuple[str, str]]:
    """Split ``text`` into words and tag each with its Penn Treebank part of speech.

    Returns:
        [(word, tag), ...], punctuation as separate words.
    """
    return [(str(w), str(t)) for w, t in _pattern_tagger().tag(text)]


def syntax_mask_text(text: str, encode, budget: int, rng: random.Random | None = None) -> list:
    """CLIPA's syntax masking of a caption: its words kept by part of speech to fit ``budget``.

    Args:
        encode: caption or word -> token ids (the tokenizer's own).
    """
    ids = encode(text)
    if len(ids) <= budget:
        return ids
    tagged = pos_tag(text)
    pieces = [encode(word) for word, _ in tagged]
    kept = syntax_mask_words([t for _, t in tagged], [len(p) for p in pieces], budget)
    return [i for k in kept for i in pieces[k]]


def _on_tokens(fn):
    """A token-list reduction as a caption reduction: ``(text, encode, budget, rng) -> ids``."""
    return lambda text, encode, budget, rng: fn(encode(text), budget, rng)


# The text-reduction registry: config.TEXT_REDUCTIONS names exactly these (a test checks it).
# Each is ``(caption, encode, budget, rng) -> token ids``.
TEXT_REDUCTION_FNS = {"truncate": _on_tokens(truncate_tokens), "random": _on_tokens(random_mask_tokens),
                      "block": _on_tokens(block_mask_tokens), "syntax": syntax_mask_text}
