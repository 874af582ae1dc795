"""The ``filter_shard`` outputs beside the shards: manifest.json, sizes.json, report.html."""
from __future__ import annotations

import os
import uuid

import fsspec

from clipa_model import html as H
from clipa_model.artifacts import join, write_json_atomic

_BAR_PX = 360  # width of the longest bar in the report's chart


def build_manifest(shards: list[tuple[str, int]], input_count: int, dropped: dict) -> dict:
    """``manifest.json`` (see docs/ARTIFACTS.md) from ``[(shard name, samples)]``."""
    return {"shards": [{"name": name, "count": n} for name, n in shards],
            "total": sum(n for _, n in shards), "input_count": input_count,
            "dropped": dict(sorted(dropped.items()))}


def _bar_chart_svg(rows: list[tuple[str, int]]) -> str:
    """A horizontal bar per (label, count), as inline SVG (no plotting library needed)."""
    top = max([n for _, n in rows] + [1])
    height = 22
    parts = []
    for i, (label, n) in enumerate(rows):
        y = i * height
        width = max(1, round(_BAR_PX * n / top)) if n else 0
        colour = "#4c9a2a" if label == "kept" else "#c0504d"
        parts.append(
            f'<text x="150" y="{y + 15}" text-anchor="end" font-size="13">{H.esc(label)}</text>'
            f'<rect x="158" y="{y + 4}" width="{width}" height="{height - 8}" fill="{colour}"/>'
            f'<text x="{164 + width}" y="{y + 15}" font-size="12">{n:,}</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_BAR_PX + 240}" '
            f'height="{height * len(rows)}" role="img" aria-label="samples kept and dropped">'
            + "".join(parts) + "</svg>")


def render_report(manifest: dict, input_dir: str, seconds: float, settings: dict,
                  reasons: tuple = ()) -> str:
    """A self-contained HTML page: kept/dropped per reason (table and bars), the shards.

    Args:
        reasons: every reason the stage counts; each gets a row, 0 included, so a filter
            that dropped nothing is visibly on (or off, in the settings).
    """
    total_in = manifest["input_count"] or 1
    dropped = {r: 0 for r in reasons} | manifest["dropped"]
    rows = [("kept", manifest["total"])] + sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0]))
    table = H.table(["outcome", "samples", "share of input"],
                    [[label, n, f"{n / total_in:.1%}"] for label, n in rows])
    summary = (f"<p>{manifest['input_count']:,} samples read from <code>{H.esc(input_dir)}</code>; "
               f"{manifest['total']:,} kept in {len(manifest['shards'])} shards, "
               f"in {seconds:.1f} s ({manifest['input_count'] / max(seconds, 1e-9):,.0f} "
               "samples/s).</p>")
    shard_sizes = sorted({s["count"] for s in manifest["shards"]}, reverse=True)
    return H.page(
        "filter_shard: samples kept and dropped",
        summary,
        "<h2>Kept and dropped, by reason</h2>" + table
        + _bar_chart_svg([r for r in rows if r[1] or r[0] == "kept"]),
        "<h2>Settings</h2>" + H.table(["setting", "value"], sorted(settings.items())),
        "<h2>Shards</h2>" + f"<p class='note'>{len(manifest['shards'])} shards of "
        + " / ".join(str(n) for n in shard_sizes) + " samples; open_clip reads sizes.json.</p>",
    )


def write_outputs(output_dir: str, manifest: dict, report_html: str) -> None:
    """Write manifest.json, sizes.json and report.html (each atomically)."""
    write_json_atomic(join(output_dir, "manifest.json"), manifest)
    write_json_atomic(join(output_dir, "sizes.json"),
                      {s["name"]: s["count"] for s in manifest["shards"]})
    _write_text_atomic(join(output_dir, "report.html"), report_html)


def _write_text_atomic(path: str, text: str) -> None:
    """Like ``write_json_atomic``, for text: a temporary name and a rename when local."""
    if "://" in path:
        with fsspec.open(path, "w") as f:  # an object appears whole when its upload ends
            f.write(text)
        return
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
