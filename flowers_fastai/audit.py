"""Data audit: one decode pass over a `<root>/<class>/<images>` table, and what it tells about the data.

    python -m flowers_fastai data audit DIR [--json OUT] [--min-size 224]

Reports files per class, files that do not decode, exact duplicates (same decoded pixels, whatever the
file name or encoding), duplicates filed under different classes (one photo, two labels), and images
whose short side is below the training size (they get upscaled). `data.prepare_split` runs the same
pass for every training, so the run folder gets an `audit.json` without decoding anything twice; it keeps
each duplicate group on one side of the split, and leaves out (and lists, as `dropped_from_training`)
every copy of a group filed under different classes.
This module owns the inspection and the report; the folder scan stays in `data.scan_folder`.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from flowers_classifier.classes import CLASSES
from flowers_classifier.preprocess import InvalidImageError, load_rgb

AUDIT_MIN_SIZE = 224  # the input size of every default backbone


@dataclass(frozen=True)
class ImageInfo:
    """What one decode of a file tells: its size and pixel digest, or why it does not decode."""

    path: str                  # relative to the data root, as in scan_folder's table
    width: int = 0
    height: int = 0
    digest: str | None = None  # blake2b of the decoded RGB pixels (+ size): equal digests = same image
    error: str | None = None   # the decode failure, without the path


def inspect_image(root: Path, rel: str) -> ImageInfo:
    """Decode `root/rel` the way training and serving do (load_rgb) and fingerprint its pixels."""
    try:
        img = load_rgb(root / rel)
    except InvalidImageError as e:
        return ImageInfo(rel, error=str(e).split(": ", 1)[-1])
    # The size goes into the hash so two images with the same bytes but different shapes stay apart.
    digest = hashlib.blake2b(img.tobytes(), digest_size=16, person=b"%dx%d" % img.size).hexdigest()
    return ImageInfo(rel, img.width, img.height, digest)


def inspect_files(root: str | Path, paths: list[str], workers: int = 4) -> list[ImageInfo]:
    """ImageInfo for every path (relative to root), in order; PIL decodes outside the GIL, so threads help."""
    root = Path(root)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda rel: inspect_image(root, rel), paths))


def _duplicate_groups(infos: list[ImageInfo], labels: dict[str, str]) -> list[dict]:
    by_digest: dict[str, list[str]] = defaultdict(list)
    for info in infos:
        if info.digest:
            by_digest[info.digest].append(info.path)
    groups = [dict(digest=d, paths=sorted(ps), labels=sorted({labels[p] for p in ps}))
              for d, ps in by_digest.items() if len(ps) > 1]
    return sorted(groups, key=lambda g: g["paths"][0])


def audit_table(root: str | Path, df: pd.DataFrame, infos: list[ImageInfo],
                min_size: int = AUDIT_MIN_SIZE) -> dict:
    """The audit report (plain JSON-ready dict) of `df` (path, label rows) from its decode results."""
    labels = dict(zip(df["path"], df["label"], strict=True))
    groups = _duplicate_groups(infos, labels)
    conflicts = [g for g in groups if len(g["labels"]) > 1]
    unreadable = [dict(path=i.path, label=labels[i.path], reason=i.error) for i in infos if i.error]
    small = [dict(path=i.path, label=labels[i.path], width=i.width, height=i.height)
             for i in infos if not i.error and min(i.width, i.height) < min_size]
    counts = df["label"].value_counts().reindex(list(CLASSES), fill_value=0)
    duplicate_files = sum(len(g["paths"]) for g in groups)
    return dict(
        root=str(root), min_size=min_size, files=len(df), class_counts={c: int(n) for c, n in counts.items()},
        summary=dict(unreadable=len(unreadable), duplicate_groups=len(groups), duplicate_files=duplicate_files,
                     redundant_copies=duplicate_files - len(groups), conflicting_groups=len(conflicts),
                     small_images=len(small)),
        unreadable=unreadable, duplicates=groups, conflicting_duplicates=conflicts, small_images=small)


def conflicting_files(report: dict, df: pd.DataFrame) -> list[dict]:
    """Every copy of a duplicate group filed under different classes (path, label, reason): which label is
    right is unknown, and training on both would teach the model two answers for one photo."""
    labels = dict(zip(df["path"], df["label"], strict=True))
    return [dict(path=p, label=labels[p], reason=f"pixel-identical copies filed under {' and '.join(g['labels'])}")
            for g in report["conflicting_duplicates"] for p in g["paths"]]


def _listing(items: list, line, limit: int) -> list[str]:
    lines = [f"  {line(item)}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more (all of them in the --json report)")
    return lines


def format_report(report: dict, limit: int = 10) -> str:
    """Human-readable audit: one section per check, at most `limit` lines each."""
    s = report["summary"]
    counts = ", ".join(f"{c} {n}" for c, n in report["class_counts"].items())
    lines = [f"{report['root']}: {report['files']} image files ({counts})",
             f"files that do not decode: {s['unreadable']}"]
    lines += _listing(report["unreadable"], lambda u: f"{u['path']}: {u['reason']}", limit)
    lines.append(f"exact duplicates (same decoded pixels): {s['duplicate_groups']} group(s), "
                 f"{s['redundant_copies']} file(s) beyond the first copy")
    lines += _listing(report["duplicates"], lambda g: " == ".join(g["paths"]), limit)
    lines.append(f"duplicates filed under different classes: {s['conflicting_groups']} group(s)")
    lines += _listing(report["conflicting_duplicates"],
                      lambda g: f"{' == '.join(g['paths'])}  (labels: {', '.join(g['labels'])})", limit)
    if "dropped_from_training" in report:  # a run's audit.json (prepare_split)
        lines.append(f"left out of the run (copies with conflicting labels): {len(report['dropped_from_training'])}")
        lines += _listing(report["dropped_from_training"], lambda d: f"{d['path']}: {d['reason']}", limit)
    lines.append(f"images smaller than {report['min_size']}px on the short side: {s['small_images']}")
    lines += _listing(report["small_images"], lambda i: f"{i['path']}: {i['width']}x{i['height']}", limit)
    return "\n".join(lines)
