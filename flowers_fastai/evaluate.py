"""Evaluation of an exported model or a run folder, measured through `flowers_classifier`: the code that
serves predictions, not fastai's validation loop.

    python -m flowers_fastai evaluate MODEL.pth --data DIR [--tta] [--out DIR] [--bs N]
    python -m flowers_fastai evaluate RUN_DIR [--data DIR] [--tta] [--out DIR] [--bs N]
    python -m flowers_fastai evaluate RUN_DIR --wise-ft-sweep [--data DIR] [--out DIR]

- MODEL.pth: every image under --data (a <root>/<class>/<images> folder).
- RUN_DIR (a train.py run folder): the valid rows of its split.csv, read from --data or else from the run's
  own data folder, and its test rows when it has a test split (train.py --test-pct). Its best weights are
  made into the payload export.py would write, calibrated on the valid split (so the valid split's
  "calibrated" figures are fitted and measured on the same images; the test split's are not: nothing was
  tuned on it). train.py runs this at the end of every training.
- RUN_DIR --wise-ft-sweep (a CLIP run from pretrained weights): valid accuracy, NLL and ECE of the WiSE-FT
  interpolation for alpha 0, 0.1, ..., 1 (raw softmax, no temperature): a table, wise_ft.json, wise_ft.png.

Writes into --out (default: the run folder, or runs/eval-<name> for a .pth):
- eval_metrics.json: `split` (valid, or folder for a .pth), accuracy, cross-entropy (no label smoothing),
  per-class precision/recall/F1, macro-F1, the confusion matrix, the majority-class and uniform-random
  baselines, with --tta the same under test-time augmentation, the files that could not be read, and
  `calibration`: the model's temperature and ECE (15 bins), NLL and Brier score of the raw softmax (T = 1)
  and of the calibrated probabilities the model serves; with a test split, the same figures of it in its
  `test` section. Not named metrics.json, so a run's training metrics are never overwritten.
- predictions.csv (path, label, predicted, confidence, loss per image, as served: calibrated),
  confusion_matrix.png, top_losses.png, reliability.png (reliability diagram, raw and calibrated), the
  same with a _test suffix for a test split, and curves.png when the folder holds a history.csv.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import flowers_classifier as fc
from flowers_classifier.classes import CLASSES
from flowers_classifier.files import atomic_write, write_json
from flowers_classifier.model import calibrated_softmax
from flowers_classifier.payload import make_payload
from flowers_classifier.preprocess import Preprocess, load_rgb, preprocess_image, resize_center_crop, tta_views

from .calibration import EvaluationError, image_logits, run_split_images, run_valid_images
from .export import interpolate_weights, read_run, run_payload, zeroshot_weights
from .metrics import ECE_BINS, calibration_metrics, classification_metrics, reliability_bins
from .plots import plot_confusion_matrix, plot_curves, plot_image_grid, plot_reliability, plot_wise_ft

TOP_LOSSES = 9
FOLDER = "folder"  # a report's `split` for a .pth evaluated on every image under --data




# --------------------------------------------------------------------------- what to evaluate

def folder_images(data: str | Path) -> tuple[Path, pd.DataFrame]:
    """Every image under a <root>/<class>/<images> folder (data.scan_folder's table)."""
    from .data import DatasetError, scan_folder
    try:
        return Path(data), scan_folder(data)
    except DatasetError as e:
        raise EvaluationError(str(e)) from e


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
    """(rows that could be read, their logits (N, K) before any temperature, their TTA probabilities as
    served (mean over views of the calibrated softmax) or None, skipped files)."""
    load = tta_views if tta else preprocess_image
    kept, logits, tta_probs, skipped = [], [], [], []
    results = fc.iter_probabilities(model, [root / p for p in df["path"]], bs=bs, load=load, logits=True)
    for i, (_, z, error) in enumerate(results):
        if error is not None:
            skipped.append(dict(path=df["path"].iat[i], error=error))
            continue
        kept.append(i)
        logits.append((z[0] if tta else z).numpy())  # view 0 is the served crop
        if tta:
            tta_probs.append(calibrated_softmax(z, model.temperature).mean(0).numpy())
    if not kept:
        raise EvaluationError(f"none of the {len(df)} images under {root} could be read.")
    rows = df.iloc[kept].reset_index(drop=True)
    return rows, np.stack(logits), (np.stack(tta_probs) if tta else None), skipped


def calibration_report(y: np.ndarray, logits: np.ndarray, temperature: float) -> tuple[dict, dict]:
    """(eval_metrics.json's `calibration`, the reliability diagram's panels): ECE, NLL and Brier of the raw
    softmax and of softmax(logits / temperature)."""
    report, panels = dict(temperature=temperature), {}
    for name, t in (("raw", 1.0), ("calibrated", temperature)):
        probs = calibrated_softmax(torch.from_numpy(logits), t).double().numpy()
        report[name] = calibration_metrics(y, probs)
        panels[f"{name} (T = {t:.2f})"] = dict(bins=reliability_bins(y, probs), **report[name])
    return report, panels


def _evaluate_split(model: fc.FlowerClassifier, root: Path, df: pd.DataFrame, out_dir: Path, tta: bool, bs: int,
                    source: str, calibration: dict | None, split: str) -> dict:
    """The report of one split's images, its predictions and plots written into `out_dir` (a test split's
    files end in _test, beside the valid split's); every plot title names the split."""
    rows, logits, tta_probs, skipped = predict_table(model, root, df, tta, bs)
    probs = calibrated_softmax(torch.from_numpy(logits), model.temperature).numpy()  # as the model serves them
    y = np.array([CLASSES.index(label) for label in rows["label"]])
    report = dict(split=split, source=source, data=str(root), **classification_metrics(y, probs, CLASSES))
    report["calibration"], panels = calibration_report(y, logits, model.temperature)
    report["calibration"].update(calibration or {})
    if tta_probs is not None:
        t = classification_metrics(y, tta_probs, CLASSES)
        report["tta"] = dict(views=10, accuracy=t["accuracy"], loss=t["loss"], macro_f1=t["macro_f1"])
    report["skipped"] = skipped
    pred = probs.argmax(1)
    rows = rows.assign(predicted=[CLASSES[i] for i in pred], confidence=probs.max(1),
                       p_actual=probs[np.arange(len(y)), y], loss=-np.log(np.clip(probs[np.arange(len(y)), y],
                                                                                  1e-12, None)))
    suffix = "_test" if split == "test" else ""
    files = [f"{name}{suffix}{ext}" for name, ext in
             (("predictions", ".csv"), ("confusion_matrix", ".png"), ("top_losses", ".png"), ("reliability", ".png"))]
    atomic_write(out_dir / files[0], lambda tmp: rows[["path", "label", "predicted", "confidence",
                                                       "loss"]].to_csv(tmp, index=False))
    name = f"{Path(source).name}, {split}" if split != FOLDER else Path(source).name
    plot_confusion_matrix(np.array(report["confusion_matrix"]), CLASSES, out_dir / files[1],
                          title=f"{name}: accuracy {report['accuracy']:.3f} on {len(y)} images")
    _top_losses(root, rows, model.prep, out_dir / files[2])
    plot_reliability(panels, out_dir / files[3], title=f"{name}: {len(y)} images")
    report["files"] = files
    return report


def evaluate(model: fc.FlowerClassifier, root: Path, df: pd.DataFrame, out_dir: Path, tta: bool = False,
             bs: int = 32, history: Path | None = None, source: str = "", calibration: dict | None = None,
             split: str = FOLDER, test: pd.DataFrame | None = None) -> dict:
    """Predict `df` (path, label rows under `root`; `split` names them) with `model`, and the `test` rows
    when given (the report's `test` section); write the report files into `out_dir`. `calibration`: how
    the model's temperature was fitted, added to each `calibration` section."""
    start, out_dir = time.time(), Path(out_dir)
    report = _evaluate_split(model, root, df, out_dir, tta, bs, source, calibration, split)
    files = ["eval_metrics.json", *report.pop("files")]
    if test is not None and len(test):
        report["test"] = _evaluate_split(model, root, test, out_dir, tta, bs, source, calibration, "test")
        files += report["test"].pop("files")
    if history is not None and history.is_file() and plot_curves(history, out_dir / "curves.png"):
        files.append("curves.png")
    report.update(out_dir=str(out_dir), files=files, wall_time_s=round(time.time() - start, 1))
    write_json(out_dir / "eval_metrics.json", report)
    return report


def headline(report: dict) -> dict:
    """A report's figures for metrics.json: per split (`split` names it; `test` when there is one)."""
    keys = ("split", "n_images", "accuracy", "macro_f1", "loss", "baselines", "calibration")
    out = {k: report[k] for k in keys}
    if "test" in report:
        out["test"] = {k: report["test"][k] for k in keys}
    return out


def evaluate_run(run_dir: str | Path, data: str | Path | None = None, out_dir: str | Path | None = None,
                 tta: bool = False, bs: int = 32) -> dict:
    """Evaluate a run folder's best weights, as the exported payload will serve them, on its valid split
    (where T is fitted: its calibrated figures are in-sample) and on its test split when it has one (never
    tuned on: the `test` section)."""
    run_dir = Path(run_dir)
    root, df = run_valid_images(run_dir, data)
    _, test = run_split_images(run_dir, root, "test")
    payload, record = run_payload(run_dir, data=root, bs=bs)  # calibrated on valid, as export.py does
    record = dict(fitted_on=f"the {record['n_images']} valid images", **record)
    return evaluate(fc.model_from_payload(payload), root, df, Path(out_dir or run_dir), tta, bs,
                    history=run_dir / "history.csv", source=str(run_dir), calibration=record, split="valid",
                    test=test)


def evaluate_file(model_path: str | Path, data: str | Path, out_dir: str | Path | None = None,
                  tta: bool = False, bs: int = 32) -> dict:
    """Evaluate an exported .pth on every image under `data`."""
    model = fc.load_model(model_path)  # a bad model file fails before the folder scan
    root, df = folder_images(data)
    out_dir = Path(out_dir) if out_dir else Path("runs") / f"eval-{Path(model_path).stem}"
    return evaluate(model, root, df, out_dir, tta, bs, source=str(model_path))


WISE_FT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # 0, 0.1, ..., 1


def wise_ft_sweep(run_dir: str | Path, data: str | Path | None = None, out_dir: str | Path | None = None,
                  bs: int = 32, alphas: tuple[float, ...] = WISE_FT_ALPHAS) -> dict:
    """Valid accuracy, NLL and ECE of the WiSE-FT interpolation of a CLIP run for each alpha (raw softmax:
    a temperature fitted per alpha on the same images would flatter every row alike). Writes wise_ft.json
    and wise_ft.png into `out_dir` (default: the run folder)."""
    run_dir = Path(run_dir)
    zeroshot = zeroshot_weights(run_dir)  # refuses cnn, --no-pretrained and random-head runs, with the reason
    spec, finetuned = read_run(run_dir)
    root, df = run_valid_images(run_dir, data)
    rows = []
    for alpha in alphas:
        payload = make_payload(spec, interpolate_weights(zeroshot, finetuned, alpha))
        logits, y = image_logits(fc.model_from_payload(payload, calibrated=False), root, df, bs)
        probs = calibrated_softmax(torch.from_numpy(logits)).double().numpy()
        m = calibration_metrics(y, probs)
        rows.append(dict(alpha=alpha, accuracy=float((probs.argmax(1) == y).mean()), nll=m["nll"], ece=m["ece"],
                         brier=m["brier"]))
        print(f"  alpha {alpha:.1f}: accuracy {rows[-1]['accuracy']:.4f}, NLL {m['nll']:.4f}, ECE {m['ece']:.4f}",
              flush=True)
    out_dir = Path(out_dir or run_dir)
    plot_wise_ft(rows, out_dir / "wise_ft.png", title=f"WiSE-FT of {run_dir.name}: {len(y)} valid images")
    report = dict(source=str(run_dir), data=str(root), n_images=int(len(y)), ece_bins=ECE_BINS, rows=rows,
                  out_dir=str(out_dir), files=["wise_ft.json", "wise_ft.png"])
    write_json(out_dir / "wise_ft.json", report)
    return report


def wise_ft_table(report: dict) -> str:
    lines = [f"WiSE-FT on {report['n_images']} valid images (raw softmax; 0 = zero-shot, 1 = fine-tuned)",
             "alpha  accuracy     NLL     ECE"]
    lines += [f"{r['alpha']:5.1f}  {r['accuracy']:8.4f}  {r['nll']:6.4f}  {r['ece']:6.4f}" for r in report["rows"]]
    return "\n".join(lines)


def _split_summary(report: dict) -> list[str]:
    b, c = report["baselines"], report["calibration"]
    split = "" if report["split"] == FOLDER else f"{report['split']} split, "
    lines = [f"{split}{report['n_images']} images from {report['data']}: accuracy {report['accuracy']:.4f}, "
             f"macro-F1 {report['macro_f1']:.4f}, loss {report['loss']:.4f}",
             f"  baselines: majority class ({b['majority_class']['predicts']}) accuracy "
             f"{b['majority_class']['accuracy']:.4f}, uniform random accuracy {b['uniform_random']['accuracy']:.4f}"]
    if "tta" in report:
        lines.append(f"  TTA ({report['tta']['views']} views): accuracy {report['tta']['accuracy']:.4f}, "
                     f"macro-F1 {report['tta']['macro_f1']:.4f}")
    fitted = f"; T fitted on {c['fitted_on']}" if report["split"] == "test" and "fitted_on" in c else ""
    lines.append(f"  calibration, temperature {c['temperature']:.3f}: ECE {c['raw']['ece']:.4f} -> "
                 f"{c['calibrated']['ece']:.4f}, NLL {c['raw']['nll']:.4f} -> {c['calibrated']['nll']:.4f}, "
                 f"Brier {c['raw']['brier']:.4f} -> {c['calibrated']['brier']:.4f} (raw -> calibrated{fitted})")
    if report["skipped"]:
        lines.append(f"  {len(report['skipped'])} file(s) could not be read (listed in eval_metrics.json)")
    return lines


def summary(report: dict) -> str:
    """The printed report: one block per split (valid, then test when the run has one)."""
    return "\n".join(_split_summary(report) + (_split_summary(report["test"]) if "test" in report else []))
