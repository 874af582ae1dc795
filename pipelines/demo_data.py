"""Synthetic image-caption data for the demo and the tests: coloured shapes with captions.

Each image shows one shape class (circle, star, checkerboard, ...) in a random colour on a
random background (solid, gradient or noisy), at a random position, scale and rotation.
Colour is drawn independently of the class, so it cannot give the class away (the
evaluation's ``colour_baseline_top1`` checks this). Captions vary their wording but name
the class noun early, because pretraining sees only the first 8 BPE tokens (start token
included) of each caption.

``write_demo_images`` feeds the download step (served over HTTP by the demo server);
``write_eval_set`` writes the held-out labelled set that the evaluate step reads.
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from clipa_model.artifacts import write_json_atomic, write_marker

CLASSNAMES = [
    "circle", "triangle", "square", "star", "cross",
    "ring", "heart", "arrow", "stripes", "checkerboard",
]

# Zero-shot prompt templates; short, so that most fit the 8-token pretrain budget.
TEMPLATES = [
    "a photo of a {}.",
    "a drawing of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {} shape.",
    "a rendering of a {}.",
    "a {}.",
    "a small {}.",
    "a large {}.",
]

# Named colours with their RGB; a caption names the colour, the pixels jitter around it.
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 220, 40), "orange": (245, 140, 20), "purple": (130, 40, 170),
    "pink": (245, 120, 190), "white": (245, 245, 245), "black": (15, 15, 15),
    "gray": (128, 128, 128), "brown": (120, 70, 30), "teal": (0, 128, 128),
    "navy": (20, 30, 100), "olive": (110, 120, 20), "maroon": (120, 20, 40),
    "lavender": (190, 170, 240),
}
# Pairs too close to tell apart are redrawn so that the shape stays visible.
_MIN_CONTRAST = 120.0

_PREFIXES = ["a photo of", "a drawing of", "a picture of", "an image of", "a sketch of",
             "a render of", "clip art of", "an illustration of"]
_SIZES = {"small": (0.34, 0.5), "large": (0.62, 0.84)}  # fraction of the image side
_POSITIONS = {"in the top left": (0, 0), "in the top right": (1, 0), "in the bottom left": (0, 1),
              "in the bottom right": (1, 1), "in the center": (0.5, 0.5), "on the left": (0, 0.5),
              "on the right": (1, 0.5), "at the top": (0.5, 0), "at the bottom": (0.5, 1)}

_ImageRng = np.random.Generator
KNOBS = {'rotation': math.pi, 'bg_noise': 30, 'fg_noise': 12}


# Class nouns that are plural take no article ("red stripes", not "a red stripes").
_PLURAL = {"stripes"}


def _a(phrase: str, plural: bool = False) -> str:
    """``phrase`` with its indefinite article: "an orange star", "a star", "red stripes"."""
    if plural:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# ---------------------------------------------------------------- shapes as polygons / masks

def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate (N, 2) unit-coordinate points by ``angle`` radians around the origin."""
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(rng: _ImageRng) -> np.ndarray:
    outer = _regular(5)
    inner = _regular(5, -math.pi / 2 + math.pi / 5) * rng.uniform(0.38, 0.5)
    return np.stack([outer, inner], 1).reshape(-1, 2)


def _cross(rng: _ImageRng) -> np.ndarray:
    w = rng.uniform(0.28, 0.4)
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1),
                     (-w, w), (-1, w), (-1, -w), (-w, -w)], dtype=float)


def _heart(rng: _ImageRng) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 80, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], 1) / 17.0


def _arrow(rng: _ImageRng) -> np.ndarray:
    shaft, head = rng.uniform(0.14, 0.24), rng.uniform(0.5, 0.7)
    neck = rng.uniform(0.0, 0.3)
    return np.array([(-1, -shaft), (neck, -shaft), (neck, -head), (1, 0), (neck, head),
                     (neck, shaft), (-1, shaft)], dtype=float)


_POLYGONS: dict[str, Callable[[_ImageRng], np.ndarray]] = {
    "triangle": lambda rng: _regular(3),
    "square": lambda rng: _regular(4, math.pi / 4),
    "star": _star, "cross": _cross, "heart": _heart, "arrow": _arrow,
}


def _bands(x: np.ndarray, n_periods: float) -> np.ndarray:
    """Alternate bands along ``x`` in [-1, 1]: True on every other half-period."""
    return np.floor((x + 1) * n_periods) % 2 == 0


def _stripes(u, v, rng):
    return _bands(u, rng.uniform(2.0, 3.5))


def _checkerboard(u, v, rng):
    n = rng.uniform(2.0, 3.0)
    return _bands(u, n) ^ _bands(v, n)


def _dots(u, v, rng):
    cell = 2 / rng.uniform(3.0, 5.0)
    du, dv = (u + 1) % cell - cell / 2, (v + 1) % cell - cell / 2
    return du ** 2 + dv ** 2 < (cell * rng.uniform(0.28, 0.36)) ** 2


def _grid(u, v, rng):
    cell, width = 2 / rng.uniform(3.0, 4.5), rng.uniform(0.16, 0.24)
    on_line = lambda x: np.abs((x + 1) % cell / cell - 0.5) > 0.5 - width / 2  # noqa: E731
    return on_line(u) | on_line(v)


def _waves(u, v, rng):
    amp, freq = rng.uniform(0.12, 0.2), rng.uniform(1.5, 2.5)
    return _bands(u + amp * np.sin(math.pi * freq * v), rng.uniform(2.0, 3.0))


_PATTERNS: dict[str, Callable] = {"stripes": _stripes, "checkerboard": _checkerboard,
                                   "dots": _dots, "grid": _grid, "waves": _waves}


def _pattern_mask(name: str, side: int, rng: _ImageRng) -> np.ndarray:
    """(side, side) bool mask: a pattern filling a rotated square patch."""
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side * 2 - 1  # [-1, 1]
    angle = rng.uniform(-1, 1) * KNOBS['rotation'] / 2
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / 0.72  # [-1, 1] inside the patch
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) / 0.72
    inside = (np.abs(u) < 1) & (np.abs(v) < 1)
    return inside & _PATTERNS[name](u, v, rng)


def shape_mask(name: str, size: int, centre: tuple[float, float], radius: float,
               rng: _ImageRng) -> np.ndarray:
    """Render one shape as a soft mask.

    Args:
        name: a class in ``CLASSNAMES``.
        size: image side in pixels.
        centre: (x, y) in pixels; radius: half the shape's extent in pixels.
        rng: random generator (rotation and shape details).

    Returns:
        (size, size) float32 array in [0, 1], 1 inside the shape.
    """
    ss = 2  # draw at 2x and downsample: anti-aliased edges
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = centre[0] * ss, centre[1] * ss, radius * ss
    if name in ("circle", "ring"):
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        if name == "ring":
            ri = r * rng.uniform(0.5, 0.7)
            draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif name in _POLYGONS:
        pts = _rotate(_POLYGONS[name](rng), rng.uniform(-1, 1) * KNOBS['rotation']) * r + [cx, cy]
        draw.polygon([tuple(p) for p in pts], fill=255)
    else:  # stripes, checkerboard: a patterned patch
        side = max(2, int(2 * r))
        patch = Image.fromarray((_pattern_mask(name, side, rng) * 255).astype(np.uint8))
        canvas.paste(patch, (int(cx - side / 2), int(cy - side / 2)))
    canvas = canvas.resize((size, size), Image.BILINEAR)
    return np.asarray(canvas, dtype=np.float32) / 255.0


# ---------------------------------------------------------------- colours and backgrounds

def _pick_colours(rng: _ImageRng) -> tuple[str, str]:
    """A foreground and a background colour name that contrast enough."""
    names = list(COLOURS)
    while True:
        fg, bg = rng.choice(names, 2, replace=False)
        if np.linalg.norm(np.subtract(COLOURS[fg], COLOURS[bg])) >= _MIN_CONTRAST:
            return str(fg), str(bg)


def _jitter(rgb: tuple[int, int, int], rng: _ImageRng, amount: float = 18.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, amount, 3), 0, 255)


def _background(bg: str, size: int, rng: _ImageRng) -> np.ndarray:
    """(size, size, 3) float background: solid, a gradient towards a shade, or noisy."""
    base = _jitter(COLOURS[bg], rng)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    style = rng.integers(3)
    if style == 1:  # gradient: darker or lighter towards one side
        ramp = np.linspace(0, 1, size, dtype=np.float32)
        ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        img = img * (1 - 0.35 * ramp[..., None]) + 0.35 * ramp[..., None] * rng.uniform(0, 255)
    elif style == 2:
        img += rng.normal(0, rng.uniform(0, KNOBS['bg_noise']), (size, size, 1)).astype(np.float32)
    return img


def render_image(name: str, size: int, rng: _ImageRng) -> tuple[Image.Image, dict]:
    """Draw one image of class ``name``.

    Returns:
        (RGB image, attributes used by the caption: colour, background, size word, position).
    """
    fg, bg = _pick_colours(rng)
    size_word = str(rng.choice(list(_SIZES)))
    frac = rng.uniform(*_SIZES[size_word])
    radius = frac * size / 2
    pos_word = str(rng.choice(list(_POSITIONS)))
    px, py = _POSITIONS[pos_word]
    # Keep the shape inside the image; jitter within a quarter of the free room.
    room = size - 2 * radius
    cx = radius + room * np.clip(px + rng.uniform(-0.15, 0.15), 0, 1)
    cy = radius + room * np.clip(py + rng.uniform(-0.15, 0.15), 0, 1)
    mask = shape_mask(name, size, (cx, cy), radius, rng)[..., None]  # (H, W, 1)
    fg_rgb = _jitter(COLOURS[fg], rng)
    fg_img = fg_rgb + rng.normal(0, rng.uniform(0, KNOBS['fg_noise']), (size, size, 1)).astype(np.float32)
    img = mask * fg_img + (1 - mask) * _background(bg, size, rng)
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), {"colour": fg, "background": bg, "size": size_word,
                                     "position": pos_word}


# ---------------------------------------------------------------- captions

def make_caption(name: str, attrs: dict, rng: _ImageRng) -> str:
    """A caption in one of several phrasings, class noun within its first few words.

    Args:
        name: class noun; attrs: from ``render_image``; rng: random generator.

    Returns:
        e.g. "a small red star on a blue background" or "a drawing of a star, red on blue".
    """
    c, bg, sz, pos = attrs["colour"], attrs["background"], attrs["size"], attrs["position"]
    pl = name in _PLURAL
    style = int(rng.integers(7))
    if style == 0:
        return f"{_a(f'{sz} {c} {name}', pl)} on {_a(bg)} background"
    if style == 1:
        return f"{rng.choice(_PREFIXES)} {_a(name, pl)}, {c} on {bg}"
    if style == 2:
        return f"{c} {name} {pos}, {bg} background"
    if style == 3:
        return f"{_a(f'{c} {name}', pl)} {pos} of the image"
    if style == 4:
        return f"{name} shape in {c} against {_a(bg)} backdrop"
    if style == 5:
        return f"{rng.choice(_PREFIXES)} {_a(f'{c} {name}', pl)}"
    return f"{_a(f'{sz} {name}', pl)} drawn in {c}, {pos}"


# ---------------------------------------------------------------- writers

def _samples(n: int, seed: int, size: int):
    """Yield (label, image, caption) for n images, classes balanced and shuffled."""
    rng = np.random.default_rng(seed)
    labels = np.resize(np.arange(len(CLASSNAMES)), n)
    rng.shuffle(labels)
    for label in labels:
        image, attrs = render_image(CLASSNAMES[label], size, rng)
        yield int(label), image, make_caption(CLASSNAMES[label], attrs, rng)


def write_demo_images(root: str, n: int, seed: int = 0, size: int = 256) -> list[dict]:
    """Write ``n`` captioned JPEGs under ``root/images/``.

    Args:
        root: folder to write into (created).
        n: number of images; classes are balanced.
        seed: random seed; the eval set uses another stream (see ``write_eval_set``).
        size: image side in pixels (>= 200 passes the DataComp size filter).

    Returns:
        [{"file": "images/000123.jpg", "caption": str, "label": int}, ...]
    """
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    for i, (label, image, caption) in enumerate(_samples(n, seed, size)):
        rel = f"images/{i:06d}.jpg"
        image.save(os.path.join(root, rel), quality=90)
        rows.append({"file": rel, "caption": caption, "label": label})
    return rows


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_eval_set(out_dir: str, n_per_class: int, seed: int, size: int = 256) -> dict:
    """Write the held-out labelled eval set (kind ``eval_set``, see docs/ARTIFACTS.md).

    Args:
        out_dir: output folder (created): classes.json, eval-00000.tar, marker.
        n_per_class: images per class.
        seed: random seed; mixed with a fixed offset so that the stream never coincides
            with ``write_demo_images(seed=...)`` for the same number.
        size: image side in pixels.

    Returns:
        The marker dict (count, num_classes, shards).
    """
    os.makedirs(out_dir, exist_ok=True)
    n = n_per_class * len(CLASSNAMES)
    shard = "eval-00000.tar"
    with tarfile.open(os.path.join(out_dir, shard), "w") as tar:
        for i, (label, image, _) in enumerate(_samples(n, seed + 1_000_003, size)):
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=90)
            _add_bytes(tar, f"{i:06d}.jpg", buf.getvalue())
            _add_bytes(tar, f"{i:06d}.cls", str(label).encode())
    write_json_atomic(os.path.join(out_dir, "classes.json"),
                      {"classnames": CLASSNAMES, "templates": TEMPLATES})
    return write_marker(out_dir, "eval_set", count=n, num_classes=len(CLASSNAMES),
                        shards=[shard])


def write_filtered_shards(out_dir: str, rows: list[dict], root: str,
                          shard_size: int = 256) -> dict:
    """Pack ``write_demo_images`` output straight into the ``filtered_shards`` format.

    Bypasses download and filter: for tuning runs and tests of the training stages.

    Args:
        out_dir: output folder (created); rows, root: from ``write_demo_images(root, ...)``.
        shard_size: samples per shard.

    Returns:
        The marker dict.
    """
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    for s in range(0, len(rows), shard_size):
        name = f"shard-{s // shard_size:05d}.tar"
        chunk = rows[s:s + shard_size]
        with tarfile.open(os.path.join(out_dir, name), "w") as tar:
            for i, row in enumerate(chunk):
                key = f"{s + i:09d}"
                with open(os.path.join(root, row["file"]), "rb") as f:
                    _add_bytes(tar, f"{key}.jpg", f.read())
                _add_bytes(tar, f"{key}.txt", row["caption"].encode())
                _add_bytes(tar, f"{key}.json", json.dumps({"label": row["label"]}).encode())
        shards.append({"name": name, "count": len(chunk)})
    manifest = {"shards": shards, "total": len(rows), "input_count": len(rows), "dropped": {}}
    write_json_atomic(os.path.join(out_dir, "manifest.json"), manifest)
    write_json_atomic(os.path.join(out_dir, "sizes.json"), {s["name"]: s["count"] for s in shards})
    return write_marker(out_dir, "filtered_shards", count=len(rows), input_count=len(rows),
                        dropped={}, shards=len(shards), seconds=0.0)
