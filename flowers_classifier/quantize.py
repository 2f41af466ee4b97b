"""int8 on the CPU: `quantize_int8(net)` turns an fp32 network's Linear layers into dynamically quantised
int8 ones (torch's `quantize_dynamic`: int8 weights, per output channel; activations quantised per call),
after two equal rewrites that give it more Linear layers to quantise: each self-attention
`nn.MultiheadAttention` becomes `SelfAttention` (plain nn.Linear qkv and out projections), and each 1x1
convolution becomes `Conv1x1AsLinear` (the small ConvNeXt V2s, atto to nano, build their MLPs as 1x1
convolutions; tiny and up as nn.Linear on NHWC tensors).

Why the swap: nn.MultiheadAttention keeps its q/k/v projection as a raw `in_proj_weight` Parameter and its
output projection as a NonDynamicallyQuantizableLinear, and quantize_dynamic touches neither: a ViT would
keep about a third of its matmul FLOPs in fp32.

The weights in a `.pth` stay fp32/fp16 (plain tensors, `torch.load(weights_only=True)`); the payload only
asks for int8 (payload.QUANTIZE_KEY) and `load_model` quantises at load time. Pure torch.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .model import replace_modules

# The quantised engine packing the weights. On the AMD EPYC (AVX-512 VNNI) of bench/RESULTS.md, a ViT-L-sized
# MLP pair (1024 -> 4096 -> 1024 over 257 tokens, int8 per channel) timed in turn, batch 1 / batch 8, p50 ms:
# "x86" 116 / 900, "fbgemm" 148 / 812, "onednn" 152 / 777 on the shared, noisy 2-core machine: no engine won
# both, and the differences were within that machine's noise. So torch's default, "x86" (it picks fbgemm or
# oneDNN per layer), stays; `python -m bench.int8 --engines fbgemm,onednn` times the whole model with others.
# The packed weights remember their engine: it only matters while quantising.
ENGINE = "x86"


class SelfAttention(nn.Module):
    """nn.MultiheadAttention for self-attention (query = key = value), as a qkv nn.Linear, PyTorch's
    scaled_dot_product_attention and an out nn.Linear: the same weights (copied), the same outputs up to
    fp32 rounding, and Linear layers that quantize_dynamic can quantise. Called like the module it
    replaces and returning (output, None) as it does with need_weights=False."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not can_swap(mha):
            raise ValueError("SelfAttention replaces a self-attention nn.MultiheadAttention only (one in_proj "
                             "weight, no bias_k/bias_v, no add_zero_attn); leave this one as it is.")
        dim = mha.embed_dim
        self.num_heads, self.batch_first = mha.num_heads, mha.batch_first
        has_bias = mha.in_proj_bias is not None
        self.qkv = nn.Linear(dim, 3 * dim, bias=has_bias)
        self.out_proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if has_bias:
                self.qkv.bias.copy_(mha.in_proj_bias)
            if self.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.to(mha.in_proj_weight.device, mha.in_proj_weight.dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                need_weights: bool = False, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, **_) -> tuple[torch.Tensor, None]:
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("SelfAttention: key and value must be the query (self-attention only)")
        if need_weights or key_padding_mask is not None:
            raise ValueError("SelfAttention: need_weights and key_padding_mask are not supported")
        x = query if self.batch_first else query.transpose(0, 1)  # (N, L, D)
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)  # an additive float mask, as nn.MultiheadAttention takes it
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(n, length, dim)
        out = self.out_proj(out)
        return (out if self.batch_first else out.transpose(0, 1)), None


def can_swap(mha: nn.Module) -> bool:
    """A self-attention nn.MultiheadAttention that SelfAttention reproduces exactly (open_clip's ViT blocks)."""
    return (isinstance(mha, nn.MultiheadAttention) and mha._qkv_same_embed_dim and mha.bias_k is None
            and not mha.add_zero_attn)


class Conv1x1AsLinear(nn.Module):
    """A 1x1 convolution (stride 1, no padding, one group) as the nn.Linear over channels that it is,
    computed on the NHWC view of its input (no copy for a channels_last tensor, as load_model feeds a
    ConvNeXt on the CPU): the same weights, outputs equal up to fp32 rounding, quantisable."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_pointwise(conv):
            raise ValueError(f"Conv1x1AsLinear replaces a 1x1 convolution with stride 1, no padding and one "
                             f"group, not {conv}")
        self.linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():
            self.linear.weight.copy_(conv.weight[:, :, 0, 0])
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)
        self.to(conv.weight.device, conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def is_pointwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.groups == 1 and conv.dilation == (1, 1) and conv.padding in ((0, 0), "valid"))


class PatchConvAsLinear(nn.Module):
    """A patchify convolution (kernel = stride, no padding, one group: a ViT's patch embedding, a ConvNeXt's
    stem and downsampling layers) as the nn.Linear over each flattened kh x kw x C patch that it is: the
    same weights (reordered), outputs equal up to fp32 rounding. Why: AOTInductor can prepack a Linear's
    weights for a dynamic batch axis, but packs a convolution's at every call (aot.py)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not is_patchify(conv):
            raise ValueError(f"PatchConvAsLinear replaces a convolution whose kernel equals its stride, with no "
                             f"padding and one group, not {conv}")
        out_channels, in_channels, kh, kw = conv.weight.shape
        self.kernel_size = (kh, kw)
        self.linear = nn.Linear(kh * kw * in_channels, out_channels, bias=conv.bias is not None)
        with torch.no_grad():  # (O, C, kh, kw) -> (O, kh * kw * C): the order of an NHWC patch, flattened
            self.linear.weight.copy_(conv.weight.permute(0, 2, 3, 1).reshape(out_channels, -1))
            if conv.bias is not None:
                self.linear.bias.copy_(conv.bias)
        self.to(conv.weight.device, conv.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        kh, kw = self.kernel_size
        rows, cols = h // kh, w // kw
        # Rows and columns past the last whole patch are dropped, as the convolution drops them.
        patches = x[:, :, :rows * kh, :cols * kw].permute(0, 2, 3, 1).reshape(n, rows, kh, cols, kw, c)
        patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(n, rows, cols, kh * kw * c)
        return self.linear(patches).permute(0, 3, 1, 2)


def is_patchify(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == conv.stride and conv.groups == 1
            and conv.dilation == (1, 1) and conv.padding in ((0, 0), "valid") and conv.padding_mode == "zeros")


def as_linears(net: nn.Module, attention: bool = True, patches: bool = False) -> int:
    """Replace, in place, every self-attention nn.MultiheadAttention of `net` by SelfAttention (unless
    `attention` is False), every 1x1 convolution by Conv1x1AsLinear and, with `patches`, every other
    patchify convolution by PatchConvAsLinear; returns how many were replaced."""

    def swap(child: nn.Module) -> nn.Module | None:
        if attention and can_swap(child):
            return SelfAttention(child)
        if is_pointwise(child):
            return Conv1x1AsLinear(child)
        if patches and is_patchify(child):
            return PatchConvAsLinear(child)
        return None

    return replace_modules(net, swap)


def classifier_head(net: nn.Module) -> nn.Module | None:
    """The final classification layer (timm's get_classifier(), ClipClassifier.head)."""
    if hasattr(net, "get_classifier"):
        return net.get_classifier()
    return getattr(net, "head", None)


@contextmanager
def _engine(name: str):
    if name not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"int8: this torch build has no {name!r} quantised engine (it has "
                           f"{torch.backends.quantized.supported_engines}); serve fp32 (backend='eager').")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def quantize_int8(net: nn.Module, engine: str = ENGINE) -> nn.Module:
    """`net` (fp32, CPU, eval) rewritten by `as_linears`, then every nn.Linear but the classifier head
    dynamically quantised to int8, in place (no second copy of the weights); returns it.
    The head (a few thousand weights, 5 outputs) stays fp32: no speed to win, and its logits are the output.
    Weights: symmetric int8 per output channel. Activations: quantised per call from their own range
    (dynamic), so no calibration data is needed."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    as_linears(net)
    head = classifier_head(net)
    names = {name: per_channel_dynamic_qconfig for name, m in net.named_modules()
             if type(m) is nn.Linear and m is not head}
    with _engine(engine), warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao one day; it is what this torch ships and tests.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated")
        return quantize_dynamic(net, names, dtype=torch.qint8, inplace=True)


def int8_layers(net: nn.Module) -> int:
    """How many dynamically quantised int8 Linear layers `net` holds."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    return sum(isinstance(m, DynamicLinear) for m in net.modules())
