"""The img2dataset settings the download step exposes (a light module: no img2dataset)."""
from __future__ import annotations

import dataclasses

# img2dataset's default: skip images whose X-Robots-Tag says any of these.
DEFAULT_DISALLOWED = "noai,noimageai,noindex,noimageindex"
ENCODE_FORMATS = ("jpg", "png", "webp")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
HASHES = ("", "md5", "sha256", "sha512")


@dataclasses.dataclass(frozen=True)
class DownloadOptions:
    """img2dataset's settings the pipeline exposes (same names, except samples_per_shard).

    Attributes:
        image_size, resize_mode: target side and how to reach it ("keep_ratio": shorter
            side = image_size, no crop; "center_crop", "border", "keep_ratio_largest",
            "no" = keep as is). Images are never upscaled.
        encode_format, encode_quality: "jpg" (default), "png" or "webp", and its quality
            (0-100; for png the compression level 0-9).
        samples_per_shard: URLs per shard (number_sample_per_shard).
        processes, threads: worker processes, download threads per process.
        timeout, retries: per-URL HTTP timeout in seconds; retries after a failure.
        min_image_size: drop images whose shorter original side is smaller (0 = off).
        max_aspect_ratio: drop images more elongated than this (0 = off).
        max_image_pixels: refuse images whose header claims more pixels, before decoding.
        compute_hash: "sha256", "md5", "sha512" or "" (none), stored in KEY.json.
        disallowed_header_directives: comma-separated X-Robots-Tag directives that make
            img2dataset skip an image (its default); "" honours none.
        user_agent_token: added to the User-Agent (and matched in X-Robots-Tag).
    """
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    encode_format: str = "jpg"
    encode_quality: int = 95
    samples_per_shard: int = 1000
    processes: int = 1
    threads: int = 16
    timeout: int = 10
    retries: int = 0
    min_image_size: int = 0
    max_aspect_ratio: float = 0.0
    max_image_pixels: int = 89_478_485
    compute_hash: str = "sha256"
    disallowed_header_directives: str = DEFAULT_DISALLOWED
    user_agent_token: str = ""

    def validate(self) -> "DownloadOptions":
        """Raise ValueError naming the first setting out of range and what it expects."""
        png = self.encode_format == "png"
        checks = (
            ("image_size", self.image_size >= 1, "at least 1"),
            ("samples_per_shard", self.samples_per_shard >= 1, "at least 1"),
            ("processes", self.processes >= 1, "at least 1"),
            ("threads", self.threads >= 1, "at least 1"),
            ("timeout", self.timeout >= 1, "at least 1 second"),
            ("retries", self.retries >= 0, "0 or more"),
            ("min_image_size", self.min_image_size >= 0, "0 (off) or more"),
            ("max_aspect_ratio", self.max_aspect_ratio == 0 or self.max_aspect_ratio >= 1,
             "0 (off) or at least 1"),
            ("encode_format", self.encode_format in ENCODE_FORMATS,
             f"one of {ENCODE_FORMATS}"),
            ("encode_quality", 0 <= self.encode_quality <= (9 if png else 100),
             "0-9 for png (its compression level)" if png else "0-100"),
            ("resize_mode", self.resize_mode in RESIZE_MODES, f"one of {RESIZE_MODES}"),
            ("compute_hash", self.compute_hash in HASHES, f"one of {HASHES}"),
            ("max_image_pixels", self.max_image_pixels >= 1, "at least 1"))
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"download option {name}={getattr(self, name)!r} is out of "
                                 f"range; expected {expected}")
        return self
