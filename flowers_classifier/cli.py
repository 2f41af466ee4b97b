"""`python -m flowers_classifier PATH... [--model models/cnn_flowers.pth] [--top-k 3] [--json OUT] [--bs N]`:
predict image files and folders (searched recursively) with an exported model, in batches: one line per image on
stdout, errors on stderr, and optionally every record as JSON. `build_parser` and `run` are what `flowers-predict`
(flowers_apps.cli: the same job, in this process or on Ray, and --out CSV/Parquet) builds on.

Also what every command-line entry point of the project shares: `quiet_third_party_warnings`, called by
the entry points only (never on import, so code importing the library keeps Python's own filters).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from tqdm.auto import tqdm

from .backends import BACKENDS
from .classes import CLASSES
from .files import write_json
from .inference import error_record, find_images, iter_predictions, load_model
from .model import FlowerClassifier
from .payload import default_model_path
from .preprocess import IMAGE_SUFFIXES

# Deprecation notices from torch, timm, fastai, pandas, numpy and gradio are meant for the developers
# of those libraries (e.g. "`torch.jit.script` is deprecated", emitted while fastai is imported); a
# user of our CLIs can do nothing about them. Our own code issues neither category.
NOISE_CATEGORIES = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# UserWarnings with the same nature: about how a library is used internally, not about the user's input.
NOISE_MESSAGES = (".*mode.chained_assignment.*", ".*load_learner.*insecure pickle.*",
                  ".*copy keyword is deprecated.*")


def quiet_third_party_warnings() -> None:
    """Hide third-party deprecation noise for this process. Python's -W flag or PYTHONWARNINGS (both
    land in sys.warnoptions) turn this off, so a developer can still see every warning."""
    if sys.warnoptions:
        return
    for category in NOISE_CATEGORIES:
        warnings.filterwarnings("ignore", category=category)
    for message in NOISE_MESSAGES:
        warnings.filterwarnings("ignore", message=message)


def _top_k(record: dict, k: int) -> str:
    ranked = sorted(record["probabilities"].items(), key=lambda kv: kv[1], reverse=True)[:k]
    return f"{record['image_path']}\t" + "  ".join(f"{c} {p:.3f}" for c, p in ranked)


def build_parser(prog: str = "python -m flowers_classifier") -> argparse.ArgumentParser:
    """The batch CLI's parser, in argument groups; flowers-predict (flowers_apps.cli) adds its engine group to it."""
    p = argparse.ArgumentParser(prog=prog,
                                description="Predict the flower class of image files and folders (searched "
                                            "recursively) with an exported model, in batches.")
    p.add_argument("paths", nargs="+", help="image files and/or folders")
    m = p.add_argument_group("model")
    m.add_argument("--model", type=Path, default=default_model_path("cnn"),
                   help=f"exported .pth (cnn or clip) or .onnx (default: {default_model_path('cnn')})")
    m.add_argument("--uncalibrated", action="store_true",
                   help="raw softmax confidences, ignoring the temperature the model was calibrated with at export")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="what runs the model (default auto: see load_model)")
    g.add_argument("--int8", dest="backend", action="store_const", const="int8",
                   help="serve a .pth int8 on the CPU (as --backend int8)")
    g.add_argument("--fp32", dest="backend", action="store_const", const="eager",
                   help="serve a .pth unquantised even if it asks for int8 (as --backend eager)")
    o = p.add_argument_group("output")
    o.add_argument("--top-k", type=int, default=3, help="classes printed per image (default 3)")
    o.add_argument("--json", type=Path, help="also write one record per image to this JSON file")
    o.add_argument("--bs", type=int, default=32, help="images per forward pass (default 32)")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """`args` when its values are in range; else the parser's usage error (exit 2) naming the flag."""
    if not 1 <= args.top_k <= len(CLASSES):
        parser.error(f"--top-k must be between 1 and {len(CLASSES)}, not {args.top_k}")
    if args.bs < 1:
        parser.error(f"--bs must be at least 1, not {args.bs}")
    return args


# What runs the job: (the model loaded here, the image files, bs) -> one record per file, in order. The default is
# in this process; flowers-predict --engine ray passes a Ray Data pipeline (flowers_apps.batch).
Predictions = Callable[[FlowerClassifier, list[Path], int], Iterable[dict]]


def run(args: argparse.Namespace, predictions: Predictions = iter_predictions,
        write: Callable[[list[dict]], None] | None = None) -> int:
    """The job `args` asks for (build_parser's), predicted by `predictions`: one line per image (path, top-k
    classes with confidences), errors on stderr, --json, then `write(records)` (flowers-predict's --out). Exit code
    0 when every image was predicted, 1 when some could not be read, 2 when nothing could run."""
    quiet_third_party_warnings()
    try:
        model = load_model(args.model, backend=args.backend, calibrated=not args.uncalibrated)
    except ValueError as e:  # ModelFileError, or BackendError (--int8 where the model would run on a GPU)
        print(f"error: {e} (--model)", file=sys.stderr)
        return 2
    paths, records = [], []
    for arg in args.paths:
        found = find_images([arg])
        if not found:  # only a folder comes back empty
            records.append(error_record(arg, f"{arg}: folder holds no image files "
                                              f"({', '.join(sorted(IMAGE_SUFFIXES))})"))
            print(f"error: {records[-1]['error']}", file=sys.stderr)
        paths += found
    if not paths:
        print("error: nothing to predict; pass image files or folders holding them.", file=sys.stderr)
        return 2
    # A progress bar on a terminal only; tqdm.write keeps it below the result lines.
    with tqdm(total=len(paths), unit="image", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        for record in predictions(model, paths, args.bs):
            if record["error"]:
                bar.write(f"error: {record['error']}", file=sys.stderr)
            else:
                bar.write(_top_k(record, args.top_k), file=sys.stdout)
            records.append(record)
            bar.update()
    if args.json:
        write_json(args.json, records)
    if write:
        write(records)
    failed = sum(r["error"] is not None for r in records)
    print(f"{len(records) - failed} image(s) predicted, {failed} failed"
          + (f"; records in {args.json}" if args.json else ""), file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m flowers_classifier`: the batch job in this process (see run)."""
    parser = build_parser()
    return run(check_args(parser, parser.parse_args(argv)))
