"""bench/README.md from the result files: one current table per goal, each figure linked to its file.

    python -m bench.report [--results bench/results] [--out bench/README.md]

The goals are data (GOALS, below): what each compares, its threshold, which script measures it and how to
read that script's result file. The benchmark scripts take their thresholds from here, so a goal is stated
once. For each goal the newest file (by its meta date) that measures it is shown; older runs stay in git
history, not on the page. A goal that no file measures yet says which command measures it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
GOAL_BATCH = 8  # the batch size inference's throughput goal is set at
REPORT_ONLY = {"convnextv2_atto@64"}  # a test-size model: its inference figures are reported, not held to a goal


@dataclass(frozen=True)
class Row:
    """One line of a goal's table: a label, the figures behind the value, the value held to the goal (None:
    reported only) and a note for the verdict column."""

    label: str
    figures: list
    value: float | None
    note: str = ""


@dataclass(frozen=True)
class Goal:
    key: str
    title: str
    script: str                 # the bench module that measures it
    run: str                    # the arguments that measure it
    threshold: float
    higher_is_better: bool
    unit: str                   # "x" (a ratio), "points" (percentage points), "%" (a fraction shown in %) or "ms"
    columns: tuple[str, ...]    # the label's header, then one per figure
    value_name: str
    rows: Callable[[dict], list[Row]]  # a result file's rows for this goal; [] when it does not measure it

    def show(self, value: float) -> str:
        if self.unit == "points":
            return f"{value:+.1f} points"
        if self.unit == "%":
            return f"{100 * value:.1f}%"
        if self.unit == "ms":
            return f"{value:+.1f} ms"
        return f"{value:.2f}x"

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.higher_is_better else value <= self.threshold

    def goal_text(self) -> str:
        return f"{'≥' if self.higher_is_better else '≤'} {self.show(self.threshold).lstrip('+')}"

    def verdict(self, row: Row) -> str:
        if row.value is None:
            return row.note or "reported, no goal"
        return ("met" if self.met(row.value) else "**not met**") + (f" ({row.note})" if row.note else "")


# --------------------------------------------------------------------------- reading each script's file

def _inference_rows(data: dict, latency: bool) -> list[Row]:
    rows = []
    for r in data.get("results", []):
        speed, meta = r.get("speed", {}), r.get("meta", {})
        name = f"{meta.get('model')}@{meta.get('image_size')}"
        if latency:
            lat = speed.get("latency", {})
            if "ours/e2e" not in lat or "ours_onnx/e2e" not in lat:
                continue
            ours, ort = lat["ours/e2e"]["p50_ms"], lat["ours_onnx/e2e"]["p50_ms"]
        else:
            tp = speed.get("throughput", {})
            ours, ort = (tp.get(k, {}).get(str(GOAL_BATCH)) for k in ("ours/e2e", "ours_onnx/e2e"))
            if not ours or not ort:
                continue
        ratio = ours / ort
        held = name not in REPORT_ONLY
        rows.append(Row(name, [ours, ort], ratio if held else None,
                        "" if held else f"{ratio:.2f}x: a test-size model, reported, no goal"))
    return rows


def _int8_speed_rows(data: dict) -> list[Row]:
    speed = data.get("speed", {})
    if data.get("meta", {}).get("model") != "ViT-L-14" or not {"ours int8", "ORT fp32"} <= speed.keys():
        return []
    (ours1, ours8), (ort1, ort8) = speed["ours int8"], speed["ORT fp32"]
    ours_ms, ort_ms = 1e3 * statistics.median(ours1), 1e3 * statistics.median(ort1)
    ours_ips, ort_ips = GOAL_BATCH / statistics.median(ours8), GOAL_BATCH / statistics.median(ort8)
    return [Row("p50 latency, 1 image (ms)", [ours_ms, ort_ms], ort_ms / ours_ms),
            Row(f"throughput, batch of {GOAL_BATCH} (images/s)", [ours_ips, ort_ips], ours_ips / ort_ips)]


def _int8_agreement_rows(data: dict) -> list[Row]:
    agreement, meta = data.get("agreement") or {}, data.get("meta", {})
    return [Row(name, [meta.get("model"), meta.get("agreement_photos"), f"{100 * agreement[name][1]:.1f}%"],
                agreement[name][0]) for name in ("ours int8", "ORT int8") if name in agreement]


def _train_rows(data: dict) -> list[Row]:
    by = {(r["loop"], r["workers"]): r["images_per_s"] for r in data.get("rows", [])}
    rows = [Row(f"DataLoader workers {w}", [ours, by[("plain PyTorch", w)]], ours / by[("plain PyTorch", w)])
            for (loop, w), ours in by.items() if loop.startswith("ours") and ("plain PyTorch", w) in by]
    if len(rows) > 1:
        best_ours = max(v for (loop, _), v in by.items() if loop.startswith("ours"))
        best_plain = max(v for (loop, _), v in by.items() if loop.startswith("plain"))
        rows.append(Row("best of each", [best_ours, best_plain], best_ours / best_plain))
    return rows


def _accuracy_rows(data: dict) -> list[Row]:
    results, args = data.get("results", {}), data.get("args", {})
    if not results.get("ours") or not results.get("plain"):
        return []
    ours, plain = (100 * statistics.mean(r["final"] for r in results[k]) for k in ("ours", "plain"))
    label = f"{len(results['ours'])} seeds, {args.get('epochs')} epochs, {args.get('img_size')} px" + \
        (", --quick" if args.get("quick") else "")
    return [Row(label, [ours, plain], ours - plain)]


def _gpu_runs(data: dict) -> bool:
    return data.get("meta", {}).get("mode") == "cuda"  # not --cpu-smoke, not --estimate-memory


def _gpu_ratio_rows(data: dict) -> list[Row]:
    if not _gpu_runs(data):
        return []
    return [Row(f"{r['precision']}, channels_last {'on' if r['channels_last'] else 'off'}",
                [data["meta"].get("gpu")], r["ours_over_plain"]) for r in data.get("ratios", [])]


def _gpu_mfu_rows(data: dict) -> list[Row]:
    bf16 = [r for r in data.get("clip", []) if r.get("precision") == "bf16" and r.get("mfu") is not None]
    if not _gpu_runs(data) or not bf16:
        return []
    best = max(bf16, key=lambda r: r["mfu"])
    return [Row(f"{best['model']} bf16, grad checkpointing {'on' if best['grad_checkpointing'] else 'off'} "
                f"(the better of off/on)", [data["meta"].get("gpu"), best["bs"], best["images_per_s"]],
                best["mfu"])]


def _serve_rows(data: dict, measure: str) -> list[Row]:
    """bench/serve.py's file: Serve's p50 latency (ms added) or throughput, or Ray Data's throughput (ratios)."""
    meta, serving, ray_data = data.get("meta", {}), data.get("serving", {}), data.get("ray_data", {})
    name = f"{meta.get('model')}@{meta.get('image_size')}"
    if measure == "latency" and "latency" in serving:
        ours, base = (serving["latency"][c]["p50_ms"] for c in ("serve", "in-process"))
        return [Row(f"{name}, one client", [ours, base], ours - base)]
    if measure == "serve" and "throughput" in serving:
        ours, base = (serving["throughput"][c] for c in ("serve", "in-process"))
        return [Row(f"{name}, {meta.get('clients')} clients, {meta.get('replicas')} replica(s)",
                    [ours, base, serving.get("mean_batch")], ours / base)]
    if measure == "data" and "throughput" in ray_data:
        ours, base = (ray_data["throughput"][c] for c in ("ray-data", "in-process"))
        return [Row(f"{name}, {meta.get('data_images')} files, {meta.get('data_replicas')} actor(s)", [ours, base],
                    ours / base)]
    return []


GOALS = {g.key: g for g in (
    Goal("inference_latency", "Inference latency: ours end to end vs ONNX Runtime end to end, each model size",
         "inference", "", 1.10, False, "x", ("model", "ours p50 ms", "ORT p50 ms"), "ours / ORT",
         lambda d: _inference_rows(d, latency=True)),
    Goal("inference_throughput", f"Inference throughput at batch {GOAL_BATCH}: ours end to end vs ONNX Runtime "
         "end to end, each model size", "inference", "", 0.95, True, "x",
         ("model", "ours img/s", "ORT img/s"), "ours / ORT", lambda d: _inference_rows(d, latency=False)),
    Goal("int8_speed", "int8: ViT-L/14 ours int8 vs ONNX Runtime fp32 (speed-up)", "int8", "--random-vit-l14",
         1.5, True, "x", ("measure", "ours int8", "ORT fp32"), "speed-up", _int8_speed_rows),
    Goal("int8_agreement", "int8: top-1 agreement with fp32 on the photos, a trained model", "int8",
         "--model-file RUN/vit_flowers.pth", 0.99, True, "%", ("contender", "model", "photos", "int8 accuracy"),
         "agreement", _int8_agreement_rows),
    Goal("train_throughput", "Training images/s on the CPU: our fastai learner vs the plain PyTorch loop",
         "train_throughput", "--epochs 1", 1.0, True, "x", ("", "ours img/s", "plain img/s"), "ours / plain",
         _train_rows),
    Goal("accuracy", "From-scratch accuracy: our recipe vs the plain loop (valid accuracy %, last epoch, mean "
         "over seeds)", "accuracy_proxy", "--quick", 5.0, True, "points", ("run", "ours %", "plain %"),
         "ours - plain", _accuracy_rows),
    Goal("gpu_train_throughput", "GPU training images/s: ours vs the plain loop on CUDA", "gpu_check", "", 1.0,
         True, "x", ("precision", "GPU"), "ours / plain", _gpu_ratio_rows),
    Goal("gpu_mfu", "GPU: ViT-L/14 bf16 training MFU (on an H100)", "gpu_check", "", 0.40, True, "%",
         ("config", "GPU", "batch", "img/s"), "MFU", _gpu_mfu_rows),
    Goal("serve_throughput", f"Ray Serve throughput: concurrent clients over HTTP vs in-process predict_batch at "
         f"batch {GOAL_BATCH}", "serve", "", 0.95, True, "x", ("run", "Serve img/s", "in-process img/s",
                                                                "mean batch"), "Serve / in-process",
         lambda d: _serve_rows(d, "serve")),
    Goal("serve_latency", "Ray Serve p50 latency: one client over HTTP vs in-process predict", "serve", "", 10.0,
         False, "ms", ("run", "Serve p50 ms", "in-process p50 ms"), "added", lambda d: _serve_rows(d, "latency")),
    Goal("ray_data_throughput", f"Ray Data batch prediction (flowers-predict --engine ray) vs in-process "
         f"predict_batch, images/s at batch {GOAL_BATCH}", "serve", "", 0.80, True, "x",
         ("run", "Ray Data img/s", "in-process img/s"), "Ray Data / in-process", lambda d: _serve_rows(d, "data")),
)}


# --------------------------------------------------------------------------- the page

def load_results(folder: Path) -> list[tuple[Path, dict]]:
    """Every result file in `folder`, newest first (by meta date, then name); each dict gets `script`: its
    meta's, else the file name before the time stamp."""
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable result file ({e}); move it out of {folder}") from e
        data["script"] = data.get("meta", {}).get("script") or path.stem.rsplit("-", 1)[0]
        found.append((path, data))
    return sorted(found, key=lambda pd: (str(pd[1].get("meta", {}).get("date", "")), pd[0].name), reverse=True)


def newest(goal: Goal, results: list[tuple[Path, dict]]) -> tuple[Path, dict, list[Row]] | None:
    for path, data in results:
        if data["script"] == goal.script and (rows := goal.rows(data)):
            return path, data, rows
    return None


def _fig(value, link: str) -> str:
    """A measured number links to its file; a name (model, GPU) is shown as it is."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"[{value:.1f}]({link})" if isinstance(value, float) else f"[{value}]({link})"


def goal_verdict(goal: Goal, rows: list[Row]) -> str:
    held = [r for r in rows if r.value is not None]
    if not held:
        return "reported, no goal"
    return "met" if all(goal.met(r.value) for r in held) else "**not met**"


def section(goal: Goal, found: tuple[Path, dict, list[Row]] | None, out_dir: Path) -> tuple[list[str], list[str]]:
    """(summary row, section lines) for one goal."""
    command = f"python -m bench.{goal.script}" + (f" {goal.run}" if goal.run else "")
    lines = [f"## {goal.title}", "", f"Goal: {goal.value_name} {goal.goal_text()}.", ""]
    if found is None:
        lines += [f"Not measured yet (run: `{command}`).", ""]
        return [goal.title, goal.goal_text(), f"not measured yet (run: `{command}`)", "–"], lines
    path, data, rows = found
    link = Path(os.path.relpath(path, out_dir)).as_posix()
    meta = data.get("meta", {})
    lines += [f"From [{path.name}]({link}): {meta.get('date', 'date unknown')}, {meta.get('cpu', 'CPU unknown')}, "
              f"{meta.get('cores', '?')} cores, torch {meta.get('torch', '?')}, commit {meta.get('commit') or '?'}; "
              f"`{meta.get('command', command)}`.", ""]
    header = [*goal.columns, goal.value_name, "verdict"]
    table = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        value = "–" if r.value is None else f"[{goal.show(r.value)}]({link})"
        table.append("| " + " | ".join([r.label, *(_fig(f, link) for f in r.figures), value, goal.verdict(r)]) + " |")
    lines += [*table, ""]
    return [goal.title, goal.goal_text(), goal_verdict(goal, rows), f"[{path.name}]({link})"], lines


def render(results_dir: Path, out: Path) -> str:
    results = load_results(results_dir) if results_dir.is_dir() else []
    out_dir = out.resolve().parent
    summary, body = [], []
    for goal in GOALS.values():
        row, lines = section(goal, newest(goal, results), out_dir)
        summary.append("| " + " | ".join(row) + " |")
        body += lines
    history, docs = (Path(os.path.relpath(path, out_dir)).as_posix()
                     for path in (BENCH / "RESULTS.md", BENCH.parent / "docs" / "benchmarks.md"))
    intro = (
        "Generated by `python -m bench.report` from the result files in `bench/results/`; do not edit by hand. "
        f"Each benchmark (`python -m bench.NAME`, listed in [docs/benchmarks.md]({docs})) writes one JSON file per "
        "run there, with the machine, torch version, commit, UTC date and command line. For each goal the newest "
        "file that measures it is shown, and every figure links to its file; superseded runs live in git history. "
        "The machine is shared and its load drifts: ratios measured in one run (contenders timed in turn) hold, "
        "absolute times do not compare across runs. The runs made before result files existed: "
        f"[RESULTS.md]({history}) (the historical record).")
    return "\n".join(["# Benchmark results: the current figure for each goal", "", intro, "",
                      "| goal | threshold | verdict | result file |", "|---|---|---|---|", *summary, "",
                      *body]).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=BENCH / "results", help="the result files (default bench/results)")
    p.add_argument("--out", type=Path, default=BENCH / "README.md", help="the page to write (default bench/README.md)")
    args = p.parse_args(argv)
    try:
        text = render(args.results, args.out)
    except ValueError as e:
        print(f"bench.report: {e}", file=sys.stderr)
        return 1
    from flowers_classifier.files import atomic_write
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
