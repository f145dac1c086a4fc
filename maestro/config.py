"""Typed configuration: nested dataclasses, YAML deltas, `section.key=value` overrides, one `resolve()`.

`load(path, overrides)` reads a YAML file that holds only what differs from the defaults, applies
the overrides, checks every key and type, and calls `resolve()`, which validates values against
each other and computes every derived value (modality specs, fusion groups, global batch,
accumulation, absolute learning rate, the DeepSpeed config dict) in this one place. The resolved
config is what gets logged and saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml

from maestro.errors import ConfigError
from maestro.modalities import ModalitySpec, TargetSpec, preset, validate_modality
from maestro.sizes import SIZES


@dataclass
class DataConfig:
    dataset: str = "treesatai_ts"
    # URL of a shard split (local folder or s3://bucket/prefix), or a list of them, each a URL or
    # {path: URL, weight: W} (W × its samples drawn per epoch; see `shard_sources`)
    shards: str | list[str | dict[str, Any]] = ""
    inputs: list[str] | None = None  # modalities fed to the model; None: the preset's
    targets: list[str] | None = None  # downstream targets (heads, labels); None: the preset's first
    modalities: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-modality deltas or new sensors
    batch_size: int = 32  # per worker (micro-batch)
    workers: int = 4  # data-loader processes per rank
    shuffle_buffer: int = 256
    augment: bool = True  # random flips/transpose (train only)
    random_dates: bool = True  # random valid date per bin in training (the reference's train mode)
    token_budget: int = 0  # >0: packed batches of at most this many tokens (for dates=all)
    seed: int = 0
    strict: bool = False  # re-raise data errors instead of skipping and counting them
    # Geometry of your own data (0 / empty: the preset's): tile and crop side in metres, and the
    # reference date (a modality name, whose first date it is, or YYYY-MM-DD).
    tile_m: float = 0.0
    crop_m: float = 0.0
    ref_date: str = ""
    read_ahead: bool = False  # S3: each loader worker reads its next shard whole in the background


@dataclass
class StorageConfig:
    """S3 behaviour of every storage call (`maestro/storage.py`): loader, shards, checkpoints."""

    retry_budget_s: float = 300.0  # the longest continuous S3 outage a call rides out, then an error
    connect_timeout_s: float = 10.0  # per S3 request
    read_timeout_s: float = 60.0  # per S3 request: silence this long is a hanging endpoint
    block_size: int = 16 * 2**20  # s3fs read block: one request per block of a sequential read
    cache_type: str = "readahead"  # s3fs cache: fetch ahead of sequential reads ("none" for random access)


@dataclass
class ModelConfig:
    size: Literal["debug", "tiny", "small", "base", "large"] = "tiny"
    fusion: Literal["shared", "monotemp", "mod", "group"] = "group"
    inter_depth: int = 3
    attention: Literal["flash", "sdpa", "math"] = "sdpa"
    kernels: Literal["triton", "torch"] = "torch"
    use_date_enc: bool = True
    interpolate: Literal["nearest", "bilinear"] = "nearest"
    head: Literal["attentive", "linear"] = "attentive"  # downstream heads (the reference's type_head)
    init: str = ""  # probe/finetune weights: "" the run's own, "random", or a .safetensors/.ckpt path


@dataclass
class MaskConfig:
    ratio: float = 0.75
    scale: float = 0.0
    modality: float | None = 0.25
    bands: float | None = None
    dates: float | None = 0.25
    locations: float | None = 0.25


@dataclass
class LossConfig:
    kind: Literal["l1", "l2"] = "l1"
    target_norm: Literal["none", "patch", "patch_group"] = "patch_group"


@dataclass
class OptimConfig:
    base_lr: float = 3e-5
    lr_scaling: Literal["sqrt", "none"] = "sqrt"  # lr = base_lr * sqrt(global_batch / 3)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.01
    decay_norms_and_biases: bool = True  # the reference decays everything
    pct_start: float = 0.2
    div_factor: float = 1000.0
    final_factor: float = 1e7  # final lr = lr / final_factor
    grad_clip: float = 0.0  # 0: none (the reference)


@dataclass
class TrainConfig:
    steps: int = 1000
    grad_accum: int = 1
    # The optimizer step's batch over all workers; 0: data.batch_size × grad_accum × the most
    # workers (run.workers). Kept at every worker count by changing the accumulation steps.
    global_batch: int = 0
    zero_stage: int = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # Written by a background thread from a host copy while training goes on (false: in step).
    checkpoint_async: bool = True
    log_every: int = 10
    image_every: int = 500
    ema: bool = True
    ema_momentum: float = 0.9999  # per optimizer step
    seed: int = 0


@dataclass
class RunConfig:
    name: str = "maestro"
    storage: str = "runs"  # local folder or s3://bucket/prefix
    # A number, or [MIN, MAX] on a Ray cluster (elastic: the run shrinks to what the cluster still
    # holds and grows back); auto: this machine's GPUs (use_gpu) or CPU cores, for local runs.
    workers: int | list[int] | Literal["auto"] = 1
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: int = 1
    address: str = ""  # Ray cluster address; empty: start Ray locally
    max_failures: int = 3  # restarts after a crash
    max_preemptions: int = -1  # restarts after a node is preempted or lost (-1: no limit)
    resize_check_s: float = 60.0  # elastic runs: how often Ray looks for room to grow
    resource_wait_s: float = 0.0  # on a cluster: how long to wait for nodes (autoscaling) before failing


@dataclass
class EvalConfig:
    """Downstream evaluation (maestro/eval): probe, fine-tune, in-loop probe during pretraining.

    Splits default to `data.shards` (train) and its sibling folders `val` and `test`. Steps and
    learning rates follow the reference's probe and fine-tune recipes (maestro_reference.md §5.2-5.3);
    validation runs every `val_every` steps (the reference: once per epoch)."""

    train: str = ""
    val: str = ""
    test: str = ""
    monitor: str = ""  # the metric picking the best checkpoint; "" : weighted_f1 or miou by task
    probe_steps: int = 500
    probe_base_lr: float = 1e-5
    probe_final_factor: float = 1e7
    finetune_steps: int = 1000
    finetune_base_lr: float = 1e-5
    finetune_final_factor: float = 2.0
    val_every: int = 100
    patience: int = 5  # validations without improvement before fine-tuning stops; 0: never
    every: int = 0  # in-loop probe every N pretraining steps; 0: off
    probe_samples: int = 256  # samples of eval.train (fit) and eval.val (score) for the in-loop probe


@dataclass
class Derived:
    """Values computed by `resolve()`; never set by users."""

    modalities: dict[str, ModalitySpec] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    targets: dict[str, TargetSpec] = field(default_factory=dict)
    grid_pos_enc: int = 0
    tile_m: float = 0.0
    crop_m: float = 0.0
    ref_date: str = ""
    global_batch: int = 0
    lr: float = 0.0
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    derived: Derived = field(default_factory=Derived)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "derived"]


# --- type checking of plain YAML values against dataclass field types --------------------------


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return {
        type(None): "null",
        bool: "true/false",
        int: "an integer",
        float: "a number",
        str: "a string",
    }.get(tp, "any value")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return `value` checked (and losslessly converted) against type `tp`, or raise ConfigError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        # YAML reads `true`/`false` as bools; let Literal["true", "false"] fields accept them.
        if isinstance(value, bool) and str(value).lower() in args:
            return str(value).lower()
        raise ConfigError(key, value, _describe(tp))
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError:
                continue
        raise ConfigError(key, value, _describe(tp))
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, value, _describe(tp))
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, value, _describe(tp))
        return {_coerce(key, k, args[0]): _coerce(f"{key}.{k}", v, args[1]) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(key, value, _describe(tp))


def _build(cls: type, values: Any, prefix: str, base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping, on top of `base` (default: the class defaults)."""
    if not isinstance(values, dict):
        raise ConfigError(prefix, values, f"a mapping of {cls.__name__} keys")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    updates = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(key, v, f"a known key of '{prefix or 'config'}': {', '.join(sorted(names))}")
        updates[k] = _coerce(key, v, hints[k])
    if base is not None:
        return dataclasses.replace(base, **updates)
    try:
        return cls(**updates)
    except TypeError as e:  # a required field is missing
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            and f.name not in updates
        )
        raise ConfigError(prefix, values, f"the required keys {missing}") from e


def _merge(base: dict, delta: dict) -> dict:
    out = dict(base)
    for k, v in delta.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(text, text, "an override of the form section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS or not all(parts):
        raise ConfigError(path, raw, f"section.key with a section among {SECTIONS}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(path, raw, f"a YAML value ({e.__class__.__name__})") from e
    return parts, value


def from_dict(raw: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """Build and resolve a config from a plain (YAML-like) delta mapping plus overrides."""
    raw = dict(raw or {})
    for text in overrides:
        parts, value = _parse_override(text)
        delta: Any = value
        for p in reversed(parts):
            delta = {p: delta}
        raw = _merge(raw, delta)
    if "derived" in raw:
        raise ConfigError("derived", raw["derived"], "no value: derived values are computed, not set")
    sections = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(name, value, f"a section among {SECTIONS}")
        sections[name] = value
    cfg = Config()
    hints = typing.get_type_hints(Config)
    for name, value in sections.items():
        setattr(cfg, name, _build(hints[name], value or {}, name))
    return resolve(cfg)


def is_overlay(text: str) -> bool:
    """An override that names a YAML file (`configs/local.yaml`) instead of `section.key=value`."""
    return "=" not in text and text.endswith((".yaml", ".yml"))


def read_delta(path: str | Path) -> dict[str, Any]:
    """One YAML delta file as a plain mapping; ConfigError names the file when it is not one."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("CONFIG", str(path), "an existing YAML file (see configs/)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(str(path), "<file>", f"valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(str(path), raw, "a mapping of sections")
    return raw


def load(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML delta file (or only defaults when `path` is None), apply overrides, resolve.

    An override naming a YAML file is an overlay: its deltas apply on top of the file's (in the
    order given), and the `section.key=value` overrides on top of all files
    (`maestro pretrain configs/treesatai_ts.yaml configs/local.yaml run.name=try`).
    """
    raw: dict[str, Any] = {} if path is None else read_delta(path)
    for text in overrides:
        if is_overlay(text):
            raw = _merge(raw, read_delta(text))
    return from_dict(raw, [t for t in overrides if not is_overlay(t)])


# --- resolve: cross-field checks and derived values --------------------------------------------


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(key, value, expected)


def shard_sources(shards: str | list[str | dict[str, Any]]) -> list[tuple[str, float]]:
    """`data.shards` as (split URL, weight) pairs; ConfigError naming the entry that is wrong.

    A split of weight W contributes round(W × its samples) samples to each epoch: 1 is its natural
    share, 3 streams each of its samples three times an epoch, 0.25 a quarter of them (other ones
    each epoch). A plain URL has weight 1.
    """
    if isinstance(shards, str):
        return [(shards, 1.0)]
    _check(bool(shards), "data.shards", shards, "a split URL, or a non-empty list of split URLs")
    out: list[tuple[str, float]] = []
    for i, entry in enumerate(shards):
        key = f"data.shards[{i}]"
        if isinstance(entry, dict):
            extra = sorted(set(entry) - {"path", "weight"})
            _check(not extra, key, entry, f"a split URL or a mapping of 'path' and 'weight' (not {extra})")
            url, weight = entry.get("path"), entry.get("weight", 1.0)
            _check(isinstance(url, str) and bool(url), f"{key}.path", url, "a split URL")
            _check(
                isinstance(weight, int | float) and not isinstance(weight, bool) and 0 < weight < math.inf,
                f"{key}.weight",
                weight,
                "a positive number (1: the split's natural share of an epoch, 2: each sample twice, "
                "0.5: half of them)",
            )
        else:
            url, weight = entry, 1.0
            _check(bool(url), key, url, "a split URL")
        out.append((url, float(weight)))
    urls = [u.rstrip("/") for u, _ in out]
    twice = sorted({u for u in urls if urls.count(u) > 1})
    _check(
        not twice,
        "data.shards",
        shards,
        f"each split once ({twice} listed twice: each sample would be seen twice an epoch; "
        "give the split a weight instead)",
    )
    return out


def _resolve_modalities(cfg: Config) -> None:
    ds = preset(cfg.data.dataset)
    specs = dict(ds.modalities)
    hints = typing.get_type_hints(ModalitySpec)
    for name, delta in cfg.data.modalities.items():
        key = f"data.modalities.{name}"
        if not isinstance(delta, dict):
            raise ConfigError(key, delta, "a mapping of modality fields")
        unknown = set(delta) - set(hints)
        if unknown:
            raise ConfigError(
                f"{key}.{sorted(unknown)[0]}",
                delta[sorted(unknown)[0]],
                f"a modality field among {sorted(hints)}",
            )
        specs[name] = _build(ModalitySpec, delta, key, base=specs.get(name))
    inputs = cfg.data.inputs if cfg.data.inputs is not None else ds.inputs
    _check(len(inputs) > 0, "data.inputs", inputs, "at least one modality")
    for name in inputs:
        _check(
            name in specs,
            "data.inputs",
            inputs,
            f"modalities among {sorted(specs)} (declare new ones under data.modalities)",
        )
    _check(len(set(inputs)) == len(inputs), "data.inputs", inputs, "each modality once")
    mods = {n: validate_modality(n, specs[n], f"data.modalities.{n}") for n in inputs}
    groups: dict[str, list[str]] = {}
    for n, s in mods.items():
        groups.setdefault(s.group, []).append(n)
    embeds: dict[str, ModalitySpec] = {}
    for n, s in mods.items():
        other = embeds.setdefault(s.embed, s)
        _check(
            (other.groups, other.patch_size) == (s.groups, s.patch_size),
            f"data.modalities.{n}.embed",
            s.embed,
            "a name shared only by modalities with the same band groups and patch size",
        )
    names = cfg.data.targets if cfg.data.targets is not None else list(ds.targets)[:1]
    for name in names:
        _check(name in ds.targets, "data.targets", names, f"targets among {sorted(ds.targets)}")
    d = cfg.derived
    d.modalities, d.groups, d.targets = mods, groups, {n: ds.targets[n] for n in names}
    d.grid_pos_enc = ds.grid_pos_enc
    d.tile_m, d.crop_m = cfg.data.tile_m or ds.tile_m, cfg.data.crop_m or ds.crop_m
    _check(0 < d.crop_m <= d.tile_m, "data.crop_m", d.crop_m, f"a crop side in (0, tile_m={d.tile_m}] metres")
    d.ref_date = cfg.data.ref_date or ds.ref_date
    if cfg.data.ref_date and d.ref_date not in mods:
        try:
            date.fromisoformat(d.ref_date)
        except ValueError:
            raise ConfigError(
                "data.ref_date", d.ref_date, f"one of the inputs {sorted(mods)} or a date YYYY-MM-DD"
            ) from None


def deepspeed_config(cfg: Config, world_size: int, use_gpu: bool, stage: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for a world size (no hand-written JSON anywhere).

    `stage`: the ZeRO stage; by default `train.zero_stage`, or 0 on one rank, which has nothing to
    partition (stages 1–3 would only add copies of every gradient). A resumed run passes its own.
    """
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_gpu)
    if stage is None:  # an elastic run that may grow partitions from the start
        stage = 0 if max(world_size, worker_range(cfg)[1]) == 1 else cfg.train.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=use_gpu, contiguous_gradients=True)
    out = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": accumulation(cfg, world_size),
        "train_batch_size": cfg.derived.global_batch,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": bf16 and stage > 0},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if bf16 and stage == 0:
        # bf16 weights without ZeRO would run DeepSpeed's unfused fp16-style optimizer (a Python
        # loop with host syncs): fp32 weights stepped by torch's AdamW, bf16 compute by autocast.
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return out


def worker_range(cfg: Config) -> tuple[int, int]:
    """(fewest, most) workers of a resolved config: equal unless `run.workers` is `[MIN, MAX]`."""
    w = cfg.run.workers
    return (w[0], w[1]) if isinstance(w, list) else (w, w)


def accumulation(cfg: Config, world_size: int) -> int:
    """Micro-batches per optimizer step on `world_size` workers: what keeps the global batch."""
    per_step = cfg.data.batch_size * world_size
    _check(
        cfg.derived.global_batch % per_step == 0,
        "run.workers",
        world_size,
        f"a worker count whose micro-batches (data.batch_size={cfg.data.batch_size} each) add up to "
        f"the global batch {cfg.derived.global_batch} exactly; {_allowed(cfg)}",
    )
    return cfg.derived.global_batch // per_step


def _allowed(cfg: Config) -> str:
    """Which worker counts of the range hold the global batch, and the global batches all of them hold."""
    low, high = worker_range(cfg)
    gb, b = cfg.derived.global_batch, cfg.data.batch_size
    ok = [w for w in range(low, high + 1) if gb % (b * w) == 0]
    every = b * math.lcm(*range(low, high + 1))
    return (
        f"of {low}..{high} worker(s) only {ok or 'none'} can; use a range of those, or "
        f"train.global_batch=N with N a multiple of {every}, which every count from {low} to {high} holds"
    )


def _resolve_workers(cfg: Config) -> None:
    """`run.workers` as a number or `[MIN, MAX]`, and the global batch every count of it holds."""
    r, t, b = cfg.run, cfg.train, cfg.data.batch_size
    if r.workers == "auto":
        r.workers = _auto_workers(cfg)
    if isinstance(r.workers, list):
        _check(
            len(r.workers) == 2 and 1 <= r.workers[0] <= r.workers[1],
            "run.workers",
            r.workers,
            "a number of workers, or [MIN, MAX] with 1 <= MIN <= MAX",
        )
        if r.workers[0] == r.workers[1]:
            r.workers = r.workers[0]
    _check(isinstance(r.workers, list) or r.workers >= 1, "run.workers", r.workers, "an integer >= 1")
    _check(t.global_batch >= 0, "train.global_batch", t.global_batch, "0 (derived) or a number of samples")
    low, high = worker_range(cfg)
    gb = cfg.derived.global_batch = t.global_batch or b * t.grad_accum * high
    if any(gb % (b * w) for w in range(low, high + 1)):
        key, value = ("train.global_batch", gb) if t.global_batch else ("run.workers", r.workers)
        raise ConfigError(
            key,
            value,
            f"worker counts that each hold the global batch {gb} exactly in micro-batches of "
            f"data.batch_size={b}; {_allowed(cfg)}",
        )


def uses_gpu(cfg: Config) -> bool:
    """Whether the run trains on GPUs: `run.use_gpu`, with `auto` meaning "if CUDA is available"."""
    if cfg.run.use_gpu != "auto":
        return cfg.run.use_gpu == "true"
    import torch

    return torch.cuda.is_available()


def _auto_workers(cfg: Config) -> int:
    """`run.workers=auto`: one worker per local GPU with GPUs, else one per `run.cpus_per_worker` cores."""
    from maestro import machine

    r = cfg.run
    _check(
        not r.address,
        "run.workers",
        "auto",
        "a number of workers when joining a Ray cluster (run.address); auto counts this machine's GPUs or cores",
    )
    count = machine.gpus() if uses_gpu(cfg) else machine.cpus() // r.cpus_per_worker
    _check(
        count >= 1,
        "run.workers",
        "auto",
        f"a machine with a GPU (run.use_gpu={r.use_gpu}), or run.use_gpu=false",
    )
    return count


def resolve(cfg: Config) -> Config:
    """Validate values against each other and compute the derived values."""
    m, mk, o, t, r, dc = cfg.model, cfg.mask, cfg.optim, cfg.train, cfg.run, cfg.data
    _check(0.0 <= mk.ratio < 1.0, "mask.ratio", mk.ratio, "a fraction in [0, 1)")
    _check(mk.scale >= 0.0, "mask.scale", mk.scale, "a non-negative exponent")
    for k in ("modality", "bands", "dates", "locations"):
        v = getattr(mk, k)
        _check(v is None or 0.0 <= v < 1.0, f"mask.{k}", v, "null or a probability in [0, 1)")
    _check(m.inter_depth >= 0, "model.inter_depth", m.inter_depth, "a non-negative number of joint blocks")
    _check(
        m.inter_depth == 0 or m.fusion in ("mod", "group"),
        "model.inter_depth",
        m.inter_depth,
        f"0 with fusion '{m.fusion}' (joint blocks need fusion mod or group)",
    )
    _check(
        m.inter_depth <= SIZES[m.size].depth,
        "model.inter_depth",
        m.inter_depth,
        f"at most the depth {SIZES[m.size].depth} of '{m.size}'",
    )
    _check(o.base_lr > 0, "optim.base_lr", o.base_lr, "a positive learning rate")
    _check(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        "optim.betas",
        o.betas,
        "two numbers in [0, 1)",
    )
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "a non-negative number")
    _check(0 < o.pct_start < 1, "optim.pct_start", o.pct_start, "a fraction in (0, 1)")
    _check(o.div_factor >= 1 and o.final_factor >= 1, "optim.div_factor", o.div_factor, "factors >= 1")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "0 (off) or a positive norm")
    _check(t.steps > 0, "train.steps", t.steps, "a positive number of optimizer steps")
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "an integer >= 1")
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", t.zero_stage, "0, 1, 2 or 3")
    _check(t.checkpoint_every > 0, "train.checkpoint_every", t.checkpoint_every, "a positive number of steps")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints, "at least 1")
    _check(t.log_every > 0, "train.log_every", t.log_every, "a positive number of steps")
    _check(t.image_every > 0, "train.image_every", t.image_every, "a positive number of steps")
    _check(0 < t.ema_momentum < 1, "train.ema_momentum", t.ema_momentum, "a momentum in (0, 1)")
    if not isinstance(dc.shards, str):
        shard_sources(dc.shards)
    _check(dc.batch_size >= 1, "data.batch_size", dc.batch_size, "an integer >= 1")
    _check(dc.workers >= 0, "data.workers", dc.workers, "an integer >= 0")
    _check(dc.shuffle_buffer >= 0, "data.shuffle_buffer", dc.shuffle_buffer, "an integer >= 0")
    _check(
        dc.token_budget >= 0,
        "data.token_budget",
        dc.token_budget,
        "0 (padded batches) or a positive token count",
    )
    _resolve_workers(cfg)
    st = cfg.storage
    _check(
        st.retry_budget_s >= 0, "storage.retry_budget_s", st.retry_budget_s, "seconds >= 0 (0: no retries)"
    )
    for k in ("connect_timeout_s", "read_timeout_s"):
        _check(getattr(st, k) > 0, f"storage.{k}", getattr(st, k), "a positive number of seconds")
    _check(st.block_size >= 5 * 2**20, "storage.block_size", st.block_size, "at least 5 MiB (S3's part size)")
    caches = ("none", "readahead", "bytes", "first", "blockcache", "background", "mmap", "all", "adaptive")
    _check(st.cache_type in caches, "storage.cache_type", st.cache_type, f"one of {caches}")
    _check(
        r.resource_wait_s >= 0, "run.resource_wait_s", r.resource_wait_s, "a non-negative number of seconds"
    )
    _check(r.cpus_per_worker >= 1, "run.cpus_per_worker", r.cpus_per_worker, "an integer >= 1")
    _check(r.max_failures >= 0, "run.max_failures", r.max_failures, "an integer >= 0")
    _check(
        r.max_preemptions >= -1, "run.max_preemptions", r.max_preemptions, "-1 (no limit) or an integer >= 0"
    )
    _check(r.resize_check_s > 0, "run.resize_check_s", r.resize_check_s, "a positive number of seconds")
    _check(bool(r.name) and "/" not in r.name, "run.name", r.name, "a non-empty name without '/'")
    ev = cfg.eval
    for k in ("probe_steps", "finetune_steps", "val_every", "probe_samples"):
        _check(getattr(ev, k) > 0, f"eval.{k}", getattr(ev, k), "a positive number")
    _check(ev.every >= 0, "eval.every", ev.every, "0 (off) or a positive number of steps")
    _check(ev.patience >= 0, "eval.patience", ev.patience, "0 (never stop early) or a number of validations")
    _check(
        ev.every % t.log_every == 0,
        "eval.every",
        ev.every,
        f"a multiple of train.log_every={t.log_every} (the in-loop probe runs at log steps)",
    )
    _check(
        not ev.every or r.workers == 1 or t.zero_stage < 3,
        "eval.every",
        ev.every,
        "0 with ZeRO stage 3 on several workers (rank 0 probes with the whole model)",
    )
    _resolve_modalities(cfg)
    d = cfg.derived
    d.lr = o.base_lr * (math.sqrt(d.global_batch / 3) if o.lr_scaling == "sqrt" else 1.0)
    d.deepspeed = deepspeed_config(cfg, worker_range(cfg)[1], uses_gpu(cfg))
    return cfg


def save(cfg: Config, path: str | Path) -> None:
    """Write the resolved config (derived values included) as YAML."""
    Path(path).write_text(dump(cfg))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
