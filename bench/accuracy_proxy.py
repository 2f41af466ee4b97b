"""Accuracy proxy: our recipe (train.py) vs the plain PyTorch loop, from scratch, same data and epochs.

    python -m bench.accuracy_proxy [--quick] [--seeds 0,1,2] [--epochs N] [--img-size PX]
                                   [--max-per-class N] [--wait-quiet] [--json OUT | --no-save]

Per seed: `train.py --arch cnn --model convnextv2_atto --no-pretrained --patience 0 --seed S` (the whole
train.py path: audit, split, fastai recipe, evaluation), then bench/plain_loop.py on the very split.csv
that run wrote, with the same model, image size, batch size and epoch count. Valid accuracy, mean ± std
over the seeds: after the last epoch (primary: neither side picks its best epoch on the valid set) and
at the best epoch. --quick: 64 px, 150 photos per class, 8 epochs (a few minutes on 2 cores); default:
every photo, 64 px, 15 epochs. Photos: FLOWERS128_DIR (skipped cleanly when absent).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    ROOT,
    add_output_args,
    machine_info,
    markdown_table,
    require_flowers,
    save_results,
    wait_for_quiet,
)
from bench.plain_loop import PlainConfig, train_plain
from bench.report import GOALS

GOAL_POINTS = GOALS["accuracy"].threshold  # our recipe >= the plain loop + this many accuracy points
MODEL = "convnextv2_atto"


def run_ours(root: Path, run_dir: Path, args: argparse.Namespace, seed: int) -> dict:
    cmd = [sys.executable, "train.py", "--arch", "cnn", "--model", MODEL, "--no-pretrained", "--data", str(root),
           "--img-size", str(args.img_size), "--epochs", str(args.epochs), "--bs", str(args.bs),
           "--seed", str(seed), "--patience", "0", "--workers", str(args.workers), "--out", str(run_dir),
           "--no-export"]
    if args.max_per_class:
        cmd += ["--max-per-class", str(args.max_per_class)]
    cmd += args.ours_args.split()  # e.g. "--lr 4e-3": a recipe change, tried against the same plain loop
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    import pandas as pd
    hist = pd.read_csv(run_dir / "history.csv")
    return dict(final=float(hist["accuracy"].iloc[-1]), best=float(hist["accuracy"].max()),
                wall_s=time.perf_counter() - start)


def run_plain(root: Path, run_dir: Path, args: argparse.Namespace, seed: int) -> dict:
    import pandas as pd

    from flowers_classifier.classes import CLASSES
    df = pd.read_csv(run_dir / "split.csv")  # exactly the photos and split our run used
    cfg = PlainConfig(model=MODEL, img_size=args.img_size, bs=args.bs, epochs=args.epochs, workers=args.workers,
                      seed=seed)
    start = time.perf_counter()
    result = train_plain(df, root, CLASSES, cfg)
    accs = [e["accuracy"] for e in result["history"]]
    return dict(final=accs[-1], best=max(accs), wall_s=time.perf_counter() - start)


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.accuracy_proxy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="64 px, 150 photos per class, 8 epochs (< 10 min on 2 cores)")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2],
                   help="comma-separated seeds (default 0,1,2): split, init, augmentation, order")
    p.add_argument("--epochs", type=int, help="epochs for both (default 15; 8 with --quick)")
    p.add_argument("--img-size", type=int, default=64, help="pixels (default 64)")
    p.add_argument("--max-per-class", type=int, help="photos per class (default all; 150 with --quick)")
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers for both (default 0, train.py's CPU "
                                                          "default)")
    p.add_argument("--ours-args", default="", help="extra train.py flags for our side, e.g. '--lr 4e-3 --mixup 0'")
    p.add_argument("--wait-quiet", action="store_true", help="first wait (<= 15 min) for a 1-min load below 0.7")
    add_output_args(p)
    args = p.parse_args(argv)
    args.epochs = args.epochs or (8 if args.quick else 15)
    args.max_per_class = args.max_per_class or (150 if args.quick else None)
    if args.epochs < 1 or args.img_size < 32 or not args.seeds:
        p.error("--epochs must be >= 1, --img-size >= 32 and --seeds non-empty")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = require_flowers("bench.accuracy_proxy")
    load_start = wait_for_quiet() if args.wait_quiet else round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    results = {"ours": [], "plain": []}
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        for seed in args.seeds:
            run_dir = Path(tmp) / f"seed{seed}"
            print(f"seed {seed}: ours (train.py) ...", file=sys.stderr, flush=True)
            results["ours"].append(run_ours(root, run_dir, args, seed))
            print(f"seed {seed}: plain loop ...", file=sys.stderr, flush=True)
            results["plain"].append(run_plain(root, run_dir, args, seed))
    meta = dict(machine_info("accuracy_proxy", argv), load_start=load_start, load_end=round(os.getloadavg()[0], 2),
                total_s=time.perf_counter() - start)
    print(f"# {meta['command']}")
    print(json.dumps({k: meta[k] for k in ("date", "cpu", "cores", "torch")}))
    print(f"{MODEL} from scratch at {args.img_size} px, {args.epochs} epochs, bs {args.bs}, "
          f"{args.max_per_class or 'all'} photos per class (80/20 split per seed), seeds {args.seeds}; "
          f"1-min load at start {load_start}, at end {meta['load_end']}; total {meta['total_s'] / 60:.1f} min\n")
    rows = [[name, mean_std([r["final"] for r in rs]), mean_std([r["best"] for r in rs]),
             " / ".join(f"{100 * r['final']:.1f}" for r in rs), statistics.mean(r["wall_s"] for r in rs)]
            for name, rs in ((f"ours (train.py {args.ours_args or 'recipe'})", results["ours"]),
                             ("plain PyTorch loop", results["plain"]))]
    print(markdown_table(["recipe", "valid acc % last epoch", "valid acc % best epoch", "per seed (last)",
                          "s per run"], rows))
    gain = 100 * (statistics.mean(r["final"] for r in results["ours"])
                  - statistics.mean(r["final"] for r in results["plain"]))
    print(f"\n- ours - plain (last epoch, mean over seeds): {gain:+.1f} points "
          f"(goal >= +{GOAL_POINTS:.0f}: {'met' if gain >= GOAL_POINTS else 'NOT met'})")
    save_results("accuracy_proxy", args, dict(meta=meta, args=vars(args), results=results), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
