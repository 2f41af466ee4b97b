"""Export a train.py run folder to a plain .pth for flowers_classifier, and/or to ONNX.

    python export.py RUN_DIR [--out models/cnn_flowers.pth] [--half | --fp32]
    python export.py RUN_DIR|MODEL.pth --onnx OUT.onnx [--out PTH] [--opset N]

--onnx writes an fp32 ONNX graph (input `image` (N, 3, H, W) with a dynamic batch axis, outputs `logits`
and `probabilities`; the preprocessing spec as JSON in its metadata) and prints how far ONNX Runtime's
probabilities are from PyTorch's. With --onnx, a .pth is written only when --out is given too.
"""

import argparse
import sys
from pathlib import Path

from flowers_fastai.cli import quiet_third_party_warnings

quiet_third_party_warnings()  # before the imports below: torch/timm may warn while imported
from flowers_fastai.export import ExportError, export_onnx, export_run, make_payload, read_run  # noqa: E402


def _payload_for_onnx(source: Path) -> dict:
    """The payload of a run folder (its best weights) or of an exported .pth (validated on load)."""
    if source.is_dir():
        spec, state_dict = read_run(source)
        return make_payload(spec, state_dict, half=False)
    from flowers_classifier import ModelFileError, load_payload
    try:
        return load_payload(source)
    except ModelFileError as e:
        raise ExportError(str(e)) from e


def _export_onnx(source: Path, out: Path, opset: int | None) -> None:
    path, diff = export_onnx(_payload_for_onnx(source), out, opset)
    check = (f"max |p_onnx - p_torch| = {diff:.2e} on a random batch of 3" if diff is not None
             else "not checked: onnxruntime is not installed (pip install onnxruntime)")
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB); {check}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR|MODEL.pth",
                   help="run folder written by train.py (metrics.json + best.pth), or (with --onnx) an exported .pth")
    p.add_argument("--out", type=Path, help="target .pth (default models/cnn_flowers.pth or models/vit_flowers.pth)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--half", dest="half", action="store_const", const=True,
                   help="store weights in fp16 (default for clip; halves the file)")
    g.add_argument("--fp32", dest="half", action="store_const", const=False,
                   help="store weights in fp32 (default for cnn)")
    p.add_argument("--onnx", type=Path, metavar="OUT.onnx", help="write an fp32 ONNX graph (dynamic batch axis)")
    p.add_argument("--opset", type=int, help="ONNX opset for --onnx (default: the exporter's)")
    args = p.parse_args(argv)
    quiet_third_party_warnings()
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
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
