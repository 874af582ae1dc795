"""Header checks before decoding: bombs are reported with the size they claim, and
``max_image_pixels`` decides for PNG, WebP and GIF too, also above PIL's own limit."""
import io
import struct
import zlib

import pandas as pd
import pytest
from PIL import Image

from components.download.img2dataset_runner import _header_problem
from components.download.url_list import UrlListError, read_url_list
from components.filter_shard.images import header_size, image_facts


def png_header(width, height):
    """A PNG whose IHDR claims width x height (a few dozen bytes of data)."""
    def chunk(body):
        return struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(ihdr) + chunk(b"IDAT" + zlib.compress(b"\0" * 64)) + chunk(b"IEND")


def webp_header(width, height):
    """An extended (VP8X) WebP whose canvas claims width x height."""
    body = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + \
        (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def gif_header(width, height):
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\0" * 20


@pytest.mark.parametrize("make", [png_header, webp_header, gif_header])
def test_bomb_messages_give_the_claimed_size(make):
    message = _header_problem(make(60_000, 50_000), 89_478_485)
    assert "(60000x50000)" in message and "(0x0)" not in message


@pytest.mark.parametrize("make", [png_header, webp_header])
def test_max_image_pixels_above_pils_limit_applies(make):
    # 15000 x 15000 = 225 M pixels: over twice PIL's default limit, which PIL refuses
    # whatever the option says; the option decides.
    data = make(15_000, 15_000)
    assert Image.MAX_IMAGE_PIXELS * 2 < 225_000_000
    assert image_facts(data, 400_000_000) == (15_000, 15_000, False)
    assert image_facts(data, 100_000_000) == (15_000, 15_000, True)
    assert _header_problem(data, 400_000_000) is None


@pytest.mark.parametrize("fmt, options", [
    ("PNG", {}), ("GIF", {}), ("WEBP", {"lossless": False}), ("WEBP", {"lossless": True}),
    ("WEBP", {"lossless": False, "exif": b"Exif\0\0"}),  # written as VP8X
])
def test_header_size_reads_what_pil_writes(fmt, options):
    for size in ((1, 1), (37, 91), (300, 17)):
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 120, 200)).save(buf, format=fmt, **options)
        assert header_size(buf.getvalue()) == size, (fmt, options, size)


def test_missing_url_column_suggests_what_clipa_run_reads(tmp_path):
    pd.DataFrame({"URL": ["http://x/1.jpg"], "caption": ["a cat"]}).to_parquet(tmp_path / "l.parquet")
    with pytest.raises(UrlListError) as err:
        read_url_list(str(tmp_path / "l.parquet"))
    assert "Rename them to 'url' and 'caption' (what clipa run reads)" in str(err.value)
    assert "url_col=" not in str(err.value)
