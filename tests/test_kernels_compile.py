"""The Triton kernels compile for a real GPU target (sm_90, to PTX and cubin) with the block sizes the
presets use, without a GPU: the interpreter alone would not catch what only the compiler rejects.

The test runs this file as a script in a fresh process without TRITON_INTERPRET, so that the kernels
are decorated as compilable functions there.
"""

from __future__ import annotations

import os
import subprocess
import sys

TARGET = ("cuda", 90, 32)  # H100/H200; architecture, warp size


def _compile(fn, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    src = ASTSource(
        fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}
    )
    return triton.compile(src, target=GPUTarget(*TARGET)).asm


def compile_all() -> list[str]:
    """Compiles every kernel for the shapes of S2 (P 4, C 10) and aerial (P 400, C 4) patches."""
    from kernels import group_norm_target as gnt
    from kernels import masking

    done = []
    for dtype in ("bf16", "fp32"):
        scalars = {"M": "i32", "P": "i32", "C": "i32", "starts": "i32", "eps": "fp32"}
        ptrs = {n: f"*{dtype}" for n in ("target_ptr", "pred_ptr", "dpred_ptr")}
        ptrs |= {"valid_ptr": "*u8", "tmask_ptr": "*u8", "out_ptr": "*fp32", "sum_ptr": "*fp32"}
        ptrs |= {"count_ptr": "*i32", "grad_ptr": "*fp32"}
        for p, c in ((4, 10), (400, 4)):
            blocks = {k: v for k, v in gnt._blocks(4096, p, c).items() if k != "num_warps"}
            common = {"HAS_VALID": True, **blocks}
            asm = _compile(gnt._group_norm_target_kernel, ptrs | scalars, common)
            assert "cubin" in asm
            for kernel in (gnt._masked_loss_fwd_kernel, gnt._masked_loss_bwd_kernel):
                for norm in (True, False):
                    _compile(kernel, ptrs | scalars, {**common, "NORM": norm, "L2": not norm})
            done.append(f"group_norm_target {dtype} P={p} C={c}")
        rows = {"index_ptr": "*i64", "dest_ptr": "*i64", "source_ptr": "*i64", "token_ptr": "*i64"}
        rows |= {n: f"*{dtype}" for n in ("x_ptr", "src_ptr", "out_ptr", "enc_ptr", "table_ptr", "grad_ptr")}
        rows |= {"genc_ptr": f"*{dtype}", "gtable_ptr": "*fp32", "K": "i32", "R": "i32", "N": "i32"}
        rows |= {"E": "i32", "T": "i32"}
        _, blocks = masking._grid(32 * 1024, 768)
        for kernel in (
            masking._gather_rows_kernel,
            masking._scatter_rows_kernel,
            masking._unmask_rows_kernel,
            masking._unmask_rows_bwd_kernel,
        ):
            _compile(kernel, rows, blocks)
        done.append(f"masking {dtype} E=768")
    return done


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["compiled", "6"], proc.stdout


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch\nfrom kernels.masking import gather_rows\n"
        "gather_rows(torch.randn(4, 3), torch.tensor([0, 1]))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ValueError: model.kernels=triton needs CUDA tensors, got a cpu tensor" in proc.stderr


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    print("compiled", len(compile_all()))
