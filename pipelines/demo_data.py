"""Synthetic image-caption data for the demo and the tests: coloured textures with captions.

Each image is filled with one texture class (rings, stripes, checkerboard, a lattice of
stars, ...) in a random colour on a random background (solid, gradient or noisy), at a
random scale and a slight rotation. Colour is drawn independently of the class, so it
cannot give the class away (the evaluation's ``colour_baseline_top1`` checks this).
Captions vary their wording but name the class noun early, because pretraining sees only
the first 8 BPE tokens (start token included) of each caption.

Why textures that fill the image, not one shape on a background (measured on the demo
recipe, tiny ViT, 500 held-out images): single shapes reached 26% top-1 after 84 px
pretraining and *lost* accuracy in the 224 / 336 px finetunes, because a 14-px patch of a
big outline looks different at each resolution; small centred patterns reached 39%. Full
textures give every patch evidence of the class at every resolution and every crop, and
their lattices (stars, crosses, triangles, dots) only take shape at 224 px and above, so
the finetunes have something to add, as with natural images. The demo renders (and
downloads) at 336 px, the last finetune's size: at 256 px that stage only saw upsampled
pixels.

``write_demo_images`` feeds the download step (served over HTTP by the demo server);
``write_eval_set`` writes the held-out labelled set that the evaluate step reads. Image i
of a stream is drawn from its own generator seeded with (seed, i), so the images are the
same whether they are rendered in one process or several.
"""
from __future__ import annotations

import io
import json
import math
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from clipa_model.artifacts import write_json_atomic, write_marker

CLASSNAMES = [
    "rings", "stripes", "checkerboard", "dots", "grid",
    "waves", "zigzag", "stars", "crosses", "triangles",
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
# Eight, not more: with fewer distinct colours in a batch, a caption's colour word matches
# several images, and only the texture can tell them apart (measured: +4 points top-1).
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 220, 40), "orange": (245, 140, 20), "purple": (130, 40, 170),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
# Pairs too close to tell apart are redrawn so that the texture stays visible.
_MIN_CONTRAST = 120.0

_PREFIXES = ["a photo of", "a drawing of", "a picture of", "an image of", "a sketch of",
             "a render of", "clip art of", "an illustration of"]
# Periods across the image side, drawn log-uniformly within the caption's scale word: 6 to
# 13, so 6-14 px per period at 84 px. Stripes, rings and checkerboards resolve there, but a
# lattice's stars, crosses, triangles and dots are 3-6 px blobs that take shape only at
# 224 px (17-37 px cells) and 336 px. Measured with the DEMO recipe, final vs pretraining
# top-1: coarser textures (3.5 to 12 periods) gave +7.4 and -2.8 points in two runs, the
# pretraining having seen most of what there is; 6 to 13 gave +5.6 to +11.8 in four runs
# of six, and in the other two the 224 px finetune lost 4 to 6 points (clipa_model/recipes.py).
_SCALES = {"bold": (6.0, 9.0), "fine": (9.0, 13.0)}
_MAX_ROTATION = 0.2  # radians either way
_BG_NOISE, _FG_NOISE = 24.0, 10.0  # max per-pixel noise std (grey levels)

_ImageRng = np.random.Generator

# Class nouns that are plural take no article ("red stripes", not "a red stripes").
_PLURAL = {"rings", "stripes", "dots", "waves", "stars", "crosses", "triangles"}


def _a(phrase: str, plural: bool = False) -> str:
    """``phrase`` with its indefinite article: "an orange grid", "a grid", "red stripes"."""
    if plural:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# ---------------------------------------------------------------- textures as masks

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


# Lattices of one small polygon (unit radius, centred on the origin).
_POLYGONS: dict[str, Callable[[_ImageRng], np.ndarray]] = {
    "triangles": lambda rng: _regular(3), "stars": _star, "crosses": _cross,
}


# Textures, as functions of rotated image coordinates (u, v) in about [-1, 1] and n, the
# periods across the image side.

def _bands(x: np.ndarray, n: float) -> np.ndarray:
    """n on/off band pairs along ``x`` in [-1, 1]."""
    return np.floor((x + 1) * n) % 2 == 0


def _rings(u, v, n, rng):
    cu, cv = rng.uniform(-0.5, 0.5, 2)
    return _bands(np.sqrt((u - cu) ** 2 + (v - cv) ** 2), n)


def _stripes(u, v, n, rng):
    return _bands(u, n)


def _checkerboard(u, v, n, rng):
    return _bands(u, n) ^ _bands(v, n)


def _dots(u, v, n, rng):
    cell = 2 / n
    du, dv = (u + 1) % cell - cell / 2, (v + 1) % cell - cell / 2
    return du ** 2 + dv ** 2 < (cell * rng.uniform(0.25, 0.35)) ** 2


def _grid(u, v, n, rng):
    cell, width = 2 / n, rng.uniform(0.15, 0.25)
    return ((u + 1) % cell < width * cell) | ((v + 1) % cell < width * cell)


def _waves(u, v, n, rng):
    period = 2 / n
    return _bands(u + 0.3 * period * np.sin(math.pi * v / period), n)


def _zigzag(u, v, n, rng):
    period = 2 / n
    tri = np.abs((v / period) % 2 - 1)  # triangle wave in [0, 1]
    return _bands(u + 0.6 * period * tri, n)


_PATTERNS: dict[str, Callable] = {"rings": _rings, "stripes": _stripes,
                                   "checkerboard": _checkerboard, "dots": _dots,
                                   "grid": _grid, "waves": _waves, "zigzag": _zigzag}


def _pattern_mask(name: str, side: int, periods: float, rng: _ImageRng) -> np.ndarray:
    """(side, side) bool mask: pattern ``name`` over the whole image, slightly rotated."""
    yy, xx = (np.mgrid[0:side, 0:side] + 0.5) / side * 2 - 1  # (side, side) each, [-1, 1]
    angle = rng.uniform(-1, 1) * _MAX_ROTATION
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    return _PATTERNS[name](u, v, periods, rng)


def _draw_lattice(draw: ImageDraw.ImageDraw, name: str, side: int, periods: float,
                  rng: _ImageRng) -> None:
    """An n x n lattice of one polygon, all turned by the same small angle, over the image."""
    n = max(2, round(periods))
    cell = side / n
    poly = _rotate(_POLYGONS[name](rng), rng.uniform(-1, 1) * _MAX_ROTATION) * cell * 0.42
    for i in range(n):
        for j in range(n):
            centre = [(i + 0.5) * cell, (j + 0.5) * cell]
            draw.polygon([tuple(p) for p in poly + centre], fill=255)


def texture_mask(name: str, size: int, periods: float, rng: _ImageRng) -> np.ndarray:
    """Render one class as a soft mask filling the image.

    Args:
        name: a class in ``CLASSNAMES``.
        size: image side in pixels.
        periods: pattern periods (or lattice cells) across the image side.
        rng: random generator (rotation, phase and shape details).

    Returns:
        (size, size) float32 array in [0, 1], 1 on the texture's foreground.
    """
    if name not in _POLYGONS and name not in _PATTERNS:
        raise ValueError(f"unknown class {name!r}; expected one of {CLASSNAMES}")
    ss = 2  # draw at 2x and downsample: anti-aliased edges
    if name in _POLYGONS:
        canvas = Image.new("L", (size * ss, size * ss), 0)
        _draw_lattice(ImageDraw.Draw(canvas), name, size * ss, periods, rng)
    else:
        canvas = Image.fromarray((_pattern_mask(name, size * ss, periods, rng) * 255)
                                 .astype(np.uint8))
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


def _noise(size: int, std: float, rng: _ImageRng) -> np.ndarray:
    """(size, size, 1) float32 grey noise."""
    return rng.standard_normal((size, size, 1), dtype=np.float32) * np.float32(std)


def _jitter(rgb: tuple[int, int, int], rng: _ImageRng, amount: float = 18.0) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.normal(0, amount, 3), 0, 255).astype(np.float32)


def _background(bg: str, size: int, rng: _ImageRng) -> np.ndarray:
    """(size, size, 3) float background: solid, a gradient towards a shade, or noisy."""
    base = _jitter(COLOURS[bg], rng)
    style = rng.integers(3)
    if style == 1:  # gradient towards a random grey level along one axis
        ramp = 0.35 * np.linspace(0, 1, size, dtype=np.float32)
        ramp = (ramp[:, None] if rng.random() < 0.5 else ramp[None, :])[..., None]  # (H|1, W|1, 1)
        return base * (1 - ramp) + ramp * np.float32(rng.uniform(0, 255))
    img = np.broadcast_to(base, (size, size, 3))
    if style == 2:
        img = img + _noise(size, rng.uniform(0, _BG_NOISE), rng)
    return img


def render_image(name: str, size: int, rng: _ImageRng) -> tuple[Image.Image, dict]:
    """Draw one image of class ``name``.

    Returns:
        (RGB image, attributes used by the caption: colour, background, scale word).
    """
    fg, bg = _pick_colours(rng)
    scale = str(rng.choice(list(_SCALES)))
    periods = float(np.exp(rng.uniform(*np.log(_SCALES[scale]))))
    mask = texture_mask(name, size, periods, rng)[..., None]  # (H, W, 1)
    fg_img = _jitter(COLOURS[fg], rng) + _noise(size, rng.uniform(0, _FG_NOISE), rng)
    img = mask * fg_img + (1 - mask) * _background(bg, size, rng)  # (H, W, 3)
    pixels = np.clip(img, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), {"colour": fg, "background": bg, "scale": scale}


# ---------------------------------------------------------------- captions

def make_caption(name: str, attrs: dict, rng: _ImageRng) -> str:
    """A caption naming the class and, mostly, one attribute of the image.

    One attribute, not all: a caption that gave colour, background and scale would pick
    its image out of a batch without the texture, and the model would learn no textures.
    With one, it matches a few images of a batch and only the texture tells them apart,
    while the attribute still gives an easy signal early in training (measured: all
    attributes or none both learn the classes more slowly).

    Args:
        name: class noun; attrs: from ``render_image``; rng: random generator.

    Returns:
        e.g. "red stripes", "a drawing of a grid on a blue background", "fine dots pattern".
    """
    c, bg, scale = attrs["colour"], attrs["background"], attrs["scale"]
    pl = name in _PLURAL
    prefix = str(rng.choice(_PREFIXES))
    options = [
        f"{c} {name} pattern" if pl else _a(f"{c} {name}"),  # > 2 words: DataComp's filter
        f"{prefix} {_a(f'{c} {name}', pl)}",
        f"{name} in {c}, {prefix}" if pl else f"{_a(name)} in {c}",
        f"{_a(name, pl)} on {_a(bg)} background",
        f"{prefix} {_a(name, pl)} against {bg}",
        f"{_a(f'{scale} {name}', pl)} pattern",
        f"{prefix} {_a(f'{scale} {name}', pl)}",
        f"{prefix} {_a(name, pl)}",
        f"{_a(f'{c} {name}', pl)} on {bg}",  # two attributes, now and then
    ]
    weights = np.array([2, 2, 1, 1.5, 1, 1.5, 1, 1, 0.5])
    return options[int(rng.choice(len(options), p=weights / weights.sum()))]


# ---------------------------------------------------------------- writers

def _render_one(args: tuple[int, int, int, int]) -> tuple[int, bytes, str]:
    """(seed, i, label, size) -> (label, JPEG bytes, caption); image i's own generator."""
    seed, i, label, size = args
    rng = np.random.default_rng([seed, i])
    image, attrs = render_image(CLASSNAMES[label], size, rng)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return label, buf.getvalue(), make_caption(CLASSNAMES[label], attrs, rng)


def _samples(n: int, seed: int, size: int, processes: int | None = None):
    """Yield (label, JPEG bytes, caption) for n images, classes balanced and shuffled.

    Rendering is spread over ``processes`` (default: one per core, at most 4); the output
    does not depend on it.
    """
    labels = np.resize(np.arange(len(CLASSNAMES)), n)
    np.random.default_rng(seed).shuffle(labels)
    jobs = [(seed, i, int(label), size) for i, label in enumerate(labels)]
    processes = processes or min(4, os.cpu_count() or 1)
    if processes == 1 or n < 64:
        yield from map(_render_one, jobs)
        return
    with ProcessPoolExecutor(processes) as pool:
        yield from pool.map(_render_one, jobs, chunksize=64)


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
    for i, (label, jpeg, caption) in enumerate(_samples(n, seed, size)):
        rel = f"images/{i:06d}.jpg"
        with open(os.path.join(root, rel), "wb") as f:
            f.write(jpeg)
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
        for i, (label, jpeg, _) in enumerate(_samples(n, seed + 1_000_003, size)):
            _add_bytes(tar, f"{i:06d}.jpg", jpeg)
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
    # shards: the names, as filter_shard writes them (one format for every writer)
    return write_marker(out_dir, "filtered_shards", count=len(rows), input_count=len(rows),
                        dropped={}, shards=[s["name"] for s in shards], seconds=0.0)


def write_demo_shards(root: str, n: int, seed: int = 0, size: int = 256,
                      shard_size: int = 256) -> str:
    """Render ``n`` demo images under ``root/raw`` and pack them as ``root/shards``.

    The training stages' input without download and filter (tests, benchmarks, tuning).

    Returns:
        The ``filtered_shards`` folder.
    """
    raw, shards = os.path.join(root, "raw"), os.path.join(root, "shards")
    write_filtered_shards(shards, write_demo_images(raw, n, seed=seed, size=size), raw,
                          shard_size=shard_size)
    return shards
