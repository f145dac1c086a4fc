"""Where shards, runs and checkpoints live: a local folder or `s3://bucket/prefix`, both through fsspec.

The one storage layer of the project: shards, the data loader, training and the launcher reach
files only through these functions, so "is it remote" and "which filesystem" are decided here.

s3fs filesystems are created lazily and cached per process (s3fs is not fork-safe: a filesystem
made before a fork must not be used after it). The endpoint and credentials come from the usual
AWS_* environment (`AWS_ENDPOINT_URL` for a non-AWS endpoint such as MinIO or a moto server).

S3 outages and hanging endpoints are handled here, so every caller gets the same rule: every S3
request has a connect and a read timeout, and every call of this module on an `s3://` URL (and
every read of a file it opened) retries the transient errors s3fs, botocore and aiohttp raise
(connection refused or reset, timeouts, throttling, 5xx) with exponential backoff, for at most
`retry_budget_s` seconds of one continuous outage, then raises `MaestroError` naming the URL and
the last error. Nothing else retries: s3fs's and botocore's own retries are off, so the budget
is the whole story. `configure` sets the budget, timeouts and s3fs's block size and read-ahead
cache; it writes them to the environment (`MAESTRO_STORAGE`), so data-loader workers, Ray workers
and subprocesses started afterwards use them too. Local files are never retried.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import IO, Any, TypeVar

import fsspec

from maestro.errors import MaestroError

log = logging.getLogger(__name__)
T = TypeVar("T")
ENV = "MAESTRO_STORAGE"  # JSON of the `Settings` fields that differ from the defaults
_FS_CACHE: dict[tuple[int, str], fsspec.AbstractFileSystem] = {}


@dataclasses.dataclass(frozen=True)
class Settings:
    retry_budget_s: float = 300.0  # the longest continuous S3 outage a call rides out
    backoff_s: float = 0.5  # first wait after a transient error; doubled each retry, at most 30 s
    connect_timeout_s: float = 10.0  # per request
    read_timeout_s: float = 60.0  # per request: no byte for this long is a hanging endpoint
    # s3fs reads: sequential tar streams want few, large requests (one request's latency per
    # block); 16 MiB is a few FLAIR-HUB samples, and a seek within a block costs no request.
    block_size: int = 16 * 2**20
    cache_type: str = (
        "readahead"  # s3fs's cache of sequential readers: the next block is fetched with this one
    )


def settings() -> Settings:
    """The settings of this process (`configure`d here or in a parent process)."""
    return Settings(**json.loads(os.environ.get(ENV, "{}")))


def configure(**values: Any) -> Settings:
    """Set storage settings (see `Settings`) for this process and the processes it starts later."""
    fields = {f.name for f in dataclasses.fields(Settings)}
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"unknown storage settings {sorted(unknown)}; known: {sorted(fields)}")
    new = dataclasses.replace(settings(), **values)
    default = Settings()
    changed = {k: v for k, v in dataclasses.asdict(new).items() if getattr(default, k) != v}
    os.environ[ENV] = json.dumps(changed, sort_keys=True)
    _FS_CACHE.clear()  # filesystems made with the old timeouts
    return new


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join(url: str, *names: str) -> str:
    """`url/name/...` for local paths and URLs alike."""
    return "/".join([url.rstrip("/"), *names])


def filesystem(url: str) -> fsspec.AbstractFileSystem:
    """The filesystem serving `url`, one per protocol and process (S3: with this process's timeouts)."""
    protocol = "s3" if is_s3(url) else "file"
    key = (os.getpid(), protocol)
    if key not in _FS_CACHE:
        if protocol == "s3":
            st = settings()
            endpoint = os.environ.get("AWS_ENDPOINT_URL")
            fs = fsspec.filesystem(
                "s3",
                client_kwargs={"endpoint_url": endpoint} if endpoint else {},
                config_kwargs={
                    "connect_timeout": st.connect_timeout_s,
                    "read_timeout": st.read_timeout_s,
                    "retries": {"total_max_attempts": 1},  # retried here, under one budget
                },
                default_block_size=st.block_size,
                default_cache_type=st.cache_type,
                skip_instance_cache=True,
            )
            fs.retries = 1  # s3fs's own retry loop off too (its attempts, not retries)
            _FS_CACHE[key] = fs
        else:
            _FS_CACHE[key] = fsspec.filesystem("file")
    return _FS_CACHE[key]


_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "RequestTimeout",
              "TooManyRequests", "InternalError", "ServiceUnavailable"}  # fmt: skip


def _transient_one(e: BaseException) -> bool:
    import aiohttp
    import botocore.exceptions as boto

    if isinstance(e, (boto.ConnectionError, boto.HTTPClientError, aiohttp.ClientConnectionError,
                      aiohttp.ClientPayloadError, asyncio.TimeoutError, ConnectionError, TimeoutError,
                      fsspec.exceptions.FSTimeoutError)):  # fmt: skip
        return True
    response = getattr(e, "response", None)
    if isinstance(e, boto.ClientError) and isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or status == 429 or response.get("Error", {}).get("Code") in _THROTTLED
    return False


def transient(e: BaseException) -> bool:
    """Whether `e` (or an error it was raised from: s3fs wraps botocore's) is worth retrying."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if _transient_one(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


class _Backoff:
    """Waits between retries of one outage: doubling from `backoff_s`, within `retry_budget_s`."""

    def __init__(self, url: str, what: str):
        self.url, self.what, self.st = url, what, settings()
        self.start = self.deadline = None
        self.wait = self.st.backoff_s

    def after(self, e: BaseException) -> None:
        """Sleep before the next attempt, or raise if `e` is not transient or the budget is spent."""
        if not transient(e):
            raise e
        now = time.monotonic()
        if self.deadline is None:
            self.start, self.deadline = now, now + self.st.retry_budget_s
        if now >= self.deadline:
            raise MaestroError(
                f"{self.url}: {self.what} failed with transient errors for {now - self.start:.1f} s, the "
                f"retry budget (storage.retry_budget_s={self.st.retry_budget_s:g}); last "
                f"{e.__class__.__name__}: {e}; is the S3 endpoint "
                f"{os.environ.get('AWS_ENDPOINT_URL', '(AWS)')} up and reachable?"
            ) from e
        wait = min(self.wait, self.deadline - now)
        log.warning("%s: %s failed (%s: %s); retrying in %.1f s", self.url, self.what,
                    e.__class__.__name__, e, wait)  # fmt: skip
        time.sleep(wait)
        self.wait = min(2 * self.wait, 30.0)


def retrying(url: str, what: str, call: Callable[[], T]) -> T:
    """`call()`, retried through transient S3 errors (see the module docstring); local: called once."""
    if not is_s3(url):
        return call()
    backoff = _Backoff(url, what)
    while True:
        try:
            return call()
        except Exception as e:
            backoff.after(e)


class RetryingReader:
    """A binary file read from S3 that rides out outages: after a transient error it reopens the
    object and reads on from where it stood, within the retry budget of one outage."""

    mode = "rb"

    def __init__(self, url: str):
        self.url, self.name, self.pos, self.closed = url, path_of(url), 0, False
        self._f: Any = retrying(url, "open", self._open)

    def _open(self) -> Any:
        return filesystem(self.url).open(path_of(self.url), "rb")

    def _retried(self, what: str, call: Callable[[Any], T]) -> T:
        backoff = _Backoff(self.url, what)
        while True:
            try:
                if self._f is None:
                    self._f = self._open()
                    self._f.seek(self.pos)
                return call(self._f)
            except Exception as e:
                if self._f is not None:
                    self._drop()
                backoff.after(e)

    def _drop(self) -> None:
        f, self._f = self._f, None
        try:
            f.close()
        except Exception as e:  # a broken connection may fail to close: the object is dropped anyway
            log.debug("%s: closing after an error: %s", self.url, e)

    def read(self, n: int = -1) -> bytes:
        data = self._retried(f"read at byte {self.pos}", lambda f: f.read(n))
        self.pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = self._retried("seek", lambda f: f.seek(offset, whence))
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        return self._retried("size", lambda f: f.size)

    def close(self) -> None:
        if self._f is not None:
            self._drop()
        self.closed = True

    def __enter__(self) -> RetryingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadAhead:
    """An opener (`url -> file`) that reads the file opened next whole, in a background thread,
    while the current one is read: on S3 the next shard's request latency and transfer overlap
    the decoding of this one. `upcoming(url)` names the URL that will be opened after `url` (None:
    nothing to read ahead). Memory: the file being read and at most one read ahead."""

    def __init__(self, upcoming: Callable[[str], str | None]):
        self.upcoming = upcoming
        self._ahead: tuple[str, threading.Thread, list[Any]] | None = None  # url, reader, [bytes | error]

    def _start(self, url: str) -> None:
        box: list[Any] = []

        def read() -> None:
            try:
                box.append(read_bytes(url))
            except Exception as e:  # raised again where the file is opened, by a plain open
                box.append(e)

        if self._ahead is not None:
            self._ahead[1].join()  # one read ahead at a time: the memory bound
        thread = threading.Thread(target=read, name=f"read-ahead {url}", daemon=True)
        thread.start()
        self._ahead = url, thread, box

    def __call__(self, url: str) -> IO[bytes]:
        data = None
        if self._ahead is not None and self._ahead[0] == url:
            _, thread, box = self._ahead
            self._ahead = None
            thread.join()
            if isinstance(box[0], bytes):
                data = box[0]
            elif isinstance(box[0], MaestroError):
                raise box[0]  # the retry budget is spent already: not once more
            else:  # opened again here, to fail (or not) where the reader can tell
                log.warning("%s: read ahead failed (%s); opening it again", url, box[0])
        nxt = self.upcoming(url)
        if nxt is not None and (self._ahead is None or self._ahead[0] != nxt):
            self._start(nxt)
        return io.BytesIO(data) if data is not None else open_file(url)


def path_of(url: str) -> str:
    """The filesystem path of `url` (bucket/key for S3, an absolute path locally)."""
    return url[len("s3://") :] if is_s3(url) else os.path.abspath(url)


def absolute(url: str) -> str:
    """`url` with a local path made absolute (Ray workers and subprocesses start elsewhere)."""
    return url if is_s3(url) else os.path.abspath(url)


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """`(filesystem, path)` for `url`, as `fsspec.core.url_to_fs` but through this module's cache.

    Calls on it get the timeouts but not the retries: wrap them in `retrying` where an outage
    must not fail them."""
    return filesystem(url), path_of(url)


def open_file(url: str, mode: str = "rb") -> IO[bytes]:
    """Open a file for binary reading or writing; local parent folders are created on write.

    S3 reads ride out outages (`RetryingReader`); a streamed S3 write is not retried (its parts
    are gone with the connection): `write_bytes` is, whole."""
    if is_s3(url) and mode == "rb":
        return RetryingReader(url)  # type: ignore[return-value]
    fs = filesystem(url)
    if "w" in mode and not is_s3(url):
        os.makedirs(os.path.dirname(path_of(url)), exist_ok=True)
    return fs.open(path_of(url), mode)


def read_bytes(url: str) -> bytes:
    """The whole file (one request on S3, retried whole)."""
    if is_s3(url):
        return retrying(url, "read", lambda: filesystem(url).cat_file(path_of(url)))
    with open_file(url, "rb") as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    def write() -> None:
        with open_file(url, "wb") as f:
            f.write(data)

    retrying(url, "write", write)


def _fresh(url: str) -> fsspec.AbstractFileSystem:
    fs = filesystem(url)
    fs.invalidate_cache()
    return fs


def exists(url: str) -> bool:
    return retrying(url, "exists", lambda: _fresh(url).exists(path_of(url)))


def size(url: str) -> int:
    return retrying(url, "size", lambda: int(_fresh(url).size(path_of(url))))


def list_names(url: str) -> list[str]:
    """Names of the files directly under a folder/prefix (empty if it does not exist)."""

    def names() -> list[str]:
        fs, path = _fresh(url), path_of(url)
        if not fs.exists(path):
            return []
        return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))

    return retrying(url, "list", names)


def file_sizes(url: str) -> dict[str, int]:
    """`{name: bytes}` of the files directly under a folder/prefix (empty if it does not exist)."""

    def sizes() -> dict[str, int]:
        fs, path = _fresh(url), path_of(url)
        if not fs.exists(path):
            return {}
        return {
            p["name"].rstrip("/").rsplit("/", 1)[-1]: int(p["size"])
            for p in fs.ls(path, detail=True)
            if p.get("type") == "file"
        }

    return retrying(url, "list", sizes)


def remove(url: str) -> None:
    retrying(url, "remove", lambda: filesystem(url).rm(path_of(url)))
