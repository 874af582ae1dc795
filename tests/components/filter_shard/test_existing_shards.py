"""Starting from shards users already have: img2dataset output of the download step,
hand-made DataComp-style shards (uid in KEY.json), a gs:// glob on the GCS emulator; bad
input is refused before any work; --no-filter trains on the shards as they are."""
import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from clipa_model.artifacts import read_marker
from clipa_model.data import list_train_shards
from components.filter_shard.component import run_filter_shard
from components.filter_shard.existing import (ShardsError, import_existing_shards,
                                              pass_through, resolve_shards)
from pipelines.demo_data import write_demo_images
from pipelines.demo_server import serve_directory, write_url_list
from support import REPO_ROOT, noise_jpeg


CAPTIONS = ["a photo of the old wooden house near the river",
            "the dog is running across the green field",
            "a bowl of fresh fruit on the kitchen table",
            "children playing football in the park after school",
            "the city skyline at night with bright lights"]


def _tar(path, samples) -> None:
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                tf.addfile(info, io.BytesIO(members[ext]))


def _datacomp(folder, n_tars=2, per_tar=5):
    """DataComp's layout: FOLDER/shards/NNNNNNNN.tar, uid (32 hex digits) in KEY.json."""
    (folder / "shards").mkdir(parents=True)
    uids = []
    for t in range(n_tars):
        samples = []
        for i in range(per_tar):
            uid = f"{(t * 1000 + i) * 0x9E3779B97F4A7C15:032x}"[-32:]
            uids.append(uid)
            meta = {"uid": uid, "url": f"http://dc.example/{uid}.jpg",
                    "original_width": 400, "original_height": 300}
            samples.append((f"{t:08d}{i:04d}", {"jpg": noise_jpeg(t * 100 + i), "json":
                            json.dumps(meta).encode(), "txt": CAPTIONS[(t + i) % len(CAPTIONS)].encode()}))
        _tar(folder / "shards" / f"{t:08d}.tar", samples)
    return uids


def test_datacomp_layout_with_a_uid_subset(tmp_path):
    uids = _datacomp(tmp_path / "dc")
    keep = sorted(uids[::2])
    np.save(tmp_path / "subset.npy", np.array([(int(u[:16], 16), int(u[16:], 16)) for u in keep],
                                              np.dtype("u8,u8")))
    marker = import_existing_shards(str(tmp_path / "dc"), str(tmp_path / "imported"))
    assert [t.rsplit("/", 1)[-1] for t in marker["tars"]] == ["00000000.tar", "00000001.tar"]
    assert marker["count"] is None  # no sizes.json or stats: unknown until read
    result = run_filter_shard(str(tmp_path / "imported"), str(tmp_path / "out"),
                              preset="datacomp_basic", uid_list=str(tmp_path / "subset.npy"),
                              samples_per_shard=2)
    assert result["dropped"] == {"uid_not_listed": 5} and result["count"] == len(keep)
    kept = set()
    for name in result["shards"]:
        with tarfile.open(tmp_path / "out" / name) as tf:
            kept |= {json.loads(tf.extractfile(m).read())["uid"]
                     for m in tf.getmembers() if m.name.endswith(".json")}
    assert sorted(kept) == keep


def test_bad_shards_are_listed_before_any_work(tmp_path):
    with pytest.raises(ShardsError, match=r"--shards .*nothing.*matches no \.tar file"):
        resolve_shards(str(tmp_path / "nothing" / "*.tar"))
    folder = tmp_path / "mixed"
    folder.mkdir()
    _tar(folder / "00000.tar", [("a", {"jpg": noise_jpeg(1), "txt": b"a fine caption"})])
    (folder / "00001.tar").write_bytes(b"this is not a tar file at all" * 40)
    _tar(folder / "00002.tar", [("notes", {"md": b"# readme"}), ("data", {"csv": b"1,2"})])
    with pytest.raises(ShardsError) as err:
        import_existing_shards(str(folder), str(tmp_path / "out"))
    message = str(err.value)
    assert "2 of 3 tars cannot be used" in message
    assert "00001.tar: not a tar file" in message
    assert "00002.tar: not a webdataset of image-text pairs: its first sample 'notes'" in message
    with pytest.raises(ShardsError, match=r"(?s)1 of 2 tars .*00009\.tar: missing"):
        import_existing_shards(str(folder) + "/{00000,00009}.tar", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_gs_glob_on_the_emulator_and_no_filter(gcs, tmp_path):
    _datacomp(tmp_path / "dc", n_tars=3, per_tar=4)
    gcs.put(str(tmp_path / "dc" / "shards") + "/", "bkt/dc/", recursive=True)
    gcs.pipe("bkt/dc/sizes.json", json.dumps({f"{t:08d}.tar": 4 for t in range(3)}).encode())
    marker = import_existing_shards("gs://bkt/dc/0000000[01].tar", "gs://bkt/imported")
    assert marker["tars"] == ["gs://bkt/dc/00000000.tar", "gs://bkt/dc/00000001.tar"]
    assert marker["count"] == 8  # from sizes.json
    result = run_filter_shard("gs://bkt/imported", str(tmp_path / "out"), samples_per_shard=3)
    assert result["count"] == 8 and [n for n in json.loads(
        (tmp_path / "out" / "sizes.json").read_text()).values()] == [3, 3, 2]
    # The writers fetch their samples by ranged reads (concurrent GETs on gs://): the same
    # bytes as from the same tars on a local disk.
    import_existing_shards(str(tmp_path / "dc" / "shards" / "0000000[01].tar"),
                           str(tmp_path / "local"))
    run_filter_shard(str(tmp_path / "local"), str(tmp_path / "out-local"), samples_per_shard=3)
    for name in ("shard-00000.tar", "shard-00001.tar", "shard-00002.tar"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "out-local" / name).read_bytes()
    # --no-filter: the tars as they are; the training reader lists them by URL
    raw = pass_through("gs://bkt/imported", str(tmp_path / "raw"))
    assert raw["count"] == 8 and raw["shards"] == marker["tars"]
    assert list_train_shards(str(tmp_path / "raw")) == (marker["tars"], 8)


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory):
    """img2dataset output of the download step (a real run against a loopback server)."""
    tmp = tmp_path_factory.mktemp("dl")
    rows = write_demo_images(str(tmp / "www"), 24, size=96)
    with serve_directory(str(tmp / "www")) as base_url:
        write_url_list(rows, str(tmp / "www"), base_url, str(tmp / "urls.parquet"), bad_fraction=0.01)
        script = ("import json, sys; from components.download.component import run_download; "
                  "run_download(sys.argv[1], sys.argv[2], image_size=64, samples_per_shard=10, "
                  "threads=4, timeout=5, allow_networks='127.0.0.1/32')")
        proc = subprocess.run([sys.executable, "-c", script, str(tmp / "urls.parquet"),
                               str(tmp / "shards")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp / "shards"


def test_download_output_as_existing_shards(downloaded, tmp_path):
    """Its NNNNN_stats.json give the sizes; filtering it as --shards equals filtering the
    download artifact itself."""
    marker = import_existing_shards(str(downloaded), str(tmp_path / "imported"))
    assert marker["count"] == read_marker(str(downloaded), "shards")["successes"]
    settings = dict(samples_per_shard=8, min_image_side=0, min_caption_words=0)
    via_import = run_filter_shard(str(tmp_path / "imported"), str(tmp_path / "a"), **settings)
    direct = run_filter_shard(str(downloaded), str(tmp_path / "b"), **settings)
    assert (via_import["count"], via_import["dropped"]) == (direct["count"], direct["dropped"])
    for name in direct["shards"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
