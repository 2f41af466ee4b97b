"""Mixed precision without a GPU: ConvNeXt V2's Global Response Norm stays finite in fp16."""

from __future__ import annotations

import pytest
import torch
from timm.layers.grn import GlobalResponseNorm

from flowers_classifier.model import FastGlobalResponseNorm

# --------------------------------------------------------------------------- GRN in fp16

C = 16  # channels; (N, H, W, C) as in ConvNeXt V2's MLP, where the GRN sits between fc1 and fc2


class NaiveGlobalResponseNorm(FastGlobalResponseNorm):
    """Ours with the sum of squares in the input's dtype, as some ports compute it: the checks below must
    catch it, or they could not catch ours losing its fp32 squaring either."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_g = x.square().sum(dim=self.spatial_dim, keepdim=True).sqrt()
        x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)
        scale = torch.addcmul(torch.ones_like(x_n), self.weight.view(self.wb_shape), x_n)
        return torch.addcmul(self.bias.view(self.wb_shape), x, scale)


def large_activations() -> torch.Tensor:
    """A 56x56 map of activations up to 200: each square fits fp16 (<= 40000 < 65504), their spatial sum
    (~4e7) does not, its square root (~6500) does again."""
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(2, 56, 56, C, generator=gen) * 2 - 1) * 200


def trained_grn(cls: type[GlobalResponseNorm]) -> GlobalResponseNorm:
    """A GRN of `cls` with non-trivial weight and bias (timm initialises both to 0, where GRN is the identity)."""
    grn = cls(C)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        grn.weight.copy_(torch.randn(C, generator=gen))
        grn.bias.copy_(torch.randn(C, generator=gen))
    return grn


def test_the_input_overflows_a_naive_fp16_sum_of_squares():
    x = large_activations().half()
    assert x.square().isfinite().all()  # each square fits ...
    assert torch.isinf(x.square().sum(dim=(1, 2))).all()  # ... their sum over H*W does not, in every channel
    assert x.float().square().sum(dim=(1, 2)).sqrt().max() < torch.finfo(torch.float16).max  # the norm fits


def test_fast_grn_matches_timm_in_fp32_on_large_activations():
    x = large_activations()
    ours, timms = trained_grn(FastGlobalResponseNorm), trained_grn(GlobalResponseNorm)
    torch.testing.assert_close(ours(x), timms(x), rtol=1e-5, atol=1e-3)


GRNS = [pytest.param(FastGlobalResponseNorm, True, id="ours"),
        pytest.param(NaiveGlobalResponseNorm, False, id="naive-fp16-squares")]


@pytest.mark.parametrize(("cls", "safe"), GRNS)
def test_grn_in_a_half_module(cls, safe):
    x = large_activations()
    out = trained_grn(cls).half()(x.half())
    assert out.dtype == torch.float16
    assert bool(out.isfinite().all()) == safe
    if safe:  # finite and right: timm's GRN in fp32 on the same (fp16-rounded) input, to fp16's precision
        expected = trained_grn(GlobalResponseNorm)(x.half().float())
        torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=1.0)


@pytest.mark.parametrize(("cls", "safe"), GRNS)
def test_grn_under_fp16_autocast(cls, safe):
    """fp32 weights, fp16 activations from a Linear, as mixed precision runs the MLP: forward and backward."""
    torch.manual_seed(0)
    fc1 = torch.nn.Linear(C, C)
    with torch.no_grad():  # fc1 passes x through: the GRN sees the large activations, in fp16
        fc1.weight.copy_(torch.eye(C))
        fc1.bias.zero_()
    grn = trained_grn(cls)
    seen = []
    grn.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = large_activations().requires_grad_()
    # CPU autocast takes float16 in recent torch (bf16 has fp32's range: it would not overflow anyway). Unlike
    # CUDA autocast, CPU autocast leaves sum/pow in the input's dtype, so a naive GRN overflows here.
    with torch.autocast("cpu", dtype=torch.float16):
        out = grn(fc1(x))
    assert seen == [torch.float16]  # autocast was on: the GRN got fp16 activations
    out.float().mean().backward()
    finite = [out.isfinite().all(), x.grad.isfinite().all(), fc1.weight.grad.isfinite().all(),
              grn.weight.grad.isfinite().all()]
    assert all(finite) == safe
