"""filter_shard throughput next to a plain tar-to-tar copy of the same shards.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_filter.py [--shards 8] [--per-shard 1000]

Writes img2dataset-like shards (256 px JPEGs, captions, KEY.json) to a temporary folder,
then times, in the same run and on the same files:

* copy: read every member of every tar with ``tarfile`` and write them to new tars (the
  floor any reshard pays: read, parse, write);
* filter_shard: ``run_filter_shard`` with its defaults (DataComp-basic caption rules,
  size and aspect checks, sha256 and URL dedup) on Beam's local FnApiRunner.

It also times filter_shard on an 8-sample input: its fixed cost (building the Beam
pipeline, ~0.6 s of Beam's own introspection, and starting the runner), which a small
input pays in full and a web-scale one not at all; the per-sample rate without it is
printed beside the end-to-end one.

Prints samples/s of each, the ratio filter/copy (issue floor: >= 0.9) and the load
average at start and end. Each is timed ``--repeat`` times and the best run counts (the
CPU is shared: a ratio measured under load is noisier, not biased, as both run under it).

Measured (2 CPUs shared with a training benchmark, load ~3.4, --repeat 5, alternating
runs of the code before and after): before 0.51 and 0.54, after 0.59 and 0.57; on an
idle machine the code before measured 0.74 and 0.86. Below the 0.9 floor. Where a run's
time goes (``--profile``): reading and checking the tars (~0.6 s of ~2.5 s), writing the
output tars (~0.4 s), Beam's runner moving the image bytes of the ByShard shuffle
(~0.3 s), and ~0.35 s of wall time in which the runner waits for Beam's state-sampler
thread to end at each of the 9 bundles (it sleeps up to 200 ms between samples; a
fixed cost per bundle, not per sample). Saved: the kept samples of each tar travel as
one pickle (Beam's default coder pickled every SampleInfo on its own: 22,515 pickles
for 7,505 kept samples) and tar headers are built from a template (~3-5% together).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image  # noqa: E402

from clipa_model.artifacts import write_marker  # noqa: E402

WORDS = ("a photo of the red green blue small large dog cat house tree car on in with near "
         "old new bright dark").split()


def _jpeg(rng: random.Random, side: int) -> bytes:
    """A 256-px-short-side JPEG with some texture (so it compresses like a photo)."""
    w, h = side + rng.randint(0, side // 2), side
    base = Image.effect_noise((w // 8, h // 8), 60).resize((w, h), Image.BILINEAR)
    colour = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
    im = Image.blend(colour, base.convert("RGB"), 0.5)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: str, n_shards: int, per_shard: int, seed: int = 0) -> int:
    """img2dataset-like shards NNNNN.tar (KEY.jpg, KEY.json, KEY.txt) plus a marker."""
    rng = random.Random(seed)
    pool = [_jpeg(rng, 256) for _ in range(64)]
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                # distinct bytes per sample: a unique JPEG comment after the SOI marker
                base = pool[rng.randrange(len(pool))]
                jpg = base[:2] + b"\xff\xfe\x00\x0a" + key.encode()[:8] + base[2:]
                caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                meta = {"key": key, "url": f"http://example.com/{key}.jpg", "caption": caption,
                        "status": "success", "width": 256, "height": 256}
                for ext, data in (("jpg", jpg), ("json", json.dumps(meta).encode()),
                                  ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        with open(os.path.join(folder, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": per_shard, "successes": per_shard}, f)
    total = n_shards * per_shard
    write_marker(folder, "shards", count=total, successes=total, failures={},
                 shards=[f"{s:05d}.tar" for s in range(n_shards)], seconds=0.0)
    return total


def tar_copy(src: str, dst: str) -> int:
    """Copy every tar of ``src`` member by member into ``dst``; returns samples copied."""
    os.makedirs(dst, exist_ok=True)
    samples = 0
    for name in sorted(n for n in os.listdir(src) if n.endswith(".tar")):
        with tarfile.open(os.path.join(src, name)) as tin, \
                tarfile.open(os.path.join(dst, name), "w") as tout:
            for member in tin:
                tout.addfile(member, tin.extractfile(member))
                samples += member.name.endswith(".jpg")
    return samples


def best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f} (1 min) {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs of each; the best counts (the copy alone varied 1.4-2.4 s in 2 runs)")
    ap.add_argument("--profile", action="store_true", help="cProfile one filter run")
    args = ap.parse_args(argv)

    from components.filter_shard.component import run_filter_shard

    print(_load(), "at start")
    with tempfile.TemporaryDirectory(prefix="bench-filter-") as tmp:
        src = os.path.join(tmp, "shards")
        os.makedirs(src)
        n = write_shards(src, args.shards, args.per_shard)
        size_mb = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) / 2**20
        print(f"{n} samples in {args.shards} shards ({size_mb:.0f} MB)")
        run_filter_shard(src, os.path.join(tmp, "warm"), samples_per_shard=args.per_shard)
        tiny = os.path.join(tmp, "tiny")
        os.makedirs(tiny)
        write_shards(tiny, 1, 8, seed=1)
        fixed_s = best_of(args.repeat, lambda: run_filter_shard(
            tiny, os.path.join(tmp, "tiny-out"), samples_per_shard=8))
        copy_s = best_of(args.repeat, lambda: tar_copy(src, os.path.join(tmp, "copy")))
        filt_s = best_of(args.repeat, lambda: run_filter_shard(
            src, os.path.join(tmp, "filtered"), samples_per_shard=args.per_shard))
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.runcall(run_filter_shard, src, os.path.join(tmp, "prof"),
                         samples_per_shard=args.per_shard)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    ratio = copy_s / filt_s
    print(f"tar-to-tar copy: {n / copy_s:,.0f} samples/s ({copy_s:.2f} s)")
    print(f"filter_shard:    {n / filt_s:,.0f} samples/s ({filt_s:.2f} s), of which a fixed "
          f"{fixed_s:.2f} s (8-sample input); {n / max(filt_s - fixed_s, 1e-9):,.0f} samples/s "
          "without it")
    print(f"ratio filter/copy: {ratio:.2f} (issue floor: >= 0.9)")
    print(_load(), "at end")
    return ratio


if __name__ == "__main__":
    main()
