"""Data: download the public flower photos, check a `<root>/<class>/<images>` folder, split it, and
build the fastai DataLoaders.

    flowers-data download [--dest data/flowers]
    flowers-data audit DIR [--json OUT] [--min-size 224]   (see flowers_fastai.audit; the CLI: cli.py)

Every problem with a folder (missing, unknown or empty class, undecodable files) is found here, before
anything trains.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import sys
import warnings
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
from fastai.vision.all import (
    CategoryBlock,
    ColReader,
    ColSplitter,
    DataBlock,
    ImageBlock,
    Normalize,
    PILImage,
    RandomResizedCrop,
    Transform,
    aug_transforms,
)
from PIL import Image

try:
    import fcntl
except ImportError:  # Windows: DataLoader workers are spawned, never see RGBImage.failure_log: one writer
    fcntl = None

from flowers_classifier.classes import CLASSES, normalize_label
from flowers_classifier.errors import FlowersError
from flowers_classifier.files import write_json
from flowers_classifier.preprocess import IMAGE_SUFFIXES, InvalidImageError, Preprocess, load_rgb, resize_center_crop

from .audit import AUDIT_MIN_SIZE, audit_table, conflicting_files, inspect_files
from .calibration import split_names
from .distributed import rank

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
VALID_PCT = 0.2  # train.py --valid-pct, flowers_dataloaders(valid_pct=)
TEST_PCT = 0.0   # train.py --test-pct: no test split unless asked (small folders need every photo)


class DatasetError(FlowersError, ValueError):
    """The data folder cannot be trained on as it is. The message says why and what to change."""


# --------------------------------------------------------------------------- download

@contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


@contextmanager
def _progress_only_on_a_terminal():
    """fastdownload's progress bar redraws itself with carriage returns, and draws its first glyph even
    when the download fails at once: in a log file or a pipe that is noise, so its stdout goes nowhere."""
    if sys.stdout.isatty():
        yield
        return
    with redirect_stdout(io.StringIO()):
        yield


def download_flowers(dest: str | Path = "data/flowers", url: str = FLOWERS_URL, force: bool = False) -> Path:
    """Fetch and extract the flower_photos archive with fastdownload; rename class folders to our labels."""
    from fastdownload import FastDownload
    dest = Path(dest).absolute()
    if dest.exists() and not force:
        scan_folder(dest)  # already there: just prove it is usable
        return dest
    fd = FastDownload(base=dest.parent, archive=dest.parent / "archives", data=dest.parent / ".extract")
    try:
        with _socket_timeout(60), _progress_only_on_a_terminal():
            extracted = Path(fd.get(url, force=force))
    except OSError as e:
        raise DatasetError(f"download of {url} failed ({e}). Without a network, copy a "
                           f"<class>/<images> folder locally and pass it with --data.") from e
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(extracted), str(dest))
    for folder in [p for p in dest.iterdir() if p.is_dir()]:
        label = normalize_label(folder.name)
        if label and label != folder.name:
            folder.rename(dest / label)
    scan_folder(dest)
    return dest


# --------------------------------------------------------------------------- folder -> table

def scan_folder(root: str | Path) -> pd.DataFrame:
    """One row per image file (path relative to root, label). Raises DatasetError on a missing,
    unknown or empty class folder. Non-image extensions are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"--data {root}: no such folder (expected <root>/<class>/<images>)")
    folders: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = normalize_label(folder.name)
        if label is None:
            raise DatasetError(f"--data {root}: unknown class folder {folder.name!r}; expected only "
                               f"{', '.join(CLASSES)} (plurals and any case accepted). Move it out.")
        if label in folders:
            raise DatasetError(f"--data {root}: two folders map to class {label!r}; merge them.")
        folders[label] = folder
    missing = [c for c in CLASSES if c not in folders]
    if missing:
        raise DatasetError(f"--data {root}: missing class folder(s) {', '.join(missing)}; "
                           f"every one of {', '.join(CLASSES)} needs a folder of images.")
    rows = []
    for label in CLASSES:
        files = sorted(p for p in folders[label].rglob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise DatasetError(f"--data {root}: class folder {folders[label].name!r} has no image files.")
        rows += [(str(p.relative_to(root)), label) for p in files]
    return pd.DataFrame(rows, columns=["path", "label"])


def stratified_split(df: pd.DataFrame, valid_pct: float = VALID_PCT, seed: int = 42, test_pct: float = TEST_PCT,
                     groups: pd.Series | None = None) -> pd.DataFrame:
    """Adds `split` (train/valid/test) and `is_valid`: per class, a seeded random `test_pct` (at least one
    image when above 0) goes to test and `valid_pct` (at least one image) to validation; one photo at least
    stays to train. Rows with equal `groups` keys (copies of one photo: the audit's pixel digest) stay on
    one side, so no photo is both trained on and measured; a group must carry one label."""
    if not 0 < valid_pct < 1:
        raise DatasetError(f"--valid-pct must be between 0 and 1, not {valid_pct}")
    if not 0 <= test_pct < 1 or valid_pct + test_pct >= 1:
        raise DatasetError(f"--test-pct {test_pct} with --valid-pct {valid_pct}: the test fraction must be in "
                           f"[0, 1) and leave images to train on (valid + test < 1).")
    labels = df["label"].to_numpy()
    codes = np.arange(len(df)) if groups is None else pd.factorize(np.asarray(groups))[0]
    codes = np.where(codes < 0, len(df) + np.arange(len(df)), codes)  # no key (NaN): a group of its own
    if groups is not None and pd.Series(labels).groupby(codes).nunique().max() > 1:
        raise DatasetError("stratified_split: a group of copies carries different labels; leave such groups "
                           "out first (prepare_split does: audit.json, dropped_from_training).")
    sides = ("test", "valid") if test_pct > 0 else ("valid",)
    rng = np.random.default_rng(seed)
    split = np.full(len(df), "train", dtype=object)
    for label in CLASSES:
        idx = np.flatnonzero(labels == label)
        units = [idx[codes[idx] == code] for code in pd.unique(codes[idx])]  # one per photo, copies together
        if len(units) < len(sides) + 1:
            raise DatasetError(f"class {label!r} has {len(idx)} usable image(s) ({len(units)} distinct); need at "
                               f"least {len(sides) + 1} distinct to split into train and {' and '.join(sides)}.")
        target = dict(test=max(1, round(len(idx) * test_pct)), valid=max(1, round(len(idx) * valid_pct)))
        taken = dict(test=0, valid=0, train=0)
        for u in rng.permutation(len(units))[:-1]:  # the last photo of the draw always trains
            side = next((s for s in sides if taken[s] < target[s]), "train")
            split[units[u]] = side
            taken[side] += len(units[u])
    return df.assign(is_valid=split == "valid", split=split)


def non_image_files(root: Path) -> list[tuple[str, str]]:
    """(path, reason) for files in class folders that scan_folder leaves out for their extension."""
    return [(str(p.relative_to(root)), f"not an image file ({p.suffix or 'no extension'})")
            for folder in sorted(root.iterdir()) if folder.is_dir() and normalize_label(folder.name)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES]


def prepare_split(root: str | Path, run_dir: str | Path, valid_pct: float = VALID_PCT, seed: int = 42,
                  max_per_class: int | None = None, min_size: int = AUDIT_MIN_SIZE,
                  test_pct: float = TEST_PCT) -> pd.DataFrame:
    """Scan, audit (audit.json: duplicates, images below `min_size`, ...), drop undecodable files (warned
    about and listed in skipped.csv) and every copy of a photo filed under different classes (listed in
    audit.json as dropped_from_training), split with each photo's copies on one side, write split.csv."""
    root, run_dir = Path(root), Path(run_dir)
    df = scan_folder(root)
    if max_per_class:
        df = (df.sample(frac=1.0, random_state=seed).groupby("label").head(max_per_class)
                .sort_values("path").reset_index(drop=True))
    infos = inspect_files(root, df["path"].tolist())  # the one decode pass: unreadable files + the audit
    report = audit_table(root, df, infos, min_size)
    dropped = conflicting_files(report, df)
    report["dropped_from_training"] = dropped
    report["summary"]["dropped_files"] = len(dropped)
    write_json(run_dir / "audit.json", report)
    skipped = [(i.path, i.error) for i in infos if i.error] + non_image_files(root)
    if skipped:
        pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(run_dir / "skipped.csv", index=False)
        listing = "\n".join(f"  {p}: {why}" for p, why in skipped[:20])
        warnings.warn(f"{len(skipped)} file(s) in {root} cannot be decoded or are not images, and are left out "
                      f"(full list in {run_dir / 'skipped.csv'}):\n{listing}", stacklevel=2)
    left_out = {p for p, _ in skipped} | {d["path"] for d in dropped}
    if left_out:
        df = df[~df["path"].isin(left_out)].reset_index(drop=True)
        empty = [c for c in CLASSES if not (df["label"] == c).any()]
        if empty:
            raise DatasetError(f"--data {root}: class(es) {', '.join(empty)} have no decodable images "
                               f"(see skipped.csv, and dropped_from_training in audit.json).")
    digests = {i.path: i.digest for i in infos}
    df = stratified_split(df, valid_pct, seed, test_pct, groups=df["path"].map(digests))
    df.to_csv(run_dir / "split.csv", index=False)
    return df


# --------------------------------------------------------------------------- fastai DataLoaders

class RGBImage(PILImage):
    """fastai's PILImage, decoded by `load_rgb` (EXIF orientation, alpha on white, 16-bit) like serving."""

    failure_log: Path | None = None  # train() points it at run_dir/skipped.csv

    @classmethod
    def create(cls, fn, **kwargs):
        try:
            return cls(load_rgb(fn))
        except InvalidImageError as e:
            # Decoded fine when the run started, gone or broken now (deleted, rewritten mid-training):
            # never crash mid-epoch. A mid-grey stand-in keeps the batch whole; the file is reported.
            report_late_failure(cls.failure_log, str(fn), str(e))
            return cls(Image.new("RGB", (64, 64), (128, 128, 128)))


def report_late_failure(log: Path | None, path: str, reason: str) -> None:
    """Warn, and append the file to `log` (skipped.csv) on rank 0 only: its DataLoader workers (which inherit
    RANK) and its main process append under an exclusive lock on the file, so the header is written once; the
    other ranks (their run folders may be on other machines) only warn."""
    me = rank()  # from RANK, which DataLoader workers inherit from their rank's process
    where = "" if me == 0 else f"; rank {me}: not listed in skipped.csv, which rank 0 alone writes"
    warnings.warn(f"{reason} (it decoded before training; a grey stand-in is used this time{where})", stacklevel=3)
    if log is None or me != 0:
        return
    row = pd.DataFrame([(path, f"failed during training: {reason}")]).to_csv(header=False, index=False)
    with open(log, "a", newline="") as f:
        if fcntl is not None:  # released when the file closes
            fcntl.flock(f, fcntl.LOCK_EX)
        f.write(("path,reason\n" if f.seek(0, os.SEEK_END) == 0 else "") + row)


class EvalResizeCrop(Transform):
    """Validation-time resize + center crop: the exact PIL operations `flowers_classifier` applies."""

    split_idx, order = 1, 1

    def __init__(self, size: int, crop_pct: float, interpolation: str):
        self.size, self.crop_pct, self.interpolation = size, crop_pct, interpolation

    def encodes(self, img: PILImage) -> PILImage:
        return PILImage(resize_center_crop(img, self.size, self.crop_pct, self.interpolation))


def make_dataloaders(df: pd.DataFrame, root: str | Path, prep: Preprocess, bs: int = 32,
                     num_workers: int = 0, device=None, min_scale: float = 0.35, augment: bool = True):
    """A fastai DataBlock over the split table: train = RandomResizedCrop + aug_transforms, valid =
    the serving-time resize/center-crop; both normalised with the backbone's own mean/std. Test rows are
    left out: nothing fastai does (training, best epoch, early stopping) ever sees them."""
    df = df[split_names(df) != "test"].reset_index(drop=True)
    train_crop = RandomResizedCrop(prep.image_size, min_scale=min_scale)
    train_crop.split_idx = 0  # train only; valid uses EvalResizeCrop, identical to serving
    batch_tfms = (aug_transforms(max_rotate=15.0, max_lighting=0.2) if augment else []) + \
        [Normalize.from_stats(list(prep.mean), list(prep.std))]
    block = DataBlock(
        blocks=(ImageBlock(cls=RGBImage), CategoryBlock(vocab=list(CLASSES))),
        get_x=ColReader("path", pref=f"{Path(root).absolute()}/"),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        item_tfms=[train_crop, EvalResizeCrop(prep.image_size, prep.crop_pct, prep.interpolation)],
        batch_tfms=batch_tfms,
    )
    return block.dataloaders(df, bs=bs, num_workers=num_workers, device=device)
