"""flowers_classifier/micro_gemm.py: the rewrite of Inductor's fp32 micro-GEMM applies to this torch, is in
the kernels Inductor generates while it is open (and only then), and computes the same GEMMs."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import require

from flowers_classifier.micro_gemm import MARKER, inductor_fp32_micro_gemm, plain_fp32_micro_gemm


def _template() -> str:
    return inductor_fp32_micro_gemm().TEMPLATE_KERNEL


def test_the_rewrite_applies_to_this_torch_and_is_undone_after():
    before = _template()
    assert MARKER not in before
    with plain_fp32_micro_gemm() as applied:
        assert applied, "torch's micro-GEMM template changed: update micro_gemm.TORCH_K_LOOP"
        assert MARKER in _template()
    assert _template() == before


@pytest.mark.slow
@pytest.mark.parametrize("rows", [16, 5])  # whole 8-row register tiles, and a remainder
def test_inductors_generated_gemm_uses_the_plain_loops_and_computes_the_linear(rows):
    require(shutil.which("g++") is not None or shutil.which("c++") is not None,
            "Inductor's C++ GEMM needs a C++ compiler (apt-get install g++)")
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 160).eval()
    x = torch.randn(rows, 96)
    torch._dynamo.reset()
    options = dict(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP", force_disable_caches=True)
    with plain_fp32_micro_gemm(), torch._inductor.config.patch(**options), torch.no_grad():
        out, code = run_and_get_code(torch.compile(linear), x)
    torch._dynamo.reset()
    assert any(MARKER in c for c in code), "Inductor did not generate its C++ GEMM with our loops"
    torch.testing.assert_close(out, linear(x), rtol=1e-5, atol=1e-5)
