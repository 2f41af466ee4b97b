"""The two CPU measurements behind our ConvNeXt V2 speed-ups, each contender timed in turn:

    python -m bench.cpu_kernels [--runs 20] [--rounds 5] [--package] [--json OUT | --no-save]

1. Global Response Norm: timm's GlobalResponseNorm vs flowers_classifier.model.FastGlobalResponseNorm (same function)
   on the activations of convnextv2_tiny at 224 px (NHWC, the MLP's 4x width), forward and forward + backward.
2. Micro-batches: flowers_classifier.FlowerClassifier.probabilities on 32 images of a random-init
   convnextv2_tiny at 224 px, the whole batch in one forward pass vs chunks of 1, 2, 4 and 8 images
   (CPU_MICRO_BATCH is the default), ms per image. With --package, the same for the model's compiled CPU package
   (export.py --cpu-package; compiling it takes a few minutes), whose default is PACKAGE_MICRO_BATCH, and at 8
   images too (the batch of bench/inference.py's throughput goal). The result file holds the tables' rows.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

from bench.common import add_output_args, machine_info, markdown_table, save_results, time_calls

# (N, H, W, 4C) at the input of each stage's GRN in convnextv2_tiny at 224 px; batch 1 (serving) and 32 (training)
GRN_SHAPES = [(1, 56, 56, 384), (1, 28, 28, 768), (1, 14, 14, 1536), (1, 7, 7, 3072), (32, 14, 14, 1536)]
MICRO_BATCHES = (None, 1, 2, 4, 8)


def in_turn(fns: dict, runs: int, rounds: int) -> dict:
    """Median seconds per call of each function; `rounds` rounds of runs/rounds calls each, in turn."""
    import numpy as np
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += time_calls(fn, max(1, runs // rounds), warmup=0).tolist()
    return {name: float(np.median(t)) for name, t in times.items()}


def forward(module, x) -> None:
    import torch
    with torch.no_grad():
        module(x)


def forward_backward(module, x) -> None:
    module(x).sum().backward()


def grn_table(runs: int, rounds: int) -> dict:
    import torch
    from timm.layers.grn import GlobalResponseNorm

    from flowers_classifier.model import use_fast_grn
    rows = []
    for shape in GRN_SHAPES:
        timm_grn = GlobalResponseNorm(shape[-1]).eval()
        fast_grn = use_fast_grn(torch.nn.Sequential(GlobalResponseNorm(shape[-1]))).eval()[0]
        x = torch.randn(shape, requires_grad=True)

        t = in_turn({"timm fwd": partial(forward, timm_grn, x), "fast fwd": partial(forward, fast_grn, x),
                     "timm fwd+bwd": partial(forward_backward, timm_grn, x),
                     "fast fwd+bwd": partial(forward_backward, fast_grn, x)}, runs, rounds)
        rows.append(["x".join(map(str, shape)), 1e3 * t["timm fwd"], 1e3 * t["fast fwd"],
                     f"{t['timm fwd'] / t['fast fwd']:.1f}x", 1e3 * t["timm fwd+bwd"], 1e3 * t["fast fwd+bwd"],
                     f"{t['timm fwd+bwd'] / t['fast fwd+bwd']:.1f}x"])
    return dict(header=["activation NHWC", "timm fwd ms", "fast fwd ms", "speed-up", "timm fwd+bwd ms",
                        "fast fwd+bwd ms", "speed-up"], rows=rows)


def tiny_224_model(package: bool = False):
    """flowers_classifier's model of a random-init convnextv2_tiny at 224 px: eager, or its compiled CPU package."""
    import torch

    import flowers_classifier as fc
    from flowers_classifier import factory
    from flowers_classifier.classes import CLASSES
    from flowers_classifier.payload import make_payload
    from flowers_fastai.cpu_package import compile_cpu_package
    torch.manual_seed(0)
    net = factory.create_cnn("convnextv2_tiny")
    spec = dict(family="cnn", model_name="convnextv2_tiny", classes=list(CLASSES),
                **factory.cnn_preprocess(net, 224).to_dict())
    with tempfile.TemporaryDirectory() as tmp:
        payload, pth = make_payload(spec, net.state_dict()), Path(tmp) / "m.pth"
        torch.save(payload, pth)
        if package:
            compile_cpu_package(payload, pth)
        # the package's runner is loaded here
        return fc.load_model(pth, device="cpu", backend="cpu-package" if package else "eager")


def micro_batch_table(model, runs: int, rounds: int, images: int = 32) -> dict:
    import dataclasses

    import torch

    from flowers_classifier.backends import CpuPackageBackend, EagerBackend
    batch = torch.randn(images, 3, 224, 224)

    def with_micro_batch(k: int | None):  # chosen when a backend is built: one per size, the same network
        served, k = model.backend, k or images  # None: the whole batch in one pass
        if served.name == "cpu-package":
            backend = CpuPackageBackend(served.package, model.family, 224, eager=lambda: served.net, micro_batch=k)
        else:
            backend = EagerBackend(served.net, model.family, 224, micro_batch=k)
        return dataclasses.replace(model, backend=backend)
    sizes = [k for k in MICRO_BATCHES if k is None or k < images]
    t = in_turn({k: partial(with_micro_batch(k).probabilities, batch) for k in sizes}, max(rounds, runs // 4), rounds)
    whole = t[None]
    return dict(header=["images per forward pass", "ms per image", f"speed-up vs one pass of {images}"],
                rows=[[f"{images} (one pass)" if k is None else k, 1e3 * t[k] / images, f"{whole / t[k]:.2f}x"]
                      for k in sizes])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=20, help="timed calls per contender (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="rounds the calls are spread over, in turn (default 5)")
    p.add_argument("--package", action="store_true",
                   help="also time micro-batches through the compiled CPU package (compiles it: a few minutes)")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.runs < 1 or args.rounds < 1:
        p.error("--runs and --rounds must be >= 1")
    import json
    info = machine_info("cpu_kernels", argv)
    print(f"# {info['command']}")
    print(json.dumps({k: info[k] for k in ("date", "cpu", "cores", "torch", "torch_threads", "loadavg_1min")}))
    tables = {}

    def show(title: str, table: dict) -> None:
        tables[title] = table
        print(f"\n{title}:\n\n{markdown_table(**table)}")
    show("Global Response Norm, median of the timed calls", grn_table(args.runs, args.rounds))
    show("flowers_classifier on 32 images, convnextv2_tiny 224 px, by micro-batch",
         micro_batch_table(tiny_224_model(), args.runs, args.rounds))
    if args.package:
        model = tiny_224_model(package=True)
        for images in (32, 8):
            show(f"the same through its compiled CPU package, {images} images, by micro-batch",
                 micro_batch_table(model, args.runs, args.rounds, images=images))
    save_results("cpu_kernels", args, dict(meta=info, args=vars(args), tables=tables), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
