"""Inference benchmark: flowers_classifier vs the raw torch module vs ONNX Runtime, on this CPU.

    python bench/inference.py [--vit] [--runs 30] [--threads N] [--wait-quiet] [--json OUT]

A random-init convnextv2_tiny at 224 px (ViT-L-14 at 224 with --vit) is exported to a .pth payload and to
ONNX (export_onnx), then each variant runs in its own subprocess (clean cold start and peak RSS):

  ours          flowers_classifier.predict_proba from the JPEG file (decode, resize, crop, normalise, model);
                default load_model on the CPU: Linear layers as 1x1 convolutions (oneDNN), ConvNeXt
                channels_last, inference_mode
  ours model    FlowerClassifier.probabilities on an already preprocessed tensor (same process as `ours`)
  ours compiled the same with load_model(compile=True) (torch.compile, inductor freezing; --no-compile skips)
  torch eager   the timm module as built, NCHW, under torch.inference_mode: what a plain script does
  ORT           onnxruntime InferenceSession.run on the same preprocessed array (numpy only, no torch)
  ORT e2e       flowers_classifier with the .onnx (same preprocessing as `ours`, ONNX Runtime for the model)

Latency: one image, p50/p95 over --runs calls after --warmup. Throughput: images/s at batch 1, 8, 32
(e2e rows batch the files through iter_probabilities, decoding in threads). Cold start: model load + first
prediction, imports not included (reported apart). RSS: peak resident memory after the first prediction
and at the end (the end includes batch-32 activations). Photos: FLOWERS128_DIR (skipped cleanly when absent).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/inference.py` from anywhere

from bench.common import (  # noqa: E402
    ROOT,
    latency_ms,
    machine_info,
    markdown_table,
    peak_rss_mib,
    require_flowers,
    sample_photos,
    time_calls,
    verdict,
    wait_for_quiet,
)

VARIANTS = ("ours", "ours_compiled", "torch", "ort", "ours_onnx")
GOAL_LATENCY, GOAL_THROUGHPUT = 1.10, 0.95  # ours/ORT: latency at most 1.10x, throughput at least 0.95x


# --------------------------------------------------------------------------- parent: models + inputs

def make_models(vit: bool, out_dir: Path, files: list[Path], max_bs: int) -> dict:
    """Random-init payload (.pth), its ONNX export and a stack of preprocessed inputs (.npy)."""
    import numpy as np
    import torch

    from flowers_fastai import models
    from flowers_fastai.classes import CLASSES
    from flowers_fastai.export import export_onnx, make_payload
    from flowers_fastai.preprocess import preprocess_image
    torch.manual_seed(0)
    if vit:
        net = models.create_clip("ViT-L-14", pretrained=None, head_init="random")
        spec = dict(family="clip", model_name="ViT-L-14", quick_gelu=False, **models.clip_preprocess(net).to_dict())
    else:
        net = models.create_cnn("convnextv2_tiny", pretrained=None)
        spec = dict(family="cnn", model_name="convnextv2_tiny", **models.cnn_preprocess(net, 224).to_dict())
    payload = make_payload(dict(spec, classes=list(CLASSES)), net.state_dict())
    del net
    pth = out_dir / "model.pth"
    torch.save(payload, pth)
    start = time.perf_counter()
    onnx_path, diff = export_onnx(payload, out_dir / "model.onnx")
    export_s = time.perf_counter() - start
    from flowers_fastai.preprocess import Preprocess
    prep = Preprocess.from_dict(payload)
    inputs = torch.stack([preprocess_image(f, prep) for f in files[:max_bs]]).numpy()
    np.save(out_dir / "inputs.npy", inputs)
    return dict(pth=str(pth), onnx=str(onnx_path), inputs=str(out_dir / "inputs.npy"), export_s=export_s,
                onnx_max_abs_diff=diff, model=spec["model_name"], image_size=spec["image_size"])


def run_child(variant: str, models_info: dict, files: list[Path], args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"{variant}.json"
    cmd = [sys.executable, __file__, "--child", variant, "--child-out", str(out), "--child-models",
           json.dumps(models_info), "--runs", str(args.runs), "--warmup", str(args.warmup),
           "--min-images", str(args.min_images), "--threads", str(args.threads),
           "--batch-sizes", ",".join(map(str, args.batch_sizes)), "--files", *map(str, files)]
    # An empty inductor cache: the compiled variant's cold start is a first compile, as on a fresh machine.
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor-cache"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- children: one variant each

def _throughput(fn_for_bs, batch_sizes: list[int], min_images: int) -> dict:
    """images/s per batch size: one warm-up batch, then enough batches for at least `min_images` images."""
    result = {}
    for bs in batch_sizes:
        fn = fn_for_bs(bs)
        times = time_calls(fn, runs=max(1, -(-min_images // bs)), warmup=1)
        result[str(bs)] = bs / float(times.mean())
    return result


def child_ours(models_info: dict, files: list[Path], args: argparse.Namespace, variant: str) -> dict:
    t = time.perf_counter()
    import torch

    import flowers_classifier as fc
    from flowers_fastai.preprocess import preprocess_image
    torch.set_num_threads(args.threads)
    import_s = time.perf_counter() - t
    t = time.perf_counter()
    model = (fc.load_onnx_model(models_info["onnx"], threads=args.threads) if variant == "ours_onnx"
             else fc.load_model(models_info["pth"], device="cpu", compile=variant == "ours_compiled"))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    fc.predict_proba(model, files[0])
    first_s = time.perf_counter() - t
    cold_rss = peak_rss_mib()
    cycle = itertools.cycle(files)
    e2e = time_calls(lambda: fc.predict_proba(model, next(cycle)), args.runs, args.warmup)
    prep = time_calls(lambda: preprocess_image(next(cycle), model.prep), args.runs, args.warmup)
    batch = torch.stack([preprocess_image(f, model.prep) for f in files[:max(args.batch_sizes)]])
    model_only = time_calls(lambda: model.probabilities(batch[:1]), args.runs, args.warmup)
    e2e_tp = _throughput(lambda bs: lambda: list(fc.iter_probabilities(model, files[:bs], bs=bs)),
                         args.batch_sizes, args.min_images)
    model_tp = _throughput(lambda bs: lambda: model.probabilities(batch[:bs]), args.batch_sizes, args.min_images)
    return dict(import_s=import_s, load_s=load_s, first_s=first_s, cold_s=load_s + first_s, cold_rss_mib=cold_rss,
                e2e=latency_ms(e2e) | dict(throughput=e2e_tp), preprocess=latency_ms(prep),
                model=latency_ms(model_only) | dict(throughput=model_tp), peak_rss_mib=peak_rss_mib())


def child_torch(models_info: dict, args: argparse.Namespace) -> dict:
    t = time.perf_counter()
    import numpy as np
    import torch

    from flowers_fastai.models import build_from_spec
    torch.set_num_threads(args.threads)
    import_s = time.perf_counter() - t
    t = time.perf_counter()
    payload = torch.load(models_info["pth"], map_location="cpu", weights_only=True)
    net = build_from_spec(payload)
    net.load_state_dict(payload["state_dict"])
    net.eval()
    load_s = time.perf_counter() - t
    batch = torch.from_numpy(np.load(models_info["inputs"]))
    with torch.inference_mode():
        t = time.perf_counter()
        net(batch[:1]).softmax(-1)
        first_s = time.perf_counter() - t
        cold_rss = peak_rss_mib()
        single = time_calls(lambda: net(batch[:1]).softmax(-1), args.runs, args.warmup)
        tp = _throughput(lambda bs: lambda: net(batch[:bs]).softmax(-1), args.batch_sizes, args.min_images)
    return dict(import_s=import_s, load_s=load_s, first_s=first_s, cold_s=load_s + first_s, cold_rss_mib=cold_rss,
                model=latency_ms(single) | dict(throughput=tp), peak_rss_mib=peak_rss_mib())


def child_ort(models_info: dict, args: argparse.Namespace) -> dict:
    t = time.perf_counter()
    import numpy as np
    import onnxruntime as ort
    import_s = time.perf_counter() - t
    t = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(models_info["onnx"], options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t
    batch = np.load(models_info["inputs"])
    run = lambda x: session.run(["probabilities"], {"image": x})
    t = time.perf_counter()
    run(batch[:1])
    first_s = time.perf_counter() - t
    cold_rss = peak_rss_mib()
    single = time_calls(lambda: run(batch[:1]), args.runs, args.warmup)
    tp = _throughput(lambda bs: lambda: run(batch[:bs]), args.batch_sizes, args.min_images)
    return dict(import_s=import_s, load_s=load_s, first_s=first_s, cold_s=load_s + first_s, cold_rss_mib=cold_rss,
                model=latency_ms(single) | dict(throughput=tp), peak_rss_mib=peak_rss_mib())


def child_main(args: argparse.Namespace) -> int:
    info, files = json.loads(args.child_models), [Path(f) for f in args.files]
    if args.child == "torch":
        result = child_torch(info, args)
    elif args.child == "ort":
        result = child_ort(info, args)
    else:
        result = child_ours(info, files, args, args.child)
    Path(args.child_out).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- report

def report(results: dict, meta: dict, batch_sizes: list[int]) -> str:
    header = ["variant", "load s", "1st pred s", "cold s", "p50 ms", "p95 ms",
              *[f"bs{bs} img/s" for bs in batch_sizes], "RSS cold MiB", "peak RSS MiB"]
    rows = []

    def row(name: str, r: dict, part: str, cold: bool = True) -> None:
        m = r[part]
        rows.append([name, r["load_s"] if cold else None, r["first_s"] if cold else None, r["cold_s"] if cold else None,
                     m["p50_ms"], m["p95_ms"], *[m["throughput"][str(bs)] for bs in batch_sizes],
                     r["cold_rss_mib"] if cold else None, r["peak_rss_mib"] if cold else None])

    ours, torch_, ort, ours_onnx = (results[v] for v in ("ours", "torch", "ort", "ours_onnx"))
    compiled = results.get("ours_compiled")
    row("ours: fc.predict_proba (file)", ours, "e2e")
    row("ours: model only (tensor)", ours, "model", cold=False)
    if compiled:
        row("ours compiled: fc.predict_proba (file)", compiled, "e2e")
        row("ours compiled: model only (tensor)", compiled, "model", cold=False)
    row("torch eager module (tensor)", torch_, "model")
    row("ORT session.run (array)", ort, "model")
    row("ORT e2e: fc + .onnx (file)", ours_onnx, "e2e")
    lines = [f"model {meta['model']} at {meta['image_size']} px, random init; threads {meta['threads']}; "
             f"{meta['runs']} runs after {meta['warmup']} warm-up; 1-min load at start {meta['load_start']}, "
             f"at end {meta['load_end']}",
             f"ONNX export {meta['export_s']:.1f} s, max |p_onnx - p_torch| {meta['onnx_max_abs_diff']:.1e}",
             "", markdown_table(header, rows), ""]
    prep_share = ours["preprocess"]["p50_ms"] / ours["e2e"]["p50_ms"]
    lines.append(f"preprocessing (decode + resize + crop + normalise) p50 {ours['preprocess']['p50_ms']:.1f} ms "
                 f"= {prep_share:.1%} of ours end to end; imports: ours {ours['import_s']:.1f} s, "
                 f"torch {torch_['import_s']:.1f} s, ORT {ort['import_s']:.1f} s")
    lines.append("")
    lines.append("ratios ours/ORT (latency: lower is better; throughput: higher is better):")
    pairs = []
    for name, r in (("ours", ours), ("ours compiled", compiled)):
        if r:
            pairs += [(f"{name} end to end / ORT e2e (same preprocessing)", r["e2e"], ours_onnx["e2e"]),
                      (f"{name} model only / ORT session.run", r["model"], ort["model"])]
    for label, a, b in pairs:
        tps = ", ".join(f"bs{bs} {verdict(a['throughput'][str(bs)] / b['throughput'][str(bs)], GOAL_THROUGHPUT, True)}"
                        for bs in batch_sizes)
        lines.append(f"- {label}: p50 latency {verdict(a['p50_ms'] / b['p50_ms'], GOAL_LATENCY, False)}; "
                     f"throughput {tps}")
    speedup = ours["model"]["p50_ms"] / torch_["model"]["p50_ms"]
    lines.append(f"- ours model / torch eager module: p50 latency {speedup:.2f}x")
    if compiled:
        speedup = compiled["model"]["p50_ms"] / torch_["model"]["p50_ms"]
        lines.append(f"- ours compiled model / torch eager module: p50 latency {speedup:.2f}x")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/inference.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vit", action="store_true", help="ViT-L-14 (open_clip, 224 px) instead of convnextv2_tiny")
    p.add_argument("--runs", type=int, help="timed single-image calls per variant (default 30; 8 with --vit)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--min-images", type=int, help="images timed per batch size (default 64; 16 with --vit)")
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, 8, 32],
                   help="comma-separated (default 1,8,32)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for torch and ORT alike "
                                                                       "(default: all cores)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (it compiles for "
                                                              "about a minute per batch-size range on 2 cores)")
    p.add_argument("--wait-quiet", action="store_true", help="first wait (<= 15 min) for a 1-min load below 0.7")
    p.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--child-models", help=argparse.SUPPRESS)
    p.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runs = args.runs or (8 if args.vit else 30)
    args.min_images = args.min_images or (16 if args.vit else 64)
    if args.runs < 2 or args.threads < 1 or min(args.batch_sizes) < 1:
        p.error("--runs must be >= 2, --threads >= 1 and every --batch-sizes entry >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    root = require_flowers("bench/inference.py")
    files = sample_photos(root, max(64, max(args.batch_sizes)))
    load_start = wait_for_quiet() if args.wait_quiet else round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        info = make_models(args.vit, Path(tmp), files, max(args.batch_sizes))
        results = {}
        for variant in [v for v in VARIANTS if not (args.no_compile and v == "ours_compiled")]:
            start = time.perf_counter()
            results[variant] = run_child(variant, info, files, args, Path(tmp))
            print(f"measured {variant} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    meta = dict(machine_info(), model=info["model"], image_size=info["image_size"], threads=args.threads,
                runs=args.runs, warmup=args.warmup, export_s=info["export_s"],
                onnx_max_abs_diff=info["onnx_max_abs_diff"], load_start=load_start,
                load_end=round(os.getloadavg()[0], 2))
    facts = {k: meta.get(k) for k in ("date", "cpu", "cores", "torch", "onnxruntime")}
    print(f"# bench/inference.py {' '.join(sys.argv[1:])}\n{json.dumps(facts)}")
    print(report(results, meta, args.batch_sizes))
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
