"""What every benchmark shares: where the photos are (FLOWERS128_DIR, skipped cleanly when absent),
the run's facts (machine, torch, commit, date, command) and where its results go, waiting for a quiet
machine, timing statistics, peak RSS and tables.

Benchmarks are modules run from the repository root (`python -m bench.NAME`), not tests: speed goals live
here, never in tests/. Each writes its results to bench/results/NAME-<UTC time>.json, from which
`python -m bench.report` generates bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
CLASS_NAMES = ("daisy", "dandelion", "rose", "sunflower", "tulip")  # flowers_fastai.classes, without its import


def flowers_dir() -> Path | None:
    """The photo folder FLOWERS128_DIR names; None when it is unset or not a <class>/ folder."""
    path = os.environ.get("FLOWERS128_DIR")
    return Path(path) if path and all((Path(path) / c).is_dir() for c in CLASS_NAMES) else None


def require_flowers(script: str) -> Path:
    """The photo folder, or exit 0 with a note: a machine without the data skips the benchmark cleanly."""
    path = flowers_dir()
    if path is None:
        print(f"{script}: skipped: no <class>/*.jpg photo folder found; set FLOWERS128_DIR to one "
              f"(a folder of 128x128 flower photos, one sub-folder per class).")
        sys.exit(0)
    return path


def sample_photos(root: Path, n: int) -> list[Path]:
    """`n` photos, round-robin over the classes in sorted order: the same files on every run."""
    per_class = [sorted((root / c).glob("*.jpg")) for c in CLASS_NAMES]
    picked = [files[i] for i in range(max(map(len, per_class))) for files in per_class if i < len(files)]
    return picked[:n]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str | None:
    """HEAD's short hash, with "+dirty" when a tracked file differs from it (untracked files, such as earlier
    results, do not change the code); None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine_info(script: str | None = None, argv: Sequence[str] | None = None) -> dict:
    """The facts a result needs to be read later: machine, versions, commit, UTC date and, given the script's
    name, the command line that made it (`argv`: its arguments, sys.argv[1:] by default)."""
    import torch
    info = dict(date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), cpu=cpu_model(),
                cores=os.cpu_count(), torch=torch.__version__, torch_threads=torch.get_num_threads(),
                python=platform.python_version(), commit=git_commit(), loadavg_1min=round(os.getloadavg()[0], 2))
    if script:
        info["script"] = script
        info["command"] = shlex.join(["python", "-m", f"bench.{script}", *(sys.argv[1:] if argv is None else argv)])
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--json OUT and --no-save: by default a run's results go to bench/results/ (see results_path)."""
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", type=Path, metavar="OUT",
                     help="write the results to OUT instead of bench/results/NAME-<UTC time>.json")
    out.add_argument("--no-save", action="store_true", help="write no result file (a trial run)")


def results_path(script: str, args: argparse.Namespace, date: str) -> Path | None:
    """Where a run's results go: --json OUT, else bench/results/SCRIPT-<date as YYYYmmddTHHMMSSZ>.json (a file
    per run, which bench/report.py reads), or None with --no-save."""
    if getattr(args, "no_save", False):
        return None
    if getattr(args, "json", None):
        return args.json
    stamp = datetime.datetime.fromisoformat(date).astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return RESULTS_DIR / f"{script}-{stamp}.json"


def save_results(script: str, args: argparse.Namespace, results: dict,
                 argv: Sequence[str] | None = None) -> Path | None:
    """Write `results` atomically to results_path(), its `meta` completed with machine_info(script, argv)'s
    facts (a script's own meta keys win: its load average, its model); says where on stderr."""
    meta = results.setdefault("meta", {})
    for key, value in machine_info(script, argv).items():
        meta.setdefault(key, value)
    path = results_path(script, args, meta["date"])
    if path is not None:
        from flowers_classifier.files import write_json
        write_json(path, results)
        print(f"results: {path}", file=sys.stderr)
    return path


def wait_for_quiet(threshold: float = 0.7, poll_s: float = 20.0, give_up_s: float = 900.0) -> float:
    """Block until the 1-minute load average is below `threshold` (others share these cores), at most
    `give_up_s`; returns the load average measured at the start of the run (report it)."""
    start = time.monotonic()
    while (load := os.getloadavg()[0]) >= threshold and time.monotonic() - start < give_up_s:
        print(f"waiting for a quiet machine: 1-min load {load:.2f} >= {threshold}", file=sys.stderr, flush=True)
        time.sleep(poll_s)
    if load >= threshold:
        print(f"gave up waiting after {give_up_s:.0f} s: measuring at load {load:.2f}", file=sys.stderr)
    return round(load, 2)


def time_calls(fn: Callable[[], object], runs: int, warmup: int) -> np.ndarray:
    """Seconds per call of `fn`, `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return times


def rotated(items: Sequence, r: int) -> list:
    """`items` starting from the r-th (mod its length): run them in this order in round r, and who goes first
    rotates from round to round."""
    return list(items[r % len(items):]) + list(items[:r % len(items)])


def latency_ms(times: np.ndarray) -> dict:
    return dict(p50_ms=float(np.percentile(times, 50) * 1e3), p95_ms=float(np.percentile(times, 95) * 1e3))


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far. VmHWM, not getrusage's ru_maxrss: a subprocess
    inherits its parent's ru_maxrss across fork + exec, VmHWM starts afresh with the new program."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ratio: float, goal: float, higher_is_better: bool) -> str:
    met = ratio >= goal if higher_is_better else ratio <= goal
    return f"{ratio:.2f}x (goal {'>=' if higher_is_better else '<='} {goal:.2f}x: {'met' if met else 'NOT met'})"
