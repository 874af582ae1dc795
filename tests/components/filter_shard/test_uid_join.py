"""uid_list as a keyed join: the list read in pieces (parquet row groups, .npy row slices)
and matched per uid bucket keeps exactly the samples the per-sample check kept, with
byte-identical output; a bad list fails before work, a malformed uid inside one fails
the run naming the file."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipa_model.artifacts import write_marker
from components.filter_shard import matching
from components.filter_shard.component import run_filter_shard
from components.filter_shard.matching import (UID_DTYPE, UidList, UidListError,
                                              inspect_uid_list, read_uid_piece, uid_pair)
from support import noise_jpeg

CAPTION = "a photo of the old wooden house near the river"


def _sample(uid, seed: int, side: int = 220) -> dict:
    meta = {"url": f"http://dc.example/{seed}.jpg"}
    if uid is not None:
        meta["uid"] = uid
    return {"jpg": noise_jpeg(seed, side), "json": json.dumps(meta).encode(),
            "txt": CAPTION.encode()}


def _shards(folder, tars: list[list]) -> None:
    """A finished ``shards`` artifact of the given ``[(key, members), ...]`` per tar."""
    folder.mkdir(parents=True)
    paths = []
    for t, samples in enumerate(tars):
        paths.append(str(folder / f"{t:05d}.tar"))
        with tarfile.open(paths[-1], "w") as tf:
            for key, members in samples:
                for ext in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(members[ext])
                    tf.addfile(info, io.BytesIO(members[ext]))
    write_marker(str(folder), "shards", tars=paths, count=None, successes=None, failures={},
                 seconds=0.0)


def _case(rng):
    """3 tars of samples, the uids to list, and which samples the list keeps."""
    uid = lambda: rng.bytes(16).hex()  # noqa: E731 - DataComp's uids are 128-bit hashes
    tars, listed, kept = [], [], set()
    for t in range(3):
        samples = []
        for i in range(8):
            key, u = f"{t:04d}{i:05d}", uid()
            samples.append((key, _sample(u, seed=t * 100 + i)))
            if i % 3 != 1:  # two in three listed
                listed.append(u)
                kept.add(key)
        tars.append(samples)
    # no uid, a malformed uid: not listed; a listed uid in upper case hex: listed
    tars[0] += [("000000100", _sample(None, 1000)), ("000000101", _sample("xyz", 1001))]
    upper = uid()
    tars[1].append(("000100100", _sample(upper.upper(), 1002)))
    listed.append(upper)
    kept.add("000100100")
    # the same image twice: the unlisted copy has the smaller key, so dedup before the
    # join would drop the listed one and keep nothing
    tars[1].append(("000000050", _sample(uid(), 2000)))
    tars[2].append(("000200050", _sample(dup := uid(), 2000)))
    listed.append(dup)
    kept.add("000200050")
    # a listed sample failing another check counts under that check
    small = uid()
    tars[2].append(("000200060", _sample(small, 3000, side=40)))
    listed.append(small)
    listed += [uid() for _ in range(40)]  # uids of samples not in the shards
    return tars, listed, kept


def _write_lists(tmp_path, listed: list[str]) -> tuple[str, str]:
    shuffled = list(listed)
    np.random.default_rng(3).shuffle(shuffled)
    parquet = str(tmp_path / "subset.parquet")
    pq.write_table(pa.table({"uid": shuffled, "n": list(range(len(shuffled)))}), parquet,
                   row_group_size=10)
    npy = str(tmp_path / "subset.npy")
    np.save(npy, np.sort(np.array([uid_pair(u) for u in listed], UID_DTYPE)))
    return parquet, npy


def _output(folder, shards: list[str]) -> list[bytes]:
    return [(folder / name).read_bytes() for name in shards]


def _keys(folder, shards: list[str]) -> set[str]:
    keys = set()
    for name in shards:
        with tarfile.open(folder / name) as tf:
            keys |= {m.name.split(".")[0] for m in tf.getmembers()}
    return keys


def test_uid_join_keeps_what_the_per_sample_check_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(matching, "NPY_PIECE_ROWS", 16)  # several ranged .npy reads
    tars, listed, kept = _case(np.random.default_rng(0))
    _shards(tmp_path / "in", tars)
    parquet, npy = _write_lists(tmp_path, listed)
    assert len(inspect_uid_list(parquet).pieces) == 6 and len(inspect_uid_list(npy).pieces) == 4

    runs = {}
    for name, path in (("parquet", parquet), ("npy", npy)):
        runs[name] = run_filter_shard(str(tmp_path / "in"), str(tmp_path / name),
                                      uid_list=path, samples_per_shard=5, seed=4)
    result = runs["parquet"]
    unlisted = 3 * 3 + 2 + 1  # i % 3 == 1 (i = 1, 4, 7 of each tar), no/bad uid, the dup
    assert result["dropped"] == {"uid_not_listed": unlisted, "min_side": 1}
    assert _keys(tmp_path / "parquet", result["shards"]) == kept
    assert runs["npy"]["dropped"] == result["dropped"]
    assert _output(tmp_path / "npy", runs["npy"]["shards"]) == _output(
        tmp_path / "parquet", result["shards"])

    # the old check (the whole list, per sample) agrees on every sample
    whole = UidList.load(parquet)
    listed_keys = {key for samples in tars for key, m in samples
                   if str(json.loads(m["json"]).get("uid")) in whole}
    assert kept == listed_keys - {"000200060"}  # the small image: min_side

    # and the output is the one of the listed samples alone, without a list
    _shards(tmp_path / "listed", [[(k, m) for k, m in samples if k in listed_keys]
                                  for samples in tars])
    alone = run_filter_shard(str(tmp_path / "listed"), str(tmp_path / "alone"),
                             samples_per_shard=5, seed=4)
    assert alone["dropped"] == {"min_side": 1}
    assert _output(tmp_path / "alone", alone["shards"]) == _output(
        tmp_path / "parquet", result["shards"])


def test_npy_of_hex_strings_is_read_in_ranged_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(matching, "NPY_PIECE_ROWS", 3)
    uids = [np.random.default_rng(i).bytes(16).hex() for i in range(10)]
    np.save(tmp_path / "hex.npy", np.array(uids))
    source = inspect_uid_list(str(tmp_path / "hex.npy"))
    assert source.count == 10 and [(p.start, p.stop) for p in source.pieces] == [
        (0, 3), (3, 6), (6, 9), (9, 10)]
    read = np.concatenate([read_uid_piece(p) for p in source.pieces])
    assert read.tolist() == [uid_pair(u) for u in uids]


def test_gs_uid_lists_are_read_in_pieces_on_the_emulator(gcs, tmp_path, monkeypatch):
    """On gs:// the .npy pieces are ranged reads and parquet pieces row groups, as locally."""
    monkeypatch.setattr(matching, "NPY_PIECE_ROWS", 4)
    uids = [np.random.default_rng(100 + i).bytes(16).hex() for i in range(10)]
    pairs = np.array([uid_pair(u) for u in uids], UID_DTYPE)
    np.save(tmp_path / "uids.npy", pairs)
    pq.write_table(pa.table({"uid": uids}), tmp_path / "uids.parquet", row_group_size=3)
    gcs.put(str(tmp_path / "uids.npy"), "bkt/lists/uids.npy")
    gcs.put(str(tmp_path / "uids.parquet"), "bkt/lists/uids.parquet")
    for name, n_pieces in (("uids.npy", 3), ("uids.parquet", 4)):
        source = inspect_uid_list(f"gs://bkt/lists/{name}")
        assert source.count == 10 and len(source.pieces) == n_pieces
        read = np.concatenate([read_uid_piece(p) for p in source.pieces])
        assert read.tolist() == pairs.tolist()


def test_a_bad_uid_list_fails_before_work(tmp_path):
    _shards(tmp_path / "in", [[("000000000", _sample("0" * 32, 1))]])
    pq.write_table(pa.table({"url": ["http://x/1.jpg"]}), tmp_path / "nouid.parquet")
    pq.write_table(pa.table({"uid": [1, 2]}), tmp_path / "ints.parquet")
    np.save(tmp_path / "cut.npy", np.zeros(100, UID_DTYPE))
    data = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-160])
    for name, message in (("nouid.parquet", r"nouid\.parquet: no 'uid' column"),
                          ("ints.parquet", r"ints\.parquet: its uid column holds int64"),
                          ("cut.npy", r"cut\.npy: \d+ bytes, too short for its 100 uids"),
                          ("gone.npy", r"gone\.npy: uid list not found")):
        with pytest.raises(UidListError, match=message):
            run_filter_shard(str(tmp_path / "in"), str(tmp_path / "out"),
                             uid_list=str(tmp_path / name))
        assert not (tmp_path / "out").exists()  # nothing was started


def test_a_malformed_uid_in_the_list_fails_the_run_naming_the_file(tmp_path):
    good = "0" * 32
    _shards(tmp_path / "in", [[("000000000", _sample(good, 1))]])
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"uid": [good, "1" * 32, "not-a-uid"]}), path, row_group_size=2)
    with pytest.raises(Exception, match=r"bad\.parquet: uid 'not-a-uid' is not 32 hex digits"):
        run_filter_shard(str(tmp_path / "in"), str(tmp_path / "out"), uid_list=str(path))
