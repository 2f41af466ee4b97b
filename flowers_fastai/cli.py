"""The trainer's command lines: `flowers-train`, `flowers-export`, `flowers-evaluate`, `flowers-data`,
`flowers-experiments`, `flowers-wheelhouse` (train.py and export.py call the first two; `python -m flowers_fastai
COMMAND` runs any of them). Each parses, calls the library, and turns its typed errors into exit codes:
2 for a problem with the input (the message says which file or flag), 1 for a run that failed, 130 for Ctrl-C.
The parsers live here, in argument groups; train.py's, which is also a run's configuration schema (experiments
and --resume read it), stays in `flowers_fastai.train`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement

from flowers_classifier import ModelFileError
from flowers_classifier.aot import CpuPackageError
from flowers_classifier.classes import CLASSES
from flowers_classifier.cli import quiet_third_party_warnings
from flowers_classifier.errors import FlowersError
from flowers_classifier.files import write_json
from flowers_classifier.payload import default_model_path

from . import distributed
from . import experiments as exp
from . import wheelhouse as wh
from .audit import AUDIT_MIN_SIZE, audit_table, format_report, inspect_files
from .calibration import EvaluationError
from .data import FLOWERS_URL, DatasetError, download_flowers, scan_folder
from .evaluate import evaluate_file, evaluate_run, summary, wise_ft_sweep, wise_ft_table
from .export import CLI_USAGE, ExportError, export_files
from .hub import ShareError
from .onnx_export import OnnxExportError
from .probes import SanityCheckError
from .train import TrainingInterrupted, build_parser, resume_args
from .train import train as train_run


def train(argv: list[str] | None = None) -> int:
    """`python train.py` / `flowers-train`: one run (the options: flowers_fastai.train.build_parser)."""
    quiet_third_party_warnings()
    args = build_parser().parse_args(argv)
    try:
        train_run(resume_args(args.resume) if args.resume else args)
    except TrainingInterrupted as e:  # this and SanityCheckError before FlowersError, which both are
        print(f"\n{e}", file=sys.stderr)
        return 130
    except SanityCheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FlowersError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


HUB_ONNX = Path("<the --hub folder>")  # a bare --onnx: model.onnx in the --hub folder


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export.py", description=CLI_USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR|MODEL.pth",
                   help="run folder written by train.py (metrics.json + best.pth), or (with --onnx) an exported .pth")
    w = p.add_argument_group("the .pth")
    w.add_argument("--out", type=Path, help=f"target .pth (default {default_model_path('cnn')} or "
                                            f"{default_model_path('clip')})")
    g = w.add_mutually_exclusive_group()
    g.add_argument("--half", dest="half", action="store_const", const=True,
                   help="store weights in fp16 (default for clip; halves the file)")
    g.add_argument("--fp32", dest="half", action="store_const", const=False,
                   help="store weights in fp32 (default for cnn)")
    w.add_argument("--data", type=Path, help="where the run's split.csv paths live, for the calibration "
                                             "(default: the folder the run trained on)")
    w.add_argument("--no-calibrate", action="store_true", help="write the payload without a fitted temperature")
    w.add_argument("--wise-ft", type=float, metavar="ALPHA",
                   help="CLIP run: interpolate (1 - ALPHA) * zero-shot + ALPHA * fine-tuned weights, ALPHA in [0, 1]")
    s = p.add_argument_group("other formats and CPU serving")
    s.add_argument("--onnx", type=Path, nargs="?", const=HUB_ONNX, metavar="OUT.onnx",
                   help="write an fp32 ONNX graph (dynamic batch axis); bare (after --hub DIR): DIR/model.onnx")
    s.add_argument("--opset", type=int, help="ONNX opset for --onnx (default: the exporter's)")
    s.add_argument("--cpu-package", action="store_true",
                   help="also compile the .pth for this CPU into NAME.cpu.pt2 beside it (AOTInductor; load_model "
                        "serves it on the CPU); needs a C++ compiler")
    s.add_argument("--int8", action="store_true",
                   help="the .pth asks to be served int8 on the CPU (quantised at load time; weights stored as "
                        "usual); with --onnx: ONNX Runtime's int8 quantisation of the graph")
    h = p.add_argument_group("sharing on the Hugging Face Hub (docs/sharing.md)")
    h.add_argument("--hub", type=Path, metavar="DIR",
                   help="write the folder `hf upload ORG/NAME DIR` publishes: model.safetensors, config.json, "
                        "README.md (the model card), and model.onnx with a bare --onnx")
    h.add_argument("--space", type=Path, metavar="DIR",
                   help="write a Gradio Space (`hf upload ORG/NAME DIR --repo-type space`): the demo on this model")
    h.add_argument("--license", metavar="ID",
                   help="the card's licence (a Hub licence id, e.g. apache-2.0), over the starting weights' own")
    h.add_argument("--repo-id", metavar="ORG/NAME",
                   help="the Hub id the card's usage example and the Space's model link name (default ORG/<DIR>)")
    h.add_argument("--examples", type=Path, metavar="PHOTOS_DIR",
                   help="--space: its example photos (photos, or <class>/ folders: the first of each); default: "
                        "one per class from the run's test (else valid) split")
    return p


def export(argv: list[str] | None = None) -> int:
    """`python export.py` / `flowers-export`: a run folder or an exported .pth -> .pth, .onnx, CPU package."""
    quiet_third_party_warnings()
    p = export_parser()
    args = p.parse_args(argv)
    from_pth = not args.run_dir.is_dir()
    hub_onnx = args.onnx == HUB_ONNX
    onnx = None if hub_onnx else args.onnx
    sharing = args.hub or args.space
    int8_copy = from_pth and args.int8 and args.out and not (onnx or sharing)
    if hub_onnx and not args.hub:
        p.error("--onnx without a path writes model.onnx into the --hub folder: add --hub DIR, or give --onnx OUT.onnx")
    for flag, value in (("--license", args.license), ("--repo-id", args.repo_id)):
        if value is not None and not sharing:
            p.error(f"{flag} goes into the model card or the Space: add --hub DIR or --space DIR")
    if args.examples is not None and not args.space:
        p.error("--examples are the Space's example photos: add --space DIR")
    if args.repo_id is not None and (args.repo_id.count("/") != 1 or not all(args.repo_id.split("/"))):
        p.error(f"--repo-id {args.repo_id}: expected ORG/NAME, the Hub id you will upload to")
    if args.hub and args.space and args.hub.resolve() == args.space.resolve():
        p.error(f"--hub and --space name the same folder {args.hub}: a model repo and a Space are two folders")
    if args.wise_ft is not None and from_pth:
        p.error(f"--wise-ft interpolates a run folder's weights, and {args.run_dir} is not one")
    if args.int8 and args.cpu_package:
        p.error("--cpu-package compiles the fp32 model and an --int8 file is served quantised, not compiled: "
                "choose one (docs/int8.md compares them)")
    if from_pth and not (args.onnx or int8_copy or args.cpu_package or sharing):
        p.error(f"{args.run_dir} is not a run folder; exporting a .pth file is only meaningful with --onnx OUT.onnx "
                f"or --int8 --out NEW.pth, --cpu-package, --hub DIR or --space DIR")
    if args.out and from_pth and not int8_copy:
        p.error(f"--out writes a .pth from a run folder (or with --int8 alone), and {args.run_dir} is not one; "
                f"drop --out")
    try:
        export_files(args.run_dir, out=args.out, half=args.half, onnx=onnx, opset=args.opset,
                     cpu_package=args.cpu_package, int8=args.int8, data=args.data, calibrate=not args.no_calibrate,
                     wise_ft=args.wise_ft, hub=args.hub, hub_onnx=hub_onnx, space=args.space, license=args.license,
                     repo_id=args.repo_id, examples=args.examples)
    except (ExportError, OnnxExportError, CpuPackageError, ShareError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def evaluate_parser() -> argparse.ArgumentParser:
    from . import evaluate as ev

    p = argparse.ArgumentParser(prog="flowers-evaluate", description=ev.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, help="an exported .pth, or a train.py run folder")
    p.add_argument("--data", type=Path, help="<root>/<class>/<images> folder (required for a .pth; for a run "
                                             "folder, where its split.csv paths live if not where it trained)")
    p.add_argument("--out", type=Path, help="report folder (default: the run folder, or runs/eval-<name>)")
    p.add_argument("--bs", type=int, default=32, help="images per forward pass")
    m = p.add_argument_group("what to measure")
    m.add_argument("--tta", action="store_true", help="also report accuracy averaged over 10 views per image")
    m.add_argument("--wise-ft-sweep", action="store_true",
                   help="CLIP run folder: valid accuracy, NLL and ECE of the WiSE-FT interpolation for alpha "
                        "0, 0.1, ..., 1 (wise_ft.json, wise_ft.png) instead of the evaluation")
    return p


def evaluate(argv: list[str] | None = None) -> int:
    """`flowers-evaluate`: the report of an exported model on a folder, or of a run folder on its own split."""
    quiet_third_party_warnings()
    p = evaluate_parser()
    args = p.parse_args(argv)
    if args.wise_ft_sweep and not args.target.is_dir():
        p.error(f"--wise-ft-sweep needs a run folder (a CLIP run trained from pretrained weights), not {args.target}")
    try:
        if args.wise_ft_sweep:
            report = wise_ft_sweep(args.target, args.data, args.out, args.bs)
            print(wise_ft_table(report))
            print(f"wrote {', '.join(report['files'])} in {report['out_dir']}")
            return 0
        if args.target.is_dir():
            report = evaluate_run(args.target, args.data, args.out, args.tta, args.bs)
        elif args.data is None:
            raise EvaluationError(f"evaluating the model file {args.target} needs the images: pass --data DIR "
                                  f"(a <root>/<class>/<images> folder).")
        else:
            report = evaluate_file(args.target, args.data, args.out, args.tta, args.bs)
    except (EvaluationError, ExportError, ModelFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(report))
    print(f"wrote {', '.join(report['files'])} in {report['out_dir']}")
    return 0


def data_parser() -> argparse.ArgumentParser:
    from . import data as data_module

    parser = argparse.ArgumentParser(prog="flowers-data", description=data_module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="fetch TensorFlow's flower_photos into --dest")
    dl.add_argument("--dest", default="data/flowers", help="target folder (default: data/flowers)")
    dl.add_argument("--url", default=FLOWERS_URL, help="archive URL (default: TensorFlow's flower_photos)")
    dl.add_argument("--force", action="store_true", help="download and extract again even if --dest exists")
    au = sub.add_parser("audit", help="counts, undecodable files, duplicates (also across classes), small images")
    au.add_argument("root", type=Path, help="folder laid out as <root>/<class>/<images>")
    au.add_argument("--json", type=Path, help="also write the full report to this JSON file")
    au.add_argument("--min-size", type=int, default=AUDIT_MIN_SIZE,
                    help=f"flag images whose short side is below this many pixels (default {AUDIT_MIN_SIZE})")
    return parser


def data(argv: list[str] | None = None) -> int:
    """`flowers-data download|audit`: fetch the photos; report on a folder (its problems are findings, not
    failures: exit 0 unless the folder cannot be scanned)."""
    quiet_third_party_warnings()
    args = data_parser().parse_args(argv)
    try:
        if args.command == "audit":
            df = scan_folder(args.root)
            report = audit_table(args.root, df, inspect_files(args.root, df["path"].tolist()), args.min_size)
            print(format_report(report))
            if args.json:
                write_json(args.json, report)
                print(f"wrote {args.json}")
            return 0
        dest = download_flowers(args.dest, args.url, args.force)
        counts = scan_folder(dest)["label"].value_counts().reindex(list(CLASSES))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{dest}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    return 0


def experiments_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowers-experiments",
                                description="Run a TOML plan of train.py runs (grid x seeds and/or named runs) "
                                            "and summarise them; run it again to skip finished runs, resume "
                                            "interrupted ones and train again those whose settings changed.")
    p.add_argument("plan", type=Path, help="the TOML plan (see experiments/ablation.toml)")
    p.add_argument("--out", type=Path, help="experiment folder (default runs/<plan name>)")
    p.add_argument("--data", help="photo folder for every run, over the plan's data key")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="over the plan's [defaults] (and every configuration), e.g. --set epochs=4; "
                        "VALUE in TOML syntax (a bare word is a string); repeatable")
    p.add_argument("--dry-run", action="store_true", help="print the runs and what would happen to each, then stop")
    errors = p.add_mutually_exclusive_group()
    errors.add_argument("--keep-going", dest="stop_on_error", action="store_false", default=False,
                        help="record a failed run and go on with the others (the default)")
    errors.add_argument("--stop-on-error", action="store_true", help="stop at the first failed run")
    return p


def experiments(argv: list[str] | None = None) -> int:
    """`flowers-experiments PLAN.toml`: run (or resume) every run of the plan, then results.csv + summary."""
    quiet_third_party_warnings()
    args = experiments_parser().parse_args(argv)
    out = args.out or Path("runs") / args.plan.stem
    try:
        overrides = exp.parse_overrides(args.overrides) | ({} if args.data is None else {"data": args.data})
        runs = exp.plan_runs(exp.read_plan(args.plan), args.plan, out, overrides)
    except exp.PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        exp.dry_run(runs)
        return 0
    try:
        results = exp.run_experiment(runs, out, args.stop_on_error)
    except (KeyboardInterrupt, TrainingInterrupted):
        print(f"\ninterrupted; results so far in {out / 'results.csv'}. Run the same command again to resume.",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - --stop-on-error: the failure is already recorded
        print(f"error: stopped at a failed run ({type(e).__name__}: {e}); see {out / 'results.csv'}",
              file=sys.stderr)
        return 1
    failed = int((results["status"] != "finished").sum())
    print(f"{len(results) - failed} of {len(results)} runs finished; wrote {out / 'results.csv'}, "
          f"{out / 'summary.md'} and {out / 'summary.png'}")
    return 1 if failed else 0


def wheelhouse_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flowers_fastai.wheelhouse",
        description="Download into DIR every wheel a machine that already has PyTorch needs to train and serve "
                    "offline; then there: " + wh.install_command(Path("DIR"), list(wh.DEFAULT_EXTRAS)))
    parser.add_argument("dir", metavar="DIR", type=Path, help="a new or empty folder for the wheels")
    t = parser.add_argument_group("the target machine")
    t.add_argument("--python-version", metavar="X.Y",
                   help=f"the target's Python (default: this interpreter's, {wh.sysconfig.get_python_version()})")
    t.add_argument("--platform", action="append", default=[], metavar="TAG",
                   help="the target's wheel platform tag, e.g. manylinux_2_28_x86_64 (older manylinux tags "
                        "are added); repeat for several (default: this machine's)")
    t.add_argument("--exclude", default=",".join(wh.DEFAULT_EXCLUDE), metavar="NAMES",
                   help="comma-separated distributions the target already has, name, name==version (resolve "
                        "against that version) or glob; replaces the default (%(default)s). nvidia-*, cuda-* "
                        "and triton are always left out")
    t.add_argument("--extras", default=",".join(wh.DEFAULT_EXTRAS), metavar="EXTRAS",
                   help="the project's extras to include, comma-separated (default: %(default)s; "
                        "also demo, onnx, tensorboard)")
    return parser


def wheelhouse(argv: list[str] | None = None) -> int:
    """`python -m flowers_fastai.wheelhouse DIR` / `flowers-wheelhouse`: the offline wheelhouse (docs/offline.md)."""
    quiet_third_party_warnings()
    args = wheelhouse_parser().parse_args(argv)
    try:
        available = list(wh.project_metadata()["project"]["optional-dependencies"])
        extras = wh.parse_extras(args.extras, available)
        python_version = wh.check_python_version(args.python_version) if args.python_version else None
        exclusions = wh.parse_excludes(args.exclude)
        print(f"building the wheelhouse in {args.dir} (pip download; a few minutes) ...", flush=True)
        wheels = wh.build_wheelhouse(args.dir, python_version, args.platform, exclusions, extras)
    except (wh.WheelhouseError, InvalidRequirement) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(p.stat().st_size for p in wheels.values()) / 1e6
    print("\n".join(f"  {p.name}" for p in sorted(wheels.values())))
    print(f"{len(wheels)} wheels, {total:.1f} MB in {args.dir} (list and reasons: {args.dir / wh.MANIFEST})")
    print(f"on the offline machine: {wh.install_command(args.dir, extras)}")
    return 0


COMMANDS = {"train": train, "export": export, "evaluate": evaluate, "data": data, "experiments": experiments,
            "wheelhouse": wheelhouse}


def main(argv: list[str] | None = None) -> int:
    """`python -m flowers_fastai COMMAND ...`: the console scripts without installing them."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m flowers_fastai {{{','.join(COMMANDS)}}} ... (COMMAND --help for its options)",
              file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
