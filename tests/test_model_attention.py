"""Attention backends agree with each other, on padded batches and on packed variable-length rows."""

from __future__ import annotations

import pytest
import torch

from maestro.errors import ConfigError
from maestro.model.attention import Packing, attention, check_backend

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


def test_flash_needs_cuda_and_half_precision():
    with pytest.raises(ConfigError, match="model.attention"):
        check_backend("flash", torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigError, match="one of"):
        check_backend("xformers", torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lengths", [[16] * 4, [5, 1, 33, 17]])
def test_cuda_backends_agree(lengths):
    backends = ["sdpa", "math"]
    try:
        check_backend("flash", torch.device("cuda"), torch.bfloat16)
        backends.append("flash")
    except ConfigError:  # flash-attn not installed on this machine: the other two still agree
        pass
    q, k, v = rows(sum(lengths), device="cuda", dtype=torch.bfloat16, dim=64)
    packing = Packing.from_lengths(torch.tensor(lengths, device="cuda"))
    want = per_sequence(q.float().cpu(), k.float().cpu(), v.float().cpu(), lengths)
    for b in backends:
        got = attention(q, k, v, packing, b).float().cpu()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, msg=b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_backends_agree_on_cuda_in_bf16():
    from test_model_batches import make_batch

    from maestro import config
    from maestro.model import build_model

    overrides = ["data.modalities.aerial.image_size=60"]
    batch = {k: v.cuda() for k, v in make_batch(config.from_dict({}, overrides)).items()}
    backends = ["sdpa", "math"]
    try:
        check_backend("flash", torch.device("cuda"), torch.bfloat16)
        backends.append("flash")
    except ConfigError:
        pass
    losses = []
    for b in backends:
        torch.manual_seed(0)
        model = build_model(config.from_dict({}, [*overrides, f"model.attention={b}"])).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses.append(model(batch, generator=torch.Generator("cuda").manual_seed(0)).loss.float())
    for b, loss in zip(backends, losses):
        torch.testing.assert_close(loss, losses[0], atol=2e-2, rtol=2e-2, msg=b)
