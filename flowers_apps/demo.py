"""Gradio web demo: drop, paste or pick a flower photo and see the top classes, why (a Grad-CAM heat
map) and, optionally, the test-time-augmented answer.

    python app.py [--cnn models/cnn_flowers.pth] [--vit models/vit_flowers.pth] [--host 127.0.0.1]
                  [--port 7860] [--share] [--examples DIR] [--mcp] [--auth USER:PASS]
                  (or: flowers-demo ...; the options: flowers_apps/cli.py)

This module owns the page, its named API endpoint `/predict` (for gradio_client, and the MCP tool with
--mcp), login (--auth or $FLOWERS_DEMO_AUTH), the upload limit and the queue settings.
It is built on `flowers_classifier` and gradio alone: importing it never imports
fastai. Models load once, in `build_demo`; a missing model file only removes that choice from the page.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr

import flowers_classifier as fc
from flowers_classifier.errors import FlowersError
from flowers_classifier.explain import ExplainError, explain
from flowers_classifier.payload import default_model_path
from flowers_classifier.preprocess import IMAGE_SUFFIXES

CNN, VIT, ENSEMBLE = "CNN", "ViT", "Ensemble"
MAX_UPLOAD = "20mb"  # Gradio refuses bigger uploads before they reach us (HTTP 413 / a message in the page)
MAX_EXAMPLES = 10
AUTH_ENV = "FLOWERS_DEMO_AUTH"  # USER:PASS, so the password need not sit in the shell history
# Every event that runs a model joins this one queue group. Gradio's concurrency limit counts per event
# function unless events share a concurrency_id, so without it /predict, the classification on upload and
# Grad-CAM would each get their own slot and run at once.
ONE_MODEL_CALL = dict(concurrency_id="model", concurrency_limit=1)
DEFAULT_CNN, DEFAULT_VIT = default_model_path("cnn"), default_model_path("clip")
TRAIN_HELP = f"""\
**No model file found** (looked for `{{cnn}}` and `{{vit}}`). Train and export one, then restart the app:

```bash
python train.py --arch cnn    # exports {DEFAULT_CNN}
python train.py --arch clip   # exports {DEFAULT_VIT}
# offline (no pretrained weights; DIR holds one folder of photos per class):
python train.py --arch cnn --data DIR --no-pretrained
python train.py --arch clip --data DIR --no-pretrained
```
"""
NO_MODEL_ERROR = (f"No model is loaded. Train and export one with 'python train.py --arch cnn' (writes "
                  f"{DEFAULT_CNN}) or 'python train.py --arch clip' (writes {DEFAULT_VIT}); "
                  f"offline add '--data DIR --no-pretrained' (DIR: one folder of photos per class). "
                  f"Then restart app.py.")


class AuthError(FlowersError, ValueError):
    """An --auth / $FLOWERS_DEMO_AUTH value that is not USER:PASS. The message says which."""


MCP_WITH_AUTH_ERROR = (f"--mcp with --auth (or ${AUTH_ENV}): Gradio's MCP endpoint does not ask for the login, "
                       f"so it would serve the classifier to anyone who can reach the port. Use one or the other; "
                       f"to offer MCP beyond this machine, put a reverse proxy that authenticates in front.")


def parse_auth(value: str | None, source: str = "--auth") -> tuple[str, str] | None:
    """'USER:PASS' -> (user, pass); None or '' -> None (no login). The password may contain ':'."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise AuthError(f"{source}: expected USER:PASS (both non-empty), got {len(value)} characters without "
                        f"that form. Pass e.g. --auth alice:s3cret, or set {AUTH_ENV}=alice:s3cret.")
    return user, password


class ExamplesError(FlowersError, ValueError):
    """An `--examples` folder that is missing or holds no photos. The message names it."""


def find_examples(examples_dir: str | os.PathLike | None) -> list[Path]:
    """Photos directly in `examples_dir`, then the first photo of each subfolder (so a
    <root>/<class>/*.jpg dataset gives one per class); at most MAX_EXAMPLES. None -> no examples."""
    if examples_dir is None:
        return []
    root = Path(examples_dir)
    if not root.is_dir():
        raise ExamplesError(f"--examples {root}: no such folder. Pass a folder of photos (or of <class>/ "
                            f"subfolders of photos), or leave the flag out.")
    direct = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    firsts = [min(photos) for sub in sorted(p for p in root.iterdir() if p.is_dir())
              if (photos := [p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES])]
    found = (direct + firsts)[:MAX_EXAMPLES]
    if not found:
        raise ExamplesError(f"--examples {root}: no photos ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or in "
                            f"its subfolders. Point it at a folder of photos, or leave the flag out.")
    return found


def load_models(cnn_path: str | os.PathLike | None,
                vit_path: str | os.PathLike | None) -> dict[str, fc.FlowerClassifier | list[fc.FlowerClassifier]]:
    """Choice name -> model(s), for the paths that exist (a .pth, an .onnx, or a Hub folder written by `export.py
    --hub`); "Ensemble" only when both do. One that exists but does not load raises ModelFileError: serving
    without it would hide a broken export."""
    models: dict[str, fc.FlowerClassifier | list[fc.FlowerClassifier]] = {}
    if cnn_path is not None and Path(cnn_path).exists():
        models[CNN] = fc.load_cnn_model(cnn_path)
    if vit_path is not None and Path(vit_path).exists():
        models[VIT] = fc.load_vit_model(vit_path)
    if CNN in models and VIT in models:
        models[ENSEMBLE] = [models[CNN], models[VIT]]
    return models


def _describe(models: dict, cnn_path: str | os.PathLike | None, vit_path: str | os.PathLike | None) -> str:
    """One line per loaded model, so the page says what is answering."""
    lines = [f"- **{name}**: `{m.model_name}` ({Path(path).name})" for name, m, path in
             ((CNN, models.get(CNN), cnn_path), (VIT, models.get(VIT), vit_path)) if m is not None]
    if ENSEMBLE in models:
        lines.append(f"- **{ENSEMBLE}**: mean of the CNN and ViT probabilities")
    return "\n".join(lines)


def _upload_path(image: dict | None) -> tuple[str, str]:
    """(server-side path, name to show) from the raw FileData dict Gradio hands over (preprocess=False)."""
    if not image or not image.get("path"):
        raise gr.Error("No image received. Drop, paste or pick a photo first (for gradio_client: "
                       "handle_file('photo.jpg') as the first argument).", print_exception=False)
    path = str(image["path"])
    return path, image.get("orig_name") or Path(path).name


def _chosen(models: dict, choice: str):
    if not models:
        raise gr.Error(NO_MODEL_ERROR, print_exception=False)
    if choice not in models:
        raise gr.Error(f"Model {html.escape(str(choice))!r} is not loaded here; choose one of "
                       f"{', '.join(models)}.", print_exception=False)
    return models[choice]


def _bad_image(e: Exception, path: str, name: str) -> gr.Error:
    # The library names its temp path; the user knows the file by its own name.
    reason = str(e).removeprefix(f"{path}: ") if isinstance(e, fc.InvalidImageError) else "out of memory"
    return gr.Error(f"{html.escape(name)}: {html.escape(reason)}. Upload a photo (JPEG, PNG, WebP, "
                    f"...) of at most {MAX_UPLOAD.upper()}.", print_exception=False)


def make_classifier(models: dict) -> Callable[[dict | None, str, bool], tuple[dict[str, float], str]]:
    """The `/predict` handler: (raw image FileData, choice, tta) -> (Label dict, timing text)."""

    def classify(image: dict | None, choice: str = CNN, tta: bool = False) -> tuple[dict[str, float], str]:
        """Classify a flower photo as daisy, dandelion, rose, sunflower or tulip.

        Args:
            image: the flower photo (JPEG, PNG, WebP, ...; at most 20 MB).
            choice: which model answers: "CNN", "ViT" or "Ensemble" (the mean of both), as loaded.
            tta: average over 10 views (center, 4 corners and their mirror images): slower, often steadier.

        Returns:
            The most likely class with the probability of each class, and the time the prediction took.
        """
        model = _chosen(models, choice)
        path, name = _upload_path(image)
        start = time.perf_counter()
        try:
            probs = fc.predict_proba(model, path, tta=bool(tta))
        except (fc.InvalidImageError, MemoryError) as e:
            raise _bad_image(e, path, name) from e
        ms = (time.perf_counter() - start) * 1000
        return probs, f"{ms:.0f} ms with {choice}" + (" (TTA, 10 views)" if tta else "")

    return classify


def make_explainer(models: dict) -> Callable[[dict | None, str, bool], list[tuple] | None]:
    """Gallery items (overlay, caption): one Grad-CAM map per model of the choice, side by side for the
    ensemble; None when the toggle is off."""

    def explain_choice(image: dict | None, choice: str, show: bool) -> list[tuple] | None:
        if not show or not image:
            return None
        chosen = _chosen(models, choice)
        path, name = _upload_path(image)
        try:
            return [(explain(m, path), f"Grad-CAM, {m.model_name}")
                    for m in (chosen if isinstance(chosen, list) else [chosen])]
        except (fc.InvalidImageError, MemoryError) as e:
            raise _bad_image(e, path, name) from e
        except ExplainError as e:  # e.g. an ONNX model, or a map with no evidence: say why, draw nothing
            raise gr.Error(html.escape(str(e)), print_exception=False) from e

    return explain_choice


def build_demo(cnn_path: str | os.PathLike | None = DEFAULT_CNN, vit_path: str | os.PathLike | None = DEFAULT_VIT,
               examples_dir: str | os.PathLike | None = None) -> gr.Blocks:
    """The whole page, models loaded, queue configured. Launch it with `launch_demo`."""
    examples = find_examples(examples_dir)  # first: a mistyped flag should not wait for models to load
    models = load_models(cnn_path, vit_path)
    classify, explain_choice = make_classifier(models), make_explainer(models)
    with gr.Blocks(title="Flower classifier", analytics_enabled=False) as demo:
        gr.Markdown("# Flower classifier\nDrop, paste or pick a photo of a **daisy, dandelion, rose, sunflower "
                    "or tulip**.")
        info = _describe(models, cnn_path, vit_path) if models else TRAIN_HELP.format(cnn=cnn_path, vit=vit_path)
        gr.Markdown(info, elem_id="models-info")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", sources=["upload", "clipboard"], image_mode=None,
                                 label="Flower photo", elem_id="photo")
                choice = gr.Radio(list(models), value=next(iter(models), None), label="Model",
                                  visible=bool(models), elem_id="model-choice")
                with gr.Row():
                    top_k = gr.Slider(1, len(fc.CLASSES), value=len(fc.CLASSES), step=1, label="Classes shown",
                                      elem_id="top-k")
                    tta = gr.Checkbox(False, label="TTA (10 views)", elem_id="tta",
                                      info="mean over the center crop, 4 corners and their mirror images")
                    # Grad-CAM costs a backward pass: on by default for the CNN (fast), off for a ViT alone.
                    show = gr.Checkbox(CNN in models, label="Show why (Grad-CAM)", elem_id="show-why")
                button = gr.Button("Classify", variant="primary", interactive=bool(models))
            with gr.Column():
                label = gr.Label(num_top_classes=len(fc.CLASSES), label="Prediction", elem_id="prediction")
                timing = gr.Textbox(label="Prediction time", interactive=False, elem_id="timing")
                # fit_columns=False: a single map keeps its column's width (square), not the whole row, cropped.
                heat = gr.Gallery(label="Why: regions that drove the prediction (red: most)", columns=2, height=360,
                                  fit_columns=False, object_fit="contain", elem_id="heatmap", visible=bool(models))
        example_click = None
        if examples:
            example_click = gr.Examples([[str(p)] for p in examples], inputs=[image], label="Example photos",
                                        cache_examples=False, examples_per_page=MAX_EXAMPLES,
                                        elem_id="examples").load_input_event
        _wire(image, choice, button, label, timing, classify, example_click, tta=tta, show=show, heat=heat,
              explain_choice=explain_choice)
        top_k.change(lambda k: gr.Label(num_top_classes=int(k)), top_k, label, queue=False, api_visibility="private")
    # One model call at a time (ONE_MODEL_CALL, set on each model event in _wire): torch already spreads a
    # single image over every CPU core (or the GPU), so running two at once only slows both and doubles peak
    # memory; later requests wait in the queue, which tells each browser its position. max_size bounds what
    # waiting uploads (<= 20 MB each) can hold.
    return demo.queue(default_concurrency_limit=1, max_size=16)


def _wire(image, choice, button, label, timing, classify, example_click=None, *, tta, show, heat,
          explain_choice) -> None:
    """Classify on upload/paste, on a model or TTA switch, on an example click and on the button, then draw
    the heat map. Each first clears the old result at once (no queue): an error must not leave the previous
    photo's label on screen. Only the button's classification is the public `/predict` endpoint (and MCP tool)."""
    clear = dict(fn=lambda: (None, "", None), outputs=[label, timing, heat], queue=False, api_visibility="private")

    def classify_if_image(img: dict | None, model: str, views: bool) -> tuple[dict[str, float] | None, str]:
        return classify(img, model, views) if img else (None, "")

    auto = dict(fn=classify_if_image, inputs=[image, choice, tta], outputs=[label, timing], preprocess=False,
                api_visibility="private", **ONE_MODEL_CALL)
    why = dict(fn=explain_choice, inputs=[image, choice, show], outputs=[heat], preprocess=False,
               api_visibility="private", **ONE_MODEL_CALL)
    # image.upload, not image.change: replacing a shown photo fires .change twice in Gradio 6 (two inferences).
    gr.on([image.upload, choice.change, tta.change], **clear).then(**auto).success(**why)
    if example_click is not None:  # chained after the example is loaded into the image, so never races it
        example_click.then(**clear).then(**auto).success(**why)
    show.change(**why)
    image.clear(**clear)
    button.click(**clear).then(classify, [image, choice, tta], [label, timing], preprocess=False,
                               api_name="predict", **ONE_MODEL_CALL).success(**why)


def launch_demo(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
                prevent_thread_lock: bool = False, mcp: bool = False,
                auth: tuple[str, str] | None = None) -> str:
    """Serve `demo` with the app's limits; returns the local URL. Blocks until Ctrl-C unless
    prevent_thread_lock (tests), in which case stop it with `demo.close()`. `mcp`: also serve `/predict`
    as an MCP tool at <url>gradio_api/mcp/; `auth`: (user, password) for Gradio's login page. Not both:
    Gradio 6 answers MCP requests without the login (measured: `initialize` gets 200 with --auth)."""
    if mcp and auth:
        raise AuthError(MCP_WITH_AUTH_ERROR)
    # Example photos need no allowed_paths: gr.Examples copies them into Gradio's cache at build time, and
    # Gradio serves only its cache and allowed_paths, so nothing else on disk is reachable.
    _, local_url, _ = demo.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD,
                                  prevent_thread_lock=prevent_thread_lock, footer_links=["api"],
                                  mcp_server=mcp, auth=auth)
    return local_url
