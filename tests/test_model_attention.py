"""Attention backends agree with each other, on padded batches and on packed variable-length rows;
the flash backend is detected by the function it calls."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from maestro.errors import ConfigError
from maestro.model import attention as attention_module
from maestro.model.attention import (
    Packing,
    attention,
    check_backend,
    flash_varlen,
    sdpa_backends,
    sdpa_kernel,
)

CPU_BACKENDS = ["sdpa", "math"]


def rows(n: int, heads: int = 3, dim: int = 16, seed: int = 0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, heads, dim, generator=g).to(device, dtype) for _ in range(3)]


def per_sequence(q, k, v, lengths):
    """Plain softmax attention of each sequence alone (the definition)."""
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].transpose(0, 1).double() for t in (q, k, v))
        w = (qs @ ks.transpose(-1, -2) * qs.shape[-1] ** -0.5).softmax(-1)
        out.append((w @ vs).transpose(0, 1))
        start += n
    return torch.cat(out).float()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padded_batch(backend):
    q, k, v = rows(4 * 7)
    got = attention(q, k, v, Packing.dense(4, 7, q.device), backend)
    torch.testing.assert_close(got, per_sequence(q, k, v, [7] * 4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_variable_lengths(backend):
    lengths = [5, 1, 9, 3]
    q, k, v = rows(sum(lengths), seed=1)
    packing = Packing.from_lengths(torch.tensor(lengths))
    assert packing.uniform is None and packing.max_seqlen == 9
    assert packing.cu_seqlens.tolist() == [0, 5, 6, 15, 18]
    got = attention(q, k, v, packing, backend)
    torch.testing.assert_close(got, per_sequence(q, k, v, lengths), atol=1e-5, rtol=1e-5)


def test_packed_equal_lengths_take_the_padded_path():
    packing = Packing.from_lengths(torch.tensor([4, 4, 4]))
    assert packing.uniform == 4
    q, k, v = rows(12, seed=2)
    torch.testing.assert_close(
        attention(q, k, v, packing, "sdpa"), attention(q, k, v, Packing.dense(3, 4, q.device), "math")
    )


def test_flash_needs_cuda_and_half_precision(monkeypatch):
    with pytest.raises(ConfigError, match="one of"):
        check_backend("xformers")
    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = lambda *args: pytest.fail("flash must not run on the CPU")
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    check_backend("flash")  # installed: the build-time check passes
    q, k, v = rows(8)
    with pytest.raises(ConfigError, match="CUDA with fp16 or bf16"):
        attention(q, k, v, Packing.dense(2, 4, q.device), "flash")


def test_an_empty_flash_attn_namespace_is_not_flash_attn(monkeypatch, small_config):
    """flash-attn-4 installs `flash_attn` as an empty namespace: importable, without the function."""
    from maestro.model import build_model

    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    assert flash_varlen() is None
    with pytest.raises(ConfigError, match="flash_attn_varlen_func"):
        build_model(small_config("model.attention=flash"))


def test_forced_sdpa_kernels():
    assert {"flash", "cudnn", "efficient", "math"} <= set(sdpa_backends())
    q, k, v = rows(4 * 7)
    want = attention(q, k, v, Packing.dense(4, 7, q.device), "math")
    with sdpa_kernel("math"):
        torch.testing.assert_close(attention(q, k, v, Packing.dense(4, 7, q.device), "sdpa"), want)
    with pytest.raises(ValueError, match="one of"), sdpa_kernel("xformers"):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lengths", [[16] * 4, [5, 1, 33, 17]])
def test_cuda_backends_agree(lengths):
    backends = ["sdpa", "math"] + (["flash"] if flash_varlen() else [])  # flash where installed
    q, k, v = rows(sum(lengths), device="cuda", dtype=torch.bfloat16, dim=64)
    packing = Packing.from_lengths(torch.tensor(lengths, device="cuda"))
    want = per_sequence(q.float().cpu(), k.float().cpu(), v.float().cpu(), lengths)
    for b in backends:
        got = attention(q, k, v, packing, b).float().cpu()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, msg=b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_backends_agree_on_cuda_in_bf16(small_config, make_batch):
    from maestro.model import build_model

    batch = {k: v.cuda() for k, v in make_batch(small_config()).items()}
    backends = ["sdpa", "math"] + (["flash"] if flash_varlen() else [])
    losses = []
    for b in backends:
        torch.manual_seed(0)
        model = build_model(small_config(f"model.attention={b}")).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(model(batch, generator=torch.Generator("cuda").manual_seed(0)).loss.float())
    for b, loss in zip(backends, losses):
        torch.testing.assert_close(loss, losses[0], atol=2e-2, rtol=2e-2, msg=b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sdpa_on_packed_rows_runs_torch_varlen_and_matches_math_with_gradients(monkeypatch):
    varlen = attention_module.torch_varlen()
    if varlen is None:
        pytest.skip("needs torch.nn.attention.varlen (torch >= 2.10)")
    lengths = [5, 1, 33, 17, 64]
    packing = Packing.from_lengths(torch.tensor(lengths, device="cuda"))
    assert packing.uniform is None
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return varlen(*args, **kwargs)

    monkeypatch.setattr(attention_module, "torch_varlen", lambda: counted)
    results = {}
    for backend in ("sdpa", "math"):
        q, k, v = (
            t.requires_grad_() for t in rows(sum(lengths), device="cuda", dtype=torch.bfloat16, dim=64)
        )
        out = attention(q, k, v, packing, backend)
        (out.float() * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        results[backend] = [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]
    assert len(calls) == 1  # sdpa took the variable-length kernel, math the padded reference
    for got, want in zip(results["sdpa"], results["math"]):
        torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)


def test_importing_the_model_does_not_load_torch_dynamo():
    """Commands that build no optimizer (shards, info, embed, export) import
    the model: `torch.nn.attention.varlen`, which only CUDA half-precision packed rows need, would
    load torch._dynamo there (about a second of each start)."""
    import subprocess
    import sys

    code = "import sys, maestro.train.loop; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
