"""Writing the Gradio Space (`export.py RUN|MODEL.pth --space DIR [--examples PHOTOS_DIR]`): a folder that
`hf upload ORG/NAME DIR --repo-type space` publishes and that Spaces build and start as is.

    README.md          the Space's YAML (sdk gradio, sdk_version: the gradio installed here, which the tests ran;
                       app_file, python_version, license, title) and what the Space is
    app.py             a few lines: the project's demo (flowers_apps.demo) on model/, listening where Spaces say
                       (GRADIO_SERVER_NAME, GRADIO_SERVER_PORT; 127.0.0.1:7860 when unset)
    requirements.txt   the runtime's and the demo's dependencies at the versions installed here; no fastai
    model/             config.json + model.safetensors (the Hub folder's model files)
    examples/          a few photos: the page's clickable examples
    flowers_classifier/, flowers_apps/   the runtime and the demo: their source, copied

How the code reaches the Space: its source is vendored, not installed. The project is not on PyPI, and a Space
installs requirements.txt only; a bundled wheel would need a build step at export time and a local path in
requirements.txt. The copied source is the code that exported the model and that the tests ran, readable in the
Space's Files tab; only the runtime and the demo are copied, so the trainer (fastai) is not there to import.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import shutil
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from flowers_classifier.files import atomic_write
from flowers_classifier.preprocess import IMAGE_SUFFIXES

from .calibration import EvaluationError, run_split_images
from .hub import Licence, ShareError, check_share_folder, replace_dir, write_model_files
from .wheelhouse import PROJECT

APP_FILE, REQUIREMENTS_FILE, README_FILE = "app.py", "requirements.txt", "README.md"
MODEL_DIR, EXAMPLES_DIR = "model", "examples"
VENDORED = ("flowers_classifier", "flowers_apps")  # the runtime and the demo; never flowers_fastai
SPACE_FILES = (README_FILE, APP_FILE, REQUIREMENTS_FILE, MODEL_DIR, EXAMPLES_DIR, *VENDORED)
SPACE_EXAMPLES = 10  # at most; the demo shows up to 10 (flowers_apps.demo.MAX_EXAMPLES)
DEMO_EXTRA = "demo"  # the project's extra whose requirements the demo needs
# A Space's free hardware is a CPU: torch's CPU wheels (~200 MB) instead of PyPI's Linux ones, which bring CUDA
# libraries (gigabytes). pip picks 2.x.y+cpu from here for a torch==2.x.y pin (a local version sorts higher).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
APP = '''"""The Space: the flowers_fastai Gradio demo (flowers_apps, copied beside this file with the flowers_classifier
runtime) on the model in model/. Spaces run `python app.py` with GRADIO_SERVER_NAME=0.0.0.0; locally it listens on
127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise."""

import os
from pathlib import Path

from flowers_apps.demo import build_demo, launch_demo

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE / "{examples}"

if __name__ == "__main__":
    demo = build_demo(cnn_path={cnn}, vit_path={vit}, examples_dir=EXAMPLES if EXAMPLES.is_dir() else None)
    launch_demo(demo, host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
'''


def installed_version(name: str, why: str) -> str:
    """The public version of an installed distribution; ShareError saying what needs it otherwise."""
    try:
        return Version(md.version(name)).public
    except md.PackageNotFoundError as e:
        raise ShareError(f"--space: {name} is not installed here, and {why}. Install the project with its demo "
                         f"extra (`pip install -e \".[demo]\"`), then export again.") from e


def space_requirements() -> list[str]:
    """The runtime's requirements and the demo extra's, each pinned (==) to the version installed here, extras
    dropped (the Space serves no MCP): what the Space installs is what this project ran with."""
    try:
        wanted = [Requirement(r) for r in md.requires(PROJECT) or ()]
    except md.PackageNotFoundError as e:
        raise ShareError(f"--space: the {PROJECT} distribution is not installed, so the requirements the Space pins "
                         f"are unknown; install the project (`pip install -e \".[demo]\"`), then export again.") from e
    wanted = [r for r in wanted if r.marker is None or r.marker.evaluate({"extra": DEMO_EXTRA})]
    return [f"{r.name}=={installed_version(r.name, f'the Space pins it ({r})')}" for r in wanted]


def package_source(name: str) -> Path:
    """The folder of an importable package, found without importing it (the trainer never imports the apps)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ShareError(f"--space: the package {name} is not importable here, so it cannot be copied into the "
                         f"Space; install the project (`pip install -e \".[demo]\"`).")
    return Path(next(iter(spec.submodule_search_locations)))


def pick_examples(photos_dir: Path) -> list[Path]:
    """--examples: the photos directly in `photos_dir`, then the first photo of each sub-folder (a <class>/ folder
    gives one per class), at most SPACE_EXAMPLES; ShareError when there are none."""
    if not photos_dir.is_dir():
        raise ShareError(f"--examples {photos_dir}: no such folder; pass a folder of photos (or of <class>/ "
                         f"sub-folders of photos).")

    def photos(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    found = photos(photos_dir) + [ps[0] for sub in sorted(p for p in photos_dir.iterdir() if p.is_dir())
                                  if (ps := photos(sub))]
    if not found:
        raise ShareError(f"--examples {photos_dir}: no photos ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or in its "
                         f"sub-folders.")
    return found[:SPACE_EXAMPLES]


def run_examples(run_dir: Path, data: Path | None) -> tuple[list[Path], str | None]:
    """(one photo per class from the run's test split, else its valid split: photos it did not train on; a note
    when there are none to take)."""
    try:
        for split in ("test", "valid"):
            root, df = run_split_images(run_dir, data, split)
            if len(df):
                firsts = df.sort_values("path").groupby("label", sort=True).head(1)
                return [root / p for p in firsts["path"]], None
    except EvaluationError as e:
        return [], f"no example photos in the Space: {e} Pass --examples PHOTOS_DIR."
    return [], "no example photos in the Space: the run has no valid or test photos. Pass --examples PHOTOS_DIR."


def space_card(payload: dict, licence: Licence, repo_id: str | None, examples: list[Path], source: str) -> str:
    """README.md: the Space's YAML front matter (read by huggingface_hub.SpaceCard) and its page."""
    from huggingface_hub import SpaceCard, SpaceCardData
    gradio = installed_version("gradio", "the Space's sdk_version pins the gradio version the demo ran with")
    data = SpaceCardData(title="Flower classifier", sdk="gradio", sdk_version=gradio, app_file=APP_FILE,
                         python_version=f"{sys.version_info.major}.{sys.version_info.minor}", license=licence.id,
                         models=[repo_id] if repo_id else None, tags=["image-classification", "flowers", "fastai"],
                         emoji="🌼", colorFrom="yellow", colorTo="green", pinned=False,
                         short_description="Daisy, dandelion, rose, sunflower or tulip?")
    model = f" ([{repo_id}](https://huggingface.co/{repo_id}))" if repo_id else ""
    shown = (f"- `{EXAMPLES_DIR}/`: {len(examples)} example photos, copied from {source}: publish only photos you "
             f"may share.") if examples else f"- no `{EXAMPLES_DIR}/`: export with `--examples PHOTOS_DIR` to add some."
    body = f"""# Flower classifier

Drop, paste or pick a photo of a daisy, dandelion, rose, sunflower or tulip: `{payload['model_name']}`{model},
fine-tuned with fastai by flowers_fastai, says which, with a calibrated probability per class and a Grad-CAM map
of why.

## What is here

- `{APP_FILE}`: starts the project's Gradio demo on `{MODEL_DIR}/` (Spaces run `python {APP_FILE}`).
- `{MODEL_DIR}/`: the model, `config.json` (preprocessing, calibration) and `model.safetensors` (no pickle).
- `flowers_classifier/`, `flowers_apps/`: the serving runtime and the demo, copied from the flowers_fastai
  checkout that exported the model, so the Space runs the code the model was tested with; fastai is neither
  copied nor installed.
- `{REQUIREMENTS_FILE}`: their dependencies at the versions the project ran with (torch's CPU build: a Space's
  free hardware has no GPU); `sdk_version` above pins gradio alike, so a Gradio release cannot break the Space.
{shown}

## Run it locally

```bash
pip install -r {REQUIREMENTS_FILE} && python {APP_FILE}    # then open http://127.0.0.1:7860
```

## Publish it

```bash
hf upload ORG/NAME . --repo-type space    # from this folder, logged in with `hf auth login`
```

## License

`{licence.id}`: the model's. {licence.why}
"""
    return str(SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write_space(payload: dict, out: Path, *, licence: Licence, run_dir: Path | None = None,
                repo_id: str | None = None, examples_dir: Path | None = None,
                data: Path | None = None) -> tuple[list[Path], list[str]]:
    """The Space of `payload` in `out` ((files and folders written, notes for the user)). Example photos come
    from `examples_dir`, else from the run's test (or valid) split; each file is written atomically and each
    folder replaced whole, so nothing stale stays."""
    out = Path(out)
    check_share_folder(out, SPACE_FILES, "--space")
    requirements = space_requirements()  # errors first, before anything is written
    sources = {name: package_source(name) for name in VENDORED}
    notes = []
    if examples_dir is not None:
        examples, source = pick_examples(Path(examples_dir)), f"`{Path(examples_dir).name}`"
    elif run_dir is not None:
        examples, note = run_examples(Path(run_dir), data)
        source = f"the run's photo folder (`{examples[0].parents[1].name}`), one per class" if examples else ""
        notes += [note] if note else []
    else:
        examples, source = [], ""
        notes.append("no example photos in the Space: pass --examples PHOTOS_DIR.")
    card = space_card(payload, licence, repo_id, examples, source)

    written = [replace_dir(out / MODEL_DIR, lambda tmp: write_model_files(payload, tmp))]
    for name, src in sources.items():
        written.append(replace_dir(out / name, lambda tmp, src=src: shutil.copytree(
            src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))))
    if examples:
        def copy_examples(tmp: Path) -> None:
            for i, photo in enumerate(examples):
                shutil.copyfile(photo, tmp / f"{i + 1:02d}_{photo.name}")
        written.append(replace_dir(out / EXAMPLES_DIR, copy_examples))
    elif (out / EXAMPLES_DIR).exists():
        shutil.rmtree(out / EXAMPLES_DIR)  # an earlier export's photos: not asked for now
    model = f'HERE / "{MODEL_DIR}"'
    app = APP.format(examples=EXAMPLES_DIR, cnn=model if payload["family"] == "cnn" else None,
                     vit=model if payload["family"] == "clip" else None)
    lines = ["# The Space's dependencies: the flowers_classifier runtime's and the demo's, at the versions",
             "# flowers_fastai ran with (no fastai). torch from its CPU index: a Space's free hardware has no GPU.",
             f"--extra-index-url {TORCH_CPU_INDEX}", *requirements]
    written += [atomic_write(out / APP_FILE, lambda tmp: Path(tmp).write_text(app)),
                atomic_write(out / REQUIREMENTS_FILE, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n")),
                atomic_write(out / README_FILE, lambda tmp: Path(tmp).write_text(card))]
    return written, notes
