"""Sample lists ``filter_shard`` matches against: a uid subset, an eval set's images.

* ``UidList``: DataComp's filtering track hands out the uids to keep, 128-bit hashes
  written as 32 hex digits (the ``uid`` field of KEY.json and the parquet metadata). The
  list comes as ``.npy`` (DataComp's format: a sorted structured array of dtype
  ``"u8,u8"``, the upper and lower 64 bits) or ``.parquet`` (a ``uid`` column of hex
  strings). It is held sorted in that ``u8,u8`` form: 16 bytes a uid on each worker
  (140 M uids: 2.2 GB), looked up by binary search.
* ``EvalImages``: the images of an eval set, by exact sha256 and by a 64-bit perceptual
  hash (pHash: the signs of the low 8x8 DCT coefficients of a 32x32 grey thumbnail, as
  the ``imagehash`` package computes it) that survives re-encoding and resizing. An eval
  set is small (ImageNet's 50 k images: under 3 MB of hashes).
"""
from __future__ import annotations

import hashlib
import io
import os

import fsspec
import numpy as np
from PIL import Image

UID_DTYPE = np.dtype("u8,u8")  # DataComp: (int(uid[:16], 16), int(uid[16:32], 16))
UID_FORMATS = (".npy", ".parquet")
_PHASH_SIDE, _PHASH_LOW = 32, 8


class UidListError(ValueError):
    """A uid list that cannot be read; the message names the file and what was expected."""


def uid_pair(uid: str) -> tuple[int, int]:
    """``"0123...ef"`` (32 hex digits) -> (upper 64 bits, lower 64 bits).

    Raises:
        ValueError: not 32 hex digits.
    """
    if len(uid) != 32:
        raise ValueError(f"uid {uid[:40]!r}: expected 32 hex digits")
    return int(uid[:16], 16), int(uid[16:], 16)


def _read_npy(path: str) -> np.ndarray:
    with fsspec.open(path, "rb") as f:
        arr = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if arr.dtype == UID_DTYPE or (arr.dtype.names and len(arr.dtype.names) == 2
                                  and all(arr.dtype[i] == np.uint64 for i in range(2))):
        return arr.astype(UID_DTYPE).reshape(-1)
    if arr.dtype.kind in "US":  # hex strings
        return np.array([uid_pair(str(u)) for u in arr.reshape(-1)], UID_DTYPE)
    raise UidListError(f"{path}: an array of dtype {arr.dtype}; expected DataComp's uid "
                       "array of dtype \"u8,u8\" (or an array of 32-digit hex strings)")


def _read_parquet(path: str) -> np.ndarray:
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        schema = pq.read_schema(f)
        if "uid" not in schema.names:
            raise UidListError(f"{path}: no 'uid' column (found {schema.names[:12]}); "
                               "expected DataComp metadata with a uid column of hex strings")
        f.seek(0)
        column = pq.read_table(f, columns=["uid"]).column("uid").to_pylist()
    return np.array([uid_pair(str(u)) for u in column], UID_DTYPE)


class UidList:
    """The uids a sample must be among to be kept."""

    def __init__(self, uids: np.ndarray, source: str):
        self.uids, self.source = np.sort(uids), source

    @classmethod
    def load(cls, path: str) -> "UidList":
        """Read a ``.npy`` or ``.parquet`` uid list (local or gs://).

        Raises:
            UidListError: unknown format, missing file, no uid column, malformed uids.
        """
        ext = os.path.splitext(path.rstrip("/"))[1].lower()
        if ext not in UID_FORMATS:
            raise UidListError(f"{path}: unknown uid list format {ext or '(no extension)'!r}; "
                               f"expected {' or '.join(UID_FORMATS)} (DataComp's uid array "
                               "of dtype \"u8,u8\", or parquet with a uid column)")
        try:
            uids = _read_npy(path) if ext == ".npy" else _read_parquet(path)
        except UidListError:
            raise
        except FileNotFoundError:
            raise UidListError(f"{path}: uid list not found") from None
        except (ValueError, OSError) as e:
            raise UidListError(f"{path}: cannot read as a uid list ({e})"[:300]) from None
        return cls(uids, path)

    def __len__(self) -> int:
        return len(self.uids)

    def __contains__(self, uid: str) -> bool:
        try:
            query = np.array([uid_pair(uid)], UID_DTYPE)
        except (ValueError, TypeError):
            return False
        i = int(np.searchsorted(self.uids, query)[0])
        return i < len(self.uids) and self.uids[i] == query[0]


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: ``D @ x`` is the DCT of the column ``x``."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    d[0] /= np.sqrt(2)
    return d


_DCT = _dct_matrix(_PHASH_SIDE)


def phash(data: bytes) -> int:
    """The 64-bit perceptual hash of an image's bytes (decoded at reduced scale)."""
    with Image.open(io.BytesIO(data)) as im:
        im.draft("L", (_PHASH_SIDE * 2, _PHASH_SIDE * 2))  # JPEG: decode at 1/2..1/8 scale
        grey = np.asarray(im.convert("L").resize((_PHASH_SIDE, _PHASH_SIDE),
                                                 Image.LANCZOS), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:_PHASH_LOW, :_PHASH_LOW]  # (8, 8) lowest frequencies
    bits = (low > np.median(low)).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0])


class EvalImages:
    """Exact and perceptual hashes of an eval set's images, and the test for a match."""

    def __init__(self, sha256: set[bytes], phashes: np.ndarray, max_distance: int):
        self.sha256, self.phashes, self.max_distance = sha256, phashes, max_distance

    @classmethod
    def from_images(cls, images, max_distance: int) -> "EvalImages":
        """Hash an iterable of image bytes."""
        shas, hashes = set(), []
        for data in images:
            shas.add(hashlib.sha256(data).digest())
            hashes.append(phash(data))
        return cls(shas, np.array(hashes, dtype=np.uint64), max_distance)

    def match(self, data: bytes, sha256: bytes | None = None) -> str | None:
        """``"sha256"`` or ``"phash"`` when the image duplicates an eval image, else None."""
        if (sha256 or hashlib.sha256(data).digest()) in self.sha256:
            return "sha256"
        if self.max_distance < 0 or not len(self.phashes):
            return None
        distance = np.bitwise_count(self.phashes ^ np.uint64(phash(data)))
        return "phash" if int(distance.min()) <= self.max_distance else None


def eval_set_images(path: str):
    """The image bytes of an eval set (eval_set artifact, webdataset shards, ImageFolder)."""
    from clipa_model.artifacts import IMAGE_EXTS
    from clipa_model.eval.data import open_classification_set, read_tar_samples

    ds = open_classification_set(path)
    for shard in ds.shards:
        for _, sample in read_tar_samples(shard):
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            if image is not None:
                yield image
    for url, _ in ds.items or ():
        with fsspec.open(url, "rb") as f:
            yield f.read()
