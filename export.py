"""Export a train.py run folder to a plain .pth for flowers_classifier, and/or to ONNX.

    python export.py RUN_DIR [--out models/cnn_flowers.pth] [--half | --fp32]
    python export.py RUN_DIR|MODEL.pth --onnx OUT.onnx [--out PTH] [--opset N]
    python export.py RUN_DIR|MODEL.pth --int8 [--out PTH] [--onnx OUT.onnx]
    python export.py RUN_DIR|MODEL.pth --hub DIR [--onnx] [--license L]    # the Hugging Face model repo
    python export.py RUN_DIR|MODEL.pth --space DIR [--examples PHOTOS]     # a Gradio Space (docs/sharing.md)

--onnx writes an fp32 ONNX graph (input `image` (N, 3, H, W) with a dynamic batch axis, outputs `logits`
and `probabilities`; the preprocessing spec as JSON in its metadata) and prints how far ONNX Runtime's
probabilities are from PyTorch's. With --onnx, a .pth is written only when --out is given too.
--int8 writes a .pth served int8 on the CPU (quantised at load time), or with --onnx an int8 ONNX graph.
"""

import sys

from flowers_fastai.cli import export

if __name__ == "__main__":
    sys.exit(export())
