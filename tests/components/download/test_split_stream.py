"""split_url_list streams the list: batch by batch, parts cut on shard boundaries,
the same rows and order as reading it whole."""
import gzip
import json

import pandas as pd
import pytest

from components.download import run as download_run
from components.download.url_list import UrlListError, iter_url_batches, read_url_list


def _rows(n, start=0):
    return pd.DataFrame({"url": [f"http://img{i % 7}.example.com/{i}.jpg" for i in range(start, start + n)],
                         "caption": [f"caption {i}" for i in range(start, start + n)],
                         "label": list(range(start, start + n))})


@pytest.fixture
def url_folder(tmp_path):
    """One list in three files and formats: parquet (two row groups), csv.gz, jsonl."""
    folder = tmp_path / "urls"
    folder.mkdir()
    _rows(25).to_parquet(folder / "a.parquet", row_group_size=10)
    with gzip.open(folder / "b.csv.gz", "wt") as f:
        _rows(13, 25).to_csv(f, index=False)
    with open(folder / "c.jsonl", "w") as f:
        for rec in _rows(9, 38).to_dict("records"):
            f.write(json.dumps(rec) + "\n")
    bad = _rows(2, 47).assign(url=["http://169.254.169.254/latest/meta-data", "file:///etc/passwd"])
    bad.to_parquet(folder / "d.parquet")
    return folder


def test_batches_hold_the_rows_read_whole(url_folder):
    whole = read_url_list(str(url_folder))
    streamed = pd.concat(list(iter_url_batches(str(url_folder), batch_rows=4)), ignore_index=True)
    assert streamed["url"].tolist() == whole["url"].tolist()
    assert streamed["caption"].tolist() == whole["caption"].tolist()
    # "label" is an int in parquet and jsonl, text in csv: text everywhere, as read whole
    assert streamed["label"].tolist() == whole["label"].tolist()
    assert max(len(b) for b in iter_url_batches(str(url_folder), batch_rows=4)) <= 4


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_parts_are_cut_on_shard_boundaries_across_batches(url_folder, tmp_path, monkeypatch, parts):
    monkeypatch.setattr(download_run, "BATCH_ROWS", 3)  # part starts fall inside batches
    plan_dir = str(tmp_path / f"plan{parts}")
    got = download_run.split_url_list(str(url_folder), plan_dir, parts=parts, samples_per_shard=4)
    plan = download_run.read_plan(plan_dir)
    assert plan["count"] == 49 and sum(plan["refused"].values()) == 2
    kept = read_url_list(str(url_folder)).iloc[:47]  # the two refused rows come last
    rows = pd.concat([pd.read_parquet(f"{plan_dir}/part-{p:05d}.parquet") for p in got],
                     ignore_index=True)
    assert rows["url"].tolist() == kept["url"].tolist()
    for p in plan["parts"]:
        assert p["rows"] == len(pd.read_parquet(f"{plan_dir}/part-{p['part']:05d}.parquet"))
        if p is not plan["parts"][-1]:
            assert p["rows"] == 4 * p["shards"]  # whole shards only
    assert [p["first_shard"] for p in plan["parts"]] == sorted(p["first_shard"] for p in plan["parts"])
    assert not (tmp_path / f"plan{parts}" / "screened.parquet").exists()


def test_streamed_split_names_a_bad_file(url_folder, tmp_path):
    (url_folder / "e.jsonl").write_text('{"url": "http://x/1.jpg"}\n')  # no caption column
    with pytest.raises(UrlListError, match=r"e\.jsonl: no 'caption' column"):
        download_run.split_url_list(str(url_folder), str(tmp_path / "plan"))


class _CountingFile:
    """A binary file that counts the bytes read through it."""

    def __init__(self, f):
        self.f, self.read_bytes = f, 0

    def read(self, *args):
        data = self.f.read(*args)
        self.read_bytes += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_parquet_stream_reads_one_row_group_at_a_time(tmp_path):
    # pyarrow's default pre-buffering read every row group up front: the whole list in
    # memory while streaming it, the split's growth with list length.
    from components.download.url_list import iter_parquet

    path = tmp_path / "big.parquet"
    _rows(20_000).to_parquet(path, row_group_size=1000)
    with open(path, "rb") as raw:
        f = _CountingFile(raw)
        batches = iter_parquet(f, 1000)
        first = next(batches)
        assert first.num_rows == 1000
        assert f.read_bytes < path.stat().st_size / 4, (f.read_bytes, path.stat().st_size)
        assert sum(b.num_rows for b in batches) == 19_000
