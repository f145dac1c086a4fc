"""Fused patch-group target normalization and masked loss against their pure-torch references.

Three-way comparisons (kernel, reference in the input dtype, reference in float32 on the same values)
on odd shapes: prime patch counts, groups of 1 to 4 bands, patch sizes 2 to 20, invalid pixels holding
NaN. On CPU the kernels run under the Triton interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from kernels.group_norm_target import (
    group_norm_masked_loss,
    group_norm_masked_loss_ref,
    group_norm_target,
    group_norm_target_ref,
)

# On a CUDA machine the kernels are compiled and the tests run on the GPU; on CPU, the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _on_device():
    with torch.device(DEVICE):
        yield


# (patches M, patch side, norm groups): prime M, every group size 1..4, patch sides 2..20
CASES = [
    (7, 2, [1, 1]),
    (13, 3, [4]),
    (31, 2, [4, 4, 2]),
    (5, 5, [1, 2, 3, 4]),
    (11, 7, [3]),
    (3, 16, [2]),
    (2, 20, [1, 3]),
]
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(m: int, side: int, groups: list[int], dtype: torch.dtype, seed: int = 0):
    """target, pred (M, P, C) in dtype; valid (M, P) with NaN targets where invalid; token_mask (M,)."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    p, c = side * side, sum(groups)
    target = torch.randn(m, p, c, generator=g) * 3 + torch.randn(m, 1, c, generator=g) * 5
    valid = torch.rand(m, p, generator=g) > 0.25
    valid[0] = False  # a patch with no valid pixel
    valid[-1] = False
    valid[-1, 0] = True  # a patch with one valid pixel (groups of 1 band: one value, variance 0)
    target[~valid] = float("nan")
    token_mask = torch.rand(m, generator=g) < 0.7
    token_mask[-1] = True
    pred = torch.randn(m, p, c, generator=g)
    return target.to(dtype), pred.to(dtype), valid, token_mask


def assert_within_rounding(kernel, ref_same, ref_fp32):
    """Per element, the kernel stays within twice the same-dtype reference's worst rounding error, plus
    one unit in the last place of the output dtype, plus a float32 summation-order floor."""
    ref_fp32 = ref_fp32.float()
    err_kernel = (kernel.float() - ref_fp32).abs()
    err_ref = (ref_same.float() - ref_fp32).abs().max()
    scale = ref_fp32.abs()
    bound = 2 * err_ref + torch.finfo(kernel.dtype).eps * scale + 1e-5 * scale.max()
    assert (err_kernel <= bound).all(), (err_kernel.max().item(), err_ref.item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "side", "groups"), CASES)
def test_group_norm_target_matches_reference(m, side, groups, dtype):
    target, _, valid, _ = _inputs(m, side, groups, dtype)
    out = group_norm_target(target, groups, valid)
    assert out.dtype == torch.float32 and out.shape == target.shape
    assert torch.isfinite(out).all()
    assert (out[~valid] == 0).all()
    ref = group_norm_target_ref(target, groups, valid)
    assert_within_rounding(out, ref, group_norm_target_ref(target.float(), groups, valid))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5)


def test_group_norm_target_hand_computed():
    """One patch of 2×2 pixels, groups {c0} and {c1, c2}: mean and unbiased variance by hand."""
    t = torch.tensor([[[1.0, 0.0, 2.0], [3.0, 2.0, 4.0], [5.0, 4.0, 6.0], [7.0, 6.0, 8.0]]])
    out = group_norm_target(t, [1, 2])
    c0 = (torch.tensor([1.0, 3, 5, 7]) - 4) / torch.sqrt(torch.tensor(20.0 / 3) + 1e-6)
    g = t[0, :, 1:]
    c12 = (g - g.mean()) / torch.sqrt(g.var(unbiased=True) + 1e-6)
    torch.testing.assert_close(out[0, :, 0], c0)
    torch.testing.assert_close(out[0, :, 1:], c12)


def test_group_norm_target_without_valid_and_backward():
    target = torch.randn(7, 9, 5, dtype=torch.float64).float().requires_grad_()
    out = group_norm_target(target, [2, 3])
    torch.testing.assert_close(out, group_norm_target_ref(target, [2, 3]), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    (g_kernel,) = torch.autograd.grad(out, target, grad)
    (g_ref,) = torch.autograd.grad(group_norm_target_ref(target, [2, 3]), target, grad)
    torch.testing.assert_close(g_kernel, g_ref)


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("normalized", [True, False], ids=["patch_group", "raw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "side", "groups"), CASES)
def test_masked_loss_matches_reference(m, side, groups, dtype, normalized, kind):
    target, pred, valid, token_mask = _inputs(m, side, groups, dtype, seed=m)
    norm = groups if normalized else None

    def run(fn, p, t):
        p = p.detach().requires_grad_()
        total, count = fn(p, t, norm, valid, token_mask, kind)
        (grad,) = torch.autograd.grad(total * 0.5, p)  # a non-unit upstream gradient
        return total, count, grad

    total, count, grad = run(group_norm_masked_loss, pred, target)
    ref_total, ref_count, ref_grad = run(group_norm_masked_loss_ref, pred, target)
    f32_total, _, f32_grad = run(group_norm_masked_loss_ref, pred.float(), target.float())

    assert count.dtype == torch.float32 and count == ref_count
    assert count == (valid & token_mask[:, None]).sum() * sum(groups)
    assert torch.isfinite(total) and torch.isfinite(grad).all()
    assert grad.dtype == dtype
    assert (grad[~token_mask] == 0).all() and (grad[~valid] == 0).all()
    assert_within_rounding(total, ref_total, f32_total)
    assert_within_rounding(grad, ref_grad, f32_grad)


def test_masked_loss_no_masked_token_and_no_valid():
    target, pred, _, token_mask = _inputs(5, 3, [2, 1], torch.float32)
    pred.requires_grad_()
    total, count = group_norm_masked_loss(pred, target, [2, 1], None, torch.zeros_like(token_mask))
    (grad,) = torch.autograd.grad(total, pred)
    assert total == 0 and count == 0 and (grad == 0).all()
    total, count = group_norm_masked_loss(pred, target.nan_to_num(), [2, 1], None, token_mask)
    ref_total, ref_count = group_norm_masked_loss_ref(pred, target.nan_to_num(), [2, 1], None, token_mask)
    assert count == ref_count == token_mask.sum() * 9 * 3
    torch.testing.assert_close(total, ref_total)


def test_masked_loss_errors_say_what_is_wrong():
    target, pred, valid, token_mask = _inputs(5, 2, [2, 2], torch.float32)
    with pytest.raises(ValueError, match=r"\[2, 1\] must be positive and sum to the 4 channels"):
        group_norm_masked_loss(pred, target, [2, 1], valid, token_mask)
    with pytest.raises(ValueError, match=r"valid must be bool \(M, P\) = \(5, 4\), got torch.float32"):
        group_norm_masked_loss(pred, target, [2, 2], valid.float(), token_mask)
    with pytest.raises(ValueError, match="'l3'"):
        group_norm_masked_loss(pred, target, [2, 2], valid, token_mask, kind="l3")
    with pytest.raises(ValueError, match=r"target.detach\(\)"):
        group_norm_masked_loss(pred, target.requires_grad_(), [2, 2], valid, token_mask)
