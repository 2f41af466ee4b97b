"""Export: a finished (or interrupted) run folder -> a plain `.pth` payload for `flowers_classifier`.

The payload is a dict of tensors and plain metadata, loadable with `torch.load(weights_only=True)`:
format_version, family, model_name, classes, image_size, mean, std, interpolation, crop_pct,
(clip) quick_gelu, dtype and state_dict. No pickled classes, so loading it never runs code.

`export_onnx` turns a payload into an ONNX graph (dynamic batch axis, outputs `logits` and
`probabilities`) carrying the same metadata as JSON in its metadata_props, checked against PyTorch
with ONNX Runtime before it is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write
from .models import build_from_spec

FORMAT_VERSION = 1
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


def make_payload(spec: dict, state_dict: dict[str, torch.Tensor], half: bool = False) -> dict:
    dtype = torch.float16 if half else torch.float32
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    return dict(format_version=FORMAT_VERSION, **spec, dtype=str(dtype).removeprefix("torch."),
                state_dict=tensors)


def default_export_path(family: str) -> Path:
    return Path("models") / ("cnn_flowers.pth" if family == "cnn" else "vit_flowers.pth")


def export_run(run_dir: str | Path, out: str | Path | None = None, half: bool | None = None) -> Path:
    """Write the payload of `run_dir` atomically to `out`. fp16 storage by default for CLIP."""
    spec, state_dict = read_run(run_dir)
    half = spec["family"] == "clip" if half is None else half
    payload = make_payload(spec, state_dict, half)
    out = Path(out) if out else default_export_path(spec["family"])
    return atomic_write(out, lambda tmp: torch.save(payload, tmp))


# --------------------------------------------------------------------------- ONNX

ONNX_METADATA_KEY = "flowers_fastai"  # metadata_props key holding the payload spec as JSON
ONNX_INPUT, ONNX_OUTPUTS = "image", ("logits", "probabilities")
ONNX_TOLERANCE = 1e-4  # max abs difference of probabilities, ONNX Runtime vs PyTorch, fp32


class _LogitsAndProbabilities(nn.Module):
    """The network plus its softmax, so ONNX users get probabilities without re-implementing anything."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, logits.softmax(-1)


def onnx_spec(payload: dict) -> dict:
    """The payload's metadata as stored in the ONNX file: everything but the weights, dtype float32."""
    return {k: v for k, v in payload.items() if k != "state_dict"} | {"dtype": "float32"}


def _fp32_module(payload: dict) -> nn.Module:
    net = build_from_spec(payload)
    net.load_state_dict(payload["state_dict"], strict=True)
    return _LogitsAndProbabilities(net.float()).eval()


def _check_onnx(path: str, module: nn.Module, size: int) -> float | None:
    """Max abs difference of probabilities between ONNX Runtime and PyTorch on a random batch of 3 (the
    graph was traced with 2, so this also proves the batch axis is dynamic); None without onnxruntime."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = module(x)[1]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run([ONNX_OUTPUTS[1]], {ONNX_INPUT: x.numpy()})[0]
    return float((torch.from_numpy(got) - expected).abs().max())


def export_onnx(payload: dict, out: str | Path, opset: int | None = None) -> tuple[Path, float | None]:
    """Write `payload` (a `.pth` payload dict) as an fp32 ONNX graph to `out`, atomically, and return
    (path, max abs difference of probabilities vs PyTorch, None when onnxruntime is not installed).
    Raises ExportError, and writes nothing, when the difference exceeds ONNX_TOLERANCE."""
    import onnx
    module = _fp32_module(payload)
    size = int(payload["image_size"])
    sample = torch.zeros(2, 3, size, size)  # batch 2, not 1: torch.export would specialise a batch of 1
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(module, (sample,), dynamo=True, input_names=[ONNX_INPUT],
                                output_names=list(ONNX_OUTPUTS), dynamic_shapes={"x": {0: batch}},
                                opset_version=opset, verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: json.dumps(onnx_spec(payload))})
    diff: list[float | None] = []

    def write(tmp: str) -> None:
        onnx.save_model(proto, tmp)  # weights inline: fine below protobuf's 2 GB (ViT-L/14 fp32 is 1.2 GB)
        diff.append(_check_onnx(tmp, module, size))
        if diff[0] is not None and diff[0] > ONNX_TOLERANCE:
            raise ExportError(f"{out}: the ONNX graph disagrees with PyTorch by {diff[0]:.2e} (> {ONNX_TOLERANCE}) "
                              f"in probability; nothing was written. Try another --opset.")

    return atomic_write(out, write), diff[0]
