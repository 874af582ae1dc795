"""Image checks for ``filter_shard``: size from the header, completeness, bomb limit.

Reading a JPEG's size needs only its SOF segment, a few hundred bytes in; decoding it
(even at 1/8 scale) costs ~100x more. img2dataset re-encodes every image it stores, so a
shard's JPEGs are well formed unless the bytes were cut or damaged afterwards: the header
parse plus the end-of-image marker catch a cut; ``full=True`` also decodes (at 1/8 scale),
which catches damage inside the entropy-coded data.

The pixel count in the header is checked before anything is decoded, so an image whose
header claims 100000x100000 pixels (a decompression bomb) costs no memory.
"""
from __future__ import annotations

import io
import struct
import warnings
from typing import NamedTuple

from PIL import Image

_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, 0xD8}  # markers without a length


class ImageFacts(NamedTuple):
    width: int
    height: int
    too_large: bool  # more pixels than allowed: not decoded


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame segment, without decoding.

    Raises:
        ValueError: not a JPEG, a malformed marker, or no SOF before the data ends.
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (no start-of-image marker)")
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"bad JPEG marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in _SOF:
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            if not width or not height:
                raise ValueError(f"JPEG header says {width}x{height}")
            return width, height
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    raise ValueError("JPEG ends before its frame header")


def _jpeg_complete(data: bytes) -> bool:
    """Whether the JPEG ends with its end-of-image marker (padding after it allowed)."""
    return data.rstrip(b"\0\r\n ")[-2:] == b"\xff\xd9"


def header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a PNG, WebP or GIF header claims, read from its bytes, else None.

    PIL's own parse refuses a header claiming over twice ``Image.MAX_IMAGE_PIXELS``
    before it says the size, so the size of a bomb (and ``max_image_pixels`` above
    PIL's limit) is read here instead.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP" or len(data) < 30:
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":  # extended: 24-bit canvas width-1 and height-1
        return (1 + int.from_bytes(data[24:27], "little"),
                1 + int.from_bytes(data[27:30], "little"))
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the frame tag and start code
        return (struct.unpack("<H", data[26:28])[0] & 0x3FFF,
                struct.unpack("<H", data[28:30])[0] & 0x3FFF)
    if chunk == b"VP8L" and data[20] == 0x2F:  # lossless: two 14-bit sizes minus one
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    return None


def _pil_size(data: bytes, max_pixels: int) -> tuple[int, int, bool]:
    """(width, height, too_large) from the header (PNG, WebP, GIF) or PIL's parse."""
    size = header_size(data)
    if size is not None:
        width, height = size
        if width < 1 or height < 1:
            raise ValueError(f"empty image {width}x{height}")
        return width, height, width * height > max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        except Image.DecompressionBombError:
            return 0, 0, True
    if width < 1 or height < 1:
        raise ValueError(f"empty image {width}x{height}")
    return width, height, width * height > max_pixels


def _decode_small(data: bytes) -> None:
    """Decode at 1/8 scale where the format allows (JPEG draft mode), else in full."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()


def image_facts(data: bytes, max_pixels: int, full: bool = False) -> ImageFacts:
    """Size of an image and whether it is too large, checking that it is whole.

    Args:
        data: the image file's bytes (JPEG, PNG, WebP, ...).
        max_pixels: images with more pixels are reported ``too_large`` and not decoded.
        full: also decode the image (1/8 scale for JPEG) to prove its data is intact.

    Raises:
        ValueError, OSError (PIL): when the bytes are not a whole image.
    """
    if data[:2] == b"\xff\xd8":
        width, height = jpeg_size(data)
        too_large = width * height > max_pixels
        if not too_large and not _jpeg_complete(data):
            raise ValueError("JPEG is cut (no end-of-image marker)")
    else:
        width, height, too_large = _pil_size(data, max_pixels)
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] != b"IEND" and not too_large:
            raise ValueError("PNG is cut (no IEND chunk)")
    if full and not too_large:
        _decode_small(data)
    return ImageFacts(width, height, too_large)


def to_jpeg(data: bytes, quality: int = 95) -> bytes:
    """Re-encode a (checked, not too large) image as an RGB JPEG."""
    with Image.open(io.BytesIO(data)) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()
