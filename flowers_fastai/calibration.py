"""Temperature scaling: one scalar T fitted on a run's validation logits by minimising the NLL of
softmax(logits / T), stored in the payload and applied by `flowers_classifier` when it serves. Also where a
run's images of one split are found: the valid split fits T; a test split, when the run has one
(train.py --test-pct), is never fitted on and only measured.

T > 1 softens an over-confident model, T < 1 sharpens an under-confident one; the argmax never changes, so
accuracy does not either. The search is bounded (TEMPERATURE_BOUNDS): on a validation set the model gets
100% right the NLL keeps falling as T -> 0, and the fit stops at the lower bound instead of diverging.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

import flowers_classifier as fc
from flowers_classifier.classes import CLASSES
from flowers_classifier.errors import FlowersError

TEMPERATURE_BOUNDS = (0.05, 20.0)
SPLITS = ("train", "valid", "test")  # split.csv's `split` column
_GOLDEN = (math.sqrt(5) - 1) / 2


class EvaluationError(FlowersError, ValueError):
    """The model or the images to evaluate cannot be found. The message names the path and the flag."""


def split_names(df: pd.DataFrame) -> pd.Series:
    """Each row's split (SPLITS): the `split` column, or train/valid from `is_valid` in a split.csv written
    before test splits existed."""
    if "split" in df:
        return df["split"]
    return pd.Series(np.where(df["is_valid"].astype(bool), "valid", "train"), index=df.index)


def run_split_images(run_dir: Path, data: str | Path | None = None, split: str = "valid") -> tuple[Path, pd.DataFrame]:
    """The rows of one split of a run's split.csv (none for a split it does not have) and the folder they are
    relative to."""
    path = run_dir / "split.csv"
    if not path.is_file():
        raise EvaluationError(f"{path} not found: is {run_dir} a train.py run folder? Pass a run folder "
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
    df = pd.read_csv(path)
    return root, df[split_names(df) == split].reset_index(drop=True)


def run_valid_images(run_dir: Path, data: str | Path | None = None) -> tuple[Path, pd.DataFrame]:
    """The valid rows of a run's split.csv (what T is fitted on; never its test rows) and their folder."""
    return run_split_images(run_dir, data, "valid")


def nll_at(logits: np.ndarray, y: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature) for labels `y` (float64, stable)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), np.asarray(y)].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
                    tol: float = 1e-4) -> float:
    """The T in `bounds` minimising nll_at(logits, y, T): golden-section search over log T. The NLL is
    convex in 1/T, hence unimodal in log T, so the search finds the minimum (or the nearer bound)."""
    if len(y) == 0:
        raise ValueError("fit_temperature: no validation images to fit the temperature on")
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = nll_at(logits, y, math.exp(a)), nll_at(logits, y, math.exp(b))
    while hi - lo > tol:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = nll_at(logits, y, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = nll_at(logits, y, math.exp(b))
    return math.exp((lo + hi) / 2)


def image_logits(model: fc.FlowerClassifier, root: Path, df: pd.DataFrame,
                 bs: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), labels (N,)) of the readable images of `df` (path, label rows under `root`), through
    flowers_classifier's served preprocessing; unreadable files are left out."""
    logits, labels = [], []
    results = fc.iter_probabilities(model, [root / p for p in df["path"]], bs=bs, logits=True)
    for label, (_, z, error) in zip(df["label"], results, strict=True):
        if error is None:
            logits.append(z.numpy())
            labels.append(CLASSES.index(label))
    if not logits:
        raise EvaluationError(f"none of the {len(df)} images under {root} could be read.")
    return np.stack(logits), np.array(labels)


def fit_payload_temperature(payload: dict, root: Path, df: pd.DataFrame, bs: int = 32) -> dict:
    """Fit T for `payload` (as it will be written, fp16 storage included) on the images of `df`: the
    temperature and the NLL before and after, for metrics.json and the printed note."""
    model = fc.model_from_payload(payload, calibrated=False)
    logits, y = image_logits(model, root, df, bs)
    t = fit_temperature(logits, y)
    return dict(temperature=t, n_images=int(len(y)), nll_raw=nll_at(logits, y, 1.0),
                nll_calibrated=nll_at(logits, y, t), bounds=list(TEMPERATURE_BOUNDS))
