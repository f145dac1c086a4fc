"""Sequential reading of one tar shard into samples, with retries for transient read errors.

We parse the 512-byte ustar headers ourselves rather than use `tarfile`: samples we do not need
(another worker's, or ones already consumed before a resume) are skipped by seeking, never read
into memory, and a failed read is resumed at the member it broke in, on a freshly opened file.
Only `OSError`s (connection resets, timeouts, S3 errors as s3fs raises them) are retried; a
corrupt header or a short read is the shard's fault and raises `DataError` at once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import IO

from maestro.errors import DataError

log = logging.getLogger(__name__)

BLOCK = 512
RETRIES = 3
BACKOFF_S = 0.05  # first wait; multiplied by 4 each retry


def _octal(field: bytes, where: str) -> int:
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError as e:
        raise DataError(f"{where}: corrupt tar header (number field {field!r}); the shard is damaged") from e


def parse_header(block: bytes, where: str) -> tuple[str, int, bytes] | None:
    """(member name, data size, type flag) of a header block; None at the end-of-archive block."""
    if block == bytes(BLOCK):
        return None
    stored = _octal(block[148:156], where)
    actual = sum(block[:148]) + 8 * 32 + sum(block[156:])
    if stored != actual:
        raise DataError(f"{where}: corrupt tar header (checksum {stored} != {actual}); the shard is damaged")
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    return (f"{prefix}/{name}" if prefix else name), _octal(block[124:136], where), block[156:157]


def split_name(name: str) -> tuple[str, str]:
    """'dir/KEY.suffix.npy' -> ('KEY', 'suffix.npy'): the key ends at the basename's first dot."""
    base = name.rsplit("/", 1)[-1]
    key, _, suffix = base.partition(".")
    return key, suffix


class _Cursor:
    """A file read from a byte offset, reopened there after a transient error (with backoff)."""

    def __init__(self, url: str, opener: Callable[[str], IO[bytes]], retries: int, backoff: float):
        self.url, self.opener, self.retries, self.backoff = url, opener, retries, backoff
        self.f: IO[bytes] | None = None
        self.pos = 0

    def read_at(self, offset: int, n: int) -> bytes:
        for attempt in range(self.retries + 1):
            try:
                if self.f is None:
                    self.f = self.opener(self.url)
                    self.pos = 0
                if self.pos != offset:
                    self.f.seek(offset)
                data = self.f.read(n)
                self.pos = offset + len(data)
                return data
            except OSError as e:
                self.close()
                if attempt == self.retries:
                    raise
                wait = self.backoff * 4**attempt
                log.warning(
                    "%s: read failed at byte %d (%s); retry %d in %.2fs",
                    self.url,
                    offset,
                    e,
                    attempt + 1,
                    wait,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.f is not None:
            with contextlib.suppress(OSError):
                self.f.close()
            self.f = None


def read_samples(
    url: str,
    want: Callable[[str], bool],
    opener: Callable[[str], IO[bytes]],
    retries: int = RETRIES,
    backoff: float = BACKOFF_S,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield `(key, {suffix: bytes})` for each wanted sample of a shard, in file order.

    Members of one sample are consecutive (the writer's layout). Raises DataError on a damaged
    shard and OSError once retries are spent; samples yielded before that are good.
    """
    cur = _Cursor(url, opener, retries, backoff)
    offset = 0
    key, members = None, {}
    try:
        while True:
            block = cur.read_at(offset, BLOCK)
            if not block:
                break  # no end-of-archive blocks: tolerated; missing samples are found by the caller
            if len(block) < BLOCK:
                raise DataError(f"{url}: truncated at byte {offset} (a partial tar header)")
            head = parse_header(block, f"{url} byte {offset}")
            if head is None:
                break
            name, size, kind = head
            offset += BLOCK
            if kind not in (b"0", b"\0"):
                raise DataError(f"{url}: member '{name}' is not a regular file (type {kind!r}); refusing it")
            k, suffix = split_name(name)
            if k != key:
                if key is not None and members:
                    yield key, members
                key, members = k, {}
            if want(k):
                data = cur.read_at(offset, size)
                if len(data) < size:
                    raise DataError(f"{url}: truncated in member '{name}' ({len(data)} of {size} bytes)")
                members[suffix] = data
            offset += -(-size // BLOCK) * BLOCK
        if key is not None and members:
            yield key, members
    finally:
        cur.close()
