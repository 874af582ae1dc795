"""Synthetic demo data: classes, captions within the pretrain token budget, eval-set format."""
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import open_clip
from PIL import Image

from clipa_model.artifacts import read_marker
from pipelines.demo_data import (CLASSNAMES, TEMPLATES, make_caption, render_image,
                                 write_demo_images, write_eval_set, write_filtered_shards)


def test_classes_and_templates():
    assert len(CLASSNAMES) >= 10 and len(set(CLASSNAMES)) == len(CLASSNAMES)
    assert len(TEMPLATES) >= 5 and all(t.count("{}") == 1 for t in TEMPLATES)


def test_write_demo_images_rows_and_files(tmp_path):
    rows = write_demo_images(str(tmp_path), 24, seed=1, size=64)
    assert len(rows) == 24
    assert sorted({r["label"] for r in rows}) == list(range(10)) or len(CLASSNAMES) > 10
    for row in rows:
        assert row["file"].startswith("images/") and row["file"].endswith(".jpg")
        assert Image.open(tmp_path / row["file"]).size == (64, 64)
        assert CLASSNAMES[row["label"]] in row["caption"]
        assert len(row["caption"].split()) > 2  # passes the DataComp caption filter


def test_captions_name_the_class_within_8_tokens():
    tokenizer = open_clip.SimpleTokenizer()
    rng = np.random.default_rng(0)
    hits, n = 0, 400
    for i in range(n):
        name = CLASSNAMES[i % len(CLASSNAMES)]
        _, attrs = render_image(name, 32, rng)
        tokens = tokenizer([make_caption(name, attrs, rng)], context_length=8)[0].tolist()
        noun = tokenizer.encode(name)
        kept = tokens[:7]  # the 8th position holds the end token after truncation
        hits += any(kept[j:j + len(noun)] == noun for j in range(len(kept)))
    assert hits / n >= 0.9


def test_captions_vary():
    rng = np.random.default_rng(0)
    captions = set()
    for _ in range(100):
        _, attrs = render_image("stars", 32, rng)
        captions.add(make_caption("stars", attrs, rng))
    assert len(captions) > 50


def test_images_do_not_depend_on_the_number_of_processes():
    from pipelines.demo_data import _samples

    one = list(_samples(80, seed=3, size=48, processes=1))
    two = list(_samples(80, seed=3, size=48, processes=2))
    assert one == two
    assert len({jpeg for _, jpeg, _ in one}) == 80  # and every image differs


def test_unknown_class_is_named():
    import pytest

    with pytest.raises(ValueError, match="'hexagon'"):
        render_image("hexagon", 32, np.random.default_rng(0))


def _tar_members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_eval_set_format_and_held_out(tmp_path):
    marker = write_eval_set(str(tmp_path / "eval"), n_per_class=2, seed=0, size=64)
    assert read_marker(str(tmp_path / "eval"), "eval_set") == marker
    assert marker["count"] == 2 * len(CLASSNAMES) and marker["num_classes"] == len(CLASSNAMES)
    classes = json.loads((tmp_path / "eval" / "classes.json").read_text())
    assert classes == {"classnames": CLASSNAMES, "templates": TEMPLATES}
    members = _tar_members(tmp_path / "eval" / marker["shards"][0])
    keys = {name.rsplit(".", 1)[0] for name in members}
    assert len(keys) == marker["count"]
    labels = [int(members[f"{k}.cls"]) for k in keys]
    assert sorted(set(labels)) == list(range(len(CLASSNAMES)))
    Image.open(io.BytesIO(members[f"{sorted(keys)[0]}.jpg"])).verify()
    # Same seed number, different stream: no eval image is a training image.
    rows = write_demo_images(str(tmp_path / "train"), 40, seed=0, size=64)
    train_hashes = {hashlib.sha256((tmp_path / "train" / r["file"]).read_bytes()).hexdigest()
                    for r in rows}
    eval_hashes = {hashlib.sha256(v).hexdigest() for k, v in members.items() if k.endswith(".jpg")}
    assert not train_hashes & eval_hashes


def test_filtered_shards_helper_matches_the_artifact_format(tmp_path):
    rows = write_demo_images(str(tmp_path / "raw"), 10, seed=0, size=64)
    marker = write_filtered_shards(str(tmp_path / "shards"), rows, str(tmp_path / "raw"),
                                   shard_size=4)
    assert read_marker(str(tmp_path / "shards"), "filtered_shards")["count"] == 10
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2] and manifest["total"] == 10
    members = _tar_members(tmp_path / "shards" / "shard-00000.tar")
    assert sorted(n.rsplit(".", 1)[1] for n in members) == ["jpg"] * 4 + ["json"] * 4 + ["txt"] * 4
    # the same format as filter_shard's marker: the shard names
    assert marker["shards"] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert os.path.exists(tmp_path / "shards" / "sizes.json")
