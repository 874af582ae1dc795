"""DataComp fidelity: the datacomp_basic preset at its boundaries, uid lists, and eval-set
decontamination, on hand-made samples and through run_filter_shard."""
import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clipa_model.artifacts import write_marker
from components.filter_shard.component import run_filter_shard
from components.filter_shard.matching import UidList, UidListError, phash, uid_pair
from components.filter_shard.samples import FilterConfig, check_sample

UIDS = [f"{i:032x}" for i in (0x1, 0xABC, 2**100 + 7)]  # 128-bit hex, as DataComp writes them


def _photo(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A photo-like JPEG (smooth noise + colour) whose content depends on the seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _members(caption: str, width=256, height=256, original=None, uid=None, seed=0) -> dict:
    meta = {"url": f"http://e.com/{seed}.jpg"}
    if original:
        meta.update(original_width=original[0], original_height=original[1])
    if uid:
        meta["uid"] = uid
    return {"jpg": _photo(width, height, seed), "txt": caption.encode(),
            "json": json.dumps(meta).encode()}


def _reason(members, cfg, **kw):
    return check_sample("000000001", members, cfg, language=lambda t: "en"
                        if t.startswith(("a ", "the ")) else "de", **kw).reason


def test_datacomp_basic_at_its_boundaries():
    basic = FilterConfig.from_preset("datacomp_basic")
    assert (basic.min_image_side, basic.english_only, basic.min_caption_words,
            basic.min_caption_chars, basic.max_aspect_ratio) == (200, True, 3, 6, 3.0)
    ok = "a red house"  # 3 words, 11 characters
    assert _reason(_members(ok, original=(200, 600)), basic) is None  # 200 px, aspect 3
    assert _reason(_members(ok, original=(199, 400)), basic) == "min_side"
    assert _reason(_members(ok, original=(200, 601)), basic) == "aspect_ratio"
    assert _reason(_members("a house", original=(300, 300)), basic) == "caption_words"
    assert _reason(_members("a b c", original=(300, 300)), basic) == "caption_chars"
    assert _reason(_members("a b cd", original=(300, 300)), basic) is None  # 6 characters
    assert _reason(_members("ein rotes Haus", original=(300, 300)), basic) == "not_english"
    # Sizes are the source's (KEY.json), as DataComp's: a 150 px original stored at 256 px
    assert _reason(_members(ok, 256, 256, original=(150, 150)), basic) == "min_side"
    assert _reason(_members(ok, 199, 250), basic) == "min_side"  # no original size: stored
    # the defaults are laxer, and a setting given overrides the preset
    assert _reason(_members(ok, original=(199, 400)), FilterConfig()) is None
    assert FilterConfig.from_preset("datacomp_basic", min_image_side=100).min_image_side == 100
    with pytest.raises(ValueError, match="'datacomp'.*datacomp_basic"):
        FilterConfig.from_preset("datacomp")


def _write_uids(path, uids, fmt):
    if fmt == "npy":
        np.save(path, np.array([uid_pair(u) for u in uids], np.dtype("u8,u8")))
    else:
        pd.DataFrame({"uid": uids, "text": ["x"] * len(uids)}).to_parquet(path)


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
def test_uid_list_keeps_listed_uids_only(tmp_path, fmt):
    path = str(tmp_path / f"subset.{fmt}")
    _write_uids(path, UIDS[:2], fmt)
    uids = UidList.load(path)
    assert len(uids) == 2 and UIDS[0] in uids and UIDS[1] in uids
    assert UIDS[2] not in uids and "not-a-uid" not in uids
    cfg = FilterConfig(uid_list=path)
    assert _reason(_members("a red house", uid=UIDS[1]), cfg, uids=uids) is None
    assert _reason(_members("a red house", uid=UIDS[2]), cfg, uids=uids) == "uid_not_listed"
    assert _reason(_members("a red house"), cfg, uids=uids) == "uid_not_listed"  # no uid


def test_uid_list_in_an_unknown_format_fails_before_work(tmp_path):
    (tmp_path / "uids.txt").write_text("\n".join(UIDS))
    with pytest.raises(UidListError, match=r"uids\.txt: unknown uid list format '\.txt'"):
        run_filter_shard(str(tmp_path / "nowhere"), str(tmp_path / "out"),
                         uid_list=str(tmp_path / "uids.txt"))
    np.save(tmp_path / "floats.npy", np.zeros(3))
    with pytest.raises(UidListError, match=r"floats\.npy: an array of dtype float64"):
        UidList.load(str(tmp_path / "floats.npy"))
    assert not (tmp_path / "out").exists()  # nothing was started


def _datacomp_shards(folder, samples):
    """DataComp's layout: shards/NNNNNNNN.tar with KEY.jpg/txt/json (uid in json)."""
    (folder / "shards").mkdir(parents=True)
    with tarfile.open(folder / "shards" / "00000000.tar", "w") as tf:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                tf.addfile(info, io.BytesIO(members[ext]))


def test_decontamination_drops_reencoded_and_resized_eval_images(tmp_path):
    evals = [_photo(320, 240, 100 + i) for i in range(4)]
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    with tarfile.open(eval_dir / "eval-00000.tar", "w") as tf:
        for i, data in enumerate(evals):
            for name, blob in ((f"{i:04d}.jpg", data), (f"{i:04d}.cls", b"0")):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tf.addfile(info, io.BytesIO(blob))
    # an exact copy, a copy re-encoded at quality 60 and 0.7x size, and 6 unrelated images
    copy = Image.open(io.BytesIO(evals[1])).resize((224, 168), Image.BILINEAR)
    buf = io.BytesIO()
    copy.save(buf, format="JPEG", quality=60)
    assert buf.getvalue() != evals[1]
    assert bin(phash(buf.getvalue()) ^ phash(evals[1])).count("1") <= 4
    caption = "a photo of something nice"
    samples = [("000000000", {**_members(caption, seed=0), "jpg": evals[0]}),
               ("000000001", {**_members(caption, seed=1), "jpg": buf.getvalue()})]
    samples += [(f"00000001{i}", _members(caption, seed=10 + i)) for i in range(6)]
    _datacomp_shards(tmp_path / "dc", samples)
    write_marker(str(tmp_path / "dc"), "shards", tars=[str(tmp_path / "dc/shards/00000000.tar")],
                 count=None, successes=None, failures={}, seconds=0.0)
    out = tmp_path / "out"
    result = run_filter_shard(str(tmp_path / "dc"), str(out), decontaminate=str(eval_dir),
                              samples_per_shard=4)
    assert result["dropped"] == {"eval_duplicate": 2}
    assert result["count"] == 6
    off = run_filter_shard(str(tmp_path / "dc"), str(tmp_path / "off"), samples_per_shard=4)
    assert off["count"] == 8  # without the option, the copies stay
