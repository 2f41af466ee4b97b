"""Latency of the first images after an idle pause: flowers_classifier (load_model defaults, the CPU package)
vs ONNX Runtime, on the same preprocessed image.

    python -m bench.idle_latency [--models atto@64] [--pause 0.2] [--rounds 60] [--calls 3] [--threads 2]

A demo or an API mostly sees one image now and then, not a stream. After a pause, a runtime whose worker
threads went to sleep pays for waking them: torch's OpenMP team does at each parallel region of the first
call (libgomp spins for a while after a region, then sleeps; a scheduler that wakes the worker onto the
CPU where the caller spins makes it wait), ONNX Runtime's own thread pool much less so.
bench/inference.py's turns (3 calls after a 0.2 s pause) mix such calls into its p50; this script times
them apart. Each round: pause, then --calls calls in a row, per contender, contenders in turn (one process,
the same input): the model alone on the preprocessed tensor, and predict_proba from the JPEG file (whose
decoding, ~1 ms in this thread, comes between the pause and the model). Prints p50 per call position,
ours/ORT for each. Random init (the weights do not change the speed); photos: FLOWERS128_DIR (skipped
cleanly when absent).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

from bench.common import (
    add_output_args,
    machine_info,
    markdown_table,
    require_flowers,
    rotated,
    sample_photos,
    save_results,
    time_calls,
)
from bench.inference import make_models, parse_models


def time_after_pauses(forwards: dict, pause: float, rounds: int, calls: int) -> dict:
    """Seconds of call 1..`calls` after each pause, per contender: {name: array (rounds, calls)}."""
    import numpy as np
    times = {name: np.zeros((rounds, calls)) for name in forwards}
    for r in range(rounds):
        for name in rotated(list(forwards), r):
            time.sleep(pause)
            times[name][r] = time_calls(forwards[name], calls, warmup=0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle_latency", description=__doc__.split("\n")[0])
    add_output_args(p)
    p.add_argument("--models", default="atto@64", help="comma-separated NAME@SIZE, as bench/inference.py")
    p.add_argument("--pause", type=float, default=0.2, help="idle seconds before each round's calls (default 0.2)")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--calls", type=int, default=3, help="calls in a row after each pause (default 3)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for torch and ORT alike (default 2)")
    args = p.parse_args(argv)
    photos = sample_photos(require_flowers("bench.idle_latency"), 1)
    results = []  # per model: p50 ms of each call position after the pause, per contender
    import numpy as np
    import torch

    import flowers_classifier as fc
    torch.set_num_threads(args.threads)
    print(machine_info())
    print(f"pause {args.pause} s, then {args.calls} calls in a row; {args.rounds} rounds, contenders in turn; "
          f"threads {args.threads}\n")
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in parse_models(args.models):
            info = make_models(name, size, Path(tmp) / f"{name}-{size}", photos, 1, cpu_package=True)
            x = torch.from_numpy(np.load(info["inputs"]))
            # a package that does not load is a BackendError saying why
            ours = fc.load_model(info["pth"], device="cpu", backend="cpu-package")
            ort = fc.load_model(info["onnx"], device="cpu")
            contenders = {"ours": partial(ours.probabilities, x), "ORT": partial(ort.probabilities, x),
                          "ours e2e": partial(fc.predict_proba, ours, photos[0]),  # from the JPEG file
                          "ORT e2e": partial(fc.predict_proba, ort, photos[0])}
            times = time_after_pauses(contenders, args.pause, args.rounds, args.calls)
            p50 = {k: np.median(v, axis=0) * 1e3 for k, v in times.items()}
            results.append(dict(model=name, image_size=size, p50_ms={k: v.tolist() for k, v in p50.items()}))
            for what, a, b in (("model only (tensor)", "ours", "ORT"), ("end to end (file)", "ours e2e", "ORT e2e")):
                rows = [[f"call {c + 1}", p50[a][c], p50[b][c], f"{p50[a][c] / p50[b][c]:.2f}x"]
                        for c in range(args.calls)]
                print(f"{name} at {size} px, {what}: p50 ms by position after the pause")
                print(markdown_table(["call", "ours ms", "ORT ms", "ours/ORT"], rows) + "\n")
    save_results("idle_latency", args, dict(args=vars(args), results=results), argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
