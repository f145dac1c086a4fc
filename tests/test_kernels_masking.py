"""Fused gather of visible tokens and un-masking scatter against their pure-torch references, on
padded (B, L, E) batches flattened with offsets b·L and on packed (ΣL, E) batches."""

from __future__ import annotations

import pytest
import torch

from kernels.masking import gather_rows, gather_rows_ref, unmask_rows, unmask_rows_ref

# On a CUDA machine the kernels are compiled and the tests run on the GPU; on CPU, the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


DTYPES = [torch.float32, torch.bfloat16]
TOKENS = 3  # mask tokens (modality × band group)


def _layout(lengths: list[int], seed: int):
    """Flat masking indices for sequences of `lengths` laid end to end (padded: equal lengths).

    Returns index (K,) of visible rows in ascending order per sequence, source (N,) (row of the
    encoded tokens or -1), token_id (N,)."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    index, offset = [], 0
    for n in lengths:
        keep = max(1, n - round(0.75 * n))
        index.append(torch.randperm(n, generator=g)[:keep].sort().values + offset)
        offset += n
    index = torch.cat(index)
    source = torch.full((offset,), -1, dtype=torch.int64)
    source[index] = torch.arange(index.shape[0])
    token_id = torch.randint(0, TOKENS, (offset,), generator=g)
    return index, source, token_id


LAYOUTS = {"padded": [37, 37, 37], "packed": [5, 41, 2, 23]}  # prime lengths; packed: ragged


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", [29, 64])
def test_gather_rows(layout, dtype, width):
    lengths = LAYOUTS[layout]
    index, _, _ = _layout(lengths, seed=width)
    x = torch.randn(sum(lengths), width).to(dtype).requires_grad_()
    if layout == "padded":  # (B, L, E) flattened with offsets b·L
        padded = x.detach().view(len(lengths), lengths[0], width)
        b, pos = index // lengths[0], index % lengths[0]
        assert torch.equal(gather_rows(x, index), padded[b, pos])
    out = gather_rows(x, index)
    assert out.dtype == dtype and torch.equal(out, gather_rows_ref(x, index))
    grad = torch.randn_like(out)
    (g_kernel,) = torch.autograd.grad(out, x, grad)
    (g_ref,) = torch.autograd.grad(gather_rows_ref(x, index), x, grad)
    assert torch.equal(g_kernel, g_ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("width", [29, 64])
def test_unmask_rows(layout, dtype, width):
    index, source, token_id = _layout(LAYOUTS[layout], seed=width + 1)
    enc = torch.randn(index.shape[0], width).to(dtype).requires_grad_()
    table = torch.randn(TOKENS, width).to(dtype).requires_grad_()

    out = unmask_rows(enc, source, table, token_id)
    ref = unmask_rows_ref(enc, source, table, token_id)
    assert out.dtype == dtype and torch.equal(out, ref)
    assert torch.equal(gather_rows(out, index), enc.detach())  # gather undoes the un-masking

    grad = torch.randn_like(out) * 3
    ge, gt = torch.autograd.grad(out, (enc, table), grad)
    ge_ref, gt_ref = torch.autograd.grad(ref, (enc, table), grad)
    table_32 = table.detach().float().requires_grad_()
    (gt_32,) = torch.autograd.grad(
        unmask_rows_ref(enc.detach().float(), source, table_32, token_id), table_32, grad.float()
    )
    assert torch.equal(ge, ge_ref)
    # The table gradient sums many rows: float32 accumulation keeps it within the output rounding.
    err_kernel = (gt.float() - gt_32.float()).abs().max()
    err_ref = (gt_ref.float() - gt_32.float()).abs().max()
    assert gt.dtype == dtype and err_kernel <= 2 * err_ref + 1e-5 * gt_32.abs().max()


def test_unmask_rows_table_in_float32_with_bf16_tokens():
    """Mask tokens kept in float32 while activations are bf16: output bf16, table gradient float32."""
    index, source, token_id = _layout([13, 13], seed=3)
    enc = torch.randn(index.shape[0], 16).bfloat16()
    table = torch.randn(TOKENS, 16, requires_grad=True)
    out = unmask_rows(enc, source, table, token_id)
    assert out.dtype == torch.bfloat16 and torch.equal(out, unmask_rows_ref(enc, source, table, token_id))
    grad = torch.randn_like(out)
    (gt,) = torch.autograd.grad(out, table, grad)
    (gt_ref,) = torch.autograd.grad(unmask_rows_ref(enc, source, table, token_id), table, grad)
    assert gt.dtype == torch.float32
    torch.testing.assert_close(gt, gt_ref)


def test_masking_errors_say_what_is_wrong():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"flatten a padded \(B, L, E\) batch"):
        gather_rows(x.view(2, 2, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="index must be an int32/int64 vector"):
        gather_rows(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="must share E"):
        unmask_rows(x, torch.tensor([0, -1]), torch.randn(1, 7), torch.tensor([0, 0]))
