"""Experiments: a TOML plan of train.py runs (a grid over options, named runs, seeds), run one after the
other through the same code as train.py, each into its own run folder, collected into one results table.

    python -m flowers_fastai experiments PLAN.toml [--out DIR] [--data DIR] [--dry-run] [--stop-on-error]

A plan (keys are train.py's long flags, dashes or underscores; `true` for a switch such as no-pretrained):

    seeds = [0, 1, 2]
    [defaults]          # every run
    model = "convnextv2_atto"
    no-pretrained = true
    [grid]              # the cartesian product of these lists ...
    lr = [1e-3, 2e-3]
    [[run]]             # ... and/or named runs, each a set of options over the defaults
    name = "mixup"
    mixup = 0.2

Every configuration runs once per seed, in <out>/<name or k=v,...>-seed<S>. This module owns the plan format,
the run folders' names, what a second invocation does with each folder (finished with the settings the plan
now resolves to: skipped; finished or interrupted with other settings: moved to <out>/superseded/ and run
again; interrupted: resumed as train.py --resume; failed, never started or not resumable: run again) and the
experiment's reports: results.csv (a row per run), summary.md (mean ± std over seeds per configuration) and
summary.png.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import re
import shutil
import sys
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from flowers_classifier.errors import FlowersError
from flowers_classifier.files import atomic_write

from .plots import plot_experiment_summary
from .train import TrainingInterrupted, build_parser, read_metrics, resolve_args, resume_args, train

PLAN_TABLES = ("defaults", "seeds", "grid", "run")
# Set per run by the experiment itself: the seed from `seeds`, the folder from --out, no export per run
# (every run would overwrite the same models/ file).
RESERVED = {"seed": "list the seeds in `seeds = [...]`", "out": "name the experiment folder with --out DIR",
            "resume": "run the same command again: interrupted runs are resumed",
            "export": "export the run you choose afterwards with export.py"}
ERROR_FILE = "error.txt"  # a failed run's exception and traceback, in its run folder
STATUS_ORDER = ("finished", "failed", "interrupted")
SUPERSEDED = "superseded"  # <out>/superseded/: run folders of settings the plan no longer asks for, kept
# train.py options that are no settings of a run: where its folder is (the experiment folder may move).
NOT_SETTINGS = ("out", "resume")


class PlanError(FlowersError, ValueError):
    """The plan cannot be run as written; the message names the plan file and key."""


@dataclass
class Run:
    """One training of the experiment: a configuration (its label and its own options) at one seed."""

    config: str
    options: dict          # plan keys (dashes) -> values: the defaults with this configuration's over them
    varied: dict           # the configuration's own options (grid values or the named run's), for the table
    seed: int
    folder: Path
    argv: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # train.py's resolved options, as metrics.json's "config"


def _flag(key: str) -> str:
    return key.replace("_", "-")


def read_plan(path: Path) -> dict:
    """The TOML plan, its table names and value types checked."""
    try:
        plan = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PlanError(f"plan {path}: no such file; pass the path of a TOML plan (see experiments/).") from None
    except tomllib.TOMLDecodeError as e:
        raise PlanError(f"plan {path}: not valid TOML ({e}); fix the file.") from None
    unknown = sorted(set(plan) - set(PLAN_TABLES))
    if unknown:
        raise PlanError(f"plan {path}: unknown top-level key(s) {', '.join(unknown)}; a plan holds "
                        f"{', '.join(PLAN_TABLES)} (put train.py options under [defaults]).")
    grid = plan.get("grid", {})
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise PlanError(f"plan {path}: [grid] {key} must be a non-empty list of values, e.g. {key} = [1, 2].")
    seeds = plan.get("seeds", [build_parser().get_default("seed")])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise PlanError(f"plan {path}: seeds must be a non-empty list of integers, e.g. seeds = [0, 1, 2].")
    return plan


def _label(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def configurations(plan: dict) -> list[tuple[str, dict]]:
    """(label, own options) per configuration: the grid's product, then the named runs; the defaults alone
    when the plan has neither."""
    grid = {_flag(k): v for k, v in plan.get("grid", {}).items()}
    configs = []
    if grid:
        for combo in itertools.product(*grid.values()):
            own = dict(zip(grid, combo, strict=True))
            configs.append((",".join(f"{k}={_label(v)}" for k, v in own.items()), own))
    for i, table in enumerate(plan.get("run", [])):
        own = {_flag(k): v for k, v in table.items() if k != "name"}
        name = table.get("name") or ",".join(f"{k}={_label(v)}" for k, v in own.items()) or f"run{i}"
        configs.append((str(name), own))
    return configs or [("defaults", {})]


def folder_name(config: str, seed: int) -> str:
    """A run folder's name, from its configuration and seed alone (so a second invocation finds it)."""
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", f"{config}-seed{seed}")


def _argv(options: dict, flags: dict[str, argparse.Action]) -> list[str]:
    """train.py's command line for `options`: a switch is its flag when true (--no-X when false, for
    --X/--no-X flags), anything else --key value."""
    argv = []
    for key, value in options.items():
        if isinstance(value, bool):
            if value:
                argv.append(f"--{key}")
            elif f"--no-{key}" in flags:
                argv.append(f"--no-{key}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_overrides(items: list[str]) -> dict:
    """--set KEY=VALUE pairs as plan keys and TOML values (a value that is no TOML literal is a string)."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise PlanError(f"--set {item}: expected KEY=VALUE, e.g. --set epochs=4.")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        overrides[_flag(key.strip())] = value
    return overrides


def plan_runs(plan: dict, plan_path: Path, out: Path, overrides: dict | None = None) -> list[Run]:
    """Every run of the plan, each parsed by train.py's own parser: an unknown key or a bad value fails
    here, naming the plan key, before anything trains."""
    parser = build_parser()
    flags = parser._option_string_actions

    def fail(message: str):
        raise PlanError(message)

    defaults = {_flag(k): v for k, v in plan.get("defaults", {}).items()}
    # the keys as the plan spells them (dashes or underscores), for the error messages
    tables = [plan.get("defaults", {}), plan.get("grid", {}), *plan.get("run", [])]
    spelling = {_flag(k): k for table in tables for k in table}
    overrides = overrides or {}
    configs = []
    for config, own in configurations(plan):
        options = defaults | own | overrides
        for key in options:
            where = "[defaults]" if key not in own else f"configuration {config!r}"
            spelled = spelling.get(key, key)
            if key in RESERVED:
                raise PlanError(f"plan {plan_path}: key {spelled!r} ({where}) is set by the experiment: "
                                f"{RESERVED[key]}.")
            if f"--{key}" not in flags:
                raise PlanError(f"plan {plan_path}: unknown key {spelled!r} ({where}): it is not a train.py flag "
                                f"(--{key}); see python train.py --help.")
        configs.append((config, own, options))
    runs = []
    # Seed by seed: an experiment cut short still holds every configuration at its first seeds.
    for seed in plan.get("seeds", [parser.get_default("seed")]):
        for config, own, options in configs:
            folder = out / folder_name(config, seed)
            argv = _argv(options, flags) + ["--seed", str(seed), "--out", str(folder), "--no-export"]
            parser.error = lambda msg, config=config: fail(f"plan {plan_path}, configuration {config!r}: {msg}")
            try:
                settings = resolved_settings(parser.parse_args(argv))
            except ValueError as e:  # a value train.py refuses once resolved (--min-scale, fp16 without CUDA)
                fail(f"plan {plan_path}, configuration {config!r}: {e}")
            runs.append(Run(config, options, own, seed, folder, argv, settings))
    names = [r.folder.name for r in runs]
    if len(set(names)) != len(names):
        raise PlanError(f"plan {plan_path}: two runs would share a folder ({names}); give each [[run]] a "
                        f"distinct name and list each seed once.")
    return runs


def resolved_settings(args: argparse.Namespace) -> dict:
    """The options train() runs `args` with (arch presets filled in), as metrics.json's "config" records them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(resolve_args(args)).items()}


def changed_settings(run: Run, config: dict) -> list[str]:
    """The settings `run` resolves to now that differ from `config` (the folder's metrics.json), in words. A
    flag missing from `config` (new in train.py since that run) counts as unchanged at its default."""
    parser = build_parser()
    changes = []
    for key, value in run.settings.items():
        before = config.get(key, parser.get_default(key))
        if key not in NOT_SETTINGS and before != value:
            changes.append(f"--{_flag(key)} {_label(before)} -> {_label(value)}")
    return changes


def run_state(run: Run) -> tuple[str, str]:
    """What this invocation does with the run's folder, and why: 'finished' (skip it), 'resume' (interrupted
    with a finished epoch to continue from), 'rerun' (it ran with other settings: set it aside, train again)
    or 'start' (train afresh: never started, or nothing train.py --resume can continue)."""
    path = run.folder / "metrics.json"
    if not path.is_file():
        return "start", ""
    metrics = json.loads(path.read_text())
    changes = changed_settings(run, metrics.get("config", {}))
    if changes:
        return "rerun", f"ran with other settings ({', '.join(changes)})"
    if metrics.get("status") == "finished":
        return "finished", ""
    history = run.folder / "history.csv"
    if not ((run.folder / "last.pth").is_file() and len(history.read_text().splitlines()) > 1):
        return "start", "stopped before its first finished epoch"
    try:
        read_metrics(run.folder)
    except ValueError as e:  # e.g. --lr auto interrupted before lr_find chose the LR: stage 2 has no LR yet
        return "start", f"train.py cannot resume it: {e}"
    return "resume", ""


def set_aside(folder: Path) -> Path:
    """Move a run folder to <experiment>/superseded/<name> (<name>-2, ... when taken): kept, never deleted."""
    aside = folder.parent / SUPERSEDED
    aside.mkdir(exist_ok=True)
    target, n = aside / folder.name, 1
    while target.exists():
        n += 1
        target = aside / f"{folder.name}-{n}"
    return folder.rename(target)


def execute(run: Run) -> None:
    """Train `run` (or continue it) in-process, through train.py's own train()."""
    state, why = run_state(run)
    if state == "resume":
        (run.folder / ERROR_FILE).unlink(missing_ok=True)  # an earlier failure of this run, tried again now
        print(f"== resuming {run.folder.name}", flush=True)
        train(resume_args(run.folder))
        return
    if state == "rerun":  # its results belong to other settings: keep them, out of this experiment's table
        print(f"== {run.folder.name} {why}: moved to {set_aside(run.folder)}", flush=True)
    elif run.folder.exists():  # a failed run, or nothing to resume: start it afresh
        print(f"== {run.folder.name}: starting again ({why or 'failed'})", flush=True)
        shutil.rmtree(run.folder)
    print(f"== running {run.folder.name}: train.py {' '.join(run.argv)}", flush=True)
    train(build_parser().parse_args(run.argv))


def free_memory() -> None:
    """Free the last run's learner before the next run builds its own: fastai's Learner and its callbacks
    reference each other, so only the cycle collector frees its model and optimizer, at a time of its own
    choosing; on a GPU, hand the freed blocks back too, so a grid of large models does not run out of memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def record_failure(run: Run, error: BaseException) -> None:
    run.folder.mkdir(parents=True, exist_ok=True)
    text = f"{type(error).__name__}: {error}\n\n" + "".join(traceback.format_exception(error))
    atomic_write(run.folder / ERROR_FILE, lambda tmp: Path(tmp).write_text(text))


def result_row(run: Run, varied: list[str]) -> dict:
    """The run's row of results.csv, from its folder (metrics.json, history.csv, error.txt). `varied`: the
    options any configuration sets, each with this run's resolved value. A folder that ran with other
    settings (an experiment stopped before it ran again) counts as not run: its figures are not this run's."""
    row = dict(config=run.config, **{key: run.settings.get(key.replace("-", "_")) for key in varied},
               seed=run.seed, status="not run", best_accuracy=None, best_epoch=None, final_accuracy=None,
               final_train_loss=None, final_valid_loss=None, wall_time_s=None, error="", run_dir=run.folder.name)
    metrics_path, error_path = run.folder / "metrics.json", run.folder / ERROR_FILE
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        changes = changed_settings(run, metrics.get("config", {}))
        if changes:
            return row | dict(error=f"its folder ran with other settings ({', '.join(changes)}); run the "
                                    f"experiment again to train it")
        row.update(status=metrics["status"], best_accuracy=metrics.get("best_accuracy"),
                   best_epoch=metrics.get("best_epoch"), wall_time_s=metrics.get("wall_time_s"))
        history = pd.read_csv(run.folder / "history.csv")
        if len(history):
            last = history.iloc[-1]
            row.update(final_accuracy=float(last["accuracy"]), final_train_loss=float(last["train_loss"]),
                       final_valid_loss=float(last["valid_loss"]))
    if error_path.is_file() and row["status"] != "finished":
        row.update(status="failed", error=error_path.read_text().split("\n", 1)[0])
    return row


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per configuration, over its finished seeds: mean and std of the best and final valid accuracy and
    the wall time; sorted by mean best accuracy, best first."""
    done = results[results["status"] == "finished"]
    table = done.groupby("config", sort=False).agg(
        seeds=("seed", "count"), best_mean=("best_accuracy", "mean"), best_std=("best_accuracy", "std"),
        final_mean=("final_accuracy", "mean"), final_std=("final_accuracy", "std"),
        wall_time_s=("wall_time_s", "mean"))
    return table.fillna({"best_std": 0.0, "final_std": 0.0}).sort_values("best_mean", ascending=False)


def summary_markdown(table: pd.DataFrame) -> str:
    """The summary as a markdown table, in %, the best configuration in bold."""
    lines = ["| configuration | seeds | best valid acc % (mean ± std) | final valid acc % | wall time s |",
             "|---|---|---|---|---|"]
    for i, (config, r) in enumerate(table.iterrows()):
        cells = [config, f"{int(r.seeds)}", f"{100 * r.best_mean:.1f} ± {100 * r.best_std:.1f}",
                 f"{100 * r.final_mean:.1f} ± {100 * r.final_std:.1f}", f"{r.wall_time_s:.0f}"]
        if i == 0:
            cells = [f"**{c}**" for c in cells[:-1]] + [cells[-1]]
            cells[0] += " (best)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_reports(runs: list[Run], out: Path) -> pd.DataFrame:
    """results.csv always; summary.md and summary.png once a run has finished. Returns the results."""
    varied = list(dict.fromkeys(key for run in runs for key in run.varied))
    results = pd.DataFrame([result_row(r, varied) for r in runs])
    results["best_epoch"] = results["best_epoch"].astype("Int64")  # an integer, even beside runs without one
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    table = summarize(results)
    if len(table):
        atomic_write(out / "summary.md", lambda tmp: Path(tmp).write_text(summary_markdown(table)))
        done = results[results["status"] == "finished"]
        seeds = {c: done.loc[done["config"] == c, "best_accuracy"].tolist() for c in table.index}
        plot_experiment_summary(table.index.tolist(), table["best_mean"].tolist(), table["best_std"].tolist(),
                                seeds, out / "summary.png")
    return results


def run_experiment(runs: list[Run], out: Path, stop_on_error: bool = False) -> pd.DataFrame:
    """Every run not finished yet, in order; a failure is recorded (error.txt, results.csv) and the next
    run starts unless `stop_on_error`. Ctrl-C stops the whole experiment (run it again to resume)."""
    for run in runs:
        if run_state(run)[0] == "finished":
            print(f"== {run.folder.name}: finished, skipped", flush=True)
            continue
        try:
            execute(run)
        except (KeyboardInterrupt, TrainingInterrupted):
            write_reports(runs, out)
            raise
        except Exception as e:  # noqa: BLE001 - any failure of one run is recorded, the others still run
            record_failure(run, e)
            print(f"== {run.folder.name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if stop_on_error:
                write_reports(runs, out)
                raise
        free_memory()  # here, where no exception (whose traceback holds the learner) is alive any more
        write_reports(runs, out)  # after every run: results.csv is current even if the experiment dies
    return write_reports(runs, out)


def dry_run(runs: list[Run]) -> None:
    actions = {"finished": "skip (finished)", "resume": "resume", "start": "train", "rerun": "train again"}
    for run in runs:
        state, why = run_state(run)
        print(f"{actions[state]:<16} {run.folder}: train.py {' '.join(run.argv)}")
        if why:
            aside = f": moved to {run.folder.parent / SUPERSEDED} first" if state == "rerun" else ""
            print(f"{'':<16} {why}{aside}")
