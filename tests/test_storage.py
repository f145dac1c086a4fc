"""The storage layer under S3 faults: outages ridden out, dead and hanging endpoints named.

A real moto server on 127.0.0.1, reached through a local TCP proxy (`maestro.data.proxy`) that
the tests take down, bring back, or make hang.
"""

from __future__ import annotations

import threading
import time

import botocore.exceptions
import pytest

from maestro import config, storage
from maestro.data import build_loader
from maestro.data.proxy import Proxy
from maestro.errors import MaestroError
from shards.synth import write_synthetic

FAST = {"retry_budget_s": 20.0, "connect_timeout_s": 1.0, "read_timeout_s": 2.0}
AERIAL = {"aerial": {"resolution_m": 2.0, "image_size": 30, "patch_size": 10}}


@pytest.fixture
def proxy(s3_endpoint, monkeypatch):
    """A proxy in front of the moto server, and storage calls going through it."""
    p = Proxy(int(s3_endpoint.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
    monkeypatch.delenv(storage.ENV, raising=False)
    storage.configure(backoff_s=0.1)
    yield p
    p.down()
    monkeypatch.delenv(storage.ENV, raising=False)
    storage._FS_CACHE.clear()


def _cfg(url: str, read_ahead: bool = True, **storage_keys) -> config.Config:
    data = {"shards": url, "batch_size": 1, "workers": 2, "shuffle_buffer": 4, "modalities": AERIAL,
            "read_ahead": read_ahead}  # fmt: skip
    return config.from_dict({"data": data, "storage": {**FAST, **storage_keys}})


def _split(bucket: str) -> str:
    write_synthetic(f"s3://{bucket}/ts", "treesatai_ts", 12, seed=1, sizes={"aerial": 34}, max_dates=8,
                    shard_samples=3)  # fmt: skip
    return f"s3://{bucket}/ts/train"


def test_transient_errors_are_told_apart_from_lasting_ones():
    def client_error(status: int, code: str) -> botocore.exceptions.ClientError:
        meta = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
        return botocore.exceptions.ClientError(meta, "GetObject")

    assert storage.transient(botocore.exceptions.EndpointConnectionError(endpoint_url="http://x"))
    assert storage.transient(botocore.exceptions.ReadTimeoutError(endpoint_url="http://x"))
    assert storage.transient(ConnectionResetError("reset by peer"))
    assert storage.transient(client_error(503, "SlowDown")) and storage.transient(client_error(500, "X"))
    wrapped = OSError("s3fs's translation")
    wrapped.__cause__ = client_error(503, "ServiceUnavailable")
    assert storage.transient(wrapped)
    assert not storage.transient(client_error(403, "AccessDenied"))
    assert not storage.transient(FileNotFoundError("s3://b/k"))


@pytest.mark.parametrize("read_ahead", [False, True])
def test_an_outage_mid_stream_loses_and_skips_no_sample(s3_bucket, proxy, read_ahead):
    url = _split(s3_bucket)
    # generous per-request timeouts: on a loaded machine a slow answer is not the outage
    it = iter(build_loader(_cfg(url, read_ahead, connect_timeout_s=5.0, read_timeout_s=15.0)))
    keys = [next(it)["_keys"][0]]
    proxy.down()  # the endpoint refuses connections and breaks the open ones ...
    threading.Timer(3.0, proxy.up).start()  # ... for 3 s, while the workers keep reading
    batches = [next(it) for _ in range(11)]
    keys += [b["_keys"][0] for b in batches]
    assert all(b["_epoch"] == 0 for b in batches)
    assert len(set(keys)) == 12 and batches[-1]["_skipped"] == 0


def test_a_dead_endpoint_is_named_after_the_budget_even_in_loader_workers(s3_bucket, proxy):
    url = _split(s3_bucket)
    it = iter(build_loader(_cfg(url, retry_budget_s=2.0)))
    next(it)
    proxy.down()
    start = time.monotonic()
    with pytest.raises(
        # the shard or its index, whichever the outage hits first
        Exception,
        match=rf"{url}/train-0000\d\d\.(tar|index\.json).*retry budget.*storage\.retry_budget_s=2",
    ):
        for _ in range(20):
            next(it)
    # The workers had the 2 s budget (the default is 300 s): what they still held, then 2 s and change.
    assert time.monotonic() - start < 60
    with pytest.raises(MaestroError, match=rf"{url}/manifest.json.*EndpointConnectionError"):
        build_loader(_cfg(url, retry_budget_s=1.0))


def test_a_hanging_endpoint_gives_up_within_its_timeouts(s3_bucket, proxy):
    url = _split(s3_bucket)
    proxy.hang = True  # connections accepted, never answered
    storage.configure(retry_budget_s=1.0, connect_timeout_s=1.0, read_timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(MaestroError, match=rf"{url}/manifest.json.*ReadTimeoutError"):
        storage.read_bytes(f"{url}/manifest.json")
    assert time.monotonic() - start < 30  # read timeout + budget, not minutes of silence


def test_read_ahead_opener_serves_the_next_file_from_memory(s3_bucket, proxy):
    urls = [f"s3://{s3_bucket}/f{i}" for i in range(3)]
    for i, u in enumerate(urls):
        storage.write_bytes(u, bytes([i]) * 1000)
    opener = storage.ReadAhead({urls[0]: urls[1]}.get)
    assert isinstance(opener(urls[0]), storage.RetryingReader)  # nothing was foreseen: read from S3
    opener._ahead[1].join()  # the read ahead of urls[1] is done ...
    f = opener(urls[1])  # ... so opening it needs no request
    assert f.read() == bytes([1]) * 1000 and not isinstance(f, storage.RetryingReader)
