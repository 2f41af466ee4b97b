"""flowers-predict's --out: the batch records (image_path, predicted_class, confidence, probabilities, error) as a
CSV or Parquet file, one row per input file, written atomically. CSV holds `probabilities` as a JSON object;
Parquet as a struct of the classes (pyarrow: installed with the [serve] extra)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from flowers_classifier.errors import FlowersError
from flowers_classifier.files import atomic_write

FIELDS = ("image_path", "predicted_class", "confidence", "probabilities", "error")
FORMATS = (".csv", ".parquet")


class OutputFileError(FlowersError, ValueError):
    """An --out file of a format this cannot write, or whose writer is not installed. The message says which."""


def check_out(path: str | os.PathLike) -> Path:
    """`path` when it can be written (.csv, or .parquet with pyarrow installed); OutputFileError before any work."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise OutputFileError(f"--out {path}: write a {' or '.join(FORMATS)} file (the suffix picks the format)")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise OutputFileError(f"--out {path}: Parquet needs pyarrow; pip install 'flowers-fastai[serve]', "
                                  f"or write a .csv") from e
    return path


def write_records(path: str | os.PathLike, records: list[dict]) -> Path:
    """Every record as one row of `path` (.csv or .parquet, see check_out), columns FIELDS."""
    path = check_out(path)
    if path.suffix.lower() == ".csv":
        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                out = csv.DictWriter(f, FIELDS)
                out.writeheader()
                for r in records:
                    probs = r["probabilities"]
                    out.writerow({**r, "probabilities": "" if probs is None else json.dumps(probs)})
        return atomic_write(path, write)
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{k: r[k] for k in FIELDS} for r in records])
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))
