"""Inference benchmark: flowers_classifier vs the raw torch module vs ONNX Runtime, on this CPU.

    python bench/inference.py [--vit] [--runs 30] [--rounds 10] [--threads N] [--no-compile] [--wait-quiet]
                              [--json OUT]

A random-init convnextv2_tiny at 224 px (ViT-L-14 at 224 with --vit) is exported to a .pth payload and to
ONNX (export_onnx). The contenders:

  ours          flowers_classifier.predict_proba from the JPEG file (decode, resize, crop, normalise, model);
                default load_model on the CPU: Linear layers as 1x1 convolutions (oneDNN), ConvNeXt
                channels_last, batches in micro-batches of 2, inference_mode
  ours model    FlowerClassifier.probabilities on an already preprocessed tensor
  ours compiled the same with load_model(compile=True) (torch.compile, inductor freezing; --no-compile skips)
  torch eager   the module as timm/open_clip build it, NCHW, under torch.inference_mode: what a plain script does
  ORT           onnxruntime InferenceSession.run on the same preprocessed array (numpy only, no torch)
  ORT e2e       flowers_classifier with the .onnx (same preprocessing as `ours`, ONNX Runtime for the model)

Each contender lives in its own worker process (class Worker), started one at a time: its cold start
(model load + first prediction, imports reported apart) and peak RSS (after the first prediction, and after
a batch of 32) are measured while the others sit idle. Then all are timed in turn over their pipes, --rounds
rounds of short turns (measure_in_turn), so that a machine whose load drifts (others share these cores)
slows each of them alike and the ratios hold. Latency: one image, p50/p95 over --runs calls after --warmup.
Throughput: images/s at batch 1, 8, 32 from the median batch time (e2e rows batch the files through
iter_probabilities, decoding in threads). Photos: FLOWERS128_DIR (skipped cleanly when absent).
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

    from flowers_classifier import factory
    from flowers_classifier.classes import CLASSES
    from flowers_classifier.onnx_model import export_onnx
    from flowers_classifier.payload import make_payload
    from flowers_classifier.preprocess import preprocess_image
    torch.manual_seed(0)
    if vit:
        net = factory.create_clip("ViT-L-14", pretrained=None, head_init="random")
        spec = dict(family="clip", model_name="ViT-L-14", quick_gelu=False, **factory.clip_preprocess(net).to_dict())
    else:
        net = factory.create_cnn("convnextv2_tiny", pretrained=None)
        spec = dict(family="cnn", model_name="convnextv2_tiny", **factory.cnn_preprocess(net, 224).to_dict())
    payload = make_payload(dict(spec, classes=list(CLASSES)), net.state_dict())
    del net
    pth = out_dir / "model.pth"
    torch.save(payload, pth)
    start = time.perf_counter()
    onnx_path, diff = export_onnx(payload, out_dir / "model.onnx")
    export_s = time.perf_counter() - start
    from flowers_classifier.preprocess import Preprocess
    prep = Preprocess.from_dict(payload)
    inputs = torch.stack([preprocess_image(f, prep) for f in files[:max_bs]]).numpy()
    np.save(out_dir / "inputs.npy", inputs)
    return dict(pth=str(pth), onnx=str(onnx_path), inputs=str(out_dir / "inputs.npy"), export_s=export_s,
                onnx_max_abs_diff=diff, model=spec["model_name"], image_size=spec["image_size"])


# --------------------------------------------------------------------------- parent: workers in turn

class Worker:
    """One contender in its own process, driven over a pipe: it measures its cold start on its own, then
    times what it is asked to, one chunk at a time, while the other workers wait idle."""

    def __init__(self, variant: str, models_info: dict, files: list[Path], args: argparse.Namespace, tmp: Path):
        cmd = [sys.executable, __file__, "--child", variant, "--child-models", json.dumps(models_info),
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


def measure_in_turn(workers: list[Worker], args: argparse.Namespace) -> dict:
    """Latency and throughput of every contender, in --rounds rounds of short turns. A turn runs alone (the
    others are blocked on their pipe); a short pause after it lets its thread pool stop spinning."""
    times: dict[str, list[float]] = {}

    def turn(w: Worker, key: str, **command) -> None:
        times.setdefault(key, []).extend(w.ask(**command)["times"])
        time.sleep(0.2)

    for w in workers:
        w.ask(op="warmup", runs=args.warmup)
    in_turn = lambda r: workers[r % len(workers):] + workers[:r % len(workers)]  # noqa: E731 - who goes first rotates
    runs = max(1, -(-args.runs // args.rounds))
    for r in range(args.rounds):
        for w in in_turn(r):
            turn(w, f"{w.variant}/model", op="model", bs=1, runs=runs)
            if w.variant not in ("torch", "ort"):
                turn(w, f"{w.variant}/e2e", op="e2e", bs=1, runs=runs)
            if w.variant == "ours":
                turn(w, "preprocess", op="preprocess", runs=runs)
    for bs in args.batch_sizes:
        batches = max(2, -(-args.min_images // bs))  # per contender, spread over up to --rounds turns
        rounds = min(args.rounds, batches)
        for r in range(rounds):
            for w in in_turn(r):
                turn(w, f"{w.variant}/model@{bs}", op="model", bs=bs, runs=-(-batches // rounds))
                if w.variant not in ("torch", "ort"):
                    turn(w, f"{w.variant}/e2e@{bs}", op="e2e", bs=bs, runs=-(-batches // rounds))
    import numpy as np
    latency = {k: latency_ms(np.array(v)) for k, v in times.items() if "@" not in k}
    throughput: dict[str, dict] = {}
    for k, v in times.items():
        if "@" in k:
            key, bs = k.split("@")
            throughput.setdefault(key, {})[bs] = int(bs) / float(np.median(v))
    return dict(latency=latency, throughput=throughput)


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
    model = (fc.load_onnx_model(models_info["onnx"], threads=threads) if variant == "ours_onnx"
             else fc.load_model(models_info["pth"], device="cpu", compile=variant == "ours_compiled"))
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
    ("ours compiled: fc.predict_proba (file)", "ours_compiled/e2e"),
    ("ours compiled: model only (tensor)", "ours_compiled/model"),
    ("torch eager module (tensor)", "torch/model"),
    ("ORT session.run (array)", "ort/model"),
    ("ORT e2e: fc + .onnx (file)", "ours_onnx/e2e"),
)
RATIOS = (  # (label, ours, ORT)
    ("ours end to end / ORT e2e (same preprocessing)", "ours/e2e", "ours_onnx/e2e"),
    ("ours model only / ORT session.run", "ours/model", "ort/model"),
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
             f"{meta['runs']} runs after {meta['warmup']} warm-up, contenders timed in turn; 1-min load at start "
             f"{meta['load_start']}, at end {meta['load_end']}",
             f"ONNX export {meta['export_s']:.1f} s, max |p_onnx - p_torch| {meta['onnx_max_abs_diff']:.1e}",
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
    for name in ("ours", "ours_compiled"):
        if f"{name}/model" in lat:
            ratio = lat[f"{name}/model"]["p50_ms"] / lat["torch/model"]["p50_ms"]
            lines.append(f"- {name} model / torch eager module: p50 latency {ratio:.2f}x")
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
    p.add_argument("--rounds", type=int, default=10,
                   help="turns per contender and measurement, each 1/rounds of its runs (default 10)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--child-models", help=argparse.SUPPRESS)
    p.add_argument("--files", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runs = args.runs or (8 if args.vit else 30)
    args.min_images = args.min_images or (16 if args.vit else 64)
    if args.runs < 2 or args.rounds < 1 or args.threads < 1 or min(args.batch_sizes) < 1:
        p.error("--runs must be >= 2, --rounds and --threads >= 1 and every --batch-sizes entry >= 1")
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
        workers = []
        try:
            for variant in [v for v in VARIANTS if not (args.no_compile and v == "ours_compiled")]:
                start = time.perf_counter()
                workers.append(Worker(variant, info, files, args, Path(tmp)))  # one at a time: clean cold starts
                print(f"started {variant} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            start = time.perf_counter()
            speed = measure_in_turn(workers, args)
            print(f"timed all, in turn, in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        finally:
            for w in workers:
                w.close()
        cold = {w.variant: w.cold for w in workers}
    meta = dict(machine_info(), model=info["model"], image_size=info["image_size"], threads=args.threads,
                runs=args.runs, warmup=args.warmup, export_s=info["export_s"],
                onnx_max_abs_diff=info["onnx_max_abs_diff"], load_start=load_start,
                load_end=round(os.getloadavg()[0], 2))
    facts = {k: meta.get(k) for k in ("date", "cpu", "cores", "torch", "onnxruntime")}
    print(f"# bench/inference.py {' '.join(sys.argv[1:])}\n{json.dumps(facts)}")
    print(report(cold, speed, meta, args.batch_sizes))
    if args.json:
        args.json.write_text(json.dumps(dict(meta=meta, cold=cold, speed=speed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
