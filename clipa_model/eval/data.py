"""Evaluation datasets: labelled image sets (zero-shot) and image-text pairs (retrieval).

Three layouts of a labelled classification set, local or gs://:

    eval_set artifact   clipa's own (docs/ARTIFACTS.md): marker, classes.json, *.tar
    webdataset shards   a folder of *.tar (or one .tar, or a brace pattern
                        ``.../shard-{0000..0099}.tar``) with KEY.<jpg|png|webp> + KEY.cls
    ImageFolder tree    ROOT/<class folder>/<image>; class index = sorted folder order

and one layout of image-text pairs (retrieval): *.tar with KEY.<image> + KEY.txt, one
caption per line (several lines = several captions of the image).

Images are decoded in DataLoader workers, resized and cropped for the checkpoint
(``preprocess.Preprocess``) and batched as uint8; labels are checked against the class list
as they stream by, before any result is written.
"""
from __future__ import annotations

import json
import re
import tarfile
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import fsspec
import numpy as np
import torch
from PIL import Image

from clipa_model.artifacts import (IMAGE_EXTS, ArtifactError, has_marker, join, read_json,
                                   read_marker)
from clipa_model.preprocess import Preprocess

_WNID = re.compile(r"^n\d{8}$")


class EvalDataError(ValueError):
    """An evaluation dataset that cannot be read; the message names the input at fault."""


# ---------------------------------------------------------------- shards

def _is_dir(fs, path: str) -> bool:
    try:
        return fs.isdir(path)
    except (FileNotFoundError, OSError):
        return False


def list_shards(path: str) -> list[str]:
    """The .tar files of ``path``: a folder (sorted), one .tar, or a brace pattern."""
    if "{" in path:
        import braceexpand

        return list(braceexpand.braceexpand(path))
    if path.endswith(".tar"):
        return [path]
    fs, root = fsspec.core.url_to_fs(path)
    if not _is_dir(fs, root):
        raise EvalDataError(f"{path}: not found; expected a folder, a .tar shard or a "
                            "brace pattern such as shard-{0000..0009}.tar")
    names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".tar"))
    return [join(path, p.rsplit("/", 1)[-1]) for p in names]


def read_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one webdataset shard, streamed: (key, {extension: bytes}).

    The key is the member name up to the first dot of its basename (webdataset's rule).
    """
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key, sample = None, {}
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            member_key = f"{folder}/{stem}" if folder else stem
            if member_key != key and sample:
                yield key, sample
                sample = {}
            key = member_key
            sample[ext.lower()] = tar.extractfile(member).read()
        if sample:
            yield key, sample


def _image_of(sample: dict[str, bytes]) -> bytes | None:
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def decode_image(data: bytes) -> Image.Image:
    import io

    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")


# ---------------------------------------------------------------- class names

def load_classes(spec: str | None) -> tuple[list[str], list, str]:
    """Class names and prompt templates.

    Args:
        spec: None or "imagenet" (open_clip's 1000 ImageNet names and its 80 OpenAI
            templates), or a JSON file: {"classnames": [...], "templates": [...]}
            ("{}" marks the class name; templates default to the 80) or a plain list.

    Returns:
        (classnames, templates, source description).
    """
    from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    if spec in (None, "", "imagenet"):
        return list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES), "imagenet"
    try:
        obj = read_json(spec)
    except FileNotFoundError:
        raise EvalDataError(f"classes file {spec}: not found; expected a JSON file with "
                            '{"classnames": [...], "templates": [...]}') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalDataError(f"classes file {spec}: not JSON ({e})") from None
    names = obj if isinstance(obj, list) else obj.get("classnames") if isinstance(obj, dict) else None
    templates = obj.get("templates") if isinstance(obj, dict) else None
    if not names or not all(isinstance(n, str) for n in names):
        raise EvalDataError(f"classes file {spec}: expected a non-empty list of class names "
                            'under "classnames" (or a plain JSON list)')
    if templates is not None and (not templates or not all(
            isinstance(t, str) and "{}" in t for t in templates)):
        raise EvalDataError(f"classes file {spec}: \"templates\" must be strings with a {{}} "
                            "where the class name goes")
    return list(names), list(templates or OPENAI_IMAGENET_TEMPLATES), spec


def fill_template(template, classname: str) -> str:
    """A prompt: open_clip's templates are callables, JSON ones are "{}" strings."""
    return template(classname) if callable(template) else template.format(classname)


# ---------------------------------------------------------------- classification sets

@dataclass
class ClassificationSet:
    """A labelled image set, resolved and checked before any image is decoded.

    Attributes:
        path: what the user gave; layout: "eval_set", "webdataset" or "imagefolder".
        classnames, templates, classes_source: the zero-shot classifier's inputs.
        count: images, when known up front (None for plain webdataset shards).
        shards: .tar URLs (shard layouts); items: (image URL, label) (ImageFolder).
    """
    path: str
    layout: str
    classnames: list[str]
    templates: list
    classes_source: str
    count: int | None = None
    shards: list[str] = field(default_factory=list)
    items: list[tuple[str, int]] = field(default_factory=list)


def _image_folder(path: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class folders (sorted) and (image URL, label) of an ImageFolder tree."""
    fs, root = fsspec.core.url_to_fs(path)
    folders = sorted(info["name"].rstrip("/").rsplit("/", 1)[-1]
                     for info in fs.ls(root, detail=True) if info["type"] == "directory")
    items = []
    for label, name in enumerate(folders):
        for p in sorted(fs.ls(f"{root.rstrip('/')}/{name}", detail=False)):
            if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                items.append((join(path, name, p.rsplit("/", 1)[-1]), label))
    return folders, items


def open_classification_set(path: str, classes: str | None = None) -> ClassificationSet:
    """Resolve ``path`` to a classification set and its classes; check the labels' range.

    Args:
        path: eval_set artifact, webdataset shards or ImageFolder tree (local or gs://).
        classes: None (the eval_set's own classes.json; ImageNet for the other layouts;
            an ImageFolder whose folders are not ImageNet ids names its classes by its
            folders), "imagenet", or a JSON file (see ``load_classes``).

    Raises:
        EvalDataError: unreadable layout, no images, or more ImageFolder classes than names.
    """
    if has_marker(path, "eval_set"):
        marker = read_marker(path, "eval_set")
        if classes is None:
            own = read_json(join(path, "classes.json"))
            names, templates, source = own["classnames"], own["templates"], "classes.json"
        else:
            names, templates, source = load_classes(classes)
        shards = [join(path, s) for s in marker.get("shards", [])]
        ds = ClassificationSet(path, "eval_set", names, templates, source, marker.get("count"), shards)
    else:
        shards = list_shards(path)
        if shards:
            names, templates, source = load_classes(classes)
            ds = ClassificationSet(path, "webdataset", names, templates, source,
                                   _sizes_count(path), shards)
        else:
            ds = _open_image_folder(path, classes)
    if not ds.shards and not ds.items:
        raise EvalDataError(f"{path}: no images; expected an eval_set artifact, webdataset "
                            "shards (*.tar with KEY.jpg + KEY.cls) or an ImageFolder tree "
                            "(one folder of images per class)")
    return ds


def _open_image_folder(path: str, classes: str | None) -> ClassificationSet:
    folders, items = _image_folder(path)
    if classes is None and folders and not all(_WNID.match(f) for f in folders):
        from open_clip import OPENAI_IMAGENET_TEMPLATES

        names = [f.replace("_", " ") for f in folders]
        templates, source = list(OPENAI_IMAGENET_TEMPLATES), "folder names"
    else:
        names, templates, source = load_classes(classes)
    if len(folders) > len(names):
        raise EvalDataError(f"{path}: {len(folders)} class folders but {len(names)} class names "
                            f"({source}); labels {len(names)}..{len(folders) - 1} would be outside "
                            "the class list")
    return ClassificationSet(path, "imagefolder", names, templates, source, len(items), items=items)


def _sizes_count(path: str) -> int | None:
    """Sample count from a sizes.json beside the shards (open_clip's convention), if any."""
    if "{" in path or path.endswith(".tar"):
        return None
    try:
        return int(sum(read_json(join(path, "sizes.json")).values()))
    except (FileNotFoundError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------- streams

class _ShardStream(torch.utils.data.IterableDataset):
    """Decoded samples of a shard list; DataLoader workers split the shards between them.

    ``task`` "classify" yields ((S, S, 3) uint8, label), checking 0 <= label < num_classes;
    "pairs" yields ((S, S, 3) uint8, [captions]).
    """

    def __init__(self, shards: Sequence[str], transform, task: str, num_classes: int = 0):
        super().__init__()
        self.shards, self.transform, self.task, self.num_classes = list(shards), transform, task, num_classes

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        for url in mine:
            for key, sample in read_tar_samples(url):
                image = _image_of(sample)
                if image is None:
                    continue
                yield self.transform(decode_image(image)), self._target(url, key, sample)

    def _target(self, url: str, key: str, sample: dict):
        if self.task == "pairs":
            if "txt" not in sample:
                raise EvalDataError(f"{url}: sample {key!r} has an image but no .txt caption")
            return [c for c in sample["txt"].decode("utf-8").splitlines() if c.strip()] or [""]
        raw = sample.get("cls")
        try:
            label = int(raw.decode().strip())
        except (AttributeError, ValueError):
            raise EvalDataError(f"{url}: sample {key!r} has no integer class index in "
                                f"KEY.cls (got {raw!r})") from None
        if not 0 <= label < self.num_classes:
            raise EvalDataError(f"{url}: sample {key!r} has label {label}, outside the "
                                f"{self.num_classes} classes of the class list (0..{self.num_classes - 1})")
        return label


class _FileList(torch.utils.data.Dataset):
    """(image URL, label) pairs of an ImageFolder tree, decoded on access."""

    def __init__(self, items: list[tuple[str, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        url, label = self.items[i]
        with fsspec.open(url, "rb") as f:
            return self.transform(decode_image(f.read())), label


def _collate(batch):
    images, targets = zip(*batch)
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
    if isinstance(targets[0], int):
        return images, torch.tensor(targets, dtype=torch.long)
    return images, list(targets)


def _loader(dataset, batch_size: int, num_workers: int):
    workers = num_workers
    if isinstance(dataset, _ShardStream):
        workers = min(num_workers, len(dataset.shards))  # an idle worker only costs memory
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None)


def classification_batches(ds: ClassificationSet, pp: Preprocess, batch_size: int,
                           num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the set, preprocessed for ``pp``.

    Yields:
        (images (B, 3, S, S) uint8, labels (B,) int64); the last batch may be smaller.
    """
    transform = pp.pil_transform()
    if ds.items:
        dataset = _FileList(ds.items, transform)
    else:
        dataset = _ShardStream(ds.shards, transform, "classify", len(ds.classnames))
    yield from _loader(dataset, batch_size, num_workers)


def open_pair_set(path: str) -> tuple[list[str], int | None]:
    """Shards and sample count (if known) of an image-text pair set.

    Raises:
        EvalDataError: no .tar shards at ``path``.
    """
    shards = list_shards(path)
    if not shards:
        raise EvalDataError(f"{path}: no .tar shards; expected webdataset shards with "
                            "KEY.jpg + KEY.txt (one caption per line)")
    count = None
    if has_marker(path):
        try:
            count = read_marker(path).get("count")
        except ArtifactError:
            count = None
    return shards, count or _sizes_count(path)


def pair_batches(shards: list[str], pp: Preprocess, batch_size: int,
                 num_workers: int = 0) -> Iterator[tuple[torch.Tensor, list[list[str]]]]:
    """Batches of (images (B, 3, S, S) uint8, captions of each image)."""
    yield from _loader(_ShardStream(shards, pp.pil_transform(), "pairs"), batch_size, num_workers)
