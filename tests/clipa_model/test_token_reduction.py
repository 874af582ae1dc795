"""Token reduction: which image patches and which caption tokens survive each strategy."""
import random

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from clipa_model import token_reduction as tr
from clipa_model.config import ConfigError, StageConfig
from clipa_model.model import build_model, get_tokenizer
from clipa_model.tokenizer import CaptionTokenizer, WordPieceTokenizer, basic_words, find_bert_vocab


# ---------------------------------------------------------------- image

def _rows_cols(idx: torch.Tensor, grid: int):
    return (idx // grid).tolist(), (idx % grid).tolist()


@pytest.mark.parametrize("ratio, kept", [(0.3, 179), (0.4, 345), (0.75, 64), (0.999, 1)])
def test_kept_count_follows_open_clip(ratio, kept):
    n = 576 if ratio == 0.4 else 256
    assert tr.num_kept(n, ratio) == kept


@pytest.mark.parametrize("fn", [tr.random_keep_indices, tr.grid_keep_indices, tr.block_keep_indices])
def test_every_strategy_keeps_k_distinct_sorted_patches(fn):
    torch.manual_seed(0)
    idx = fn(8, 6, 20)  # 6x6 grid (84 px / 14), keep 20
    assert idx.shape == (8, 20)
    for row in idx:
        assert row.tolist() == sorted(set(row.tolist()))  # distinct, raster order
        assert 0 <= row.min() and row.max() < 36


def test_grid_masking_at_75_percent_keeps_one_patch_per_2x2_cell_same_offset():
    torch.manual_seed(1)
    idx = tr.grid_keep_indices(4, 6, tr.num_kept(36, 0.75))  # 9 patches of 36
    for row in idx:
        rows, cols = _rows_cols(row, 6)
        cells = {(r // 2, c // 2) for r, c in zip(rows, cols)}
        offsets = {(r % 2, c % 2) for r, c in zip(rows, cols)}
        assert len(cells) == 9 and len(offsets) == 1  # every cell once, one offset


def test_grid_masking_at_50_percent_keeps_two_positions_of_every_cell():
    torch.manual_seed(2)
    row = tr.grid_keep_indices(1, 4, 8)[0]
    rows, cols = _rows_cols(row, 4)
    offsets = {(r % 2, c % 2) for r, c in zip(rows, cols)}
    assert len(offsets) == 2
    assert sorted({(r // 2, c // 2) for r, c in zip(rows, cols)}) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_block_masking_keeps_one_contiguous_rectangle():
    torch.manual_seed(3)
    for row in tr.block_keep_indices(16, 6, 9):  # a 3x3 block somewhere in 6x6
        rows, cols = _rows_cols(row, 6)
        assert max(rows) - min(rows) == 2 and max(cols) - min(cols) == 2
    row = tr.block_keep_indices(1, 4, 5)[0]  # 3 rows x 2 cols, last row partly filled
    rows, cols = _rows_cols(row, 4)
    assert max(rows) - min(rows) == 2 and max(cols) - min(cols) == 1


def test_masking_module_keeps_class_token_and_acts_in_training_only():
    x = torch.arange(2 * 17 * 3, dtype=torch.float32).view(2, 17, 3)  # 4x4 grid + class token
    for strategy in tr.IMAGE_MASKS:
        m = tr.ImageTokenMasking(0.5, strategy).train()
        y = m(x)
        assert y.shape == (2, 9, 3)
        torch.testing.assert_close(y[:, 0], x[:, 0])
        for b in range(2):  # every kept token is one of the sample's own patch tokens
            own = {tuple(t) for t in x[b, 1:].tolist()}
            assert all(tuple(t) in own for t in y[b, 1:].tolist())
        assert m.eval()(x) is x


@pytest.mark.parametrize("strategy", tr.IMAGE_MASKS)
def test_model_uses_the_strategy_with_the_right_token_count(strategy):
    model = build_model("tiny", 84, 8, mask_ratio=0.5, image_mask=strategy).train()
    seen = []
    hook = model.visual.transformer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        model.encode_image(torch.zeros(2, 3, 84, 84))
        model.eval().encode_image(torch.zeros(2, 3, 84, 84))
    hook.remove()
    assert seen == [1 + 18, 1 + 36]


# ---------------------------------------------------------------- text: the strategies

def test_truncation_keeps_the_first_tokens():
    assert tr.truncate_tokens([5, 6, 7, 8], 2) == [5, 6]
    assert tr.truncate_tokens([5], 3) == [5]


def test_random_masking_keeps_a_subset_in_order():
    tokens = list(range(100, 120))
    kept = tr.random_mask_tokens(tokens, 6, random.Random(0))
    assert len(kept) == 6 and kept == sorted(kept) and set(kept) <= set(tokens)
    assert kept != tokens[:6]  # not a truncation (fixed seed)
    assert tr.random_mask_tokens([1, 2], 6, random.Random(0)) == [1, 2]


def test_block_masking_keeps_one_contiguous_window():
    tokens = list(range(20))
    starts = set()
    for seed in range(20):
        kept = tr.block_mask_tokens(tokens, 5, random.Random(seed))
        assert kept == list(range(kept[0], kept[0] + 5))
        starts.add(kept[0])
    assert len(starts) > 3 and max(starts) <= 15


def test_syntax_order_nouns_adjectives_verbs_rest():
    assert [tr.syntax_priority(t) for t in ("NNS", "NNP", "JJR", "VBG", "DT", "IN")] == \
        [0, 0, 1, 2, 3, 3]


def test_syntax_masking_keeps_nouns_then_adjectives_then_verbs_in_original_order():
    #        a     small  dog   runs   on    green grass
    tags = ["DT", "JJ", "NN", "VBZ", "IN", "JJ", "NN"]
    ones = [1] * 7
    assert tr.syntax_mask_words(tags, ones, 2) == [2, 6]  # dog grass
    assert tr.syntax_mask_words(tags, ones, 3) == [1, 2, 6]  # small dog grass
    assert tr.syntax_mask_words(tags, ones, 5) == [1, 2, 3, 5, 6]  # + green runs
    assert tr.syntax_mask_words(tags, ones, 7) == list(range(7))  # fits: untouched
    # A noun that needs 3 tokens no longer fits after the first: skipped, not cut.
    assert tr.syntax_mask_words(tags, [1, 1, 1, 1, 1, 1, 3], 3) == [1, 2, 5]


def test_pos_tagger_runs_offline():
    tags = dict(tr.pos_tag("a small dog runs on green grass"))
    assert tags["dog"].startswith("NN") and tags["grass"].startswith("NN")
    assert tags["small"].startswith("JJ") and tags["runs"].startswith("VB")
    assert tags["a"] == "DT"


# ---------------------------------------------------------------- text: tokenizers

CAPTIONS = ["a photo of a red circle in the top left corner of a noisy background",
            "Stars!", "", "a small dog runs quickly across the wet green grass at dawn"]


def test_bpe_truncation_equals_open_clips_tokenizer():
    ours = get_tokenizer("tiny", 8)(CAPTIONS)
    torch.testing.assert_close(ours, SimpleTokenizer(context_length=8)(CAPTIONS))


def test_bpe_syntax_masking_keeps_the_nouns_when_over_budget():
    bpe = SimpleTokenizer()
    tok = CaptionTokenizer("openai-bpe", 5, "syntax")  # 3 caption tokens
    ids = tok(["a small dog runs on green grass", "a dog"])
    kept = bpe.decode([t for t in ids[0].tolist()[1:] if t not in (0, bpe.eot_token_id)])
    assert kept.split() == ["small", "dog", "grass"]
    assert ids[1].tolist() == SimpleTokenizer(context_length=5)(["a dog"])[0].tolist()


def test_training_reductions_differ_from_truncation_and_fill_the_budget():
    trunc = get_tokenizer("tiny", 6)(CAPTIONS[:1])
    for name in ("random", "block", "syntax"):
        out = get_tokenizer("tiny", 6, reduction=name, seed=3)(CAPTIONS[:1])
        assert (out[0] != 0).sum() == 6 and out[0, 0] == trunc[0, 0] and out[0, -1] == trunc[0, -1]
        assert not torch.equal(out, trunc), name


def test_wordpiece_matches_hugging_face_bert_uncased():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = find_bert_vocab()
    ours = WordPieceTokenizer(vocab)
    assert len(ours.vocab) == 30_522
    hf = tokenizers.BertWordPieceTokenizer(vocab, lowercase=True)
    for text in ["A photo of a Café in Zürich!", "unaffable naïve résumé", "東京 tower, 2023...",
                 "don't stop-believing #tag", "emoji 😀 test\tTabs", "x" * 120]:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False).ids, text
    assert basic_words("Hello, World!") == ["hello", ",", "world", "!"]


def test_bert_caption_format_is_open_clips_clipa_format():
    tok = CaptionTokenizer("bert-base-uncased", 6)
    ids = tok(["a photo of a red circle in the corner", "hi"])
    cls = tok.start_id
    assert ids[0].tolist()[0] == cls and ids[0].tolist()[-1] == 0  # [SEP] stripped to 0
    assert (ids[0] != 0).sum() == 5  # [CLS] + 4 word pieces
    assert ids[1].tolist()[:2] == [cls, WordPieceTokenizer(tok.vocab_path).vocab["hi"]]
    syntax = CaptionTokenizer("bert-base-uncased", 5, "syntax")(["a small dog runs on green grass"])
    wp = WordPieceTokenizer(tok.vocab_path)
    assert syntax[0].tolist()[1:4] == [wp.vocab[w] for w in ("small", "dog", "grass")]


def test_text_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="text_reduction"):
        StageConfig(text_reduction="shuffle")
    with pytest.raises(ConfigError, match="image_mask"):
        StageConfig(image_mask="checker")
    with pytest.raises(ConfigError, match="vocab_path"):
        find_bert_vocab("/nonexistent/vocab.txt")


def test_every_configurable_name_resolves_in_its_registry():
    """config.py lists the names a StageConfig accepts (torch-free); the registries hold the
    code. A name in one and not the other would pass validation and fail mid-training."""
    from clipa_model.config import IMAGE_MASKS, TEXT_REDUCTIONS

    assert set(IMAGE_MASKS) == set(tr.IMAGE_MASK_FNS)
    assert set(TEXT_REDUCTIONS) == set(tr.TEXT_REDUCTION_FNS)
    for name in IMAGE_MASKS:
        keep = tr.IMAGE_MASK_FNS[name](2, 6, 9)          # a 6x6 grid, 9 patches kept
        assert keep.shape == (2, 9) and bool((keep[:, 1:] > keep[:, :-1]).all())
    encode = lambda text: [len(w) for w in text.split()]  # noqa: E731  a word -> its length
    for name in TEXT_REDUCTIONS:
        ids = tr.TEXT_REDUCTION_FNS[name]("a red cat sits on the old mat", encode, 4, random.Random(0))
        assert len(ids) == 4, name
