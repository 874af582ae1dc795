"""Peak memory of the data stages at N and 10N samples: it must not grow with the dataset.

    .venv/bin/python bench/bench_filter_scale.py [--samples 10000] [--rows 1000000]

1. filter_shard at N and 10N samples. The samples are metadata-sized: a 16x16 JPEG made
   unique by a JPEG comment holding its key (~700 bytes), a 6-word caption and a small
   KEY.json, 1,000 to a tar, so 10N samples are 10x the tars, the metadata the dedup and
   the plan handle, and the bytes written; size filters are off so every sample goes all
   the way through. Beam's FnApiRunner runs the transforms in worker processes
   (``direct_running_mode=multi_processing``), as Dataflow's workers do, while the runner
   process holds the shuffled data between steps, as Dataflow's shuffle service does.
   The local runner hands each worker its whole share of a step's input as one bundle,
   so the workers scale with the data, as an autoscaling runner's do: W workers for N
   samples, 10W for 10N (the same data per worker). A step that gathered per-sample data
   into one element (the old plan step: every sample's metadata on one worker) would
   still put 10x the data on one worker. Printed: the peak RSS of the worker processes
   (``RUSAGE_CHILDREN``, the largest worker: the number that must stay flat; issue
   floor: at most 1.3x for 10x the samples) and of the runner process.
2. ``split_url_list`` of a parquet URL list of R and 10R rows (generated in row groups of
   65,536, so the generator stays small too): peak RSS of the process doing the split.
   Measured (2 shared cores, load ~5): 1M rows 272 MiB, 10M rows 280 MiB, x1.03. Before
   the parquet reads stopped pre-buffering (``url_list.iter_parquet``) it was 283 -> 420
   MiB (x1.48): pyarrow read every row group of the list up front, ~16 bytes a row.

Each measurement runs in a fresh interpreter, so one peak does not hide another.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PER_TAR = 1000


def write_tiny_shards(folder: str, n: int) -> None:
    """``n`` metadata-sized samples in tars of PER_TAR, plus a ``shards`` marker."""
    from PIL import Image

    sys.path.insert(0, ROOT)
    from clipa_model.artifacts import write_marker

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 30, 200)).save(buf, format="JPEG", quality=80)
    base = buf.getvalue()
    os.makedirs(folder, exist_ok=True)
    for t in range(-(-n // PER_TAR)):
        with tarfile.open(os.path.join(folder, f"{t:05d}.tar"), "w") as tf:
            for i in range(t * PER_TAR, min(n, (t + 1) * PER_TAR)):
                key = f"{i:09d}"
                jpg = base[:2] + b"\xff\xfe\x00\x0b" + key.encode() + base[2:]  # unique bytes
                meta = json.dumps({"url": f"http://img.example.com/{key}.jpg"}).encode()
                for ext, data in (("jpg", jpg), ("json", meta),
                                  ("txt", f"a small photo number {i} here".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    write_marker(folder, "shards", count=n, successes=n, failures={}, shards=-(-n // PER_TAR),
                 seconds=0.0)


def write_url_list(path: str, rows: int) -> None:
    """A parquet URL list of ``rows`` rows, written in row groups (bounded memory)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    group = 65_536
    with pq.ParquetWriter(path, pa.schema([("url", pa.string()), ("caption", pa.string())])) as w:
        for start in range(0, rows, group):
            ids = range(start, min(rows, start + group))
            w.write_table(pa.table({"url": [f"http://img{i % 997}.example.com/{i}.jpg" for i in ids],
                                    "caption": [f"a photo number {i}" for i in ids]}))


def _child(args: list[str]) -> dict:
    """Run this script's ``--child`` mode in a fresh interpreter; its JSON result."""
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(kind: str, src: str, out: str, workers: int = 1) -> None:
    """In the fresh interpreter: one filter_shard or split run, then the peaks (MiB)."""
    sys.path.insert(0, ROOT)
    start = time.perf_counter()
    if kind == "filter":
        from components.filter_shard.component import run_filter_shard

        result = run_filter_shard(src, out, samples_per_shard=PER_TAR, min_image_side=0,
                                  min_caption_words=0, pipeline_options={
                                      "direct_running_mode": "multi_processing",
                                      "direct_num_workers": int(workers)})
        n = result["count"]
    else:
        from components.download.run import split_url_list

        split_url_list(src, out, parts=4, samples_per_shard=10_000)
        n = json.load(open(os.path.join(out, "plan.json")))["count"]
    print(json.dumps({
        "n": n, "seconds": time.perf_counter() - start,
        "self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20_000, help="N for filter_shard")
    ap.add_argument("--workers", type=int, default=1, help="W: Beam workers for N samples")
    ap.add_argument("--rows", type=int, default=1_000_000, help="R for split_url_list")
    ap.add_argument("--skip", choices=("filter", "split"), default=None)
    ap.add_argument("--child", nargs=4, metavar=("KIND", "SRC", "OUT", "W"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        if args.skip != "filter":
            runs = []
            for n, w in ((args.samples, args.workers), (10 * args.samples, 10 * args.workers)):
                write_tiny_shards(f"{tmp}/in{n}", n)
                runs.append(_child(["filter", f"{tmp}/in{n}", f"{tmp}/out{n}", str(w)]))
                print(f"filter_shard {runs[-1]['n']:>9,} samples, {w:>2} workers: largest worker "
                      f"{runs[-1]['workers_mib']:6.0f} MiB peak, runner {runs[-1]['self_mib']:6.0f} "
                      f"MiB, {runs[-1]['seconds']:.0f} s")
            print(f"filter_shard 10x samples: worker peak x{runs[1]['workers_mib'] / runs[0]['workers_mib']:.2f} "
                  f"(floor: at most 1.3), runner x{runs[1]['self_mib'] / runs[0]['self_mib']:.2f}")
        if args.skip != "split":
            runs = []
            for rows in (args.rows, 10 * args.rows):
                write_url_list(f"{tmp}/urls{rows}.parquet", rows)
                runs.append(_child(["split", f"{tmp}/urls{rows}.parquet", f"{tmp}/plan{rows}", "1"]))
                print(f"split_url_list {runs[-1]['n']:>11,} rows: {runs[-1]['self_mib']:6.0f} MiB peak, "
                      f"{runs[-1]['seconds']:.0f} s")
            print(f"split_url_list 10x rows: peak x{runs[1]['self_mib'] / runs[0]['self_mib']:.2f} "
                  "(floor: at most 1.3)")


if __name__ == "__main__":
    main()
