"""A register-friendly form of Inductor's fp32 micro-GEMM, swapped in while a CPU package compiles
(`plain_fp32_micro_gemm`, used by aot.py).

Why: in the batch-1 graph of a small ConvNeXt, Inductor's generated GEMMs do most of the work. Their inner
kernel (torch 2.14's `CppMicroGemmFP32Vec`) accumulates an 8 x 32 tile through a lambda that
`c10::ForcedUnroll` calls once per register, at every step of k. g++ 12 keeps the 16 accumulators in
registers, but it also stores all 16 to the stack at every step. That is 16 vector stores per 16 FMAs, and the
kernel runs at 40% of its speed. Written as two plain loops, the same arithmetic in the same order keeps the
accumulators in registers: 16 x 160 -> 640 (convnextv2_atto at 64 px) took 18-21 µs per call against 46-51 µs,
with bit-identical results (one thread, g++ 12.2 -O3, AVX-512). We change only the plain fp32 case: B in
fp32 and no N tail.
Other cases, and a torch whose template differs, compile as torch writes them (the latter with a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

MARKER = "flowers_classifier: plain loops"  # a comment in the kernels we generate: tests look for it

# The k loop of the kernel as torch 2.14's template writes it (shared by every dtype and the N-tail variant),
# and the line after it, which makes the match unique.
TORCH_K_LOOP = """
    for (int k = 0; k < K; ++k) {
        c10::ForcedUnroll<ROWS * COLS>{}(compute, k);
    }"""
AFTER_K_LOOP = """

    // store to C"""

PLAIN_K_LOOP = """
{%- if input2_dtype == torch.float32 and not tail_n %}
    // """ + MARKER + """, so that g++ keeps the accumulators in registers (see micro_gemm.py)
    for (int k = 0; k < K; ++k) {
        #pragma GCC unroll 64
        for (int row = 0; row < ROWS; ++row) {
    {%- if alpha != 1 %}
            Vectorized a(static_cast<{{compute_t}}>(A[row * lda + k]) * {{alpha}});
    {%- else %}
            Vectorized a(static_cast<{{compute_t}}>(A[row * lda + k]));
    {%- endif %}
            #pragma GCC unroll 64
            for (int col = 0; col < COLS; ++col) {
                if (row == 0) {
                    vb[col] = Vectorized::loadu(B + k * ldb + col * VLEN);
                }
                vc[row * COLS + col] = at::vec::fmadd(a, vb[col], vc[row * COLS + col]);
            }
        }
    }
{%- else %}""" + TORCH_K_LOOP + """
{%- endif %}"""


def inductor_fp32_micro_gemm() -> type:
    """Inductor's fp32 micro-GEMM class, whose `TEMPLATE_KERNEL` (a Jinja template of C++) this module rewrites."""
    import torch._inductor.compile_fx  # noqa: F401 - loads Inductor's codegen modules in an order that works
    from torch._inductor.codegen.cpp_micro_gemm import CppMicroGemmFP32Vec
    return CppMicroGemmFP32Vec


@contextmanager
def plain_fp32_micro_gemm() -> Iterator[bool]:
    """While open, Inductor generates its fp32 micro-GEMM kernels with plain loops (see the module docstring).
    Yields whether it could: False, with a warning, where torch's template is not the one this was written for."""
    micro_gemm = inductor_fp32_micro_gemm()
    template = micro_gemm.TEMPLATE_KERNEL
    if template.count(TORCH_K_LOOP + AFTER_K_LOOP) != 1:
        warnings.warn("flowers_classifier: this torch's Inductor fp32 micro-GEMM template is not the one "
                      "micro_gemm.py rewrites (torch 2.14's); the CPU package is compiled with it as it is "
                      "(its generated matmuls may run slower).", stacklevel=3)
        yield False
        return
    micro_gemm.TEMPLATE_KERNEL = template.replace(TORCH_K_LOOP + AFTER_K_LOOP, PLAIN_K_LOOP + AFTER_K_LOOP)
    try:
        yield True
    finally:
        micro_gemm.TEMPLATE_KERNEL = template
