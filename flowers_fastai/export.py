"""Export: a finished (or interrupted) run folder -> a plain `.pth` payload for `flowers_classifier`.

The payload is a dict of tensors and plain metadata, loadable with `torch.load(weights_only=True)`:
format_version, family, model_name, classes, image_size, mean, std, interpolation, crop_pct,
(clip) quick_gelu, dtype and state_dict. No pickled classes, so loading it never runs code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .files import atomic_write

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
