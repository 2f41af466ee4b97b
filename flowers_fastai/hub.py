"""Writing the Hub folder (`export.py RUN|MODEL.pth --hub DIR`): model.safetensors, config.json, README.md (the
model card, whose YAML huggingface_hub.ModelCard reads), the confusion matrix it shows and, with --onnx,
model.onnx: a folder that `hf upload ORG/NAME DIR` publishes as is, and that `flowers_classifier.load_model(DIR)`
or `load_model("hf-hub:ORG/NAME")` serves (the layout is the runtime's: flowers_classifier.hub).

The card's facts come from the run folder alone: metrics.json (class counts, recipe) and eval_metrics.json with
its confusion matrix (the evaluation train.py runs through flowers_classifier at the end of a run: the test split
when there is one, and the valid split). Nothing is invented: a figure the run did not measure, or measured on
other weights (WiSE-FT) or at another temperature, is left out and the card says why. The licence is the
starting weights' (timm's pretrained config for ConvNeXt V2, the publisher's for CLIP); `--license` overrides it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import save_file

from flowers_classifier.classes import CLASSES
from flowers_classifier.errors import FlowersError
from flowers_classifier.files import atomic_write
from flowers_classifier.hub import CARD_FILE, CONFIG_FILE, HUB_PREFIX, ONNX_FILE, WEIGHTS_FILE
from flowers_classifier.payload import INT8, QUANTIZE_KEY, TEMPERATURE_KEY

CONFUSION_FILE = "confusion_matrix.png"
HUB_FILES = (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, CONFUSION_FILE, ONNX_FILE)  # all that --hub writes
OTHER = "other"  # the Hub's licence id for a licence it does not list, or one not known
LIBRARY_NAME = "flowers_classifier"  # the code that loads the folder (the card's library_name)
PLACEHOLDER_ORG = "ORG"  # the usage example's Hub id without --repo-id: ORG/<folder name>
# open_clip's pretrained weights by publisher (the tag "openai", else the Hub organisation of the tag's weights):
# their licence and where it is stated. A publisher not listed gets "other" and a sentence saying so.
CLIP_LICENCES = {
    "openai": ("mit", "OpenAI released CLIP's weights under the MIT licence (github.com/openai/CLIP)"),
    "laion": ("mit", "LAION publishes its OpenCLIP weights (LAION-2B, DataComp) under the MIT licence, as their "
                     "model cards on the Hub state"),
}
ECE_BINS = 15  # metrics.py's (the evaluation's `ece_bins`); named in the card


class ShareError(FlowersError, ValueError):
    """The Hub folder or the Space cannot be written as asked (a folder holding other files, examples without
    photos, no gradio to pin). The message names the folder or flag."""


# --------------------------------------------------------------------------- folders and files

def check_share_folder(out: Path, allowed: Iterable[str], flag: str) -> None:
    """`out` is new, empty, or holds only what the writer writes (and dot-files such as .git): anything else
    would be published with it by `hf upload`. ShareError naming the folder and what is in it otherwise."""
    if out.exists() and not out.is_dir():
        raise ShareError(f"{flag} {out}: is a file, not a folder; name a new or empty folder.")
    others = sorted(p.name for p in out.iterdir() if p.name not in allowed and not p.name.startswith(".")) \
        if out.is_dir() else []
    if others:
        raise ShareError(f"{flag} {out}: holds files this export does not write ({', '.join(others[:5])}"
                         f"{', ...' if len(others) > 5 else ''}), which `hf upload` would publish too; name a new or "
                         f"empty folder, or one an earlier {flag} wrote.")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def replace_dir(dest: Path, fill: Callable[[Path], object]) -> Path:
    """`fill(tmp)` on a new folder beside `dest`, then that folder renamed to `dest` (an old `dest` moved aside
    first, then deleted): a reader never sees a half-filled folder, and nothing stale stays in it."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the folder is published, give it the usual permissions
    try:
        fill(tmp)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            dest.rename(old / dest.name)
        tmp.rename(dest)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def hub_config(payload: dict) -> dict:
    """config.json: the payload's metadata, everything but the weights (format version included)."""
    return {k: v for k, v in payload.items() if k != "state_dict"}


def write_model_files(payload: dict, out: Path) -> list[Path]:
    """config.json and model.safetensors of `payload` in `out`, each written atomically. safetensors holds the
    tensors and a JSON header only: loading it runs nothing."""
    config = json.dumps(hub_config(payload), indent=2) + "\n"  # strict: a value JSON cannot hold is an error
    tensors = {k: v.contiguous() for k, v in payload["state_dict"].items()}

    def save(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": "pt"})  # replaces the file: 0600
        os.chmod(tmp, 0o666 & ~_umask())

    return [atomic_write(out / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config)),
            atomic_write(out / WEIGHTS_FILE, save)]


# --------------------------------------------------------------------------- licence

@dataclass(frozen=True)
class Licence:
    """The card's `license`, the sentence that says where it comes from, and the starting weights' Hub repo."""

    id: str
    why: str
    base_model: str | None = None


def weights_licence(spec: dict, config: dict | None) -> Licence:
    """The licence of the weights a run started from, read from its config (metrics.json); "other" with the
    reason when it is unknown: no run (a .pth alone), random init, a local weights file, an unlisted publisher."""
    if config is None:
        return Licence(OTHER, "Exported from a .pth file, which does not record the weights its training started "
                              "from: the licence is unknown. Set one with `export.py ... --license`.")
    if config.get("no_pretrained"):
        return Licence(OTHER, "Trained from random initialisation, so no pretrained weights' licence applies; the "
                              "exporter did not choose one (`export.py ... --license`).")
    if config.get("weights"):
        return Licence(OTHER, f"Fine-tuned from a local weights file ({Path(config['weights']).name}) whose licence "
                              f"this export cannot know; check it, then set it with `export.py ... --license`.")
    if spec["family"] == "cnn":
        import timm

        from .pretrained import cnn_pretrained_tag
        name = f"{spec['model_name']}.{cnn_pretrained_tag(spec['model_name'])}"  # what train.py fine-tuned from
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg.license:
            return Licence(cfg.license, f"Inherited from the starting weights, timm's `{name}` (its pretrained "
                                        f"config: `license: {cfg.license}`).", cfg.hf_hub_id or None)
        return Licence(OTHER, f"timm's pretrained config of `{name}` states no licence; check the weights' source, "
                              f"then set it with `export.py ... --license`.", cfg.hf_hub_id or None)
    import open_clip
    tag = config.get("pretrained_tag")
    hf_hub = (open_clip.get_pretrained_cfg(spec["model_name"], tag) or {}).get("hf_hub", "")
    repo = "/".join(hf_hub.split("/")[:2]) or None  # "org/repo/" or "org/repo/file.bin" -> org/repo
    publisher = "openai" if tag == "openai" else (repo or "").split("/")[0]
    if publisher in CLIP_LICENCES:
        licence, source = CLIP_LICENCES[publisher]
        return Licence(licence, f"Inherited from the starting weights, open_clip's `{spec['model_name']}` / `{tag}`: "
                                f"{source}.", repo)
    return Licence(OTHER, f"open_clip's `{spec['model_name']}` / `{tag}` weights come from a publisher whose licence "
                          f"this export does not know; check it, then set it with `export.py ... --license`.", repo)


def resolve_licence(spec: dict, run_dir: Path | None, override: str | None = None) -> Licence:
    """The starting weights' licence (weights_licence), or `override` (--license) with a note on stderr when it
    differs from a known one: relicensing weights is the exporter's call, and theirs to check."""
    found = weights_licence(spec, read_metrics(run_dir).get("config") if run_dir else None)
    if not override:
        return found
    override = override.strip().lower()
    if found.id not in (OTHER, override):
        print(f"note: --license {override} replaces the starting weights' licence {found.id} ({found.why}); "
              f"make sure their terms allow it.", file=sys.stderr)
    return Licence(override, "Set by the exporter (`export.py --license`)." + (
        f" The starting weights' own licence is `{found.id}`: {found.why}" if found.id != OTHER else ""),
        found.base_model)


# --------------------------------------------------------------------------- what the run measured

def read_metrics(run_dir: Path, name: str = "metrics.json") -> dict:
    path = Path(run_dir) / name
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Results:
    """The evaluation figures that hold for the weights and temperature written: one row per split (test first),
    the split the model-index reports, the confusion matrix of that split, and why anything was left out."""

    rows: list[dict] = field(default_factory=list)
    confusion: Path | None = None
    notes: list[str] = field(default_factory=list)


def measured_results(run_dir: Path | None, payload: dict, wise_ft: float | None = None) -> Results:
    """What the run's evaluation (eval_metrics.json, written by train.py or `flowers_fastai evaluate RUN_DIR`)
    measured, kept only where it describes `payload`: accuracy always (the temperature does not move the
    argmax), NLL and ECE only at the temperature `payload` serves."""
    if run_dir is None:
        return Results(notes=["Exported from a .pth file: no training run, so no evaluation, is known to this "
                              "export. Measure one with `python -m flowers_fastai evaluate MODEL.pth --data DIR`."])
    report = read_metrics(run_dir, "eval_metrics.json")
    if not report:
        return Results(notes=[f"The run has no evaluation (no eval_metrics.json: interrupted, or trained before "
                              f"runs were evaluated); measure one with `python -m flowers_fastai evaluate "
                              f"{Path(run_dir).name}`, then export again."])
    if wise_ft is not None:
        return Results(notes=[f"The run's evaluation measured its fine-tuned weights, not this WiSE-FT interpolation "
                              f"(alpha {wise_ft:g}): no figures are reported. Measure the exported .pth with "
                              f"`python -m flowers_fastai evaluate MODEL.pth --data DIR`."])
    served = float(payload.get(TEMPERATURE_KEY, 1.0))
    measured = float(report["calibration"]["temperature"])
    probs = ("calibrated" if math.isclose(served, measured, rel_tol=1e-9) else
             "raw" if TEMPERATURE_KEY not in payload else None)
    results = Results()
    if probs is None:
        results.notes.append(f"NLL and ECE left out: the run was evaluated at temperature {measured:.4f}, and this "
                             f"export serves {served:.4f} (fitted again, on other images).")
    splits = [s for s in (report.get("test"), report) if s]
    for split in splits:
        row = dict(split="test" if split["split"] == "test" else "validation", n_images=split["n_images"],
                   accuracy=split["accuracy"], macro_f1=split["macro_f1"],
                   majority=split["baselines"]["majority_class"]["accuracy"])
        if probs:
            row.update(nll=split["calibration"][probs]["nll"], ece=split["calibration"][probs]["ece"])
        results.rows.append(row)
    matrix = Path(run_dir) / (f"{Path(CONFUSION_FILE).stem}_test.png" if "test" in report else CONFUSION_FILE)
    results.confusion = matrix if matrix.is_file() else None
    evaluated = "float16" if payload["family"] == "clip" else "float32"  # run_payload's default storage
    if payload.get("dtype", evaluated) != evaluated:
        results.notes.append(f"Measured with {evaluated} weights; this folder stores {payload['dtype']}, so "
                             f"probabilities may differ in the last digits.")
    if payload.get(QUANTIZE_KEY) == INT8:
        results.notes.append("Measured unquantised; this model asks to be served int8 on the CPU "
                             "(`backend='eager'` serves it as measured).")
    return results


def eval_results(results: Results, data_name: str) -> list:
    """The model-index entries: accuracy (and ECE where measured) of the first split (test when there is one)."""
    from huggingface_hub import EvalResult
    if not results.rows:
        return []
    row = results.rows[0]
    common = dict(task_type="image-classification", task_name="Image Classification", dataset_type="imagefolder",
                  dataset_name=data_name, dataset_split=row["split"])
    entries = [EvalResult(metric_type="accuracy", metric_name="Accuracy", metric_value=row["accuracy"], **common)]
    if "ece" in row:
        entries.append(EvalResult(metric_type="ece", metric_name=f"Expected calibration error ({ECE_BINS} bins)",
                                  metric_value=row["ece"], **common))
    return entries


# --------------------------------------------------------------------------- the card

def _starting_point(spec: dict, config: dict | None, licence: Licence) -> str:
    if config is None:
        return "unknown starting weights (exported from a .pth file)"
    if config.get("no_pretrained"):
        return "random initialisation"
    if config.get("weights"):
        return f"a local weights file ({Path(config['weights']).name})"
    if spec["family"] == "clip":
        head = " with a zero-shot head (CLIP's text embeddings of the class prompts)" \
            if config.get("head_init", "zeroshot") == "zeroshot" else ""
        return f"open_clip's `{spec['model_name']}` / `{config.get('pretrained_tag')}` weights{head}"
    return f"timm's pretrained `{licence.base_model or spec['model_name']}`"


def _recipe_lines(payload: dict, record: dict, licence: Licence, wise_ft: float | None) -> list[str]:
    config, recipe = record.get("config", {}), record.get("recipe", {})
    size, crop = int(payload["image_size"]), float(payload.get("crop_pct", 0.875))
    kind = "timm ConvNeXt V2" if payload["family"] == "cnn" else "OpenCLIP ViT image tower"
    lines = [f"- Architecture: `{payload['model_name']}` ({kind}) with a linear head for the 5 classes, from "
             f"{_starting_point(payload, config or None, licence)}.",
             f"- Input: {size} px. Served: the short side resized to {math.floor(size / crop)} px "
             f"({payload.get('interpolation', 'bicubic')}), centre crop, normalised with mean {list(payload['mean'])} "
             f"and std {list(payload['std'])}."]
    if recipe:
        spread = f"layer-wise LR decay {config.get('llrd')}" if payload["family"] == "clip" else \
            f"the first layer group at LR / {recipe.get('lr_mult')}"
        lr = recipe.get("lr") if recipe.get("lr") is not None else "lr_find's suggestion (--lr auto)"
        if recipe.get("freeze_epochs"):
            lines.append(f"- Stage 1: {recipe['freeze_epochs']} epoch(s) training the head alone (body frozen), "
                         f"LR {recipe.get('head_lr')}.")
        lines.append(f"- Stage 2: {recipe.get('epochs')} epoch(s) training every layer, LR {lr} ({spread}), "
                     f"one-cycle schedule.")
        lines.append(f"- Batch size {config.get('bs')}, weight decay {recipe.get('wd')}, label smoothing "
                     f"{recipe.get('label_smoothing')}, MixUp alpha {recipe.get('mixup')}, CutMix alpha "
                     f"{recipe.get('cutmix')}, random-resized crops of at least {config.get('min_scale')} of the "
                     f"photo, precision {recipe.get('precision')}, seed {recipe.get('seed')} (fastai).")
    if record.get("best_epoch") is not None:
        lines.append(f"- Kept: the weights of epoch {record['best_epoch']}, the best valid accuracy "
                     f"({record['best_accuracy']:.4f}).")
    if wise_ft is not None:
        lines.append(f"- WiSE-FT: (1 - {wise_ft:g}) x zero-shot + {wise_ft:g} x fine-tuned weights.")
    t = payload.get(TEMPERATURE_KEY)
    lines.append(f"- Calibration: logits divided by a temperature T = {t:.4f}, fitted on the valid split (NLL)."
                 if t is not None else "- Calibration: none (T = 1, the raw softmax).")
    if payload.get(QUANTIZE_KEY) == INT8:
        lines.append("- Served int8 on the CPU (its Linear layers quantised when loaded; the weights stored are "
                     "fp32/fp16).")
    return lines


def _data_lines(record: dict) -> list[str]:
    counts = record.get("class_counts")
    if not counts:
        return ["Not recorded: this folder was exported without a training run (from a .pth file)."]
    splits = list(counts)
    data = Path(record.get("config", {}).get("data", "the data folder")).name
    lines = [f"{sum(map(sum, counts.values()))} photos from the folder `{data}` (one sub-folder per class), split "
             f"stratified by class (seed {record.get('config', {}).get('seed')}); the test split, when there is one, "
             f"is never trained or tuned on.", "", "| class | " + " | ".join(splits) + " |",
             "|---|" + "---:|" * len(splits)]
    lines += [f"| {c} | " + " | ".join(str(counts[s][i]) for s in splits) + " |" for i, c in enumerate(CLASSES)]
    return lines


def _evaluation_lines(results: Results) -> list[str]:
    lines = []
    if results.rows:
        lines += ["Measured at the end of training through `flowers_classifier` (the code that serves this folder), "
                  "on these weights, with the probabilities served (calibrated):", "",
                  f"| split | images | accuracy | macro-F1 | NLL | ECE ({ECE_BINS} bins) | majority-class accuracy |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in results.rows:
            nll, ece = (f"{r['nll']:.4f}", f"{r['ece']:.4f}") if "ece" in r else ("not measured",) * 2
            lines.append(f"| {r['split']} | {r['n_images']} | {r['accuracy']:.4f} | {r['macro_f1']:.4f} | {nll} | "
                         f"{ece} | {r['majority']:.4f} |")
        lines += ["", "The validation split chose the epoch and fitted the temperature: its figures are optimistic. "
                      f"On {results.rows[0]['n_images']} {results.rows[0]['split']} images one photo is "
                      f"{1 / results.rows[0]['n_images']:.1%} of accuracy."]
    lines += [f"{note}" for note in results.notes]
    return lines


def card_body(payload: dict, record: dict, licence: Licence, results: Results, repo_id: str,
              wise_ft: float | None, has_onnx: bool) -> str:
    """The card's Markdown: intended use, classes, data, recipe, evaluation, confusion matrix, limitations,
    usage, licence."""
    name = repo_id.split("/")[-1]
    confusion = ([f"![Confusion matrix, {results.rows[0]['split']} split]({CONFUSION_FILE})"] if results.confusion
                 else ["Not available: no evaluation of these weights is known to this export."])
    onnx = [f"`{ONNX_FILE}` holds the same model as an ONNX graph (ONNX Runtime: "
            f"`fc.load_model(\"{HUB_PREFIX}{repo_id}\", backend=\"onnx\")`)."] if has_onnx else []
    sections = [
        [f"# {name}", "",
         f"A flower photo classifier for {len(CLASSES)} classes ({', '.join(CLASSES)}): `{payload['model_name']}` "
         f"fine-tuned with fastai by flowers_fastai. The weights are plain safetensors and `{CONFIG_FILE}` holds the "
         f"preprocessing and calibration: loading runs no pickled code (unlike a fastai `learner.pkl`)."],
        ["## Intended use", "",
         "Telling apart photos of these five flowers, e.g. in a demo, a course exercise or a photo-sorting tool, "
         "with a calibrated probability per class. Not for anything where a wrong label matters (identifying plants "
         "for safety, e.g. whether one is edible)."],
        ["## Classes", "", "The model answers one of these, in this order (its logits'): " +
         ", ".join(f"{i} `{c}`" for i, c in enumerate(CLASSES)) + "."],
        ["## Training data", "", *_data_lines(record)],
        ["## Training recipe", "", *_recipe_lines(payload, record, licence, wise_ft)],
        ["## Evaluation", "", *_evaluation_lines(results)],
        ["## Confusion matrix", "", *confusion],
        ["## Limitations", "",
         "- It always answers one of the five classes: a photo of anything else (another flower, a cat) still gets "
         "one of them, often with high confidence. There is no 'none of these'.",
         "- Trained on the photos above only: drawings, several flowers in one photo, or unusual angles and light may "
         "be out of its distribution, and its calibration holds on photos like the validation split's.",
         f"- {licence.why}"],
        ["## Usage", "",
         "With the `flowers_classifier` runtime (torch, timm, open_clip; no fastai: `pip install .` in a clone of "
         "flowers_fastai):", "", "```python",
         "import flowers_classifier as fc",
         f"model = fc.load_model(\"{HUB_PREFIX}{repo_id}\")  # downloaded once into the Hugging Face cache",
         "print(fc.predict(model, \"rose.jpg\"), fc.predict_proba(model, \"rose.jpg\"))", "```", "", *onnx],
        ["## License", "", f"`{licence.id}`. {licence.why}"],
    ]
    return "\n\n".join("\n".join(s) for s in sections).replace("\n\n\n", "\n\n") + "\n"


def model_card(payload: dict, run_dir: Path | None, licence: Licence, repo_id: str, wise_ft: float | None = None,
               has_onnx: bool = False):
    """(the ModelCard: YAML front matter + body, results: the Results it reports)."""
    from huggingface_hub import ModelCard, ModelCardData
    record = read_metrics(run_dir) if run_dir else {}
    results = measured_results(run_dir, payload, wise_ft)
    data_name = Path(record.get("config", {}).get("data", "flowers")).name
    family = ["timm", "convnextv2"] if payload["family"] == "cnn" else ["open_clip", "clip"]
    tags = ["image-classification", "flowers", "fastai", "flowers_fastai", "safetensors", *family,
            *(["onnx"] if has_onnx else [])]
    data = ModelCardData(license=licence.id, library_name=LIBRARY_NAME, pipeline_tag="image-classification",
                         tags=tags, base_model=licence.base_model, model_name=repo_id.split("/")[-1],
                         eval_results=eval_results(results, data_name) or None)
    body = card_body(payload, record, licence, results, repo_id, wise_ft, has_onnx)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"), results


def write_hub_folder(payload: dict, out: Path, *, run_dir: Path | None = None, licence: Licence,
                     repo_id: str | None = None, wise_ft: float | None = None,
                     write_onnx: Callable[[Path], object] | None = None) -> list[Path]:
    """The Hub folder of `payload` in `out`: config.json, model.safetensors, model.onnx (through `write_onnx(path)`
    when given; an older one removed otherwise), the run's confusion matrix and README.md, the card, last. Each
    file is written atomically; `out` may be new, empty, or an earlier --hub folder (check_share_folder)."""
    out = Path(out)
    check_share_folder(out, HUB_FILES, "--hub")
    repo_id = repo_id or f"{PLACEHOLDER_ORG}/{out.resolve().name}"
    card, results = model_card(payload, run_dir, licence, repo_id, wise_ft, has_onnx=write_onnx is not None)
    written = write_model_files(payload, out)
    if write_onnx is not None:
        write_onnx(out / ONNX_FILE)
        written.append(out / ONNX_FILE)
    else:
        (out / ONNX_FILE).unlink(missing_ok=True)  # an earlier --onnx: not these weights
    if results.confusion is not None:
        written.append(atomic_write(out / CONFUSION_FILE, lambda tmp: shutil.copyfile(results.confusion, tmp)))
    else:
        (out / CONFUSION_FILE).unlink(missing_ok=True)
    written.append(atomic_write(out / CARD_FILE, lambda tmp: Path(tmp).write_text(str(card))))
    return written


def folder_size(paths: Iterable[Path]) -> str:
    return f"{sum(p.stat().st_size for p in paths) / 2**20:.1f} MiB"

