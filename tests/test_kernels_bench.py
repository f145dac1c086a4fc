"""kernels/bench.py: shapes from the registry, the timed callables on CPU (interpreter), the byte
model against an independent count of the loads and stores executed, the no-GPU exit, and (on a
CUDA machine) a short real run."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from kernels import bench


def test_cases_take_every_preset_shape_from_the_registry():
    cs = bench.cases(batch=2)
    loss = {(c.preset, c.shape.split()[0]): c.shape for c in cs if c.op == "group_norm_masked_loss"}
    assert len(loss) == 4 + 4 + 5  # modalities of TreeSatAI-TS, PASTIS-HD, FLAIR-HUB
    assert loss["treesatai_ts", "aerial"] == "aerial M=450 P=400 C=4 groups=[1, 3]"
    assert loss["pastis_hd", "s2"] == "s2 M=2048 P=4 C=10 groups=[4, 4, 2]"
    assert loss["flair_hub", "dem"] == "dem M=512 P=1024 C=2 groups=[2]"
    gathers = [c.shape for c in cs if c.op == "gather_rows" and c.preset == "treesatai_ts"]
    assert gathers[0] == "aerial N=450 K=112 E=768"  # 225 tokens, 169 masked, per sample
    assert all(c.bytes["both"] == c.bytes["fwd"] + c.bytes["bwd"] and c.bytes["fwd"] > 0 for c in cs)


class ByteMeter(TorchDispatchMode):
    """Counts the bytes an op moves, independently of `kernels/traffic.py`: inside each Triton
    launch (run by the interpreter) the distinct addresses its loads and stores touch, times their
    element size; outside, every aten call's tensor inputs read and outputs written in full (views
    and allocations move nothing; an in-place call writes its target and reads the rest)."""

    def __init__(self, monkeypatch):
        super().__init__()
        from triton.runtime import interpreter

        self.read = self.written = 0
        self._launch: dict[str, list] | None = None
        meter, builder = self, interpreter.InterpreterBuilder
        load, store, call = (
            builder.create_masked_load,
            builder.create_masked_store,
            interpreter.GridExecutor.__call__,
        )

        def record(kind, ptrs, mask):
            size = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
            hit = np.broadcast_to(mask.data, ptrs.data.shape)
            meter._launch[kind].append((ptrs.data[hit], size))

        def masked_load(self, ptrs, mask, *args):
            record("read", ptrs, mask)
            return load(self, ptrs, mask, *args)

        def masked_store(self, ptrs, value, mask, *args):
            record("written", ptrs, mask)
            return store(self, ptrs, value, mask, *args)

        def launch(self, *args, **kwargs):
            meter._launch = {"read": [], "written": []}
            with _disable_current_modes():  # the interpreter's own host copies are not the kernel's
                call(self, *args, **kwargs)
            for kind, hits in meter._launch.items():
                for size in {s for _, s in hits}:
                    addresses = np.unique(np.concatenate([a for a, s in hits if s == size]))
                    setattr(meter, kind, getattr(meter, kind) + addresses.size * size)

        monkeypatch.setattr(builder, "create_masked_load", masked_load)
        monkeypatch.setattr(builder, "create_masked_store", masked_store)
        monkeypatch.setattr(interpreter.GridExecutor, "__call__", launch)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            return out  # a view
        if func.__name__.startswith(("empty", "new_empty")):
            return out  # an allocation
        nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))  # noqa: E731
        outs = tree_leaves(out)
        targets = {id(t) for t in outs}
        self.read += nbytes(t for t in tree_leaves((args, kwargs)) if id(t) not in targets)
        self.written += nbytes(outs)
        return out

    def measure(self, call) -> int:
        self.read = self.written = 0
        with self:
            call()
        return self.read + self.written


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts the interpreter's loads")
@pytest.mark.parametrize(
    "preset, op, key",
    [
        ("treesatai_ts", "group_norm_masked_loss", "s1"),  # 2×2 patches, several per program
        ("odd", "group_norm_masked_loss", "odd"),  # 5×5 patches, 1 invalid pixel each, 3 programs
        ("treesatai_ts", "gather_rows", "s1"),
        ("flair_hub", "gather_rows", "s1"),
        ("treesatai_ts", "unmask_rows", "s1"),
        ("flair_hub", "unmask_rows", "s1"),
    ],
)
def test_byte_model_matches_the_loads_and_stores_executed(preset, op, key, monkeypatch):
    """Every pass's byte count equals what the Triton kernels and the torch calls around them
    really read and write, at the presets' shapes (batch 1) and launch block sizes."""
    torch.manual_seed(0)
    if preset == "odd":
        spec = SimpleNamespace(num_dates=2, tokens_per_date=19, patch_size=5, channels=3, norm_groups=[1, 2])
        case = bench._loss_case(preset, key, spec, batch=1)
    else:
        case = next(c for c in bench.cases(1, (preset,)) if c.op == op and c.shape.startswith(key))
    meter = ByteMeter(monkeypatch)
    inputs = case.make("cpu")
    calls = bench.passes(case.run["triton"], case.grads, inputs)
    got = {name: meter.measure(calls[name]) for name in ("fwd", "bwd", "both")}
    assert got == case.bytes, case.shape


@pytest.mark.parametrize("op", ["group_norm_masked_loss", "gather_rows", "unmask_rows"])
def test_timed_callables_agree_between_triton_and_eager(op):
    case = next(c for c in bench.cases(batch=1, presets=("treesatai_ts",)) if c.op == op and "s1" in c.shape)
    torch.manual_seed(0)
    inputs = case.make("cuda" if torch.cuda.is_available() else "cpu")
    got = {impl: bench.passes(case.run[impl], case.grads, inputs) for impl in ("triton", "eager")}
    for name in ("fwd", "bwd", "both"):
        a, b = got["triton"][name](), got["eager"][name]()
        for x, y in zip(*(t if isinstance(t, tuple) else (t,) for t in (a, b))):
            torch.testing.assert_close(x.float(), y.float(), rtol=1e-4, atol=1e-4)


def test_without_gpu_says_so_and_exits_zero(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = bench.RESULTS.read_text()
    assert bench.main(["--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "no CUDA GPU" in out[0]
    assert json.loads(out[-1]) == {"gpu": False, "results": []}
    assert bench.RESULTS.read_text() == before
    assert before.splitlines()[0].split(",") == bench.FIELDS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_on_gpu_compiled(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results.csv")
    assert bench.main(["--batch", "2", "--runs", "5", "--impls", "triton,eager", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["gpu"] and report["copy_gb_s"] > 0
    assert all(r["ms"] > 0 for r in report["results"])
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 1 + len(report["results"])
