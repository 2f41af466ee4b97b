"""Compiling the CPU package of a payload (`export.py --cpu-package`): `compile_cpu_package` writes
`<name>.cpu.pt2` beside `<name>.pth`, which `flowers_classifier.load_model` serves on the CPU (the archive's
format, its metadata and the checks made before it is served are the runtime's: `flowers_classifier.aot`).

Why: on a CPU, eager PyTorch runs ConvNeXt/ViT as hundreds of separate ops, each with its own dispatch and
its own pass over memory. AOTInductor (torch.export + Inductor with frozen weights) compiles the network
once into a shared library: elementwise work fused into the neighbouring kernels, weights prepacked for
oneDNN, no Python per op. Compiling takes a C++ compiler and a minute or more, so it is done by
`export.py --cpu-package`, never at load; loading the package takes a few seconds at most.

Two graphs for a ConvNeXt. The main graph takes any batch (1..MAX_BATCH). Inductor prepacks Linear weights
for it, but a convolution's weights only for a static input shape: with a dynamic batch axis, each
depthwise convolution reorders its weights at every call, which is most of a small model's time at batch 1
(convnextv2_atto at 64 px: 1.2-1.3x faster at batch 1 with a static graph, measured A/B here). So a network that
keeps convolutions after `compiled_net`'s rewrites also gets a graph compiled for one image (BATCH1_GRAPH),
and single images, a demo's and an API's usual call, go through it; its matmuls are autotuned at export
(AUTOTUNE; Inductor's generated GEMMs are compiled as torch writes them: docs/cpu-gemm-finding.md says what
g++ makes of their inner loop). The main graph then serves batches only, so it is traced and autotuned at
TUNED_BATCH images. A ViT keeps no convolution (its patch embedding becomes a Linear) and gets one graph: a
second copy of ViT-L/14's 1.2 GB would buy nothing.

On small maps a ConvNeXt's 7x7 depthwise convolutions are compiled as what they are there, a dense
per-channel mix of the map's positions (SmallMapDepthwiseConv, maps of SMALL_MAP positions or fewer): oneDNN
runs one in ~30 µs whatever the map, a fixed cost that dwarfs a 4x4 map's arithmetic, while Inductor fuses the
mix into one small reduction (convnextv2_atto at 64 px, its eight convolutions on 4x4 and 2x2 maps, A/B: the
model takes 0.89-0.94x the time at batch 1 warm, 0.90-0.96x right after decoding a photo, 0.95-0.96x at batch 8).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from flowers_classifier.aot import (
    BATCH1_GRAPH,
    MAIN_GRAPH,
    CpuPackageError,
    cpu_package_path,
    load_cpu_package,
    package_meta,
    write_package_meta,
)
from flowers_classifier.factory import build_from_spec
from flowers_classifier.files import atomic_write
from flowers_classifier.model import replace_modules
from flowers_classifier.quantize import as_linears

PACKAGE_TOLERANCE = 1e-4  # max abs difference of probabilities, compiled vs eager, fp32 (as for ONNX)
MAX_BATCH = 1024  # the dynamic batch axis of the compiled graph: 1 ... MAX_BATCH images per call
# Depthwise convolutions on maps of at most this many positions (4x4) compile as SmallMapDepthwiseConv. The mix
# holds (H*W)^2 weights per channel against a 7x7 kernel's 49: 5x at 4x4 but 21x at 8x8, where it measured
# slower than oneDNN (convnextv2_atto at 64 px, A/B: 1.06-1.08x the time with the 4x4 limit).
SMALL_MAP = 16
# Options for a graph whose matmuls are autotuned at export: Inductor times, for each Linear at the traced shapes,
# its own generated GEMM (a C++ template, bias and activation fused) against oneDNN's and keeps the faster on
# the machine that compiles (max-autotune; its tables are not printed). At a small model's shapes oneDNN's fixed
# cost per call is most of each matmul (convnextv2_atto at 64 px, batch 1: 16 to 256 rows); at larger ones
# oneDNN wins and stays (convnextv2_tiny at 224 px; forcing the generated GEMM everywhere made it 2.2x slower).
AUTOTUNE = {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "autotune_num_choices_displayed": 0,
            "max_autotune_report_choices_stats": False}
# The batch a main graph that serves batches only (a ConvNeXt's: single images take its batch-1 graph) is traced
# and autotuned at: that of the batch-8 throughput goal (bench/inference.py). convnextv2_atto at 64 px, both
# packages in one process, against the main graph traced on 2 images with oneDNN's matmuls: 0.89-1.00x the time
# at batch 8 (median 0.93x, 12 processes), 0.72-0.74x at 2, 1.00-1.04x at 32. At 224 px batches reach the graph
# 4 images at a time (inference.PACKAGE_MICRO_BATCH), yet convnextv2_tiny's package traced and tuned at 4 instead
# took the same time (A/B). A ViT's main graph serves single images too: traced on 2, its matmuls left to oneDNN.
TUNED_BATCH = 8


def eager_cpu_net(payload: dict) -> nn.Module:
    """The payload's network, fp32, eval mode, in the form the package computes: ConvNeXt channels_last, 1x1 and
    patchify convolutions as the Linear layers they are (the small ConvNeXt V2s, atto to nano, build their MLPs
    as 1x1 convolutions: Inductor then packs them as matmuls instead of calling oneDNN's convolution for each,
    which made convnextv2_atto at 64 px about 1.6x faster at batch 1, measured here A/B on the two packages;
    stems, downsampling layers and a ViT's patch embedding then need no weight reorder per call either)."""
    net = build_from_spec(payload)
    net.load_state_dict(payload["state_dict"], strict=True)
    as_linears(net, attention=False, patches=True)
    net = net.float().eval()
    return net.to(memory_format=torch.channels_last) if payload["family"] == "cnn" else net


def compiled_net(payload: dict) -> nn.Module:
    """The modules the package traces: `eager_cpu_net`, its depthwise convolutions on small maps (at the
    payload's image size) as SmallMapDepthwiseConv."""
    net = eager_cpu_net(payload)
    small_map_depthwise_as_dense(net, _example(payload, 1))
    return net


class SmallMapDepthwiseConv(nn.Module):
    """A stride-1 depthwise convolution (a ConvNeXt block's 7x7) on one fixed map of H x W positions, as the
    dense per-channel mix it is there: out[:, c, p] = bias[c] + sum_q mix[p, q, c] * x[:, c, q], with mix[p, q]
    the kernel tap that joins input position q to output position p (zero where the kernel does not reach:
    the zero padding). The same function as the convolution on that map, computed as one reduction."""

    def __init__(self, conv: nn.Conv2d, height: int, width: int):
        super().__init__()
        if not is_depthwise(conv):
            raise ValueError(f"SmallMapDepthwiseConv replaces a stride-1 depthwise convolution, not {conv}")
        (kh, kw), (ph, pw) = conv.kernel_size, conv.padding
        weight = conv.weight.detach()[:, 0]  # (C, kh, kw)
        rows = torch.arange(height)[None, :] - torch.arange(height)[:, None] + ph  # [out row, in row] -> kernel row
        cols = torch.arange(width)[None, :] - torch.arange(width)[:, None] + pw
        reach = ((rows >= 0) & (rows < kh))[:, None, :, None] & ((cols >= 0) & (cols < kw))[None, :, None, :]
        taps = weight[:, rows.clamp(0, kh - 1)[:, None, :, None], cols.clamp(0, kw - 1)[None, :, None, :]]
        mix = (taps * reach).permute(1, 2, 3, 4, 0).reshape(height * width, height * width, -1)  # [p, q, c]
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(weight.shape[0])
        self.register_buffer("mix", mix.contiguous())
        self.register_buffer("bias", bias.clone())
        self.map_size = (height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if (h, w) != self.map_size:
            raise ValueError(f"SmallMapDepthwiseConv was built for {self.map_size} maps, got {(h, w)}")
        out = (x.permute(0, 2, 3, 1).reshape(n, 1, h * w, c) * self.mix).sum(2) + self.bias
        return out.view(n, h, w, c).permute(0, 3, 1, 2)


def is_depthwise(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


def small_map_depthwise_as_dense(net: nn.Module, example: torch.Tensor) -> int:
    """Replace, in place, each depthwise convolution of `net` that runs on a map of at most SMALL_MAP positions
    for `example` (the map sizes are recorded in one forward) by SmallMapDepthwiseConv; returns how many."""
    maps: dict[nn.Module, tuple[int, int]] = {}

    def record(conv: nn.Module, args: tuple) -> None:  # returns None: the convolution's input stays as it is
        maps[conv] = tuple(args[0].shape[-2:])

    hooks = [m.register_forward_pre_hook(record) for m in net.modules() if is_depthwise(m)]
    if not hooks:  # a ViT: no forward to run
        return 0
    try:
        with torch.no_grad():
            net(example)
    finally:
        for hook in hooks:
            hook.remove()

    def swap(module: nn.Module) -> nn.Module | None:
        if module not in maps or maps[module][0] * maps[module][1] > SMALL_MAP:
            return None
        return SmallMapDepthwiseConv(module, *maps[module])

    return replace_modules(net, swap)


def _example(payload: dict, n: int) -> torch.Tensor:
    size = int(payload["image_size"])
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))
    return x.contiguous(memory_format=torch.channels_last) if payload["family"] == "cnn" else x


def compile_cpu_package(payload: dict, payload_path: str | os.PathLike, out: str | os.PathLike | None = None,
                        ) -> tuple[Path, float]:
    """Compile `payload` (the one written at `payload_path`) for this CPU and write it atomically to `out` (default
    `cpu_package_path(payload_path)`). Returns (path, max abs difference of probabilities vs eager on
    batches of 3 and 1). Raises CpuPackageError, writing nothing, when compiling fails or the result disagrees."""
    out = Path(out) if out else cpu_package_path(payload_path)
    net = compiled_net(payload)
    # checked against the network as it is, not as rewritten for the compiler
    reference = eager_cpu_net(payload) if any(isinstance(m, SmallMapDepthwiseConv) for m in net.modules()) else net
    graphs = [MAIN_GRAPH] + ([BATCH1_GRAPH] if has_convolutions(net) else [])
    diff: list[float] = []

    def write(tmp: str) -> None:
        try:
            meta = package_meta(payload, payload_path, graphs)
            with torch.no_grad():
                files = {name: _aot_compile(net, payload, name) for name in graphs}
            from torch._inductor.package import package_aoti
            package_aoti(tmp, files)
        except Exception as e:  # noqa: BLE001 - compiler missing, export unsupported, ...: a user error saying which
            raise CpuPackageError(f"{out}: {_compile_failure(e)}; nothing was written, and the .pth still serves "
                                  f"(eager) without the package.") from e
        write_package_meta(tmp, meta)
        # loaded as load_model loads it: the runtime's own checks of the metadata must pass here
        diff.append(_max_prob_diff(load_cpu_package(tmp, payload, payload_path), reference, payload))
        if diff[0] > PACKAGE_TOLERANCE:
            raise CpuPackageError(f"{out}: the compiled model disagrees with PyTorch by {diff[0]:.2e} "
                                  f"(> {PACKAGE_TOLERANCE}) in probability; nothing was written.")

    return atomic_write(out, write, suffix=".tmp.pt2"), diff[0]  # AOTInductor only writes to *.pt2


def _compile_failure(e: Exception) -> str:
    """What stopped a compile, for the user: the C++ compiler (missing or failing), this torch's Inductor API
    (moved or renamed), or anything else as it is."""
    what = f"{type(e).__name__}: {str(e)[:400]}"
    chain = _causes(e)
    try:
        from torch._inductor.exc import CppCompileError, InvalidCxxCompiler
        if any(isinstance(c, (CppCompileError, InvalidCxxCompiler)) for c in chain):
            return (f"the C++ compiler is missing or failed ({what}). Compiling needs a working C++ compiler "
                    f"(gcc/g++ on PATH, or the one named by CXX)")
    except ImportError:  # the API check below says it
        pass
    if any(isinstance(c, (ImportError, AttributeError)) for c in chain):
        return (f"torch {torch.__version__} is not supported by --cpu-package: its AOTInductor API differs from "
                f"the one this code calls ({what}). Install the torch version pyproject.toml names")
    return f"compiling the CPU package failed ({what})"


def _causes(e: BaseException) -> list[BaseException]:
    """`e` and what it wraps (`raise ... from`, Inductor's InductorError.inner_exception); not what it was raised
    while handling, which did not cause it."""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = getattr(e, "inner_exception", None) or e.__cause__
    return chain


def has_convolutions(net: nn.Module) -> bool:
    """Whether `net` still runs convolutions, whose weights a dynamic-batch graph packs at every call."""
    return any(isinstance(m, torch.nn.Conv2d) for m in net.modules())


def _aot_compile(net: nn.Module, payload: dict, graph: str) -> list:
    """AOTInductor's files for one graph of the package, with frozen weights: the batch-1 graph static and
    autotuned; the main graph with a dynamic batch axis, traced and autotuned at TUNED_BATCH where a batch-1
    graph serves single images, else traced on 2 images (torch.export would specialise a batch of 1)."""
    options = {"aot_inductor.package": True, "freezing": True}
    if graph == BATCH1_GRAPH:
        program = torch.export.export(net, (_example(payload, 1),))
        options |= AUTOTUNE
    else:
        batches_only = has_convolutions(net)  # the same test that gives the package its batch-1 graph
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        program = torch.export.export(net, (_example(payload, TUNED_BATCH if batches_only else 2),),
                                      dynamic_shapes=({0: batch},))
        if batches_only:
            options |= AUTOTUNE
    args, kwargs = program.example_inputs
    from torch._inductor import aot_compile
    return aot_compile(program.module(check_guards=False), args, kwargs, options=options)


def _max_prob_diff(runner: Callable, net: nn.Module, payload: dict) -> float:
    # 3: not a traced batch (2 or TUNED_BATCH), so the batch axis is proven dynamic; 1: the batch-1 graph
    diffs = []
    with torch.inference_mode():
        for x in (_example(payload, 3), _example(payload, 1)):
            diffs.append(float((runner(x).softmax(-1) - net(x).softmax(-1)).abs().max()))
    return max(diffs)
