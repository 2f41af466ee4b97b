"""Export a train.py run folder to a plain .pth for flowers_classifier.

    python export.py RUN_DIR [--out models/cnn_flowers.pth] [--half | --fp32]
"""

import argparse
import sys
from pathlib import Path

from flowers_fastai.export import ExportError, export_run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="export.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="run folder written by train.py (metrics.json + best.pth)")
    p.add_argument("--out", type=Path, help="target .pth (default models/cnn_flowers.pth or models/vit_flowers.pth)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--half", dest="half", action="store_const", const=True,
                   help="store weights in fp16 (default for clip; halves the file)")
    g.add_argument("--fp32", dest="half", action="store_const", const=False,
                   help="store weights in fp32 (default for cnn)")
    args = p.parse_args(argv)
    try:
        path = export_run(args.run_dir, args.out, args.half)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
