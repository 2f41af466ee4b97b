"""Export: a finished (or interrupted) run folder -> a plain `.pth` payload for `flowers_classifier`,
calibrated (temperature fitted on the run's valid split, see calibration.py), optionally a WiSE-FT
interpolation of a CLIP run with its zero-shot model, and the `export.py` CLI (also `flowers-export`).
The formats are the runtime's (`flowers_classifier.payload`, `.onnx_model`, `.aot`); writing the ONNX graph
and compiling the CPU package are `onnx_export` and `cpu_package`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from flowers_classifier.errors import FlowersError
from flowers_classifier.files import atomic_write
from flowers_classifier.payload import (
    INT8,
    QUANTIZE_KEY,
    TEMPERATURE_KEY,
    ModelFileError,
    default_model_path,
    load_payload,
    make_payload,
)

from .calibration import EvaluationError, fit_payload_temperature, run_valid_images
from .cpu_package import compile_cpu_package
from .hub import folder_size, resolve_licence, write_hub_folder
from .onnx_export import export_onnx
from .space import write_space

BEST_NAME = "best"  # run_dir/best.pth: the best weights on valid accuracy (SaveModelCallback)
ZEROSHOT_NAME = "zeroshot"  # run_dir/zeroshot.pth: a pretrained CLIP run's zero-shot model, for WiSE-FT


class ExportError(FlowersError, ValueError):
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


# --------------------------------------------------------------------------- WiSE-FT

def zeroshot_weights(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The zero-shot model (encoder + head) a pretrained CLIP run started from; ExportError saying why a run
    has none (a cnn run, --no-pretrained, --head-init random, or a run trained before it was kept)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise ExportError(f"{metrics_path} not found: is {run_dir} a train.py run folder?")
    config = json.loads(metrics_path.read_text()).get("config", {})
    if config.get("arch") != "clip":
        raise ExportError(f"--wise-ft: {run_dir} is a {config.get('arch')} run; WiSE-FT interpolates a CLIP run "
                          f"with the zero-shot CLIP model it started from.")
    if config.get("no_pretrained"):
        raise ExportError(f"--wise-ft: {run_dir} was trained with --no-pretrained, so its 'zero-shot' model is a "
                          f"random network and interpolating towards it is meaningless. Train with pretrained "
                          f"weights (--weights FILE or --pretrained-tag) to use --wise-ft.")
    if config.get("head_init") != "zeroshot":
        raise ExportError(f"--wise-ft: {run_dir} started from a random head (--head-init {config.get('head_init')}), "
                          f"not a zero-shot one: there is no zero-shot model to interpolate with.")
    path = run_dir / f"{ZEROSHOT_NAME}.pth"
    if not path.is_file():
        raise ExportError(f"--wise-ft: {path} not found: runs trained before WiSE-FT support do not keep their "
                          f"zero-shot model; train the run again to use --wise-ft.")
    return torch.load(path, map_location="cpu", weights_only=True)


def interpolate_weights(zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                        alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT (Wortsman et al. 2022): (1 - alpha) * zero-shot + alpha * fine-tuned for every floating
    tensor; integer buffers come from the fine-tuned model. alpha 0 = zero-shot, 1 = fine-tuned."""
    if not 0 <= alpha <= 1:
        raise ExportError(f"--wise-ft {alpha}: alpha must be in [0, 1] (0 = zero-shot, 1 = fine-tuned).")
    if set(zeroshot) != set(finetuned):
        raise ExportError(f"--wise-ft: {ZEROSHOT_NAME}.pth and {BEST_NAME}.pth hold different tensors "
                          f"({sorted(set(zeroshot) ^ set(finetuned))[:5]}); they are not the same architecture.")
    return {k: torch.lerp(zeroshot[k].to(v.dtype), v, alpha) if v.is_floating_point() else v
            for k, v in finetuned.items()}


def run_weights(run_dir: str | Path, wise_ft: float | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model spec, weights) of a run folder: best.pth, or with `wise_ft` alpha its interpolation with the
    run's zero-shot model."""
    zeroshot = zeroshot_weights(run_dir) if wise_ft is not None else None  # its refusal first: it says why
    spec, state_dict = read_run(run_dir)
    if zeroshot is not None:
        state_dict = interpolate_weights(zeroshot, state_dict, wise_ft)
    return spec, state_dict


# --------------------------------------------------------------------------- calibrated export

def run_payload(run_dir: str | Path, half: bool | None = None, wise_ft: float | None = None,
                calibrate: bool = True, data: str | Path | None = None, bs: int = 32,
                int8: bool = False) -> tuple[dict, dict]:
    """(payload, calibration record) of a run folder. With `calibrate`, T is fitted on the run's valid split
    (read from `data` or the run's own data folder) through flowers_classifier, on the weights as they are
    written; the record then holds temperature and NLL before/after. Without the images the payload has
    no temperature (serves T = 1) and the record says why (`skipped`). `int8` asks for int8 serving on the
    CPU (flowers_classifier.quantize); T is fitted unquantised, as every device can serve the file."""
    spec, state_dict = run_weights(run_dir, wise_ft)
    half = spec["family"] == "clip" if half is None else half
    payload = make_payload(spec, state_dict, half)
    record = _calibrate(payload, run_dir, data, bs) if calibrate else dict(skipped="--no-calibrate")
    if int8:
        payload[QUANTIZE_KEY] = INT8
    return payload, record


def _calibrate(payload: dict, run_dir: str | Path, data: str | Path | None, bs: int) -> dict:
    """Fit and store the payload's temperature; the record, or why it was skipped."""
    try:
        root, df = run_valid_images(Path(run_dir), data)
    except EvaluationError as e:
        return dict(skipped=f"{e} Calibrate with `python export.py {run_dir} --data DIR`.")
    try:
        record = fit_payload_temperature(payload, root, df, bs)
    except EvaluationError as e:  # the valid images are there but none decodes: nothing is written
        raise ExportError(f"cannot calibrate {run_dir}: {e} Pass --data DIR with the run's photos, or "
                          f"--no-calibrate to write it uncalibrated.") from e
    payload[TEMPERATURE_KEY] = record["temperature"]
    return record


def calibration_note(record: dict) -> str:
    """One line on what the calibration did, for the CLIs."""
    if "skipped" in record:
        return f"not calibrated (served with T = 1): {record['skipped']}"
    return (f"calibrated on {record['n_images']} valid images: temperature {record['temperature']:.3f}, "
            f"valid NLL {record['nll_raw']:.4f} -> {record['nll_calibrated']:.4f}")


def export_run(run_dir: str | Path, out: str | Path | None = None, half: bool | None = None,
               calibrate: bool = True, data: str | Path | None = None, wise_ft: float | None = None,
               temperature: float | None = None, int8: bool = False) -> Path:
    """Write the payload of `run_dir` atomically to `out`. fp16 storage by default for CLIP. Calibrated
    on the run's valid split unless `calibrate` is False or a `temperature` (already fitted on these
    weights) is given; when the images are not there, a note on stderr says how to calibrate. `int8`: the
    payload asks to be served int8 on the CPU."""
    if temperature is not None:
        spec, state_dict = run_weights(run_dir, wise_ft)
        half = spec["family"] == "clip" if half is None else half
        payload = make_payload(spec, state_dict, half, temperature, int8)
    else:
        payload, record = run_payload(run_dir, half, wise_ft, calibrate, data, int8=int8)
        if "skipped" in record and calibrate:
            print(f"note: {calibration_note(record)}", file=sys.stderr)
    out = Path(out) if out else default_model_path(payload["family"])
    return atomic_write(out, lambda tmp: torch.save(payload, tmp))


def load_exported(path: str | Path) -> dict:
    """The payload of an exported .pth (validated on load); ExportError naming the file otherwise."""
    try:
        return load_payload(path)
    except ModelFileError as e:
        raise ExportError(str(e)) from e


CLI_USAGE = """Export a train.py run folder to a plain .pth for flowers_classifier, and/or to ONNX.

    python export.py RUN_DIR [--out models/cnn_flowers.pth] [--half | --fp32] [--data DIR] [--no-calibrate]
    python export.py RUN_DIR --wise-ft ALPHA [--out PTH]
    python export.py RUN_DIR|MODEL.pth --onnx OUT.onnx [--out PTH] [--opset N]
    python export.py RUN_DIR|MODEL.pth --cpu-package [--out PTH]
    python export.py RUN_DIR|MODEL.pth --int8 [--out PTH] [--onnx OUT.onnx]
    python export.py RUN_DIR|MODEL.pth --hub DIR [--onnx] [--license L] [--repo-id ORG/NAME]
    python export.py RUN_DIR|MODEL.pth --space DIR [--examples PHOTOS_DIR] [--license L] [--repo-id ORG/NAME]

A run folder's payload is calibrated: one temperature T is fitted on the run's valid split (NLL of
softmax(logits / T), on the weights written) and stored in it; flowers_classifier divides the logits by T
when it serves. The images are read from --data or from where the run trained; without them the payload
is written uncalibrated (T = 1) and a note says so. --no-calibrate skips the fit.

--wise-ft ALPHA (CLIP runs trained from pretrained weights with a zero-shot head): writes
(1 - ALPHA) * zero-shot + ALPHA * fine-tuned weights (0 = the zero-shot model, 1 = the fine-tuned one),
calibrated like any other. `python -m flowers_fastai evaluate RUN_DIR --wise-ft-sweep` helps pick ALPHA.

--onnx writes an fp32 ONNX graph (input `image` (N, 3, H, W) with a dynamic batch axis, outputs `logits`
and `probabilities`; the preprocessing spec as JSON in its metadata) and prints how far ONNX Runtime's
probabilities are from PyTorch's. With --onnx, a .pth is written only when --out is given too.

Every file one command writes (.pth, .onnx, CPU package) holds the same weights (WiSE-FT and fp16 storage
included) and the same temperature: the payload is made and calibrated once, and each file is written from it.
A CLIP run's weights are stored fp16 whenever a .pth is written (unless --fp32); an ONNX graph alone is fp32.

--cpu-package compiles the .pth (the one written, or MODEL.pth) for this machine's CPU with AOTInductor
(torch.export, frozen weights; a C++ compiler and a minute or more) into NAME.cpu.pt2 beside it, which
flowers_classifier.load_model then serves on the CPU instead of the eager model. It is valid for this torch
version and this kind of CPU only; elsewhere load_model warns and serves the eager model.

--int8 (CPU serving): the .pth asks flowers_classifier to serve it int8 on the CPU: its Linear layers
(attention's projections and 1x1 convolutions included) are quantised to int8 when it is loaded; the file
still holds the usual weights, and load_model(..., backend="eager") serves it fp32. From an exported MODEL.pth,
--int8 --out NEW.pth writes a copy that asks for int8. With --onnx, --int8 writes ONNX Runtime's dynamic
int8 quantisation of the fp32 graph instead.

--hub DIR writes the folder `hf upload ORG/NAME DIR` publishes: model.safetensors (no pickle), config.json (the
payload's metadata), README.md (the model card: licence of the starting weights or --license, the run's data,
recipe and measured results, its confusion matrix) and, with a bare --onnx after it, model.onnx.
flowers_classifier.load_model(DIR) or load_model("hf-hub:ORG/NAME") serves it. --space DIR writes a Gradio Space
(`hf upload ORG/NAME DIR --repo-type space`): the demo on the model, pinned requirements, example photos from
--examples or else from the run's test (or valid) split. With --hub or --space, a .pth is written only when --out
is given too. docs/sharing.md walks through both.
"""


def _export_onnx(payload: dict, out: Path, opset: int | None, int8: bool = False) -> None:
    path, diff = export_onnx(payload, out, opset, int8=int8)
    what = "int8 ONNX vs fp32 torch" if int8 else "p_onnx - p_torch"
    check = (f"max |{what}| = {diff:.2e} in probability on a random batch of 3" if diff is not None
             else "not checked: onnxruntime is not installed (pip install onnxruntime)")
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB); {check}")


def _export_cpu_package(payload: dict, pth: Path) -> None:
    """The package of `payload`, the one written at `pth`, beside it."""
    print(f"compiling {pth} for this CPU (AOTInductor; a minute or more) ...", flush=True)
    path, diff = compile_cpu_package(payload, pth)
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB); max |p_compiled - p_eager| = {diff:.2e} "
          f"on a random batch of 3")


def _int8_copy(payload: dict, source: Path, out: Path) -> None:
    """An exported payload, unchanged but for the int8 request."""
    payload[QUANTIZE_KEY] = INT8
    path = atomic_write(out, lambda tmp: torch.save(payload, tmp))
    print(f"exported {path} ({path.stat().st_size / 2**20:.1f} MiB, served int8 on the CPU; weights, "
          f"temperature and preprocessing as in {source})")


def export_files(source: Path, *, out: Path | None = None, half: bool | None = None, onnx: Path | None = None,
                 opset: int | None = None, cpu_package: bool = False, int8: bool = False, data: Path | None = None,
                 calibrate: bool = True, wise_ft: float | None = None, hub: Path | None = None, hub_onnx: bool = False,
                 space: Path | None = None, license: str | None = None, repo_id: str | None = None,
                 examples: Path | None = None) -> None:
    """What `export.py` writes from a run folder or an exported .pth (`source`; see CLI_USAGE for which file
    each option asks for). One payload is made (and calibrated) once, and every file is written from it."""
    from_pth = not source.is_dir()
    int8_copy = from_pth and int8 and out and not (onnx or hub or space)  # MODEL.pth --int8 --out NEW.pth
    writes_pth = not from_pth and (not (onnx or hub or space) or out or cpu_package)
    if from_pth:
        payload, record = load_exported(source), None
        if int8:
            payload[QUANTIZE_KEY] = INT8
    else:
        # fp16 is the storage of a .pth, a Hub folder and a Space (CLIP's default); an .onnx alone is fp32
        half = False if half is None and not (writes_pth or hub or space) else half
        payload, record = run_payload(source, half, wise_ft, calibrate, data, int8=int8)
    if int8_copy:
        _int8_copy(payload, source, out)
        return
    if onnx:
        _export_onnx(payload, onnx, opset, int8)
    if hub or space:
        run_dir = None if from_pth else source
        licence = resolve_licence(payload, run_dir, license)
        name = repo_id or "ORG/NAME"
        if repo_id is None:
            print("note: the card and the Space name the model ORG/<folder name>; pass --repo-id ORG/NAME, the id "
                  "you will upload to, to name it right.", file=sys.stderr)
    if hub:
        graph = (lambda path: _export_onnx(payload, path, opset, int8)) if hub_onnx else None
        files = write_hub_folder(payload, hub, run_dir=run_dir, licence=licence, repo_id=repo_id, wise_ft=wise_ft,
                                 write_onnx=graph)
        print(f"wrote the Hub folder {hub} ({', '.join(p.name for p in files)}; {folder_size(files)}, license "
              f"{licence.id}); publish it with `hf upload {name} {hub}`")
    if space:
        files, notes = write_space(payload, space, licence=licence, run_dir=run_dir, repo_id=repo_id,
                                   examples_dir=examples, data=data)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(f"wrote the Space {space} ({', '.join(p.name for p in files)}); try it with `cd {space} && python "
              f"app.py`, publish it with `hf upload {name} {space} --repo-type space`")
    if record is not None and not writes_pth:
        print(calibration_note(record))
    pth = source
    if writes_pth:
        pth = atomic_write(out or default_model_path(payload["family"]), lambda tmp: torch.save(payload, tmp))
        wise = f", WiSE-FT alpha {wise_ft:g}" if wise_ft is not None else ""
        wise += ", served int8 on the CPU" if int8 else ""
        print(f"exported {pth} ({pth.stat().st_size / 2**20:.1f} MiB{wise}); {calibration_note(record)}")
    if cpu_package:
        _export_cpu_package(payload, pth)
