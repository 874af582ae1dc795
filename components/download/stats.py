"""The download step's numbers: failure reasons, per-shard stats summed, metrics, HTML.

img2dataset writes ``NNNNN_stats.json`` per finished shard with a ``status_dict`` of
raw messages; these are grouped by a short reason (``http_404``, ``decode_error``,
``unsafe_address``...). Rows the URL screen refused before img2dataset (see
``components.download.url_safety``) are added under their own reasons, so that always
``successes + sum(failures) == count`` (rows in).
"""
from __future__ import annotations

import json
import re
from collections import Counter

import fsspec

from clipa_model import html as H
from components.download.url_safety import GUARD_MESSAGE

# How img2dataset's free-text error messages (urllib / cv2 / its resizer / our checks)
# map to short reasons. First match wins; anything unmatched is "other" (its text kept
# in failure_examples).
_REASONS = (
    (re.compile(re.escape(GUARD_MESSAGE)), "unsafe_address"),
    (re.compile(r"HTTP Error (\d{3})"), None),  # -> http_<code>
    (re.compile(r"image has more pixels than|image area too large"), "too_large"),
    (re.compile(r"image is cut"), "truncated_image"),
    (re.compile(r"timed? ?out", re.I), "timeout"),
    (re.compile(r"Image decoding error|cannot identify image|decod", re.I), "decode_error"),
    (re.compile(r"image too small"), "too_small"),
    (re.compile(r"aspect ratio too large"), "aspect_ratio"),
    (re.compile(r"hash mismatch"), "hash_mismatch"),
    (re.compile(r"X-Robots-Tag"), "robots_disallowed"),
    (re.compile(r"Connection refused", re.I), "connection_refused"),
    (re.compile(r"Connection reset|Remote end closed|RemoteDisconnected|IncompleteRead",
                re.I), "connection_closed"),
    (re.compile(r"Name or service not known|name resolution|nodename nor servname|getaddrinfo",
                re.I), "dns_error"),
    (re.compile(r"SSL|certificate", re.I), "ssl_error"),
    (re.compile(r"unknown url type|no host given|URL can't contain|'NoneType'|Invalid URL",
                re.I), "bad_url"),
)


def failure_reason(message: str) -> str:
    """A short, stable reason for one of img2dataset's error messages.

    Args:
        message: the text img2dataset stores in ``status_dict`` / ``error_message``, e.g.
            ``"HTTP Error 404: File not found"`` or ``"Image decoding error"``.

    Returns:
        e.g. ``"http_404"``, ``"decode_error"``, ``"timeout"``; ``"other"`` if unknown.
    """
    for pattern, reason in _REASONS:
        m = pattern.search(message)
        if m:
            return reason or f"http_{m.group(1)}"
    return "other"


def stats_files(folder: str) -> list[str]:
    """Paths of img2dataset's ``NNNNN_stats.json`` in ``folder``, by shard id."""
    fs, root = fsspec.core.url_to_fs(str(folder))
    paths = [p for p in fs.glob(root.rstrip("/") + "/*_stats.json")
             if re.fullmatch(r"\d+_stats\.json", p.rsplit("/", 1)[-1])]
    return sorted(paths)


def summarize_stats(folders: list[str]) -> dict:
    """Sum the per-shard stats img2dataset wrote in ``folders`` into one summary.

    Returns:
        ``{"stats_count", "successes", "failures": {reason: n}, "failure_examples":
        {reason: one raw message}, "shards": [NNNNN.tar, ...], "start", "end"}``. Only
        shards with a stats file count: img2dataset writes it after closing the tar, so
        it means "finished". start/end span the shards' own working time.
    """
    count = successes = 0
    failures: Counter = Counter()
    examples: dict[str, str] = {}
    shards = []
    start, end = float("inf"), float("-inf")
    for folder in folders:
        fs, _ = fsspec.core.url_to_fs(str(folder))
        for path in stats_files(folder):
            with fs.open(path, "r") as f:
                stats = json.load(f)
            count += stats["count"]
            successes += stats["successes"]
            # status_dict counts "success" and every distinct error message together.
            for message, n in stats.get("status_dict", {}).items():
                if message == "success":
                    continue
                reason = failure_reason(message)
                failures[reason] += n
                examples.setdefault(reason, message[:300])
            start = min(start, stats.get("start_time", start))
            end = max(end, stats.get("end_time", end))
            shards.append(path.rsplit("/", 1)[-1].replace("_stats.json", ".tar"))
    return {"stats_count": count, "successes": successes, "failures": dict(failures),
            "failure_examples": examples, "shards": sorted(shards), "start": start, "end": end}


def download_result(summary: dict, count: int, refused: dict, refused_examples: dict,
                    seconds: float) -> dict:
    """Marker fields from the shard stats and the URL screen's refusals.

    Rows of shards that never finished count as ``shard_failed`` so that successes and
    failures always add up to the rows in. Throughput is over the shards' own working
    time (first start to last end): the ~10 s img2dataset needs to start its worker
    processes would otherwise swamp it on small lists.
    """
    failures = Counter(summary["failures"]) + Counter(refused)
    screened = count - sum(refused.values())
    missing = screened - summary["stats_count"]
    if missing > 0:
        failures["shard_failed"] += missing
    span = summary["end"] - summary["start"] if summary["shards"] else 0.0
    span = max(span, 1e-3)
    return {"count": count, "successes": summary["successes"],
            "failures": dict(sorted(failures.items())),
            "failure_examples": {**refused_examples, **summary["failure_examples"]},
            "shards": summary["shards"], "seconds": round(seconds, 3),
            "success_rate": round(summary["successes"] / max(count, 1), 4),
            "images_per_second": round(summary["successes"] / span, 1),
            "urls_per_second": round(summary["stats_count"] / span, 1)}


def metrics(result: dict) -> dict:
    """The numbers logged as KFP Metrics (and shown in the report)."""
    numbers = {"count": result["count"], "successes": result["successes"],
               "failed": sum(result["failures"].values()),
               "success_rate": result["success_rate"], "seconds": result["seconds"],
               "images_per_second": result["images_per_second"],
               "urls_per_second": result["urls_per_second"],
               "shards": len(result["shards"])}
    numbers.update({f"failed_{reason}": n for reason, n in result["failures"].items()})
    return numbers


def render_report(result: dict, url_list: str, parts: list[dict] | None = None) -> str:
    """A self-contained HTML page: outcome, failures by reason (with an example), parts."""
    total = max(result["count"], 1)
    rows = [["downloaded", result["successes"], f"{result['successes'] / total:.1%}", ""]]
    rows += [[reason, n, f"{n / total:.1%}", result["failure_examples"].get(reason, "")[:160]]
             for reason, n in sorted(result["failures"].items(), key=lambda kv: -kv[1])]
    summary = (f"<p>{result['count']:,} URLs from <code>{H.esc(url_list)}</code>: "
               f"{result['successes']:,} images downloaded ({result['success_rate']:.1%}) "
               f"into {len(result['shards'])} shards in {result['seconds']:.1f} s; "
               f"{result['images_per_second']:,.1f} images/s and "
               f"{result['urls_per_second']:,.1f} URLs/s while shards were being "
               "downloaded.</p>")
    sections = [summary, "<h2>Outcome by reason</h2>"
                + H.table(["outcome", "URLs", "share", "example message"], rows)]
    if parts:
        sections.append("<h2>Parts (parallel download tasks)</h2>" + H.table(
            ["part", "first shard", "shards", "URLs", "images", "seconds"],
            [[p["part"], p["first_shard"], len(p["shards"]), p["count"], p["successes"],
              p["seconds"]] for p in parts]))
    settings = result.get("settings", {})
    if settings:
        sections.append("<h2>Settings</h2>" + H.table(["setting", "value"],
                                                      sorted(settings.items())))
    return H.page("download: images fetched and failures", *sections)
