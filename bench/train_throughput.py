"""Training throughput: our fastai path vs a plain PyTorch + timm loop, same model, data, size and batch.

    python -m bench.train_throughput [--epochs 1] [--max-images 1600] [--model convnextv2_atto]
                                     [--img-size 112] [--bs 32] [--workers 0,2] [--repeats 2] [--channels-last]
                                     [--ours-timm-grn] [--wait-quiet] [--json OUT | --no-save]

ours:  flowers_fastai.data.make_dataloaders + learner.build_learner + fine_tune (the CNN recipe from random
       init as `train.py --no-pretrained` runs it: gradient clipping, one-cycle, per-epoch checkpoints,
       history.csv; its from-scratch MixUp/label smoothing/crop settings), fastai's DataLoader and
       aug_transforms. What makes it fast: flowers_classifier.model.FastGlobalResponseNorm (ConvNeXt V2's GRN in fewer,
       faster passes).
plain: bench/plain_loop.py (timm's model as built, torchvision transforms in DataLoader workers, AdamW,
       warmup + cosine).

Both run --repeats times per --workers value (DataLoader worker processes; train.py uses 0 on a CPU), in
ABBA order (ours, plain, plain, ours) so that a drifting machine load favours neither. Reported, pooled:
train-phase images/s (data loading included, validation excluded) and the whole epoch (+ validation).
This script compares on the CPU; the GPU comparison (ours there: fp16/bf16 MixedPrecision, channels_last,
batch augmentation on the GPU; the plain loop with autocast, PlainConfig.device) is bench/gpu_check.py's.
Photos: FLOWERS128_DIR (skipped cleanly when absent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from bench.common import (
    add_output_args,
    machine_info,
    markdown_table,
    require_flowers,
    save_results,
    verdict,
    wait_for_quiet,
)
from bench.plain_loop import PlainConfig, train_plain
from bench.report import GOALS

GOAL = GOALS["train_throughput"].threshold  # ours images/s / the plain loop's


def split_table(root: Path, max_images: int | None, seed: int):
    """The same stratified 80/20 split for both loops, at most `max_images` photos (per class in proportion)."""
    from flowers_fastai.data import scan_folder, stratified_split
    df = scan_folder(root)
    if max_images and max_images < len(df):
        df = (df.groupby("label", group_keys=False).sample(frac=max_images / len(df), random_state=seed)
                .sort_values("path").reset_index(drop=True))
    return stratified_split(df, 0.2, seed)


def train_ours(df, root: Path, cfg: PlainConfig, fast_grn: bool = True) -> dict:
    """fastai: make_dataloaders + build_learner + fine_tune; a callback times the train phase of each epoch."""
    from fastai.callback.core import Callback

    from flowers_classifier import factory
    from flowers_fastai.data import make_dataloaders
    from flowers_fastai.learner import Recipe, build_learner, fine_tune, seed_everything
    from flowers_fastai.recipes import preset

    class Timer(Callback):
        order = 71  # after the Recorder (50) and HistoryCallback (70): recorder.log holds this epoch

        def __init__(self):
            self.history = []

        def before_epoch(self):
            self.epoch_start = time.perf_counter()

        def before_train(self):
            self.start, self.seen = time.perf_counter(), 0

        def after_batch(self):
            if self.training:
                self.seen += len(self.learn.xb[0])

        def after_train(self):
            self.train_s = time.perf_counter() - self.start

        def after_epoch(self):
            self.history.append(dict(train_s=self.train_s, train_images=self.seen,
                                     accuracy=float(self.recorder.log[3]),
                                     epoch_s=time.perf_counter() - self.epoch_start))

    seed_everything(cfg.seed)
    model = factory.create_cnn(cfg.model, fast_grn=fast_grn)
    prep = factory.cnn_preprocess(model, cfg.img_size)
    scratch = preset("cnn", pretrained=False)  # what train.py --no-pretrained uses (the LR: the plain one)
    recipe = Recipe(epochs=cfg.epochs, freeze_epochs=0, lr=cfg.lr, lr_mult=1.0, mixup=scratch["mixup"],
                    label_smoothing=scratch["label_smoothing"], patience=None, wd=cfg.wd, seed=cfg.seed,
                    channels_last=cfg.channels_last)
    with tempfile.TemporaryDirectory(prefix="bench-ours-") as run_dir:
        dls = make_dataloaders(df, root, prep, bs=cfg.bs, num_workers=cfg.workers, min_scale=scratch["min_scale"])
        learn = build_learner(dls, model, recipe, run_dir)
        timer = Timer()
        learn.add_cb(timer)
        with contextlib.redirect_stdout(sys.stderr):  # history lines: progress, not results
            fine_tune(learn, recipe)
    return dict(history=timer.history, accuracy=timer.history[-1]["accuracy"])


def warm_up(model_name: str, bs: int, img_size: int, steps: int = 3) -> None:
    """A few untimed training steps first: the first run in a process pays for oneDNN kernel creation and
    allocator growth, and it would otherwise always be the same loop's first run."""
    import timm
    import torch
    model = timm.create_model(model_name, num_classes=5)
    x, y = torch.randn(bs, 3, img_size, img_size), torch.randint(0, 5, (bs,))
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x), y).backward()


def images_per_s(history: list[dict]) -> float:
    return sum(e["train_images"] for e in history) / sum(e["train_s"] for e in history)


def summarise(name: str, workers: int, results: list[dict]) -> dict:
    """One row over the repeats: images/s = all train images / all train seconds; per-run seconds averaged."""
    h = [e for r in results for e in r["history"]]
    train_s = sum(e["train_s"] for e in h)
    return dict(loop=name, workers=workers, images_per_s=images_per_s(h), train_s=train_s / len(results),
                epoch_s=sum(e["epoch_s"] for e in h) / len(results), accuracy=results[0]["accuracy"],
                runs_images_per_s=[images_per_s(r["history"]) for r in results])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-images", type=int, default=1600, help="photos used, train + valid (default 1600; 0: all)")
    p.add_argument("--model", default="convnextv2_atto", help="timm model name (default convnextv2_atto)")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--bs", type=int, default=32)
    p.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 2],
                   help="comma-separated DataLoader worker counts, each run for both loops (default 0,2)")
    p.add_argument("--channels-last", action="store_true", help="both loops: model and batches channels_last")
    p.add_argument("--repeats", type=int, default=2, help="runs of each loop per --workers value, in ABBA order, "
                                                             "pooled (default 2)")
    p.add_argument("--ours-timm-grn", action="store_true",
                   help="ablation: our loop with timm's GlobalResponseNorm instead of FastGlobalResponseNorm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", action="store_true", help="first wait (<= 15 min) for a 1-min load below 0.7")
    add_output_args(p)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.bs < 1 or args.repeats < 1 or args.img_size < 32 or min(args.workers) < 0:
        p.error("--epochs, --bs and --repeats must be >= 1, --img-size >= 32, --workers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    import os

    import torch
    args = parse_args(argv)
    root = require_flowers("bench.train_throughput")
    df = split_table(root, args.max_images, args.seed)
    load_start = wait_for_quiet() if args.wait_quiet else round(os.getloadavg()[0], 2)
    from flowers_classifier.classes import CLASSES
    warm_up(args.model, args.bs, args.img_size)
    rows = []
    for workers in args.workers:
        cfg = PlainConfig(model=args.model, img_size=args.img_size, bs=args.bs, epochs=args.epochs, workers=workers,
                          channels_last=args.channels_last, seed=args.seed)
        runs = {"ours (fastai)": [], "plain PyTorch": []}
        train = {"ours (fastai)": partial(train_ours, df, root, cfg, not args.ours_timm_grn),
                 "plain PyTorch": partial(train_plain, df, root, CLASSES, cfg)}
        for r in range(args.repeats):  # ours, plain, plain, ours, ...: a drifting load favours neither
            for name in (list(train) if r % 2 == 0 else list(train)[::-1]):
                print(f"workers {workers}, repeat {r + 1}: {name} ...", file=sys.stderr, flush=True)
                runs[name].append(train[name]())
        rows += [summarise(name, workers, results) for name, results in runs.items()]
    meta = dict(machine_info("train_throughput", argv), load_start=load_start, load_end=round(os.getloadavg()[0], 2),
                torch_threads=torch.get_num_threads(), train_images=int((~df.is_valid).sum()),
                valid_images=int(df.is_valid.sum()))
    print(f"# {meta['command']}")
    print(json.dumps({k: meta[k] for k in ("date", "cpu", "cores", "torch", "torch_threads")}))
    print(f"{args.model} at {args.img_size} px, bs {args.bs}, {args.epochs} epoch(s) x {args.repeats} repeats (ABBA), "
          f"{meta['train_images']} train / "
          f"{meta['valid_images']} valid photos, {'channels_last' if args.channels_last else 'NCHW'}, random init"
          f"{', ours with timm GRN' if args.ours_timm_grn else ''}; "
          f"1-min load at start {load_start}, at end {meta['load_end']}\n")
    print(markdown_table(["loop", "workers", "train img/s", "per run img/s", "train s", "epoch s (+valid)",
                          "valid acc %"],
                         [[r["loop"], r["workers"], r["images_per_s"],
                           " / ".join(f"{v:.1f}" for v in r["runs_images_per_s"]),
                           r["train_s"], r["epoch_s"], 100 * r["accuracy"]] for r in rows]))
    print()
    by = {(r["loop"], r["workers"]): r["images_per_s"] for r in rows}
    for workers in args.workers:
        ratio = by[("ours (fastai)", workers)] / by[("plain PyTorch", workers)]
        print(f"- workers {workers}: ours / plain train images/s {verdict(ratio, GOAL, True)}")
    best_ours = max(v for (loop, _), v in by.items() if loop.startswith("ours"))
    best_plain = max(v for (loop, _), v in by.items() if loop.startswith("plain"))
    print(f"- best of each: ours / plain {verdict(best_ours / best_plain, GOAL, True)}")
    save_results("train_throughput", args, dict(meta=meta, args=vars(args), rows=rows), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
