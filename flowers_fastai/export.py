"""Export: a finished (or interrupted) run folder -> a plain `.pth` payload for `flowers_classifier`, and
the `export.py` CLI (also `flowers-export`). The format itself and ONNX are the runtime's
(`flowers_classifier.payload`, `flowers_classifier.onnx_model`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from flowers_classifier.files import atomic_write
from flowers_classifier.onnx_model import OnnxExportError, export_onnx
from flowers_classifier.payload import ModelFileError, default_model_path, load_payload, make_payload

BEST_NAME = "best"  # run_dir/best.pth: the best weights on valid accuracy (SaveModelCallback)


class ExportError(ValueError):
    """The run folder cannot be exported. The message names the missing file."""


def read_run(run_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model spec from metrics.json, best weights from best.pth) of a run folder."""
    run_dir = Path(run_dir)
    metrics_path, weights_path = run_dir / "metrics.json", run_dir / f"{BEST_NAME}.pth"
    for path in (metrics_path, weights_path):
        if not path.is_file():
            raise ExportError(f"{path} not found: is {run_dir} a train.py run folder that finished an epoch?")
    spec = json.loads(metrics_path.read_text())["model"]
    return spec, torch.load(weights_path, map_location="cpu", weights_only=True)


def export_run(run_dir: str | Path, out: str | Path | None = None, half: bool | None = None) -> Path:
    """Write the payload of `run_dir` atomically to `out`. fp16 storage by default for CLIP."""
    spec, state_dict = read_run(run_dir)
    half = spec["family"] == "clip" if half is None else half
    payload = make_payload(spec, state_dict, half)
    out = Path(out) if out else default_model_path(spec["family"])
    return atomic_write(out, lambda tmp: torch.save(payload, tmp))


def load_source(source: str | Path) -> dict:
    """The payload of a run folder (its best weights, fp32) or of an exported .pth (validated on load)."""
    source = Path(source)
    if source.is_dir():
        return make_payload(*read_run(source), half=False)
    try:
        return load_payload(source)
    except ModelFileError as e:
        raise ExportError(str(e)) from e


# --------------------------------------------------------------------------- CLI

CLI_USAGE = """Export a train.py run folder to a plain .pth for flowers_classifier, and/or to ONNX.

    python export.py RUN_DIR [--out models/cnn_flowers.pth] [--half | --fp32]
    python export.py RUN_DIR|MODEL.pth --onnx OUT.onnx [--out PTH] [--opset N]

--onnx writes an fp32 ONNX graph (input `image` (N, 3, H, W) with a dynamic batch axis, outputs `logits`
and `probabilities`; the preprocessing spec as JSON in its metadata) and prints how far ONNX Runtime's
probabilities are from PyTorch's. With --onnx, a .pth is written only when --out is given too.
"""


def _export_onnx(source: Path, out: Path, opset: int | None) -> None:
    path, diff = export_onnx(load_source(source), out, opset)
    check = (f"max |p_onnx - p_torch| = {diff:.2e} on a random batch of 3" if diff is not None
             else "not checked: onnxruntime is not installed (pip install onnxruntime)")
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB); {check}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="export.py", description=CLI_USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR|MODEL.pth",
                   help="run folder written by train.py (metrics.json + best.pth), or (with --onnx) an exported .pth")
    p.add_argument("--out", type=Path, help=f"target .pth (default {default_model_path('cnn')} or "
                                            f"{default_model_path('clip')})")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--half", dest="half", action="store_const", const=True,
                   help="store weights in fp16 (default for clip; halves the file)")
    g.add_argument("--fp32", dest="half", action="store_const", const=False,
                   help="store weights in fp32 (default for cnn)")
    p.add_argument("--onnx", type=Path, metavar="OUT.onnx", help="write an fp32 ONNX graph (dynamic batch axis)")
    p.add_argument("--opset", type=int, help="ONNX opset for --onnx (default: the exporter's)")
    args = p.parse_args(argv)
    if not args.run_dir.is_dir() and not args.onnx:
        p.error(f"{args.run_dir} is not a run folder; exporting a .pth file is only meaningful with --onnx OUT.onnx")
    if args.out and not args.run_dir.is_dir():
        p.error(f"--out writes a .pth from a run folder, and {args.run_dir} is not one; drop --out")
    try:
        if args.onnx:
            _export_onnx(args.run_dir, args.onnx, args.opset)
        if not args.onnx or (args.out and args.run_dir.is_dir()):
            path = export_run(args.run_dir, args.out, args.half)
            print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    except (ExportError, OnnxExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
