"""kernels/bench.py: shapes from the registry, the timed callables on CPU (interpreter), the no-GPU
exit, and (on a CUDA machine) a short real run."""

from __future__ import annotations

import json

import pytest
import torch

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
    assert all(c.bytes["both"] > c.bytes["fwd"] > 0 for c in cs)


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
