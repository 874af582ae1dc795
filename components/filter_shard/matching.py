"""Sample lists ``filter_shard`` matches against: a uid subset, an eval set's images.

* ``UidList``: DataComp's filtering track hands out the uids to keep, 128-bit hashes
  written as 32 hex digits (the ``uid`` field of KEY.json and the parquet metadata). The
  list comes as ``.npy`` (DataComp's format: a sorted structured array of dtype
  ``"u8,u8"``, the upper and lower 64 bits) or ``.parquet`` (a ``uid`` column of hex
  strings). DataComp's lists hold up to ~1.4 billion uids (~22 GB), so no worker loads
  one whole: ``inspect_uid_list`` checks the file's format from its header or footer and
  cuts it into ``UidPiece`` s (row groups; slices of ``.npy`` rows, read by range), each
  piece's uids go to the join bucket ``uid_buckets`` gives them, and a ``UidList`` holds
  one bucket's share, sorted in the ``u8,u8`` form (16 bytes a uid), looked up by binary
  search.
* ``EvalImages``: the images of an eval set, by exact sha256 and by a 64-bit perceptual
  hash (pHash: the signs of the low 8x8 DCT coefficients of a 32x32 grey thumbnail, as
  the ``imagehash`` package computes it) that survives re-encoding and resizing. An eval
  set is small (ImageNet's 50 k images: under 3 MB of hashes).
"""
from __future__ import annotations

import hashlib
import io
import math
import os
from typing import NamedTuple

import fsspec
import numpy as np
from PIL import Image

UID_DTYPE = np.dtype("u8,u8")  # DataComp: (int(uid[:16], 16), int(uid[16:32], 16))
UID_FORMATS = (".npy", ".parquet")
NPY_PIECE_ROWS = 1 << 20  # .npy rows read per piece: 16 MB of DataComp's uids
UIDS_PER_BUCKET = 1 << 22  # at most ~64 MB of uids per join bucket, whatever the input
_PHASH_SIDE, _PHASH_LOW = 32, 8


class UidListError(ValueError):
    """A uid list that cannot be read; the message names the file and what was expected."""


def uid_pair(uid: str) -> tuple[int, int]:
    """``"0123...ef"`` (32 hex digits) -> (upper 64 bits, lower 64 bits).

    Strict (no ``0x``, spaces or underscores, which ``int(s, 16)`` would take), so a
    sample's uid and a list's uid compare equal exactly when their hex digits do.

    Raises:
        ValueError: not 32 hex digits.
    """
    raw = bytes.fromhex(uid) if isinstance(uid, str) and len(uid) == 32 else b""
    if len(raw) != 16:  # fromhex skips whitespace: a short result is a malformed uid
        raise ValueError(f"uid {str(uid)[:40]!r}: expected 32 hex digits")
    return int.from_bytes(raw[:8], "big"), int.from_bytes(raw[8:], "big")


def is_uid(uid) -> bool:
    try:
        uid_pair(uid)
    except ValueError:
        return False
    return True


def uid_pairs(uids: list[str], path: str) -> np.ndarray:
    """Hex uid strings -> a ``UID_DTYPE`` array, in one ``bytes.fromhex`` for speed.

    Raises:
        UidListError: naming ``path`` and the first malformed uid.
    """
    raw = b""
    if all(isinstance(u, str) and len(u) == 32 for u in uids):
        try:
            raw = bytes.fromhex("".join(uids))
        except ValueError:
            pass
    if len(raw) != 16 * len(uids):
        bad = next(u for u in uids if not is_uid(u))
        raise UidListError(f"{path}: uid {str(bad)[:40]!r} is not 32 hex digits; expected "
                           "DataComp's uids (128-bit hashes in hex)")
    halves = np.frombuffer(raw, ">u8").reshape(-1, 2)
    out = np.empty(len(uids), UID_DTYPE)
    out["f0"], out["f1"] = halves[:, 0], halves[:, 1]
    return out


def uid_buckets(pairs: np.ndarray, buckets: int) -> np.ndarray:
    """The join bucket (0 .. buckets-1) of each uid of a ``UID_DTYPE`` array.

    Both halves are mixed (a multiplicative hash) rather than taking the upper 64 bits
    alone: DataComp's uids are uniform hashes, but a hand-made list of small numbers
    would otherwise put every uid in bucket 0.
    """
    pairs = np.asarray(pairs, UID_DTYPE).reshape(-1)
    mixed = (pairs["f0"] ^ pairs["f1"]) * np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2^64
    return ((mixed >> np.uint64(32)) % np.uint64(buckets)).astype(np.int64)


class UidPiece(NamedTuple):
    """A part of a uid list one worker reads: rows ``start..stop`` of an ``.npy`` (at byte
    ``offset``, of ``dtype``) or row group ``start`` of a parquet file."""
    path: str
    fmt: str  # "npy" or "parquet"
    start: int
    stop: int
    offset: int = 0
    dtype: object = None


class UidListSource(NamedTuple):
    """A checked uid list: its path, how many uids, and the pieces to read it in."""
    path: str
    count: int
    pieces: list

    def buckets(self, at_least: int) -> int:
        """Join buckets: at least ``at_least``, and enough that each holds about
        ``UIDS_PER_BUCKET`` uids or fewer."""
        return max(1, at_least, math.ceil(self.count / UIDS_PER_BUCKET))


def _npy_kind(dtype: np.dtype, path: str) -> str:
    """"pairs" (DataComp's ``u8,u8``) or "hex" (strings); anything else is an error."""
    if dtype == UID_DTYPE or (dtype.names and len(dtype.names) == 2
                              and all(dtype[i] == np.uint64 for i in range(2))):
        return "pairs"
    if dtype.kind in "US":
        return "hex"
    raise UidListError(f"{path}: an array of dtype {dtype}; expected DataComp's uid "
                       "array of dtype \"u8,u8\" (or an array of 32-digit hex strings)")


def _npy_source(path: str) -> UidListSource:
    """The pieces of an ``.npy`` list, from its header alone."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    with fs.open(fs_path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise UidListError(f"{path}: .npy format version {version}; expected 1.0 or 2.0")
        shape, _, dtype = read_header(f)  # the order of rows does not matter to a set
        offset = f.tell()
    _npy_kind(dtype, path)
    count = math.prod(shape)
    size = fs.size(fs_path)
    if size < offset + count * dtype.itemsize:
        raise UidListError(f"{path}: {size} bytes, too short for its {count} uids; "
                           "expected a complete .npy file")
    pieces = [UidPiece(path, "npy", a, min(a + NPY_PIECE_ROWS, count), offset, dtype)
              for a in range(0, count, NPY_PIECE_ROWS)]
    return UidListSource(path, count, pieces)


def _parquet_source(path: str) -> UidListSource:
    """The pieces (row groups) of a parquet list, from its footer alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        schema = meta.schema.to_arrow_schema()
    if "uid" not in schema.names:
        raise UidListError(f"{path}: no 'uid' column (found {schema.names[:12]}); "
                           "expected DataComp metadata with a uid column of hex strings")
    kind = schema.field("uid").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UidListError(f"{path}: its uid column holds {kind}; expected strings of 32 "
                           "hex digits (DataComp's uid)")
    pieces = [UidPiece(path, "parquet", i, i + 1) for i in range(meta.num_row_groups)]
    return UidListSource(path, meta.num_rows, pieces)


def inspect_uid_list(path: str) -> UidListSource:
    """Check a ``.npy`` or ``.parquet`` uid list (local or gs://) from its header or footer,
    without reading its uids, and cut it into pieces.

    Raises:
        UidListError: unknown format, missing file, no uid column, wrong dtype or type.
    """
    ext = os.path.splitext(path.rstrip("/"))[1].lower()
    if ext not in UID_FORMATS:
        raise UidListError(f"{path}: unknown uid list format {ext or '(no extension)'!r}; "
                           f"expected {' or '.join(UID_FORMATS)} (DataComp's uid array "
                           "of dtype \"u8,u8\", or parquet with a uid column)")
    try:
        return _npy_source(path) if ext == ".npy" else _parquet_source(path)
    except UidListError:
        raise
    except FileNotFoundError:
        raise UidListError(f"{path}: uid list not found") from None
    except (ValueError, OSError) as e:
        raise UidListError(f"{path}: cannot read as a uid list ({e})"[:300]) from None


def read_uid_piece(piece: UidPiece) -> np.ndarray:
    """The uids of one piece as a ``UID_DTYPE`` array.

    Raises:
        UidListError: a malformed uid (naming the file and the uid). An OSError (a failed
            read from gs://) is not caught: the runner retries it.
    """
    if piece.fmt == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(piece.path, "rb") as f:
            column = pq.ParquetFile(f).read_row_group(piece.start, columns=["uid"])
        return uid_pairs(column.column("uid").to_pylist(), piece.path)
    fs, fs_path = fsspec.core.url_to_fs(piece.path)
    size = piece.dtype.itemsize
    with fs.open(fs_path, "rb") as f:  # one ranged read: only this piece's rows
        f.seek(piece.offset + piece.start * size)
        raw = f.read((piece.stop - piece.start) * size)
    rows = np.frombuffer(raw, piece.dtype)
    if _npy_kind(piece.dtype, piece.path) == "pairs":
        return rows.astype(UID_DTYPE)
    return uid_pairs([u.decode("ascii", "replace") if isinstance(u, bytes) else str(u)
                      for u in rows], piece.path)


class UidList:
    """A set of uids (a whole small list, or one join bucket's share of a large one)."""

    def __init__(self, uids: np.ndarray, source: str):
        self.uids, self.source = np.sort(np.asarray(uids, UID_DTYPE).reshape(-1)), source

    @classmethod
    def load(cls, path: str) -> "UidList":
        """Read a whole ``.npy`` or ``.parquet`` uid list (local or gs://). For small lists
        and tests: filter_shard's graph reads a list in pieces instead.

        Raises:
            UidListError: unknown format, missing file, no uid column, malformed uids.
        """
        source = inspect_uid_list(path)
        parts = [read_uid_piece(piece) for piece in source.pieces]
        return cls(np.concatenate(parts) if parts else np.empty(0, UID_DTYPE), path)

    def __len__(self) -> int:
        return len(self.uids)

    def contains(self, pairs: np.ndarray) -> np.ndarray:
        """Which uids of a ``UID_DTYPE`` array are in the list (a bool array)."""
        pairs = np.asarray(pairs, UID_DTYPE).reshape(-1)
        if not len(self.uids):
            return np.zeros(len(pairs), bool)
        i = np.minimum(np.searchsorted(self.uids, pairs), len(self.uids) - 1)
        return self.uids[i] == pairs

    def __contains__(self, uid: str) -> bool:
        try:
            query = np.array([uid_pair(uid)], UID_DTYPE)
        except (ValueError, TypeError):
            return False
        return bool(self.contains(query)[0])


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
