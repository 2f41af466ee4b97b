"""One training run, top to bottom: arguments -> data check and split -> model (pretrained resolved)
-> fastai Learner -> freeze/unfreeze fine-tune -> run folder (+ exported .pth).

The run folder holds learner.pkl (fastai export), best.pth (best weights on valid accuracy), zeroshot.pth
(a pretrained CLIP run's zero-shot model, for WiSE-FT: export.py --wise-ft), history.csv, metrics.json
(config, class counts, sanity check, best accuracy/epoch, calibration temperature, wall time), split.csv,
audit.json (data audit), the evaluation of the best weights on the valid split, calibrated there, and on
the --test-pct test split that nothing tunes on (eval_metrics.json, predictions.csv, confusion_matrix.png,
top_losses.png, reliability.png, curves.png, and *_test files; see evaluate.py), lr_find.png/.json with
--lr auto and, when some files could not be decoded, skipped.csv.

--lr-find and --overfit-batch probe the learner the run would train, write their report into the run
folder (lr_find.png/.json, overfit_batch.json) and stop: no training, no export, no metrics.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from flowers_classifier import factory
from flowers_classifier.classes import CLASSES
from flowers_classifier.errors import FlowersError
from flowers_classifier.files import atomic_write, write_json
from flowers_classifier.payload import FAMILIES, default_model_path
from flowers_classifier.preprocess import Preprocess

from . import distributed
from .api import check_min_scale, cnn_drop_path, create_model, default_run_dir, flowers_dataloaders, flowers_learner
from .api import make_recipe as api_make_recipe
from .audit import AUDIT_MIN_SIZE
from .calibration import SPLITS, split_names
from .data import TEST_PCT, VALID_PCT, prepare_split
from .evaluate import evaluate_run, headline
from .export import ZEROSHOT_NAME, export_run
from .learner import (
    Recipe,
    export_learner,
    fine_tune,
    resolve_precision,
    resume_learner,
    seed_everything,
    valid_accuracy,
)
from .pretrained import CLIP_DEFAULT_TAG, check_clip_pretrained, check_cnn_pretrained
from .probes import SanityCheckError, find_lr, overfit_one_batch, sanity_check
from .recipes import PRESETS, SCRATCH, SHARED, describe, preset


def _lr_arg(text: str) -> float | str:
    """--lr: a positive number, or 'auto'."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a learning rate (e.g. 1e-3) or 'auto', not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"the learning rate must be positive, not {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's fixed default; a flag whose default depends on --arch says so in its own help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", formatter_class=_HelpFormatter,
        description="Fine-tune a flower classifier (timm ConvNeXt V2 or OpenCLIP ViT) with fastai, "
                    "then export it for flowers_classifier. Options without a fixed default take their "
                    "arch's preset (flowers_fastai/recipes.py), shown as 'default: cnn X, clip Y'.")
    p.add_argument("--arch", choices=FAMILIES, default="cnn",
                   help="backbone family: cnn = timm ConvNeXt V2, clip = OpenCLIP image encoder + linear head")
    p.add_argument("--model", help=f"timm name (cnn; arch default {PRESETS['cnn']['model']}) or open_clip name "
                                   f"(clip; arch default {PRESETS['clip']['model']})")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="data/flowers", help="folder laid out as <root>/<class>/<images>")
    g.add_argument("--valid-pct", type=float, default=VALID_PCT,
                   help="stratified validation fraction (picks the best epoch, early stopping, fits the temperature)")
    g.add_argument("--test-pct", type=float, default=TEST_PCT,
                   help="stratified test fraction that nothing trains or tunes on: metrics.json and eval_metrics.json "
                        "report accuracy, NLL, ECE and Brier on it (0: no test split)")
    g.add_argument("--max-per-class", type=int, help="use at most N images per class (quick runs)")
    g.add_argument("--img-size", type=int, help="square input size in pixels (arch default: the model's own)")
    g.add_argument("--bs", type=int, help=f"batch size per process ({describe('bs')}); with N processes "
                                          "(torchrun / accelerate launch) the effective batch is N x bs")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (default: 0 on CPU, 8 on GPU)")
    g.add_argument("--min-scale", type=float, help="RandomResizedCrop's smallest crop, as a fraction of the "
                                                   f"image area ({describe('min_scale')})")
    w = p.add_argument_group("weights (default: pretrained from the hub; fails fast when offline)")
    x = w.add_mutually_exclusive_group()
    x.add_argument("--no-pretrained", action="store_true",
                   help="random init (then, unless given: no frozen stage and one LR for all groups)")
    x.add_argument("--weights", type=Path,
                   help="local backbone weights: timm state dict / .safetensors (cnn) or open_clip checkpoint "
                        "(clip; for a file of OpenAI's weights use --model ViT-L-14-quickgelu, as they need QuickGELU)")
    w.add_argument("--pretrained-tag", default=CLIP_DEFAULT_TAG,
                   help="clip: open_clip pretrained tag (e.g. openai, laion2b_s32b_b82k, datacomp_xl_s13b_b90k)")
    o = p.add_argument_group("recipe")
    o.add_argument("--epochs", type=int, help=f"stage 2 (unfrozen) epochs ({describe('epochs')})")
    o.add_argument("--freeze-epochs", type=int,
                   help=f"stage 1 epochs training the head only ({describe('freeze_epochs')})")
    o.add_argument("--lr", type=_lr_arg,
                   help=f"stage 2 max LR of the head group ({describe('lr')}), or "
                        "'auto': fastai's lr_find on the model as stage 2 trains it, right before stage 2, picks "
                        "its valley suggestion (lr_find.png/.json)")
    o.add_argument("--head-lr", type=float, help=f"stage 1 (linear probe) max LR ({describe('head_lr')})")
    o.add_argument("--lr-mult", type=float,
                   help="cnn: stage 2 spreads LRs geometrically from lr/lr_mult (stem) to lr (head), "
                        f"fastai's lr=slice(lr/lr_mult, lr) ({describe('lr_mult')})")
    o.add_argument("--wd", type=float, help=f"AdamW decoupled weight decay ({describe('wd')})")
    o.add_argument("--label-smoothing", type=float,
                   help=f"label smoothing eps ({describe('label_smoothing')})")
    o.add_argument("--mixup", type=float, help=f"MixUp Beta alpha, 0 disables ({describe('mixup')})")
    o.add_argument("--cutmix", type=float, help=f"CutMix Beta alpha, 0 disables ({describe('cutmix')})")
    o.add_argument("--mix-prob", type=float, default=SHARED["mix_prob"],
                   help="probability that a batch is mixed at all")
    o.add_argument("--switch-prob", type=float, default=SHARED["switch_prob"],
                   help="with MixUp and CutMix both on: probability of CutMix for a mixed batch")
    o.add_argument("--grad-clip", type=float, default=SHARED["grad_clip"], help="max gradient norm, 0 disables")
    o.add_argument("--patience", type=int, default=SHARED["patience"],
                   help="early stopping patience in epochs, 0 disables")
    o.add_argument("--ema", type=float, default=SHARED["ema"], help="timm ModelEmaV3 decay (e.g. 0.999), 0 disables")
    o.add_argument("--seed", type=int, default=SHARED["seed"], help="seed for split, init, augmentation and order")
    o.add_argument("--deterministic", action="store_true", default=SHARED["deterministic"],
                   help="bit-reproducible runs on one machine, slower on a GPU: cuDNN's deterministic kernels with "
                        "benchmarking off, and torch's deterministic algorithms (an op without one warns). Without "
                        "it the seeds are still fixed, but cuDNN picks its fastest kernels, so two GPU runs agree "
                        "only up to rounding")
    o.add_argument("--precision", choices=("auto", "fp16", "bf16", "fp32"), default=SHARED["precision"],
                   help="auto = fp16 mixed precision on CUDA, fp32 on CPU; bf16 mixed precision (autocast, "
                        "fp32 weights) runs on CUDA and on the CPU; fp16 needs CUDA")
    o.add_argument("--bf16", action="store_const", const="bf16", dest="precision",
                   help="shortcut for --precision bf16 (CUDA or CPU)")
    o.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="train in channels_last memory format (default: on for cnn on CUDA, off otherwise)")
    e = p.add_argument_group("explore (instead of training: report into the run folder, then stop)")
    e.add_argument("--lr-find", action="store_true",
                   help="fastai lr_find with valley/slide/minimum/steep suggestions: lr_find.png + lr_find.json")
    e.add_argument("--lr-find-stage", choices=("frozen", "unfrozen"),
                   help="stage to probe (default: the one the run starts with, frozen unless --freeze-epochs 0)")
    e.add_argument("--lr-find-iters", type=int, default=100, help="lr_find steps (also used by --lr auto)")
    e.add_argument("--overfit-batch", action="store_true",
                   help="train every parameter at --lr (AdamW, no label smoothing, no MixUp) on one batch until "
                        "its loss < 0.1: overfit_batch.json; exit 1 if it does not get there")
    e.add_argument("--overfit-steps", type=int, default=200, help="most optimizer steps for --overfit-batch")
    c = p.add_argument_group("clip")
    c.add_argument("--llrd", type=float, metavar="DECAY",
                   help=f"clip: layer-wise LR decay DECAY in (0, 1] (default {PRESETS['clip']['llrd']:g}; "
                        f"{SCRATCH['llrd']:g} with --no-pretrained): "
                        "stage 2 LR of group g is lr * DECAY**(groups-1-g), equivalent to fastai "
                        "lr=slice(lr*DECAY**(groups-1), lr); groups = [patch embed + class/pos embed + ln_pre], "
                        "one per transformer block (24 for ViT-L-14), [ln_post + proj], [head]. "
                        "Replaces --lr-mult for clip")
    c.add_argument("--unfreeze-last", type=int, metavar="K",
                   help="stage 2 fine-tunes only the last K blocks (clip: transformer blocks, cnn: stages) and "
                        "everything above them (clip: ln_post+proj and head), via fastai freeze_to")
    c.add_argument("--head-init", choices=("zeroshot", "random"),
                   help="clip: start the head from CLIP's text embeddings of the class prompts (zeroshot; the "
                        "default with pretrained weights), or random (the default, and the only choice, with "
                        "--no-pretrained: a random text tower gives no zero-shot head)")
    c.add_argument("--grad-checkpointing", action="store_true", help="clip: trade compute for activation memory")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="run folder (default runs/<arch>-<time>)")
    out.add_argument("--export", type=Path, help="exported .pth path (default models/<cnn|vit>_flowers.pth)")
    out.add_argument("--no-export", action="store_true", help="leave exporting to export.py")
    out.add_argument("--tensorboard", action="store_true",
                     help="log train/valid loss, accuracy and LR into <run folder>/tensorboard "
                          "(view with: tensorboard --logdir runs/)")
    out.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue an interrupted run from its last finished epoch, with the run's own config "
                          "and split (other options are ignored)")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the arch's preset (recipes.py), from scratch with --no-pretrained."""
    for key, value in preset(args.arch, pretrained=not args.no_pretrained).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.arch == "clip" and args.head_init is None:
        args.head_init = "random" if args.no_pretrained else "zeroshot"
    check_min_scale(args.min_scale, "--min-scale ")
    resolve_precision(args.precision)  # --precision fp16 without CUDA fails here, before the data scan
    if args.out is None:
        args.out = default_run_dir(args.arch)
    if args.export is None and not args.no_export:
        args.export = default_model_path(args.arch)
    return args


def clip_pretrained(args: argparse.Namespace) -> str | Path | None:
    """--no-pretrained -> None, --weights FILE -> the file, else the --pretrained-tag (default openai)."""
    if args.no_pretrained:
        return None
    return args.weights if args.weights is not None else args.pretrained_tag


def check_clip_args(args: argparse.Namespace) -> None:
    """What can be checked before the data scan and the (large) download: --llrd's range, and that the
    weights exist (file, known tag, cached or downloadable: offline without a cache fails here)."""
    if not 0 < args.llrd <= 1:
        raise ValueError(f"--llrd {args.llrd}: the decay must be in (0, 1]; 1 means one LR for all groups.")
    if args.no_pretrained and args.head_init == "zeroshot":
        raise ValueError("--head-init zeroshot needs pretrained weights: with --no-pretrained the text tower is "
                         "random, so its 'zero-shot' head would be noise. Drop --head-init (random is then the "
                         "default) or pass --weights FILE / --pretrained-tag instead of --no-pretrained.")
    check_clip_pretrained(args.model, clip_pretrained(args))


def check_pretrained(args: argparse.Namespace) -> str:
    """Before the data scan, the weights and model checks of either family (offline without a cache, a
    missing --weights file, an unknown --model fail here, not after minutes of decoding images). Returns
    where the weights come from, in words, for the printed plan."""
    if args.arch == "clip":
        check_clip_args(args)
        hub = f"open_clip tag {args.model}/{args.pretrained_tag}"
    else:
        source = None if args.no_pretrained else (args.weights or "hub")
        hub = f"timm hub {check_cnn_pretrained(args.model, source)}"
    if args.no_pretrained:
        return "random init"
    return f"file {args.weights}" if args.weights else hub


def print_plan(args: argparse.Namespace, df: pd.DataFrame, weights: str) -> None:
    """What this run will do, printed before the model is built: a first epoch can take minutes on a CPU."""
    cuda = torch.cuda.is_available()
    device = f"cuda ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
    n = split_names(df).value_counts()
    shown = [s for s in SPLITS if s != "test" or n.get(s, 0)]  # no test split: the plan reads as before
    images = [f"images: {', '.join(f'{n.get(s, 0)} {s}' for s in shown)} (from {args.data})"]
    audit = Path(args.out) / "audit.json"
    dropped = json.loads(audit.read_text()).get("dropped_from_training", []) if audit.is_file() else []
    if dropped:
        images.append(f"left out: {len(dropped)} image(s), pixel-identical copies filed under different classes "
                      f"(no label to trust; listed in {audit}, dropped_from_training)")
    lines = [f"model: {args.model} ({args.arch})", f"weights: {weights}",
             f"device: {device}, precision {resolve_precision(args.precision)}", *images,
             f"epochs: {args.freeze_epochs} head only + {args.epochs} unfrozen, batch size {args.bs}",
             f"run folder: {args.out}"]
    if distributed.world_size() > 1:
        lines.insert(3, f"processes: {distributed.world_size()} data-parallel ({torch.distributed.get_backend()}), "
                        f"effective batch {distributed.world_size() * args.bs}")
    if args.arch == "clip":
        lines.insert(2, f"head init: {args.head_init}")
    print("\n".join(lines), flush=True)


def pretrained_arg(args: argparse.Namespace) -> bool | Path | str | None:
    """The API's `pretrained`: False for --no-pretrained, the --weights file, else True (hub / the clip tag)."""
    if args.no_pretrained:
        return False
    return args.weights if args.weights is not None else True


def build_model(args: argparse.Namespace, spec: dict | None = None) -> torch.nn.Module:
    """The run's model (api.create_model). With `spec` (--resume) its architecture offline and randomly
    initialised, as last.pth holds the weights, but with the run's own drop-path rate and gradient checkpointing."""
    if spec is None:
        return create_model(args.arch, args.model, pretrained_arg(args), args.img_size, args.head_init,
                            args.pretrained_tag, args.grad_checkpointing)
    if args.arch == "cnn":
        model = factory.create_cnn(spec["model_name"], num_classes=len(spec["classes"]),
                                   drop_path_rate=cnn_drop_path(not args.no_pretrained))
    else:
        model = factory.build_from_spec(spec)
        if args.grad_checkpointing:
            model.visual.set_grad_checkpointing(True)
    model.flowers_name = spec["model_name"]
    return model


def model_spec(args: argparse.Namespace, model: torch.nn.Module, prep: Preprocess) -> dict:
    """Plain metadata that rebuilds the architecture offline (see factory.build_from_spec)."""
    spec = dict(family=args.arch, model_name=args.model, classes=list(CLASSES), **prep.to_dict())
    if args.arch == "clip":
        spec["quick_gelu"] = model.quick_gelu
    return spec


def recipe_options(args: argparse.Namespace) -> dict:
    """The recipe flags as flowers_learner's options (lr_mult for cnn, llrd for clip; 0 disables)."""
    spread = dict(llrd=args.llrd) if args.arch == "clip" else dict(lr_mult=args.lr_mult)
    lr = None if args.lr == "auto" else args.lr  # --lr auto: set by lr_find right before stage 2
    return dict(epochs=args.epochs, freeze_epochs=args.freeze_epochs, head_lr=args.head_lr, lr=lr, **spread,
                unfreeze_last=args.unfreeze_last, wd=args.wd, label_smoothing=args.label_smoothing,
                mixup=args.mixup, cutmix=args.cutmix, mix_prob=args.mix_prob, switch_prob=args.switch_prob,
                grad_clip=args.grad_clip or None, patience=args.patience or None, ema_decay=args.ema or None,
                precision=args.precision, channels_last=args.channels_last, seed=args.seed)


def make_recipe(args: argparse.Namespace, n_groups: int) -> Recipe:
    return api_make_recipe(args.arch, n_groups, not args.no_pretrained, **recipe_options(args))


def make_learner(args: argparse.Namespace, df: pd.DataFrame, run_dir: Path, resumed: dict | None = None):
    """The run's model, DataLoaders and Learner, through the public API (flowers_dataloaders, flowers_learner)."""
    model = build_model(args, resumed["model"] if resumed else None)
    dls = flowers_dataloaders(args.data, args.arch, model=model, img_size=args.img_size, bs=args.bs,
                              seed=args.seed, min_scale=args.min_scale, pretrained=pretrained_arg(args),
                              num_workers=args.workers, run_dir=run_dir, split=df)
    options = dict(recipe=Recipe(**resumed["recipe"])) if resumed else recipe_options(args)
    return flowers_learner(dls, args.arch, model=model, pretrained=pretrained_arg(args),
                           tensorboard=args.tensorboard, **options)


def explore(args: argparse.Namespace, learn, recipe: Recipe, run_dir: Path) -> None:
    """--lr-find / --overfit-batch: probe the learner this run would train, report, and stop."""
    if args.lr_find:
        stage = args.lr_find_stage or ("frozen" if recipe.freeze_epochs > 0 else "unfrozen")
        found = find_lr(learn, stage, run_dir, args.lr_find_iters, recipe.unfreeze_last)
        print(f"lr_find, {stage} stage: " + ", ".join(f"{k} {v:.2e}" for k, v in found["suggestions"].items()))
        print(f"wrote {run_dir / 'lr_find.png'} and {run_dir / 'lr_find.json'}")
    if args.overfit_batch:
        result = overfit_one_batch(learn, recipe.lr or recipe.head_lr, args.overfit_steps)
        write_json(run_dir / "overfit_batch.json", result)
        verdict = "reached" if result["success"] else "did NOT reach"
        print(f"overfit one batch of {result['batch_size']}: loss {result['final_loss']:.4f} after "
              f"{result['steps']} steps at lr {result['lr']:.1e} ({verdict} < {result['target']}); "
              f"wrote {run_dir / 'overfit_batch.json'}")
        if not result["success"]:
            raise SanityCheckError(f"the model could not overfit one batch in {args.overfit_steps} steps (loss "
                                   f"{result['final_loss']:.4f}); check labels and preprocessing, or raise --lr "
                                   f"or --overfit-steps.")


def fine_tune_auto_lr(learn, recipe: Recipe, run_dir: Path, num_it: int) -> dict:
    """--lr auto: stage 1 as configured, then fastai's lr_find on the model as stage 2 trains it (head
    trained, body unfrozen); its valley suggestion becomes stage 2's LR. Returns the metrics.json record."""
    fine_tune(learn, replace(recipe, epochs=0))

    def valley() -> float:  # several processes: rank 0 alone, on its own (weights restored after), outside DDP
        with distributed.outside_ddp(learn):
            return find_lr(learn, "unfrozen", run_dir, num_it, recipe.unfreeze_last)["suggestions"]["valley"]
    recipe.lr = distributed.on_main(valley)  # the same LR on every rank
    print(f"--lr auto: lr_find valley suggestion {recipe.lr:.2e} is stage 2's LR (see {run_dir / 'lr_find.png'})")
    fine_tune(learn, replace(recipe, freeze_epochs=0))
    return dict(valley=recipe.lr, used_for="lr", stage="unfrozen", file="lr_find.json")


def _best_from_history(path: Path) -> tuple[float, int]:
    hist = pd.read_csv(path)
    best = hist["accuracy"].idxmax()
    return float(hist.loc[best, "accuracy"]), int(hist.loc[best, "epoch"])


class TrainingInterrupted(FlowersError):
    """Ctrl-C during training; the message says how to resume."""


def read_metrics(run_dir: Path) -> dict:
    """metrics.json of a run to resume; refuses finished or foreign folders."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no metrics.json there; is it a train.py run folder?")
    metrics = json.loads(path.read_text())
    if metrics.get("status") == "finished":
        raise FileExistsError(f"--resume {run_dir}: that run already finished; export it with export.py.")
    if metrics["recipe"]["lr"] is None:  # --lr auto, stopped before its lr_find picked the LR
        raise ValueError(f"--resume {run_dir}: the run was interrupted before --lr auto chose its LR; "
                         f"start it again instead.")
    return metrics


def resume_args(run_dir: Path) -> argparse.Namespace:
    """The interrupted run's own options (metrics.json config), pointed back at its folder. Several processes:
    rank 0's metrics.json, sent to the other ranks (their machines need no copy of the run folder)."""
    distributed.init()
    config = distributed.on_main(lambda: read_metrics(run_dir))["config"]
    args = build_parser().parse_args([])
    for key, value in config.items():
        setattr(args, key, Path(value) if key in ("out", "weights", "export") and value else value)
    args.out, args.resume = Path(run_dir), Path(run_dir)
    return args


def train(args: argparse.Namespace) -> Path:
    """Run one training as configured by `args` (see build_parser); returns the run folder."""
    distributed.check_launch()
    args = resolve_args(args)
    start = time.time()
    run_dir = Path(args.out)
    if distributed.world_size() > 1:
        if args.lr_find or args.overfit_batch:
            raise ValueError("--lr-find and --overfit-batch are single-process explorations: run them with "
                             "`python train.py --lr-find ...` (or --overfit-batch), then launch the processes "
                             "with --lr VALUE (or --lr auto).")
        distributed.init()
    # Several processes: only rank 0's run folder counts (read there, sent to the other ranks by on_main).
    resumed = distributed.on_main(lambda: read_metrics(run_dir)) if args.resume else None
    if resumed and resumed.get("world_size", 1) != distributed.world_size():
        raise ValueError(f"--resume {run_dir}: the run trained with {resumed.get('world_size', 1)} process(es), "
                         f"this launch has {distributed.world_size()}; resume it with the same number of "
                         f"processes (the one-cycle schedule and the batches per epoch depend on it).")
    if resumed is None and distributed.on_main((run_dir / "metrics.json").exists):
        raise FileExistsError(f"--out {run_dir} already holds a run; choose another --out folder "
                              f"(or continue it with --resume {run_dir}).")
    # e.g. offline without cached weights, or a missing --weights file: say so before the data scan.
    weights = "last.pth of the interrupted run" if resumed else check_pretrained(args)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed, args.deterministic)

    # 1. Data: every folder problem surfaces here, before a model is built (a resumed run keeps its split).
    #    Several processes: rank 0 writes split.csv and audit.json and sends the table to the others (their
    #    run folders, on other machines, may not hold it).
    def split() -> pd.DataFrame:
        if resumed:
            return pd.read_csv(run_dir / "split.csv")
        return prepare_split(args.data, run_dir, args.valid_pct, args.seed, args.max_per_class,
                             min_size=args.img_size or AUDIT_MIN_SIZE,  # audit.json: duplicates, small images, ...
                             test_pct=args.test_pct)  # test rows: in split.csv, never in the DataLoaders
    df = distributed.on_main(split)
    if distributed.is_main():
        print_plan(args, df, weights)

    # 2-3. Model (pretrained weights resolved in flowers_fastai.pretrained: hub, tag, local file or random
    #    init; a resumed run rebuilds its architecture offline and takes its weights from last.pth), fastai
    #    DataLoaders and Learner: the public API (api.py) a notebook uses too.
    learn = make_learner(args, df, run_dir, resumed)
    model, recipe, n_groups = learn.model, learn.recipe, learn.flowers["n_groups"]
    spec = model_spec(args, model, learn.flowers["prep"])
    if args.lr_find or args.overfit_batch:  # explore instead of training
        explore(args, learn, recipe, run_dir)
        return run_dir
    if resumed:
        return finish(args, learn, recipe, resumed, start, epochs_done=resume_learner(learn, recipe))
    names = split_names(df)
    counts = {split: df[names == split]["label"].value_counts().reindex(CLASSES, fill_value=0).tolist()
              for split in SPLITS if split != "test" or (names == "test").any()}
    metrics = dict(status="running", world_size=distributed.world_size(), model=spec, recipe=vars(recipe),
                   param_groups=n_groups,
                   config={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   classes=list(CLASSES), class_counts=counts,
                   skipped_files=int(len(open(run_dir / "skipped.csv").readlines()) - 1)
                   if (run_dir / "skipped.csv").exists() else 0)
    # Before any step: loss near ln(5) (below it for a zero-shot head) and a gradient that flows.
    metrics["sanity"] = sanity_check(learn, expect_chance=args.arch == "cnn" or args.head_init == "random")
    if args.arch == "clip" and args.head_init == "zeroshot":
        if distributed.is_main():
            save_zeroshot(model, run_dir)  # WiSE-FT (export.py --wise-ft) interpolates towards it
        metrics["zero_shot_accuracy"] = valid_accuracy(learn)
        print(f"zero-shot valid accuracy before training: {metrics['zero_shot_accuracy']:.4f}")
    if distributed.is_main():
        write_json(run_dir / "metrics.json", metrics)
    return finish(args, learn, recipe, metrics, start)


def save_zeroshot(model: torch.nn.Module, run_dir: Path) -> Path:
    """The zero-shot CLIP model (encoder + text-embedding head) before any step, as zeroshot.pth: what
    WiSE-FT interpolates the fine-tuned weights with. fp32 and a copy: training updates `model` in place.
    Only for pretrained weights (check_clip_args refuses a zero-shot head with --no-pretrained)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return atomic_write(run_dir / f"{ZEROSHOT_NAME}.pth", lambda tmp: torch.save(state, tmp))


def finish(args: argparse.Namespace, learn, recipe: Recipe, metrics: dict, start: float,
           epochs_done: dict[str, int] | None = None) -> Path:
    """Steps 4-5 of a run (also what --resume runs): train, then save, evaluate and export."""
    run_dir = Path(args.out)
    # 4. Train: linear probe, then fine-tune with discriminative LRs; best weights end up loaded. Ctrl-C
    #    leaves best.pth, last.pth and history.csv as of the last finished epoch: --resume continues.
    #    Several processes: data-parallel (distributed.py), rank 0 alone writes; the others stop after training.
    try:
        with distributed.distributed_fit(learn) as trainer:
            if args.lr == "auto" and epochs_done is None:
                metrics["lr_auto"] = fine_tune_auto_lr(learn, recipe, run_dir, args.lr_find_iters)
            else:
                fine_tune(learn, recipe, epochs_done)
    except KeyboardInterrupt:
        metrics.update(status="interrupted", wall_time_s=round(time.time() - start, 1))
        if distributed.is_main():
            write_json(run_dir / "metrics.json", metrics)
        raise TrainingInterrupted(f"interrupted; best.pth and history.csv hold every finished epoch. "
                                  f"Continue with: python train.py --resume {run_dir}") from None

    if distributed.world_size() > 1:
        metrics["distributed"] = distributed.summary(trainer, learn)  # collective: every rank
        print(f"rank {distributed.rank()}: train shard {metrics['distributed']['train_shards'][distributed.rank()]}"
              f" images per epoch, weights in sync {metrics['distributed']['weights_in_sync']}", flush=True)
        if not distributed.is_main():
            return run_dir
    metrics["world_size"] = distributed.world_size()

    # 5. Save: fastai export (for fastai users), metrics, and the plain payload for serving.
    atomic_write(run_dir / "learner.pkl", lambda tmp: export_learner(learn, Path(tmp).absolute()))
    best_acc, best_epoch = _best_from_history(run_dir / "history.csv")
    # The best weights as the exported payload serves them, on the valid split (and the test split when there
    # is one): eval_metrics.json + plots.
    evaluation = evaluate_run(run_dir, args.data, bs=args.bs)  # calibrated on valid: T is fitted here
    metrics["evaluation"] = headline(evaluation)
    temperature = evaluation["calibration"]["temperature"]
    print(f"calibration: temperature {temperature:.3f}, valid ECE {evaluation['calibration']['raw']['ece']:.4f} -> "
          f"{evaluation['calibration']['calibrated']['ece']:.4f}")
    if "test" in evaluation:
        test, c = evaluation["test"], evaluation["test"]["calibration"]
        print(f"test split ({test['n_images']} images, never tuned on): accuracy {test['accuracy']:.4f}, "
              f"ECE {c['raw']['ece']:.4f} -> {c['calibrated']['ece']:.4f}, NLL {c['raw']['nll']:.4f} -> "
              f"{c['calibrated']['nll']:.4f}, Brier {c['raw']['brier']:.4f} -> {c['calibrated']['brier']:.4f}")
    metrics.update(status="finished", best_accuracy=best_acc, best_epoch=best_epoch,
                   wall_time_s=round(time.time() - start, 1))
    write_json(run_dir / "metrics.json", metrics)
    print(f"best valid accuracy {best_acc:.4f} at epoch {best_epoch}; run folder {run_dir}")
    if args.export:
        path = export_run(run_dir, args.export, temperature=temperature)  # the T just fitted on these weights
        print(f"exported {path}")
    return run_dir
