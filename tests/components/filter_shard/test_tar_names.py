"""Tar members named ``../../x``, ``/etc/x`` or a symlink out of the folder are never written
outside the output, wherever this project reads shards: filter_shard (reads and writes
tars), the training stream and the eval reader (read members into memory only).

Each check snapshots every file under the test's folder (and the absolute targets) before
and after, so a write anywhere, not only at the expected wrong place, fails the test.
"""
import io
import itertools
import os
import tarfile

import pytest

from clipa_model.artifacts import write_marker
from test_filter_shard import _jpeg, _sample, _samples_of

ESCAPES = ("../../x", "/tmp/clipa-escape-x", "a/../../../y")
ABSOLUTE_TARGETS = ("/tmp/clipa-escape-x.jpg", "/tmp/clipa-escape-x.txt", "/tmp/clipa-escape-x.json")


def _files(root) -> set:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def hostile_shards(tmp_path):
    """work/a/shards/00000.tar: 4 good samples, the escaping names, a symlink member."""
    shards = tmp_path / "work" / "a" / "shards"
    shards.mkdir(parents=True)
    samples = [_sample(f"00000000{i}", f"a photo of thing number {i}", _jpeg(80, 80, i))
               for i in range(4)]
    samples += [_sample(key, f"an escaping sample {i} here", _jpeg(80, 80, 50 + i))
                for i, key in enumerate(ESCAPES)]
    with tarfile.open(shards / "00000.tar", "w") as tf:
        for s in samples:
            for ext in ("jpg", "json", "txt"):
                _add(tf, f"{s['key']}.{ext}", s[ext])
        link = tarfile.TarInfo("000000009.jpg")  # a symlink leading out of the folder
        link.type, link.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
        tf.addfile(link)
        _add(tf, "000000009.json", b"{}")
        _add(tf, "000000009.txt", b"a sample whose image is a symlink")
    write_marker(str(shards), "shards", count=len(samples) + 1, successes=len(samples) + 1,
                 failures={}, shards=["00000.tar"], seconds=0.0)
    assert not any(os.path.exists(p) for p in ABSOLUTE_TARGETS)
    return tmp_path, shards


def test_filter_shard_drops_escaping_names_and_writes_only_its_output(hostile_shards):
    from components.filter_shard.component import run_filter_shard

    root, shards = hostile_shards
    before = _files(root)
    out = root / "work" / "a" / "out"
    result = run_filter_shard(str(shards), str(out), samples_per_shard=2)
    assert result["dropped"] == {"unsafe_name": len(ESCAPES), "decode_error": 1}  # symlink: no image
    new = _files(root) - before
    assert new and all(p.startswith(os.path.join("work", "a", "out") + os.sep) for p in new), new
    assert not any(os.path.exists(p) for p in ABSOLUTE_TARGETS)
    keys = [k for name in result["shards"] for k in _samples_of(str(out / name))]
    assert sorted(keys) == [f"00000000{i}" for i in range(4)]


def test_training_and_eval_readers_write_nothing(hostile_shards):
    from clipa_model.data import consumer_samples
    from clipa_model.eval.data import read_tar_samples

    root, shards = hostile_shards
    before = _files(root)
    url = str(shards / "00000.tar")
    eval_keys = [key for key, _ in read_tar_samples(url)]
    assert set(ESCAPES) <= set(eval_keys)  # read as data, not as paths
    stream = consumer_samples([url], seed=0, consumer=0, n_consumers=1, shuffle_buffer=4)
    train_keys = {s["__key__"] for s in itertools.islice(stream, 16)}
    assert "000000000" in train_keys
    assert _files(root) == before
    assert not any(os.path.exists(p) for p in ABSOLUTE_TARGETS)
