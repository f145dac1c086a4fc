"""The one tar reader (for the loader, verify, inspect and indexing) and the member-name rule.

Headers are parsed one 512-byte block at a time, so a reader can seek: members it does not want
are passed over, never read. POSIX ustar headers (what tarfile and webdataset write) are parsed
here in a few slices; any other header goes to `tarfile.TarInfo.frombuf`. ustar, PAX (`x` per member, `g`
global) and GNU long names (`L`, `K`), as `tarfile` and webdataset's `TarWriter` write them, are
understood. A header whose checksum fails is reported and the scan resynchronises at the next
block that is a valid header, so one damaged header costs only the sample it belongs to.

A member `DIR/KEY.SUFFIX` belongs to sample `DIR/KEY`: the key ends at the first dot of the
basename (WebDataset's rule); maestro's own keys have no directory and no dot. The writer's
side is here too: a sample's members as tar bytes, and the rule for the keys it accepts.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO

from maestro.errors import DataError

log = logging.getLogger(__name__)

BLOCK = 512
RECORD = 20 * BLOCK  # what `tarfile` pads an archive to; readers accept any multiple of BLOCK
RETRIES = 3
BACKOFF_S = 0.05  # first wait; multiplied by 4 each retry
MAX_EXTENSION = 1 << 20  # bytes of a PAX or GNU long-name header's data; real ones hold a few names
MAX_KEY = 200  # characters; longer keys need PAX headers in every tool and exceed file-name limits
KEY_ALPHABET = r"A-Za-z0-9_\-"
KEY_CHARS = re.compile(f"[{KEY_ALPHABET}]+")
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_EXTENSIONS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


def split_name(name: str) -> tuple[str, str]:
    """'dir/KEY.suffix.npy' -> ('dir/KEY', 'suffix.npy'): the key ends at the basename's first dot."""
    head, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{head}/{key}" if head else key), suffix


def member_name(key: str, suffix: str) -> str:
    return f"{key}.{suffix}"


def check_key(key: str, where: str = "") -> None:
    """Refuse a key the writer must not write (DataError naming it): empty, too long, or with
    characters other than letters, digits, '_' and '-' (a dot would split the key when read)."""
    if not KEY_CHARS.fullmatch(key) or len(key) > MAX_KEY:
        raise DataError(
            f"{where}sample key {key!r}: expected 1 to {MAX_KEY} letters, digits, '_' or '-' "
            f"(got {len(key)} characters); map ids with shards.schema.sample_key"
        )


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % BLOCK)


def tar_bytes(key: str, members: dict[str, bytes]) -> bytes:
    """One sample's members `KEY.SUFFIX` as tar bytes (PAX headers where a name needs them)."""
    out = []
    for suffix, data in members.items():
        info = tarfile.TarInfo(member_name(key, suffix))
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        out += [info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), _padded(data)]
    return b"".join(out)


def end_of_archive(offset: int) -> bytes:
    """The two zero blocks that end an archive written up to `offset`, padded as `tarfile` does."""
    return bytes(2 * BLOCK + -(offset + 2 * BLOCK) % RECORD)


@dataclass(frozen=True)
class Member:
    name: str
    start: int  # byte offset of its first header block (extension headers included)
    data: int  # byte offset of its data
    size: int  # data bytes
    regular: bool  # a regular file (anything else is refused when read)
    directory: bool

    @property
    def end(self) -> int:
        """Offset just past its data's padding: where the next header starts."""
        return self.data + -(-self.size // BLOCK) * BLOCK


@dataclass(frozen=True)
class Damage:
    """Bytes `[start, end)` that are no header and no member's data (a corrupt header)."""

    start: int
    end: int


@dataclass(frozen=True)
class _Header:
    """What `members` needs of a header block (as `tarfile.TarInfo` has it)."""

    name: str
    size: int
    type: bytes

    def isdir(self) -> bool:
        return self.type == tarfile.DIRTYPE


_USTAR = b"ustar\x0000"  # POSIX ustar magic and version, as tarfile and webdataset write them
_FAST_TYPES = (tarfile.REGTYPE, tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.DIRTYPE)


def _header(block: bytes) -> _Header | tarfile.TarInfo:
    """The header in a 512-byte block. POSIX ustar headers of regular files, directories and PAX
    extensions (all that tarfile and webdataset write) are parsed here, in a few slices; anything
    else (GNU and v7 headers, base-256 numbers, a checksum that does not add up, a zero block) goes
    to `tarfile.TarInfo.frombuf`, which parses it or raises its header errors."""
    kind = block[156:157]
    if block[257:265] == _USTAR and kind in _FAST_TYPES:
        try:
            size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            chksum = int(block[148:156].split(b"\0", 1)[0].strip(), 8)
        except ValueError:
            size = chksum = -1
        if size >= 0 and chksum == sum(block) - sum(block[148:156]) + 256:
            name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            return _Header(name.rstrip("/") if kind == tarfile.DIRTYPE else name, size, kind)
    return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """The `LEN KEY=VALUE\\n` records of a PAX extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError as e:
            raise DataError(f"{where}: corrupt PAX header (record at {pos})") from e
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise DataError(f"{where}: corrupt PAX header (record at {pos})")
        k, _, v = record[:-1].partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "surrogateescape")
        pos += length
    return out


def members(
    read_at: Callable[[int, int], bytes], where: str, start: int = 0, end: int | None = None
) -> Iterator[Member | Damage]:
    """Members (and damaged regions) from byte `start` up to `end` (default: the end of archive).

    Data is never read, except the small data of extension headers. A truncated header or member
    raises DataError; a header with a bad checksum yields a `Damage` and the scan goes on at the
    next valid header.
    """
    offset = start
    glob: dict[str, str] = {}
    local: dict[str, str] = {}
    first = None  # start of the extension headers of the member being read
    bad = None  # start of a damaged region being skipped
    while end is None or offset < end:
        block = read_at(offset, BLOCK)
        if not block:
            break  # no end-of-archive blocks: tolerated
        if len(block) < BLOCK:
            raise DataError(f"{where}: truncated at byte {offset} (a partial tar header)")
        try:
            info = _header(block)
        except tarfile.EOFHeaderError:
            if bad is None:
                break
            offset += BLOCK  # zeros inside a damaged region
            continue
        except tarfile.HeaderError:
            if bad is None:
                log.warning("%s: corrupt tar header at byte %d; resynchronising", where, offset)
                bad, first, local = (offset if first is None else first), None, {}
            offset += BLOCK
            continue
        if bad is not None:
            yield Damage(bad, offset)
            bad = None
        data = offset + BLOCK
        if info.type in _EXTENSIONS:
            if info.size > MAX_EXTENSION:
                raise DataError(
                    f"{where}: extension header at byte {offset} claims {info.size} bytes; the shard is damaged"
                )
            body = read_at(data, info.size)
            if len(body) < info.size:
                raise DataError(f"{where}: truncated in the extension header at byte {offset}")
            if first is None:
                first = offset
            if info.type == tarfile.GNUTYPE_LONGNAME:
                local["path"] = body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif info.type == tarfile.XHDTYPE:
                local.update(_pax_records(body, f"{where} byte {offset}"))
            elif info.type == tarfile.XGLTYPE:
                glob.update(_pax_records(body, f"{where} byte {offset}"))
            offset = data + -(-info.size // BLOCK) * BLOCK
            continue
        name = local.get("path", glob.get("path", info.name))
        try:
            size = int(local.get("size", info.size))
        except ValueError as e:
            raise DataError(f"{where}: PAX size {local['size']!r} of member '{name}' is not a number") from e
        m = Member(name, offset if first is None else first, data, size, info.type in _REGULAR, info.isdir())
        first, local = None, {}
        yield m
        offset = m.end
    if bad is not None:
        yield Damage(bad, offset)


def buffer_reader(data: bytes | memoryview, base: int = 0) -> Callable[[int, int], bytes]:
    """`read_at` over bytes that start at archive offset `base`."""
    view = memoryview(data)

    def read_at(offset: int, n: int) -> bytes:
        return bytes(view[offset - base : offset - base + n])

    return read_at


def parse_sample(data: bytes, offset: int, key: str, where: str) -> dict[str, bytes]:
    """{suffix: bytes} of the sample whose bytes `data` start at archive offset `offset`
    (`sample_members` over a buffer)."""
    return sample_members(buffer_reader(data, offset), offset, offset + len(data), key, where)


def sample_members(
    read_at: Callable[[int, int], bytes], offset: int, end: int, key: str, where: str
) -> dict[str, bytes]:
    """{suffix: bytes} of the sample at archive bytes `[offset, end)`, read through `read_at`
    (headers and members in file order, each member's data in one read).

    Refuses (DataError naming the sample) a damaged header, a member that is not a regular file,
    a member of another key, a name without a suffix and a suffix seen twice.
    """
    at = f"{where} sample '{key}'"
    out: dict[str, bytes] = {}
    for m in members(read_at, at, offset, end):
        if isinstance(m, Damage):
            raise DataError(f"{at}: corrupt tar header at byte {m.start}; refusing the sample")
        if m.directory:
            continue
        k, suffix = split_name(m.name)
        if not m.regular:
            raise DataError(f"{at}: member '{m.name}' is not a regular file (a link or device); refusing it")
        if k != key:
            raise DataError(
                f"{at}: member '{m.name}' at byte {m.start} belongs to another key; the index is stale"
            )
        if not suffix:
            raise DataError(f"{at}: member '{m.name}' has no KEY.SUFFIX name")
        if suffix in out:
            raise DataError(f"{at}: member '{suffix}' twice")
        body = read_at(m.data, m.size)
        if len(body) < m.size:
            raise DataError(f"{at}: truncated in member '{m.name}' ({len(body)} of {m.size} bytes)")
        out[suffix] = body
    return out


class Cursor:
    """A file read at byte offsets, reopened there after a transient error (with backoff).

    Only `OSError`s (connection resets, timeouts, S3 errors as s3fs raises them) are retried; a
    short read is returned as it is (the caller names it as truncation).
    """

    def __init__(
        self, url: str, opener: Callable[[str], IO[bytes]], retries: int = RETRIES, backoff: float = BACKOFF_S
    ):
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

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
