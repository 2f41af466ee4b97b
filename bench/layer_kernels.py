"""Where a small model's per-core time goes, layer by layer: each matmul and depthwise-convolution shape that
convnextv2_atto runs at 64 px and batch 1, in the form the CPU package computes it (1x1 convolutions, stem and
downsampling layers as Linear layers, channels_last), timed through the kernels our package calls and through
ONNX Runtime's:

    python -m bench.layer_kernels [--threads 1 2] [--copies 6] [--calls 60] [--rounds 5] [--json OUT | --no-save]

Matmuls (M rows x K -> N, with bias):
  Inductor GEMM   the C++ GEMM Inductor generates (max-autotune, CPP backend only): the batch-1 graph's usual
                  pick in our CPU package (docs/cpu-gemm-finding.md: what g++ makes of its inner loop)
  oneDNN packed   torch.ops.mkldnn._linear_pointwise on weights packed once: AOTInductor's ATen choice
  MKL packed      torch.ops.mkl._mkl_linear on weights packed once: torch.compile's ATen choice with frozen weights,
                  which AOTInductor never uses (an MKL-packed matrix cannot be moved, and a package's weights are)
  torch F.linear  eager PyTorch: MKL's sgemm on the weights as they are (a graph compiled without Inductor's
                  mkldnn passes calls the same, as addmm)
  ORT Gemm        a one-node ONNX graph in ONNX Runtime (MLAS, weights packed when the session is made)
Depthwise 7x7 convolutions (C channels on an H x W map):
  oneDNN packed   torch.ops.mkldnn._convolution_pointwise on weights packed once: the call in the package
  Inductor mix    SmallMapDepthwiseConv compiled by Inductor: the package's form on maps of <= aot.SMALL_MAP positions
  ORT Conv        a one-node ONNX graph, group = C

Each timed call runs `copies` layers of one shape, each with its own weights, on the same input: atto's weights
(14 MB) do not fit in a core's L2, so a layer's weights come from further away in the model, and so they do
here. Microseconds per layer: the median over `rounds` rounds of `calls` calls, the contenders in turn. The
"per forward" rows weight each shape by how often the network runs it. Why: at batch 1 the package's model
takes ~1.3x `session.run`'s time on one thread (bench/RESULTS.md section 1); this says which layers.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from bench.common import add_output_args, machine_info, markdown_table, rotated, save_results, time_calls

MODEL, IMAGE_SIZE = "convnextv2_atto", 64
MATMULS = ("Inductor GEMM", "oneDNN packed", "MKL packed", "torch F.linear", "ORT Gemm")
DEPTHWISE = ("oneDNN packed", "Inductor mix", "ORT Conv")


def layer_shapes() -> tuple[Counter, Counter]:
    """How often the network runs each matmul (M, K, N) and each depthwise convolution (C, H, W), batch 1."""
    import torch

    from flowers_classifier.factory import create_cnn
    from flowers_classifier.quantize import as_linears
    from flowers_fastai.cpu_package import is_depthwise
    net = create_cnn(MODEL).eval()
    as_linears(net, attention=False, patches=True)
    matmuls, depthwise = Counter(), Counter()

    def record(module, args) -> None:
        x = args[0]
        if isinstance(module, torch.nn.Linear):
            matmuls[(x.numel() // module.in_features, module.in_features, module.out_features)] += 1
        else:
            depthwise[(x.shape[1], x.shape[2], x.shape[3])] += 1

    for m in net.modules():
        if isinstance(m, torch.nn.Linear) or is_depthwise(m):
            m.register_forward_pre_hook(record)
    with torch.no_grad():
        net.to(memory_format=torch.channels_last)(torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    return matmuls, depthwise


def ort_session(nodes: list, inits: list, name: str, shape: list[int], threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper
    graph = helper.make_graph(nodes, "layers", [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes],
                              inits)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compiled(layers, x):
    """`layers` (run on the same input) compiled as the package's batch-1 graph compiles: frozen weights,
    Inductor's generated GEMMs only, a C++ wrapper (no Python between the kernels, as in a package)."""
    import torch

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

        def forward(self, x):
            return [layer(x) for layer in self.layers]

    with torch._inductor.config.patch(freezing=True, cpp_wrapper=True, fx_graph_cache=False):
        fn = torch.compile(Layers().eval(), options={"max_autotune": True, "max_autotune_gemm_backends": "CPP",
                                                     "autotune_num_choices_displayed": 0})
        fn(x)  # compile now, under the patched config
    return lambda: fn(x)


def matmul_contenders(m: int, k: int, n: int, copies: int, threads: int) -> dict:
    import torch
    from onnx import helper, numpy_helper
    weights = [torch.randn(n, k) * k ** -0.5 for _ in range(copies)]
    biases = [torch.randn(n) * 0.1 for _ in range(copies)]
    x = torch.randn(m, k)
    mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, m) for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, m) for w in weights]
    linears = []
    for w, b in zip(weights, biases, strict=True):
        linear = torch.nn.Linear(k, n)
        linear.weight.data, linear.bias.data = w, b
        linears.append(linear)
    inits = [numpy_helper.from_array(t.numpy(), f"{p}{i}") for i, (w, b) in enumerate(zip(weights, biases, strict=True))
             for p, t in (("w", w), ("b", b))]
    nodes = [helper.make_node("Gemm", ["x", f"w{i}", f"b{i}"], [f"y{i}"], transB=1) for i in range(copies)]
    session, feed = ort_session(nodes, inits, "x", [m, k], threads), {"x": x.numpy()}
    return {
        "Inductor GEMM": compiled(linears, x),
        "oneDNN packed": lambda: [torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [], "")
                                  for p, b in zip(onednn, biases, strict=True)],
        "MKL packed": lambda: [torch.ops.mkl._mkl_linear(x, p, w, b, m)
                               for p, w, b in zip(mkl, weights, biases, strict=True)],
        "torch F.linear": lambda: [torch.nn.functional.linear(x, w, b) for w, b in zip(weights, biases, strict=True)],
        "ORT Gemm": lambda: session.run(None, feed),
    }


def depthwise_contenders(c: int, h: int, w: int, copies: int, threads: int) -> dict:
    import torch
    from onnx import helper, numpy_helper

    from flowers_fastai.cpu_package import SMALL_MAP, SmallMapDepthwiseConv
    convs = [torch.nn.Conv2d(c, c, 7, padding=3, groups=c).eval() for _ in range(copies)]
    x = torch.randn(1, c, h, w).contiguous(memory_format=torch.channels_last)
    packed = [torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach(), [3, 3], [1, 1], [1, 1], c,
                                                           list(x.shape)) for conv in convs]
    biases = [conv.bias.detach() for conv in convs]
    inits = [numpy_helper.from_array(t.detach().numpy(), f"{p}{i}") for i, conv in enumerate(convs)
             for p, t in (("w", conv.weight), ("b", conv.bias))]
    nodes = [helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"y{i}"], group=c, pads=[3, 3, 3, 3],
                              kernel_shape=[7, 7]) for i in range(copies)]
    session, feed = ort_session(nodes, inits, "x", [1, c, h, w], threads), {"x": x.contiguous().numpy()}
    contenders = {"oneDNN packed": lambda: [torch.ops.mkldnn._convolution_pointwise(
        x, p, b, [3, 3], [1, 1], [1, 1], c, "none", [], "") for p, b in zip(packed, biases, strict=True)]}
    if h * w <= SMALL_MAP:
        contenders["Inductor mix"] = compiled([SmallMapDepthwiseConv(conv, h, w) for conv in convs], x)
    contenders["ORT Conv"] = lambda: session.run(None, feed)
    return contenders


def in_turn_us(contenders: dict, copies: int, calls: int, rounds: int) -> dict:
    """Median microseconds per layer of each contender, `rounds` rounds of `calls` calls, in turn."""
    import numpy as np
    times = {name: [] for name in contenders}
    for fn in contenders.values():
        time_calls(fn, 0, warmup=20)
    for r in range(rounds):
        for name in rotated(list(contenders), r):
            times[name] += time_calls(contenders[name], calls, warmup=2).tolist()
    return {name: float(np.median(t)) * 1e6 / copies for name, t in times.items()}


def table(shapes: Counter, make, names: tuple, label: str, args, threads: int) -> str:
    rows, per_forward = [], Counter()
    for shape, count in shapes.items():
        us = in_turn_us(make(*shape, args.copies, threads), args.copies, args.calls, args.rounds)
        for name in names:  # maps too large for a mix are the package's oneDNN convolutions
            per_forward[name] += count * (us[name] if name in us else us["oneDNN packed"])
        best = min(v for k, v in us.items() if not k.startswith("ORT"))
        ort_us = us[names[-1]]
        rows.append([label.format(*shape), count, *[us.get(name) for name in names], f"{best / ort_us:.2f}x"])
    ours_best = min(v for k, v in per_forward.items() if not k.startswith("ORT"))
    rows.append(["per forward (x count)", sum(shapes.values()), *[per_forward[n] for n in names],
                 f"{ours_best / per_forward[names[-1]]:.2f}x"])
    return markdown_table(["shape", "count", *[f"{n} us" for n in names], "best torch / ORT"], rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.layer_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts to measure (default 1 2)")
    p.add_argument("--copies", type=int, default=6, help="layers of a shape per timed call (default 6)")
    p.add_argument("--calls", type=int, default=60, help="timed calls per contender and round (default 60)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, the contenders in turn (default 5)")
    add_output_args(p)
    args = p.parse_args(argv)
    if min(args.threads + [args.copies, args.calls, args.rounds]) < 1:
        p.error("--threads, --copies, --calls and --rounds must be >= 1")
    import json
    import os

    import torch
    torch.manual_seed(0)
    info = machine_info("layer_kernels", argv)
    print(f"# {info['command']}")
    print(json.dumps({k: info.get(k) for k in ("date", "cpu", "cores", "torch", "onnxruntime", "loadavg_1min")}))
    matmuls, depthwise = layer_shapes()
    # every compiled contender stays in Dynamo's cache (one entry per module, found by its guards): a reset would
    # drop the others, which would then recompile at their next call without the options they were built with
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 1024
    tables = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        torch._dynamo.reset()  # kernels compiled for another thread count
        with torch.inference_mode():
            print(f"\n{MODEL} at {IMAGE_SIZE} px, batch 1, {threads} thread(s): matmuls, us per layer "
                  f"(1-min load {os.getloadavg()[0]:.2f})\n")
            tables[f"matmuls, {threads} thread(s)"] = table(matmuls, matmul_contenders, MATMULS, "M {} x K {} -> N {}",
                                                            args, threads)
            print(tables[f"matmuls, {threads} thread(s)"])
            print(f"\ndepthwise 7x7 convolutions, us per layer, {threads} thread(s)\n")
            tables[f"depthwise, {threads} thread(s)"] = table(depthwise, depthwise_contenders, DEPTHWISE,
                                                              "C {} on {} x {}", args, threads)
            print(tables[f"depthwise, {threads} thread(s)"])
    save_results("layer_kernels", args, dict(meta=info, args=vars(args), tables=tables), argv)  # markdown tables
    return 0


if __name__ == "__main__":
    sys.exit(main())
