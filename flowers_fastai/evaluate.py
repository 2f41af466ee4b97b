"""Evaluation of an exported model or a run folder, measured through `flowers_classifier`: the code that
serves predictions, not fastai's validation loop.

    python -m flowers_fastai.evaluate MODEL.pth --data DIR [--tta] [--out DIR] [--bs N]
    python -m flowers_fastai.evaluate RUN_DIR [--data DIR] [--tta] [--out DIR] [--bs N]

- MODEL.pth: every image under --data (a <root>/<class>/<images> folder).
- RUN_DIR (a train.py run folder): the valid rows of its split.csv, read from --data or else from the run's
  own data folder. Its best weights are exported to a temporary payload first, as export.py would write
  them. train.py runs this at the end of every training.

Writes into --out (default: the run folder, or runs/eval-<name> for a .pth):
- eval_metrics.json: accuracy, cross-entropy (no label smoothing), per-class precision/recall/F1, macro-F1,
  the confusion matrix, the majority-class and uniform-random baselines, with --tta the same under
  test-time augmentation, and the files that could not be read. Not named metrics.json, so a run's
  training metrics are never overwritten.
- predictions.csv (path, label, predicted, confidence, loss per image), confusion_matrix.png,
  top_losses.png, and curves.png when the folder holds a history.csv.
"""

from __future__ import annotations

if __name__ == "__main__":  # run as a CLI: importing fastai below warns, so filter first (flowers_fastai/cli.py)
    from flowers_classifier.cli import quiet_third_party_warnings

    quiet_third_party_warnings()

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import flowers_classifier as fc
from flowers_classifier.classes import CLASSES
from flowers_classifier.files import atomic_write, write_json
from flowers_classifier.preprocess import Preprocess, load_rgb, preprocess_image, resize_center_crop, tta_views

from .export import ExportError, export_run
from .metrics import classification_metrics
from .plots import plot_confusion_matrix, plot_curves, plot_image_grid

TOP_LOSSES = 9


class EvaluationError(ValueError):
    """The model or the images to evaluate cannot be found. The message names the path and the flag."""


# --------------------------------------------------------------------------- what to evaluate

def folder_images(data: str | Path) -> tuple[Path, pd.DataFrame]:
    """Every image under a <root>/<class>/<images> folder (data.scan_folder's table)."""
    from .data import DatasetError, scan_folder
    try:
        return Path(data), scan_folder(data)
    except DatasetError as e:
        raise EvaluationError(str(e)) from e


def run_valid_images(run_dir: Path, data: str | Path | None = None) -> tuple[Path, pd.DataFrame]:
    """The valid rows of a run's split.csv and the folder they are relative to."""
    split = run_dir / "split.csv"
    if not split.is_file():
        raise EvaluationError(f"{split} not found: is {run_dir} a train.py run folder? Pass a run folder "
                              f"or an exported .pth with --data DIR.")
    if data is None:
        metrics = run_dir / "metrics.json"
        if not metrics.is_file():
            raise EvaluationError(f"{metrics} not found, so the run's data folder is unknown; pass --data DIR.")
        data = json.loads(metrics.read_text())["config"]["data"]
    root = Path(data)
    if not root.is_dir():
        raise EvaluationError(f"the images of {run_dir} were read from {root}, which does not exist here; "
                              f"pass the data folder with --data DIR.")
    df = pd.read_csv(split)
    return root, df[df["is_valid"]].reset_index(drop=True)


# --------------------------------------------------------------------------- evaluation

def _top_losses(root: Path, df: pd.DataFrame, prep: Preprocess, path: Path) -> Path:
    worst = df.sort_values("loss", ascending=False).head(TOP_LOSSES)
    images = [resize_center_crop(load_rgb(root / p), prep.image_size, prep.crop_pct, prep.interpolation)
              for p in worst["path"]]  # what the model saw
    titles = [f"{Path(r.path).name[:28]}\npredicted {r.predicted} ({r.confidence:.2f})\n"
              f"actual {r.label} ({r.p_actual:.2f}), loss {r.loss:.2f}" for r in worst.itertuples()]
    return plot_image_grid(images, titles, path, suptitle=f"top {len(images)} losses (of {len(df)} images)")


def predict_table(model: fc.FlowerClassifier, root: Path, df: pd.DataFrame, tta: bool = False,
                  bs: int = 32) -> tuple[pd.DataFrame, np.ndarray, np.ndarray | None, list[dict]]:
    """(rows that could be read, their probabilities, their TTA probabilities or None, skipped files)."""
    load = tta_views if tta else preprocess_image
    kept, probs, tta_probs, skipped = [], [], [], []
    results = fc.iter_probabilities(model, [root / p for p in df["path"]], bs=bs, load=load)
    for i, (_, p, error) in enumerate(results):
        if error is not None:
            skipped.append(dict(path=df["path"].iat[i], error=error))
            continue
        kept.append(i)
        probs.append((p[0] if tta else p).numpy())  # view 0 is the served crop
        if tta:
            tta_probs.append(p.mean(0).numpy())
    if not kept:
        raise EvaluationError(f"none of the {len(df)} images under {root} could be read.")
    rows = df.iloc[kept].reset_index(drop=True)
    return rows, np.stack(probs), (np.stack(tta_probs) if tta else None), skipped


def evaluate(model: fc.FlowerClassifier, root: Path, df: pd.DataFrame, out_dir: Path, tta: bool = False,
             bs: int = 32, history: Path | None = None, source: str = "") -> dict:
    """Predict `df` (path, label rows under `root`) with `model`; write the report files into `out_dir`."""
    start, out_dir = time.time(), Path(out_dir)
    rows, probs, tta_probs, skipped = predict_table(model, root, df, tta, bs)
    y = np.array([CLASSES.index(label) for label in rows["label"]])
    report = dict(source=source, data=str(root), **classification_metrics(y, probs, CLASSES))
    if tta_probs is not None:
        t = classification_metrics(y, tta_probs, CLASSES)
        report["tta"] = dict(views=10, accuracy=t["accuracy"], loss=t["loss"], macro_f1=t["macro_f1"])
    report["skipped"] = skipped
    pred = probs.argmax(1)
    rows = rows.assign(predicted=[CLASSES[i] for i in pred], confidence=probs.max(1),
                       p_actual=probs[np.arange(len(y)), y], loss=-np.log(np.clip(probs[np.arange(len(y)), y],
                                                                                  1e-12, None)))
    atomic_write(out_dir / "predictions.csv", lambda tmp: rows[["path", "label", "predicted", "confidence",
                                                                  "loss"]].to_csv(tmp, index=False))
    plot_confusion_matrix(np.array(report["confusion_matrix"]), CLASSES, out_dir / "confusion_matrix.png",
                          title=f"{Path(source).name}: accuracy {report['accuracy']:.3f} on {len(y)} images")
    _top_losses(root, rows, model.prep, out_dir / "top_losses.png")
    files = ["eval_metrics.json", "predictions.csv", "confusion_matrix.png", "top_losses.png"]
    if history is not None and history.is_file() and plot_curves(history, out_dir / "curves.png"):
        files.append("curves.png")
    report.update(out_dir=str(out_dir), files=files, wall_time_s=round(time.time() - start, 1))
    write_json(out_dir / "eval_metrics.json", report)
    return report


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, out_dir: str | Path | None = None,
                 tta: bool = False, bs: int = 32) -> dict:
    """Evaluate a run folder's best weights on its valid split, as the exported payload will serve them."""
    run_dir = Path(run_dir)
    root, df = run_valid_images(run_dir, data)
    with tempfile.TemporaryDirectory() as tmp:
        model = fc.load_model(export_run(run_dir, Path(tmp) / "payload.pth"))
    return evaluate(model, root, df, Path(out_dir or run_dir), tta, bs, history=run_dir / "history.csv",
                    source=str(run_dir))


def evaluate_file(model_path: str | Path, data: str | Path, out_dir: str | Path | None = None,
                  tta: bool = False, bs: int = 32) -> dict:
    """Evaluate an exported .pth on every image under `data`."""
    model = fc.load_model(model_path)  # a bad model file fails before the folder scan
    root, df = folder_images(data)
    out_dir = Path(out_dir) if out_dir else Path("runs") / f"eval-{Path(model_path).stem}"
    return evaluate(model, root, df, out_dir, tta, bs, source=str(model_path))


def summary(report: dict) -> str:
    b = report["baselines"]
    lines = [f"{report['n_images']} images from {report['data']}: accuracy {report['accuracy']:.4f}, "
             f"macro-F1 {report['macro_f1']:.4f}, loss {report['loss']:.4f}",
             f"baselines: majority class ({b['majority_class']['predicts']}) accuracy "
             f"{b['majority_class']['accuracy']:.4f}, uniform random accuracy {b['uniform_random']['accuracy']:.4f}"]
    if "tta" in report:
        lines.append(f"TTA ({report['tta']['views']} views): accuracy {report['tta']['accuracy']:.4f}, "
                     f"macro-F1 {report['tta']['macro_f1']:.4f}")
    if report["skipped"]:
        lines.append(f"{len(report['skipped'])} file(s) could not be read (listed in eval_metrics.json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flowers_fastai.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="an exported .pth, or a train.py run folder")
    p.add_argument("--data", type=Path, help="<root>/<class>/<images> folder (required for a .pth; for a run "
                                             "folder, where its split.csv paths live if not where it trained)")
    p.add_argument("--tta", action="store_true", help="also report accuracy averaged over 10 views per image")
    p.add_argument("--out", type=Path, help="report folder (default: the run folder, or runs/eval-<name>)")
    p.add_argument("--bs", type=int, default=32, help="images per forward pass")
    args = p.parse_args(argv)
    try:
        if args.target.is_dir():
            report = evaluate_run(args.target, args.data, args.out, args.tta, args.bs)
        elif args.data is None:
            raise EvaluationError(f"evaluating the model file {args.target} needs the images: pass --data DIR "
                                  f"(a <root>/<class>/<images> folder).")
        else:
            report = evaluate_file(args.target, args.data, args.out, args.tta, args.bs)
    except (EvaluationError, ExportError, fc.ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"wrote {', '.join(report['files'])} in {report['out_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
