"""Shared test fixtures: the Triton interpreter on CPU, a real moto S3 server on 127.0.0.1, fixtures dir.

`TRITON_INTERPRET=1` must be set before any `@triton.jit` kernel is decorated, so it is set here,
at import, before test modules import `kernels`.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

# One intra-op thread per process: the suite runs on 2 cores next to data-loader and Ray worker
# processes, and oversubscribed BLAS threads make small-model steps 10-50x slower there.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """`../shared/fixtures` beside the checkout (real and format-faithful samples; never copied)."""
    assert FIXTURES.is_dir(), (
        f"shared fixtures not found at {FIXTURES}; CI checks out ../shared beside the repo"
    )
    return FIXTURES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint: a moto server on 127.0.0.1, reached through s3fs like any bucket.

    Sets the AWS_* variables that s3fs, botocore and pyarrow read, for this process and for the
    processes it starts (data-loader workers, Ray workers).
    """
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield endpoint
    server.stop()


@pytest.fixture
def clean_group_env(monkeypatch):
    """No process-group variables (RANK, WORLD_SIZE, MASTER_* …) during the test and none left
    after it: training code describes a one-rank group in os.environ when no launcher did."""
    from maestro.parallel.dist import GROUP_VARIABLES

    for k in GROUP_VARIABLES:
        monkeypatch.delenv(k, raising=False)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


# A training run small enough for a test on 2 cores: the debug model on the demo config with
# smaller aerial tiles, fewer dates and two modalities, one data-loader process.
SMALL_TRAIN = [
    "model.size=debug",
    "model.inter_depth=1",
    "data.modalities.aerial.image_size=60",
    "data.modalities.s2.num_dates=4",
    "data.batch_size=2",
    "data.workers=0",
    "data.inputs=[aerial,s2]",
    "run.workers=1",
    "run.use_gpu=false",
    "optim.base_lr=0.002",
    "train.steps=4",
    "train.checkpoint_every=2",
    "train.log_every=1",
    "train.image_every=100",
]


@pytest.fixture(scope="session")
def train_archive(tmp_path_factory) -> str:
    """A small synthetic TreeSatAI-TS training split (16 samples in 4 shards)."""
    from shards.synth import write_synthetic

    root = tmp_path_factory.mktemp("train_archive")
    write_synthetic(str(root), "treesatai_ts", samples=16, seed=0, max_dates=4, shard_samples=4)
    return str(root / "train")


def small_train_config(shards: str, storage, name: str, *overrides: str):
    """The resolved config of a `SMALL_TRAIN` run of `shards` named `name` under `storage`."""
    from maestro import config

    return config.load(
        "configs/demo.yaml",
        [*SMALL_TRAIN, f"data.shards={shards}", f"run.storage={storage}", f"run.name={name}", *overrides],
    )


@pytest.fixture
def small_run(train_archive, tmp_path):
    """`small_run(name, *overrides)`: the resolved config of a `SMALL_TRAIN` run under `tmp_path`."""
    return lambda name, *overrides: small_train_config(train_archive, tmp_path, name, *overrides)


@pytest.fixture(scope="module")
def clean_group_env_module():
    """`clean_group_env` for a module-scoped fixture that trains once for several tests."""
    from maestro.parallel.dist import GROUP_VARIABLES

    with pytest.MonkeyPatch.context() as mp:
        for k in GROUP_VARIABLES:
            mp.delenv(k, raising=False)
        yield


class StopAt:
    """An `on_step` hook: Ctrl-C on rank 0 after `step` (the run checkpoints there and returns)."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, step: int, engine, batches) -> None:
        import signal

        if step == self.step and torch.distributed.get_rank() == 0:
            signal.raise_signal(signal.SIGINT)


# What every rank imports before it trains, imported once by the fork server that starts them
# (torch's first optimizer imports torch._dynamo: about 2 s a process on 2 cores).
RANK_IMPORTS = ["torch", "torch._dynamo", "deepspeed", "maestro.train.loop", "maestro.parallel.dist"]


def _rank(
    rank: int, world: int, store_file: str, raw: dict, out: str, stop: int | None, env: dict[str, str]
) -> None:
    """One rank of a `world`-rank group in a fresh process: a launcher's part, then `train`."""
    import json

    from maestro import config
    from maestro.parallel import dist
    from maestro.train.loop import train

    os.environ.clear()  # the test's environment, not the fork server's of when it started
    os.environ.update(env, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.skip_shm_op_build()
    store = torch.distributed.FileStore(store_file, world)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=world)
    summary = train(config.from_dict(raw), on_step=None if stop is None else StopAt(stop))
    Path(out, f"rank{rank}.json").write_text(json.dumps(summary))


def _rank_server():
    """The multiprocessing context whose fork server starts `spawn_ranks`' ranks, started if need be."""
    import multiprocessing
    import multiprocessing.forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(RANK_IMPORTS)
    multiprocessing.forkserver.ensure_running()
    return ctx


def pytest_collection_modifyitems(items) -> None:
    """Start the ranks' fork server while the first tests run when a test module trains on spawned
    ranks: its imports take a core for about 6 s, which the one-threaded tests before leave idle."""
    if any(getattr(item.module, "spawn_ranks", None) is spawn_ranks for item in items if item.module):
        _rank_server()


def spawn_ranks(cfg, tmp_path: Path, stop: int | None = None) -> dict:
    """Train `cfg` on `run.workers` new processes (real DeepSpeed on gloo over a FileStore, no Ray:
    the launcher's part is tested through Ray elsewhere); rank 0's summary. `stop`: Ctrl-C after
    that step.

    The ranks are forked by multiprocessing's fork server, a single-threaded process started once
    that has imported `RANK_IMPORTS`: each rank is a new process with nothing of this one's state
    (its threads, its Ray, its process group), as a spawned one is, without importing torch,
    DeepSpeed and dynamo again."""
    import json

    world = cfg.run.workers
    work = tmp_path / f"group-{len(list(tmp_path.glob('group-*')))}"
    work.mkdir()
    raw = {k: v for k, v in cfg.to_dict().items() if k != "derived"}
    ctx = _rank_server()
    env = dict(os.environ)
    procs = [
        ctx.Process(target=_rank, args=(r, world, str(work / "store"), raw, str(work), stop, env))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * world
    return json.loads((work / "rank0.json").read_text())


@pytest.fixture(name="spawn_ranks")
def _spawn_ranks_fixture():
    """`spawn_ranks(cfg, tmp_path, stop=None)`: train on `run.workers` spawned gloo ranks."""
    return spawn_ranks


def lr_schedule(cfg) -> dict[int, float]:
    """The learning rate of each step under `cfg`'s one-cycle schedule, from step 1 (what a run,
    resumed or resized any number of times, must follow)."""
    from maestro.train import optim

    model = torch.nn.Linear(1, 1)
    opt = optim.build_optimizer(cfg, model)
    sched = optim.build_schedule(cfg, opt)
    out = {}
    for step in range(1, cfg.train.steps + 1):
        out[step] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    return out


def assert_stream_resumes_exactly(cfg, cut: int, total: int):
    """A loader of `cfg` stopped after `cut` batches, and a fresh one given its state (through
    JSON, as a checkpoint holds it), yield the first `total` batches of an uninterrupted loader;
    returns the stopped loader."""
    import json

    from maestro.data import build_loader

    it = iter(build_loader(cfg))
    ref = [next(it)["_keys"] for _ in range(total)]
    first = build_loader(cfg)
    it = iter(first)
    assert [next(it)["_keys"] for _ in range(cut)] == ref[:cut]
    again = build_loader(cfg)
    again.load_state_dict(json.loads(json.dumps(first.state_dict())))
    it = iter(again)
    assert [next(it)["_keys"] for _ in range(total - cut)] == ref[cut:]
    return first


# --- small model configs and synthetic model batches ---------------------------------------------

# TreeSatAI-TS at `model.size=debug` with a 3×3-token aerial image: every model test well under a
# second. `debug` has 2 blocks, so one joint block.
SMALL_MODEL = ["model.size=debug", "model.inter_depth=1", "data.modalities.aerial.image_size=60"]


def small_config(*overrides: str):
    """The shared small config (`SMALL_MODEL`) with further `section.key=value` overrides."""
    from maestro import config

    return config.from_dict({}, [*SMALL_MODEL, *overrides])


def make_batch(cfg, batch: int = 2, seed: int = 0, dates: dict[str, int] | None = None) -> dict:
    """A padded model batch with the shapes `cfg` implies: random values (B, T, C, H, W) per input
    modality (T = `dates[m]`, else its num_dates), sorted dates in 2020, reference date mid-year."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, s in cfg.derived.modalities.items():
        t = (dates or {}).get(m, s.num_dates)
        out[m] = torch.rand(batch, t, s.channels, s.image_size, s.image_size, generator=g)
        doy = torch.sort(torch.randint(1, 366, (batch, t), generator=g), dim=1).values
        out[f"{m}_dates"] = torch.stack([torch.full_like(doy, 2020), doy, torch.zeros_like(doy)], -1)
    out["ref_date"] = torch.tensor([[[2020, 182, 0]]]).repeat(batch, 1, 1)
    return out


@pytest.fixture(name="small_config")
def _small_config_fixture():
    """`small_config(*overrides)`: the shared small model config."""
    return small_config


@pytest.fixture(name="make_batch")
def _make_batch_fixture():
    """`make_batch(cfg, batch=2, seed=0, dates=None)`: a synthetic padded model batch."""
    return make_batch


@pytest.fixture(scope="session")
def treesatai_shards(fixtures_dir, tmp_path_factory) -> Path:
    """The real TreeSatAI-TS fixture samples converted to shards: OUT/{train,val,test}, 2 samples each."""
    from shards.convert import convert

    out = tmp_path_factory.mktemp("treesatai_shards")
    convert("treesatai_ts", fixtures_dir / "treesatai_ts", str(out))
    return out


@pytest.fixture(scope="session")
def pastis_shards(fixtures_dir, tmp_path_factory) -> Path:
    """The PASTIS-R fixture arrays (with date dictionaries in their metadata) converted to shards:
    OUT/fold1..fold5, one sample each, 32×32 px tiles."""
    import datetime as dt
    import json

    import numpy as np

    from shards.convert import convert

    src = fixtures_dir / "pastis" / "PASTIS-R"
    root = tmp_path_factory.mktemp("pastis_source")
    for d in ("DATA_S2", "DATA_S1A", "DATA_S1D", "ANNOTATIONS", "INSTANCE_ANNOTATIONS"):
        (root / d).symlink_to(src / d)
    features = []
    for f in json.loads((src / "metadata.geojson").read_text())["features"]:
        i = f["properties"]["ID_PATCH"]
        for key, prefix in (("dates-S2", "S2"), ("dates-S1A", "S1A"), ("dates-S1D", "S1D")):
            t = np.load(src / f"DATA_{prefix}" / f"{prefix}_{i}.npy").shape[0]
            start = dt.date(2018, 9, 24)
            f["properties"][key] = {
                str(k): int((start + dt.timedelta(days=5 * k)).strftime("%Y%m%d")) for k in range(t)
            }
        features.append(f)
    (root / "metadata.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    out = tmp_path_factory.mktemp("pastis_shards")
    convert("pastis", root, str(out))
    return out
