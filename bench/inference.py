"""Inference benchmark: flowers_classifier vs the raw torch module vs ONNX Runtime, on this CPU, at several
model sizes in one run.

    python -m bench.inference [--models atto@64,tiny@224,vit-l14@224] [--runs N] [--rounds N] [--threads N]
                              [--batch-sizes 1,8] [--compile] [--no-cpu-package] [--wait-quiet]
                              [--json OUT | --no-save]

Each model (`NAME@SIZE`: atto = convnextv2_atto, tiny = convnextv2_tiny, vit-l14 = open_clip ViT-L-14, or a
full timm/open_clip name), random init (weights do not change the speed), is exported to a .pth payload, to
its compiled CPU package (`export.py --cpu-package`: NAME.cpu.pt2 beside the .pth) and to ONNX
(export_onnx). The contenders:

  ours          flowers_classifier.predict_proba from the JPEG file (decode, resize, crop, normalise, model),
                load_model's defaults on the CPU: the compiled CPU package beside the .pth (AOTInductor)
  ours model    FlowerClassifier.probabilities on an already preprocessed tensor
  ours eager    the same without the package (load_model(backend="eager"): Linear layers as 1x1
                convolutions, ConvNeXt channels_last, micro-batches of 2), what a .pth alone gives
  ours compiled load_model(compile=True) (torch.compile at load, inductor freezing; only with --compile)
  torch eager   the module as timm/open_clip build it, NCHW, under torch.inference_mode: what a plain script does
  ORT           onnxruntime InferenceSession.run on the same preprocessed array (numpy only, no torch)
  ORT e2e       flowers_classifier with the .onnx (same preprocessing as `ours`, ONNX Runtime for the model)

Each contender lives in its own worker process (class Worker), started one at a time: its cold start
(model load + first prediction, imports reported apart) and peak RSS (after the first prediction, and after
a batch of 32) are measured while the others sit idle. Then all are timed in turn over their pipes, --rounds
rounds of short turns (measure_in_turn), so that a machine whose load drifts (others share these cores)
slows each of them alike and the ratios hold. Latency: one image, p50/p95 over --runs calls after --warmup.
Throughput: images/s at each batch size from the median batch time (e2e rows batch the files through
iter_probabilities, decoding as it does by default). The goals, per size: ours end to end <= 1.10x ORT end
to end p50 latency, >= 0.95x its batch-8 throughput. Photos: FLOWERS128_DIR (skipped cleanly when absent).
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
from functools import partial
from pathlib import Path

from bench.common import (
    ROOT,
    add_output_args,
    latency_ms,
    machine_info,
    markdown_table,
    peak_rss_mib,
    require_flowers,
    rotated,
    sample_photos,
    save_results,
    time_calls,
    verdict,
    wait_for_quiet,
)
from bench.report import GOAL_BATCH, GOALS

VARIANTS = ("ours", "ours_eager", "ours_compiled", "torch", "ort", "ours_onnx")
# ours/ORT: latency at most GOAL_LATENCY, throughput at batch GOAL_BATCH at least GOAL_THROUGHPUT
GOAL_LATENCY, GOAL_THROUGHPUT = GOALS["inference_latency"].threshold, GOALS["inference_throughput"].threshold
ALIASES = {"atto": "convnextv2_atto", "tiny": "convnextv2_tiny", "base": "convnextv2_base", "vit-l14": "ViT-L-14",
           "vit-b16": "ViT-B-16"}
DEFAULT_MODELS = "atto@64,tiny@224,vit-l14@224"


def parse_models(text: str) -> list[tuple[str, int]]:
    """"atto@64,vit-l14@224" -> [("convnextv2_atto", 64), ("ViT-L-14", 224)]."""
    models = []
    for item in filter(None, text.split(",")):
        name, _, size = item.partition("@")
        if not size.isdigit():
            raise ValueError(f"--models {item}: expected NAME@SIZE, e.g. atto@64 or vit-l14@224")
        models.append((ALIASES.get(name, name), int(size)))
    return models


def is_clip(model_name: str) -> bool:
    return model_name.startswith("ViT")


# --------------------------------------------------------------------------- parent: models + inputs

def make_models(model_name: str, size: int, out_dir: Path, files: list[Path], max_bs: int,
                cpu_package: bool) -> dict:
    """Random-init payload (.pth), its compiled CPU package, its ONNX export and a stack of preprocessed
    inputs (.npy)."""
    import numpy as np
    import torch

    from flowers_classifier import factory
    from flowers_classifier.classes import CLASSES
    from flowers_classifier.payload import make_payload
    from flowers_classifier.preprocess import preprocess_image
    from flowers_fastai.cpu_package import compile_cpu_package
    from flowers_fastai.onnx_export import export_onnx
    torch.manual_seed(0)
    if is_clip(model_name):
        net = factory.create_clip(model_name, image_size=size)
        spec = dict(family="clip", model_name=model_name, quick_gelu=False, **factory.clip_preprocess(net).to_dict())
    else:
        net = factory.create_cnn(model_name)
        spec = dict(family="cnn", model_name=model_name, **factory.cnn_preprocess(net, size).to_dict())
    payload = make_payload(dict(spec, classes=list(CLASSES)), net.state_dict())
    del net
    out_dir.mkdir(parents=True, exist_ok=True)
    pth = out_dir / "model.pth"
    torch.save(payload, pth)
    package_s = package_diff = None
    if cpu_package:
        start = time.perf_counter()
        package_diff = compile_cpu_package(payload, pth)[1]
        package_s = time.perf_counter() - start
        print(f"{model_name}@{size}: CPU package compiled in {package_s:.0f} s", file=sys.stderr, flush=True)
    start = time.perf_counter()
    onnx_path, diff = export_onnx(payload, out_dir / "model.onnx")
    export_s = time.perf_counter() - start
    from flowers_classifier.preprocess import Preprocess
    prep = Preprocess.from_dict(payload)
    inputs = torch.stack([preprocess_image(f, prep) for f in files[:max_bs]]).numpy()
    np.save(out_dir / "inputs.npy", inputs)
    return dict(pth=str(pth), onnx=str(onnx_path), inputs=str(out_dir / "inputs.npy"), export_s=export_s,
                onnx_max_abs_diff=diff, package_s=package_s, package_max_abs_diff=package_diff,
                model=spec["model_name"], image_size=spec["image_size"])


# --------------------------------------------------------------------------- parent: workers in turn

class Worker:
    """One contender in its own process, driven over a pipe: it measures its cold start on its own, then
    times what it is asked to, one chunk at a time, while the other workers wait idle."""

    def __init__(self, variant: str, models_info: dict, files: list[Path], args: argparse.Namespace, tmp: Path):
        cmd = [sys.executable, "-m", "bench.inference", "--child", variant, "--child-models", json.dumps(models_info),
               "--threads", str(args.threads), "--batch-sizes", ",".join(map(str, args.batch_sizes)),
               "--files", *map(str, files)]
        # An empty inductor cache: the compiled variant's cold start is a first compile, as on a fresh machine.
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp / f"inductor-cache-{variant}"))
        self.variant, self.log = variant, tmp / f"{variant}.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log)
        self.cold = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.variant} worker died (exit {self.proc.wait()}):\n"
                               f"{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def ask(self, **command) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def measure_in_turn(workers: list[Worker], args: argparse.Namespace, runs: int, min_images: int,
                    rounds: int) -> dict:
    """Latency and throughput of every contender, in `rounds` rounds of short turns. A turn runs alone (the
    others are blocked on their pipe); a short pause after it lets its thread pool stop spinning."""
    times: dict[str, list[float]] = {}

    def turn(w: Worker, key: str, **command) -> None:
        times.setdefault(key, []).extend(w.ask(**command)["times"])
        time.sleep(0.2)

    for w in workers:
        w.ask(op="warmup", runs=args.warmup)
    runs = max(1, -(-runs // rounds))
    for r in range(rounds):
        for w in rotated(workers, r):
            turn(w, f"{w.variant}/model", op="model", bs=1, runs=runs)
            if w.variant not in ("torch", "ort"):
                turn(w, f"{w.variant}/e2e", op="e2e", bs=1, runs=runs)
            if w.variant == "ours":
                turn(w, "preprocess", op="preprocess", runs=runs)
    for bs in args.batch_sizes:
        batches = max(2, -(-min_images // bs))  # per contender, spread over up to `rounds` turns
        batch_rounds = min(rounds, batches)
        for r in range(batch_rounds):
            for w in rotated(workers, r):
                turn(w, f"{w.variant}/model@{bs}", op="model", bs=bs, runs=-(-batches // batch_rounds))
                if w.variant not in ("torch", "ort"):
                    turn(w, f"{w.variant}/e2e@{bs}", op="e2e", bs=bs, runs=-(-batches // batch_rounds))
    import numpy as np
    latency = {k: latency_ms(np.array(v)) for k, v in times.items() if "@" not in k}
    throughput: dict[str, dict] = {}
    for k, v in times.items():
        if "@" in k:
            key, bs = k.split("@")
            throughput.setdefault(key, {})[bs] = int(bs) / float(np.median(v))
    # every call's seconds too, in the order timed (turns of `runs` calls): the JSON then shows a slow first
    # call per turn, or a whole run in a slower state, which medians hide
    return dict(latency=latency, throughput=throughput, call_seconds=times)


# --------------------------------------------------------------------------- children: one contender each

def load_contender(variant: str, models_info: dict, threads: int):
    """(predict one file or None, probabilities of a preprocessed batch, the flowers_classifier model or None)."""
    if variant == "ort":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(models_info["onnx"], options, providers=["CPUExecutionProvider"])
        return None, lambda x: session.run(["probabilities"], {"image": x}), None
    import torch

    import flowers_classifier as fc
    if variant == "torch":
        from flowers_classifier.factory import build_from_spec
        payload = torch.load(models_info["pth"], map_location="cpu", weights_only=True)
        net = build_from_spec(payload, fast_grn=False)  # timm's own modules, as a plain script has them
        net.load_state_dict(payload["state_dict"])
        net.eval()

        def probabilities(x):
            with torch.inference_mode():
                return net(x).softmax(-1)
        return None, probabilities, None
    if variant == "ours_onnx":
        model = fc.load_onnx_model(models_info["onnx"], threads=threads)
    else:  # "ours" takes load_model's defaults: the CPU package beside the .pth when there is one
        backend = "eager" if variant in ("ours_eager", "ours_compiled") else "auto"
        model = fc.load_model(models_info["pth"], device="cpu", backend=backend, compile=variant == "ours_compiled")
    return (lambda path: fc.predict_proba(model, path)), model.probabilities, model


def child_main(args: argparse.Namespace) -> int:
    """Worker: report the cold start, then answer timing requests (one JSON line each) until stdin closes."""
    protocol, sys.stdout = sys.stdout, sys.stderr  # library prints must not mix into the replies
    variant, info, files = args.child, json.loads(args.child_models), [Path(f) for f in args.files]
    t = time.perf_counter()
    import numpy as np
    if variant != "ort":
        import torch
        torch.set_num_threads(args.threads)
        import flowers_classifier as fc
    import_s = time.perf_counter() - t
    t = time.perf_counter()
    predict_file, probabilities, model = load_contender(variant, info, args.threads)
    load_s = time.perf_counter() - t
    batch = np.load(info["inputs"])
    if variant != "ort":
        batch = torch.from_numpy(batch)
    t = time.perf_counter()
    predict_file(files[0]) if predict_file else probabilities(batch[:1])
    first_s = time.perf_counter() - t
    cold = dict(import_s=import_s, load_s=load_s, first_s=first_s, cold_s=load_s + first_s,
                cold_rss_mib=peak_rss_mib())
    probabilities(batch[:max(args.batch_sizes)])
    cold["peak_rss_mib"] = peak_rss_mib()  # with the largest batch's activations
    print(json.dumps(cold), file=protocol, flush=True)

    cycle = itertools.cycle(files)
    from flowers_classifier.preprocess import preprocess_image
    calls = dict(
        model=lambda bs: probabilities(batch[:bs]),
        e2e=lambda bs: predict_file(next(cycle)) if bs == 1 else list(fc.iter_probabilities(model, files[:bs], bs=bs)),
        preprocess=lambda bs: preprocess_image(next(cycle), model.prep))
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "warmup":
            for _ in range(command["runs"]):
                calls["model"](1)
                if predict_file:
                    calls["e2e"](1)
            print(json.dumps(dict(times=[])), file=protocol, flush=True)
            continue
        fn = partial(calls[command["op"]], command.get("bs", 1))
        print(json.dumps(dict(times=time_calls(fn, command["runs"], warmup=0).tolist())), file=protocol, flush=True)
    return 0


# --------------------------------------------------------------------------- report

ROWS = (  # (label, contender/part); cold-start columns come from the contender's own process
    ("ours: fc.predict_proba (file)", "ours/e2e"),
    ("ours: model only (tensor)", "ours/model"),
    ("ours eager: fc.predict_proba (file)", "ours_eager/e2e"),
    ("ours eager: model only (tensor)", "ours_eager/model"),
    ("ours compiled: fc.predict_proba (file)", "ours_compiled/e2e"),
    ("ours compiled: model only (tensor)", "ours_compiled/model"),
    ("torch eager module (tensor)", "torch/model"),
    ("ORT session.run (array)", "ort/model"),
    ("ORT e2e: fc + .onnx (file)", "ours_onnx/e2e"),
)
RATIOS = (  # (label, ours, ORT)
    ("ours end to end / ORT e2e (same preprocessing)", "ours/e2e", "ours_onnx/e2e"),
    ("ours model only / ORT session.run", "ours/model", "ort/model"),
    ("ours eager end to end / ORT e2e", "ours_eager/e2e", "ours_onnx/e2e"),
    ("ours compiled end to end / ORT e2e", "ours_compiled/e2e", "ours_onnx/e2e"),
    ("ours compiled model only / ORT session.run", "ours_compiled/model", "ort/model"),
)


def report(cold: dict, speed: dict, meta: dict, batch_sizes: list[int]) -> str:
    header = ["variant", "load s", "1st pred s", "cold s", "p50 ms", "p95 ms",
              *[f"bs{bs} img/s" for bs in batch_sizes], "RSS cold MiB", "peak RSS MiB"]
    lat, tp = speed["latency"], speed["throughput"]
    rows = []
    for label, key in ROWS:
        if key not in lat:
            continue
        variant, part = key.split("/")
        c = cold[variant] if part == "e2e" or variant in ("torch", "ort") else {}
        rows.append([label, c.get("load_s"), c.get("first_s"), c.get("cold_s"), lat[key]["p50_ms"],
                     lat[key]["p95_ms"], *[tp[key][str(bs)] for bs in batch_sizes], c.get("cold_rss_mib"),
                     c.get("peak_rss_mib")])
    lines = [f"model {meta['model']} at {meta['image_size']} px, random init; threads {meta['threads']}; "
             f"{meta['runs']} runs after {meta['warmup']} warm-up, throughput from the median batch over "
             f"{meta['min_images']} images per batch size, contenders timed in turn ({meta['rounds']} rounds); "
             f"1-min load at start {meta['load_start']}, at end {meta['load_end']}",
             f"ONNX export {meta['export_s']:.1f} s, max |p_onnx - p_torch| {meta['onnx_max_abs_diff']:.1e}; "
             + (f"CPU package compiled in {meta['package_s']:.0f} s, max |p_package - p_eager| "
                f"{meta['package_max_abs_diff']:.1e}" if meta.get("package_s") is not None else "no CPU package"),
             "", markdown_table(header, rows), ""]
    prep_ms = lat["preprocess"]["p50_ms"]
    lines.append(f"preprocessing (decode + resize + crop + normalise) p50 {prep_ms:.1f} ms = "
                 f"{prep_ms / lat['ours/e2e']['p50_ms']:.1%} of ours end to end; imports: ours "
                 f"{cold['ours']['import_s']:.1f} s, torch {cold['torch']['import_s']:.1f} s, "
                 f"ORT {cold['ort']['import_s']:.1f} s")
    lines += ["", "ratios ours/ORT (latency: lower is better; throughput: higher is better):"]
    for label, a, b in RATIOS:
        if a not in lat:
            continue
        tps = ", ".join(f"bs{bs} {verdict(tp[a][str(bs)] / tp[b][str(bs)], GOAL_THROUGHPUT, True)}"
                        for bs in batch_sizes)
        lines.append(f"- {label}: p50 latency {verdict(lat[a]['p50_ms'] / lat[b]['p50_ms'], GOAL_LATENCY, False)}; "
                     f"throughput {tps}")
    for name in ("ours", "ours_eager", "ours_compiled"):
        if f"{name}/model" in lat:
            ratio = lat[f"{name}/model"]["p50_ms"] / lat["torch/model"]["p50_ms"]
            lines.append(f"- {name} model / torch eager module: p50 latency {ratio:.2f}x")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """One row per model size: ours end to end vs ORT end to end, the two goals."""
    header = ["model", "ours p50 ms", "ORT p50 ms", "latency ours/ORT", f"ours bs{GOAL_BATCH} img/s",
              f"ORT bs{GOAL_BATCH} img/s", f"bs{GOAL_BATCH} throughput ours/ORT", "ours eager p50 ms",
              f"ours eager bs{GOAL_BATCH} img/s"]
    rows, verdicts = [], []
    for r in results:
        lat, tp = r["speed"]["latency"], r["speed"]["throughput"]
        name = f"{r['meta']['model']}@{r['meta']['image_size']}"
        ours_tp, ort_tp = tp["ours/e2e"].get(str(GOAL_BATCH)), tp["ours_onnx/e2e"].get(str(GOAL_BATCH))
        eager_lat = lat.get("ours_eager/e2e", {}).get("p50_ms")
        eager_tp = tp.get("ours_eager/e2e", {}).get(str(GOAL_BATCH))
        lat_ratio = lat["ours/e2e"]["p50_ms"] / lat["ours_onnx/e2e"]["p50_ms"]
        tp_ratio = ours_tp / ort_tp if ours_tp and ort_tp else None
        rows.append([name, lat["ours/e2e"]["p50_ms"], lat["ours_onnx/e2e"]["p50_ms"], f"{lat_ratio:.2f}x", ours_tp,
                     ort_tp, f"{tp_ratio:.2f}x" if tp_ratio else "–", eager_lat, eager_tp])
        verdicts.append(f"- {name}: p50 latency {verdict(lat_ratio, GOAL_LATENCY, False)}; bs{GOAL_BATCH} throughput "
                        + (verdict(tp_ratio, GOAL_THROUGHPUT, True) if tp_ratio else f"not measured (--batch-sizes "
                                                                                    f"without {GOAL_BATCH})"))
    return "\n".join(["## Summary: ours (load_model defaults) vs ONNX Runtime, both end to end from the JPEG file",
                      "", markdown_table(header, rows), "", *verdicts])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.inference", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated NAME@SIZE (default {DEFAULT_MODELS}; "
                                                             f"aliases: {', '.join(ALIASES)})")
    p.add_argument("--runs", type=int, help="timed single-image calls per variant (default 90; 8 for ViT-L/14)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--min-images", type=int,
                   help="images timed per batch size (default 720, so the batch-8 figure is the median of 90 "
                        "batches, 3 per turn; 16 for ViT-L/14). With 64 and 240, atto@64's batch-8 ratio "
                        "moved 0.92-1.19x and 0.90-1.07x between runs of the same code")
    p.add_argument("--batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1, GOAL_BATCH],
                   help=f"comma-separated (default 1,{GOAL_BATCH})")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads for torch and ORT alike "
                                                                       "(default: all cores)")
    p.add_argument("--compile", action="store_true", help="also time load_model(compile=True) (torch.compile at "
                                                         "load; about a minute per batch-size range on 2 cores)")
    p.add_argument("--no-cpu-package", action="store_true",
                   help="do not compile the CPU package: 'ours' is then the eager model")
    p.add_argument("--wait-quiet", action="store_true", help="first wait (<= 15 min) for a 1-min load below 0.7")
    add_output_args(p)
    p.add_argument("--rounds", type=int,
                   help="turns per contender and measurement, each 1/rounds of its runs (default 30, so 3 calls "
                        "per latency turn; 10 for ViT-L/14). With 10 turns, atto@64's latency ratio over 30 calls "
                        "moved 0.97-1.36x between runs of the same code on a shared 2-core machine")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--child-models", help=argparse.SUPPRESS)
    p.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.models = parse_models(args.models)
    except ValueError as e:
        p.error(str(e))
    if ((args.runs is not None and args.runs < 2) or (args.rounds is not None and args.rounds < 1)
            or args.threads < 1 or min(args.batch_sizes) < 1):
        p.error("--runs must be >= 2, --rounds and --threads >= 1 and every --batch-sizes entry >= 1")
    return args


def run_model(model_name: str, size: int, files: list[Path], args: argparse.Namespace, tmp: Path) -> dict:
    """Export one model, start its contenders one at a time (clean cold starts), time them in turn."""
    large = model_name == "ViT-L-14"  # ~1 s per image on 2 cores: fewer calls
    runs, min_images = args.runs or (8 if large else 90), args.min_images or (16 if large else 720)
    rounds = args.rounds or (10 if large else 30)
    info = make_models(model_name, size, tmp / f"{model_name}-{size}", files, max(args.batch_sizes),
                       cpu_package=not args.no_cpu_package)
    variants = [v for v in VARIANTS if (v != "ours_compiled" or args.compile)
                and (v != "ours_eager" or not args.no_cpu_package)]
    workers = []
    try:
        for variant in variants:
            start = time.perf_counter()
            workers.append(Worker(variant, info, files, args, tmp))
            print(f"{model_name}@{size}: started {variant} in {time.perf_counter() - start:.0f} s", file=sys.stderr,
                  flush=True)
        start = time.perf_counter()
        speed = measure_in_turn(workers, args, runs, min_images, rounds)
        print(f"{model_name}@{size}: timed all, in turn, in {time.perf_counter() - start:.0f} s", file=sys.stderr,
              flush=True)
    finally:
        for w in workers:
            w.close()
    meta = dict(model=info["model"], image_size=info["image_size"], threads=args.threads, runs=runs, rounds=rounds,
                min_images=min_images, warmup=args.warmup, export_s=info["export_s"],
                onnx_max_abs_diff=info["onnx_max_abs_diff"],
                package_s=info["package_s"], package_max_abs_diff=info["package_max_abs_diff"],
                load_start=round(os.getloadavg()[0], 2))
    return dict(meta=meta, cold={w.variant: w.cold for w in workers}, speed=speed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    root = require_flowers("bench.inference")
    files = sample_photos(root, max(64, max(args.batch_sizes)))
    load_start = wait_for_quiet() if args.wait_quiet else round(os.getloadavg()[0], 2)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        for model_name, size in args.models:
            results.append(run_model(model_name, size, files, args, Path(tmp)))
            results[-1]["meta"]["load_end"] = round(os.getloadavg()[0], 2)
    meta = machine_info("inference", argv)
    facts = {k: meta.get(k) for k in ("date", "cpu", "cores", "torch", "onnxruntime", "commit")}
    print(f"# {meta['command']}\n{json.dumps(facts)}\n1-min load at start {load_start}\n")
    for r in results:
        print(report(r["cold"], r["speed"], r["meta"], args.batch_sizes) + "\n")
    print(summary(results))
    save_results("inference", args, dict(meta=meta, args=vars(args), results=results), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
