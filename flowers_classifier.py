"""Standalone flower classifier: load an exported `.pth` and predict, with torch, timm, open_clip and
PIL only (no fastai, no network).

    import flowers_classifier as fc
    model = fc.load_cnn_model("cnn_flowers.pth")   # a bare name is also looked up in models/
    fc.predict(model, "rose.jpg")                   # -> "rose"
    fc.predict_proba(model, "rose.jpg")             # -> {"daisy": 0.01, "dandelion": 0.02, ...}
    fc.predict_batch(model, fc.find_images(["photos/"]), bs=32)   # -> one record per image
    model = fc.load_model("cnn_flowers.onnx")       # ONNX Runtime instead of torch (`export.py --onnx`)

    python -m flowers_classifier PATH... [--model models/cnn_flowers.pth] [--top-k 3] [--json OUT] [--bs N]

Payloads are read with `torch.load(weights_only=True)`: a file holding pickled objects is refused
without running anything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pickle
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flowers_fastai.classes import CLASSES
from flowers_fastai.cli import quiet_third_party_warnings
from flowers_fastai.export import ONNX_INPUT, ONNX_METADATA_KEY, ONNX_OUTPUTS
from flowers_fastai.models import build_from_spec
from flowers_fastai.preprocess import InvalidImageError, Preprocess, preprocess_image

MODELS_DIR = Path(__file__).resolve().parent / "models"
REQUIRED_KEYS = frozenset({"format_version", "family", "model_name", "classes", "image_size", "mean", "std",
                           "state_dict"})
OPTIONAL_KEYS = frozenset({"interpolation", "crop_pct", "quick_gelu", "dtype"})
SUPPORTED_FORMATS = (1,)
CPU_MICRO_BATCH = 2  # images per forward pass on the CPU (see load_model)


class ModelFileError(ValueError):
    """A model file that is missing, unsafe, damaged or of the wrong kind. The message names it."""


class FlowerClassifier(nn.Module):
    """An exported network plus what it needs to be fed: classes and preprocessing."""

    channels_last = False  # load_model sets it for ConvNeXt on the CPU: inputs are then fed NHWC
    micro_batch: int | None = None  # load_model sets it on the CPU: a batch runs through the net in chunks

    def __init__(self, net: nn.Module, family: str, model_name: str, classes: tuple[str, ...], prep: Preprocess):
        super().__init__()
        self.net, self.family, self.model_name, self.classes, self.prep = net, family, model_name, classes, prep

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, num_classes) fp32 probabilities."""
        dtype = next(self.net.parameters()).dtype
        memory_format = torch.channels_last if self.channels_last else torch.preserve_format
        chunks = batch.split(self.micro_batch) if self.micro_batch else (batch,)
        logits = [self.net(c.to(self.device, dtype, memory_format=memory_format)) for c in chunks]
        return torch.cat(logits).float().softmax(-1).cpu()


def _resolve(weights_path: str | os.PathLike) -> Path:
    path = Path(weights_path)
    if not path.exists() and path.parent == Path(".") and (MODELS_DIR / path.name).exists():
        return MODELS_DIR / path.name
    return path


def load_payload(weights_path: str | os.PathLike) -> dict:
    """Read and validate a payload written by `export.py`; ModelFileError on anything else."""
    path = _resolve(weights_path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file. Train and export one with "
                             f"`python train.py --arch cnn` (or `python export.py RUN_DIR`).")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a torch file at all (random bytes, text, ...)
            raise ModelFileError(f"{path}: not a readable model file (damaged, or not a torch file at all); "
                                 f"export it again with export.py.") from e
        raise ModelFileError(f"{path}: refused to load: the file holds pickled Python objects, not a "
                             f"plain flowers_fastai payload (nothing in it was executed). Re-export it "
                             f"with export.py.") from e
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file, ...
        raise ModelFileError(f"{path}: not a readable model file ({type(e).__name__}: {e})") from e
    if not isinstance(payload, dict):
        raise ModelFileError(f"{path}: not a flowers_fastai payload (a {type(payload).__name__}, not a dict)")
    keys = set(payload)
    missing, extra = REQUIRED_KEYS - keys, keys - REQUIRED_KEYS - OPTIONAL_KEYS
    if missing or extra:
        raise ModelFileError(f"{path}: not a flowers_fastai payload (missing keys {sorted(missing)}, "
                             f"unexpected keys {sorted(extra)}); export it with export.py.")
    if payload["format_version"] not in SUPPORTED_FORMATS:
        raise ModelFileError(f"{path}: payload format {payload['format_version']} is not supported "
                             f"(this code reads {SUPPORTED_FORMATS}); update flowers_classifier.")
    if tuple(payload["classes"]) != CLASSES:
        raise ModelFileError(f"{path}: classes {payload['classes']} are not {list(CLASSES)}")
    return payload


def _build_with_weights(payload: dict) -> nn.Module:
    """The payload's architecture holding its weights. Built on the meta device and given the payload's
    tensors: no random init to throw away and no second copy of the weights (a faster cold start, half
    the peak memory). Built for real when that cannot work: a builder that moves its tensors (open_clip
    calls .to()) or a tensor that the state dict does not cover (it would stay meta)."""
    try:
        with torch.device("meta"):
            net = build_from_spec(payload)
    except NotImplementedError:  # "Cannot copy out of meta tensor"
        net = None
    if net is not None:
        net.load_state_dict(payload["state_dict"], strict=True, assign=True)
    if net is None or any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers())):
        net = build_from_spec(payload)
        net.load_state_dict(payload["state_dict"], strict=True)
    return net


def load_model(weights_path: str | os.PathLike, family: str | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
               compile: bool = False) -> FlowerClassifier:
    """Build the architecture the payload describes (no download), load its weights, eval mode.
    `family` ("cnn" or "clip") makes a file of the other family an error. Uses CUDA when available.
    On the CPU, Linear layers run as 1x1 convolutions (`_LinearAsConv`), a ConvNeXt runs channels_last and
    batches go through the network CPU_MICRO_BATCH images at a time.
    `compile=True` adds torch.compile (see `_compile`): faster still on the CPU, mostly at batch sizes
    above 1, but the first call at each new batch-size range compiles (seconds to a minute); for
    long-running servers.
    A `.onnx` file (`export.py --onnx`) is served by ONNX Runtime instead: see `load_onnx_model`."""
    if _resolve(weights_path).suffix.lower() == ".onnx":
        return load_onnx_model(weights_path, family, device)
    payload = load_payload(weights_path)
    path = _resolve(weights_path)
    if family and payload["family"] != family:
        loader = "load_cnn_model" if payload["family"] == "cnn" else "load_vit_model"
        raise ModelFileError(f"{path}: holds a {payload['family']!r} model, not {family!r}; use {loader}().")
    try:
        net = _build_with_weights(payload)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: weights do not fit {payload['model_name']} ({e})") from e
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        dtype = torch.float32  # half precision on CPU is slower and less exact
    prep = Preprocess.from_dict(payload)
    model = FlowerClassifier(net.to(device, dtype).eval(), payload["family"], payload["model_name"],
                             tuple(payload["classes"]), prep)
    if device.type == "cpu":
        # Activations of a couple of images stay in the CPU's caches; those of 32 do not, and then the
        # elementwise ops between the convolutions (GELU, GRN, LayerNorm) run at memory speed: chunks of 2
        # are ~2x faster per image than one pass of 32 (bench/cpu_kernels.py, bench/RESULTS.md).
        model.micro_batch = CPU_MICRO_BATCH
        _linears_as_convs(model.net)
        if model.family == "cnn":
            # oneDNN's convolutions are fastest on NHWC, and ConvNeXt's MLP permutes to NHWC anyway: no copies.
            model.net, model.channels_last = model.net.to(memory_format=torch.channels_last), True
    return _compile(model) if compile else model


class _LinearAsConv(nn.Module):
    """An nn.Linear over the last dim of an (N, H, W, C) or (N, L, C) tensor, computed as a 1x1 convolution
    of its channels-last view: the same arithmetic up to float rounding, but through oneDNN rather than
    MKL's sgemm, which runs at about half oneDNN's speed on the AMD EPYC measured in bench/RESULTS.md
    (MKL does not take its AVX-512 path there). Same parameters and state-dict keys as the Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight[:, :, None, None]
        if x.dim() == 4:  # (N, H, W, C) is an NCHW tensor in channels_last memory once permuted: no copy
            return F.conv2d(x.permute(0, 3, 1, 2), w, self.bias).permute(0, 2, 3, 1)
        if x.dim() == 3:  # (N, L, C) -> (N, C, L, 1), channels_last in memory too
            return F.conv2d(x.transpose(1, 2).unsqueeze(-1), w, self.bias).squeeze(-1).transpose(1, 2)
        return F.linear(x, self.weight, self.bias)


def _linears_as_convs(net: nn.Module) -> None:
    """Swap every nn.Linear of `net` (ConvNeXt's MLPs, the ViT blocks' MLPs, heads) for _LinearAsConv."""
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:  # not subclasses: NonDynamicallyQuantizableLinear of attention stays
                setattr(module, name, _LinearAsConv(child))


def _compile(model: FlowerClassifier) -> FlowerClassifier:
    """torch.compile with inductor freezing (weights folded and prepacked, elementwise ops fused), warmed
    up on one image so that a missing C++ compiler shows here, as a warning, and eager serving goes on."""
    eager = model.net
    model.net = torch.compile(eager, options={"freezing": True})
    try:
        model.probabilities(torch.zeros(1, 3, model.prep.image_size, model.prep.image_size))
    except Exception as e:  # noqa: BLE001 - any backend failure leaves the (correct) eager model in place
        warnings.warn(f"load_model(compile=True): torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
                      f"serving the eager model. It needs a C++ compiler (gcc/g++) on PATH.", stacklevel=3)
        model.net = eager
    return model


def load_cnn_model(weights_path: str | os.PathLike = "cnn_flowers.pth", device=None,
                   dtype: torch.dtype = torch.float32) -> FlowerClassifier:
    """The exported ConvNeXt V2 classifier (`export.py` output)."""
    return load_model(weights_path, "cnn", device, dtype)


def load_vit_model(weights_path: str | os.PathLike = "vit_flowers.pth", device=None,
                   dtype: torch.dtype = torch.float32) -> FlowerClassifier:
    """The exported CLIP ViT classifier; fp32 on CPU, fp16/bf16 allowed on GPU via `dtype`."""
    return load_model(weights_path, "clip", device, dtype)


# --------------------------------------------------------------------------- ONNX Runtime (optional)

class _OrtNet(nn.Module):
    """An ONNX Runtime session behind the module interface FlowerClassifier expects (forward -> logits)."""

    def __init__(self, session):
        super().__init__()
        self.session = session

    def run(self, output: str, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run([output], {ONNX_INPUT: x.float().contiguous().numpy()})[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(ONNX_OUTPUTS[0], x)


class OnnxFlowerClassifier(FlowerClassifier):
    """A FlowerClassifier whose network is an exported ONNX graph run by ONNX Runtime on the CPU: same
    classes, preprocessing and `probabilities`, so predict/predict_proba/predict_batch work unchanged."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return self.net.run(ONNX_OUTPUTS[1], batch)  # the graph's own softmax output, fp32


def _onnx_session(path: Path, threads: int | None):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ModelFileError(f"{path}: serving an .onnx model needs onnxruntime, which is not installed; "
                             f"`pip install onnxruntime`, or serve the .pth payload instead.") from e
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - truncated protobuf, not an ONNX file, unknown op, ...
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:300]}); "
                             f"export it again with `python export.py MODEL.pth --onnx OUT.onnx`.") from e


def load_onnx_model(onnx_path: str | os.PathLike, family: str | None = None, device: str | torch.device | None = None,
                    threads: int | None = None) -> OnnxFlowerClassifier:
    """An ONNX graph written by `export.py --onnx`, served by ONNX Runtime (CPU; `threads` sets its
    intra-op threads, default: ONNX Runtime's choice). The preprocessing comes from the file's metadata."""
    path = _resolve(onnx_path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file. Write one with `python export.py MODEL.pth --onnx {path}`.")
    if device is not None and torch.device(device).type != "cpu":
        raise ModelFileError(f"{path}: .onnx models are served on the CPU by ONNX Runtime; pass device='cpu' "
                             f"(or leave it out), or serve the .pth payload on {device}.")
    session = _onnx_session(path, threads)
    meta = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    if meta is None:
        raise ModelFileError(f"{path}: an ONNX model without flowers_fastai metadata (no preprocessing spec); "
                             f"export it with `python export.py MODEL.pth --onnx OUT.onnx`.")
    spec = json.loads(meta)
    if spec.get("format_version") not in SUPPORTED_FORMATS or tuple(spec.get("classes", ())) != CLASSES:
        raise ModelFileError(f"{path}: metadata format {spec.get('format_version')} / classes {spec.get('classes')} "
                             f"are not {SUPPORTED_FORMATS} / {list(CLASSES)}; re-export it with this version.")
    if family and spec["family"] != family:
        raise ModelFileError(f"{path}: holds a {spec['family']!r} model, not {family!r}.")
    return OnnxFlowerClassifier(_OrtNet(session), spec["family"], spec["model_name"], CLASSES,
                                Preprocess.from_dict(spec))


def load_ensemble(cnn_path: str | os.PathLike = "cnn_flowers.pth", vit_path: str | os.PathLike = "vit_flowers.pth",
                  device=None) -> list[FlowerClassifier]:
    """The CNN and the ViT together: pass the list to `predict_proba`/`predict` for the mean of both
    probability vectors (each model still sees its own crop size and normalisation)."""
    return [load_cnn_model(cnn_path, device), load_vit_model(vit_path, device)]


def predict_proba(model: FlowerClassifier | Sequence[FlowerClassifier],
                  image_path: str | os.PathLike) -> dict[str, float]:
    """Class -> probability for one image file (EXIF-rotated, any mode -> RGB, validation crop).
    A list of models (see `load_ensemble`) gives the unweighted mean of their probability vectors."""
    models = [model] if isinstance(model, FlowerClassifier) else list(model) if isinstance(model, Sequence) else []
    if not models or not all(isinstance(m, FlowerClassifier) for m in models):
        raise TypeError(f"predict_proba: expected a FlowerClassifier or a non-empty list of them, got "
                        f"{type(model).__name__}; load one with load_cnn_model/load_vit_model/load_ensemble.")
    # Averaging probabilities (not logits) keeps each model's calibration and needs no shared scale.
    probs = torch.stack([m.probabilities(preprocess_image(image_path, m.prep).unsqueeze(0))[0] for m in models])
    return {c: float(p) for c, p in zip(models[0].classes, probs.mean(0), strict=True)}


def predict(model: FlowerClassifier | Sequence[FlowerClassifier], image_path: str | os.PathLike) -> str:
    """The most likely class: always one of daisy, dandelion, rose, sunflower, tulip."""
    probs = predict_proba(model, image_path)
    return max(probs, key=probs.get)


# --------------------------------------------------------------------------- batch prediction + CLI

# The suffixes flowers_fastai.data scans for (that module imports fastai, so it is not imported here).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, whatever their suffix (they were asked for), and every image file below each
    folder (recursive, sorted). A path that does not exist is kept: predicting it reports the error."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        else:
            found.append(path)
    return found


def _load_or_error(load: Callable, path: Path, prep: Preprocess) -> torch.Tensor | str:
    try:
        return load(path, prep)
    except InvalidImageError as e:
        return str(e)


def iter_probabilities(model: FlowerClassifier, image_paths: Iterable[str | os.PathLike], bs: int = 32,
                       load: Callable[[Path, Preprocess], torch.Tensor] = preprocess_image,
                       workers: int = 4) -> Iterator[tuple[Path, torch.Tensor | None, str | None]]:
    """(path, probabilities, error) for every image, in order, `bs` images per forward pass; a file that
    does not decode gives (path, None, message) and the others go on. `load(path, prep)` makes the input
    (default: the served preprocessing); when it returns a stack of views (V, 3, H, W) the probabilities
    are (V, K), one row per view, for test-time augmentation."""
    paths = [Path(p) for p in image_paths]
    with ThreadPoolExecutor(workers) as pool:  # PIL decodes outside the GIL: overlap the files of a batch
        for start in range(0, len(paths), bs):
            chunk = paths[start:start + bs]
            inputs = list(pool.map(lambda p: _load_or_error(load, p, model.prep), chunk))
            stacks = [x if x.dim() == 4 else x.unsqueeze(0) for x in inputs if isinstance(x, torch.Tensor)]
            probs = iter(model.probabilities(torch.cat(stacks)).split([len(s) for s in stacks]) if stacks else [])
            for path, x in zip(chunk, inputs, strict=True):
                if isinstance(x, str):
                    yield path, None, x
                else:
                    p = next(probs)
                    yield path, (p if x.dim() == 4 else p[0]), None


def _error_record(path: str | os.PathLike, error: str) -> dict:
    return dict(image_path=str(path), predicted_class=None, confidence=None, probabilities=None, error=error)


def iter_predictions(model: FlowerClassifier, image_paths: Iterable[str | os.PathLike],
                     bs: int = 32) -> Iterator[dict]:
    """One JSON-ready record per image: image_path, predicted_class, confidence, probabilities (class ->
    probability) and error (None, or why the file could not be read, the other fields then None)."""
    for path, probs, error in iter_probabilities(model, image_paths, bs):
        if error is not None:
            yield _error_record(path, error)
            continue
        best = int(probs.argmax())
        yield dict(image_path=str(path), predicted_class=model.classes[best], confidence=float(probs[best]),
                   probabilities={c: float(p) for c, p in zip(model.classes, probs, strict=True)}, error=None)


def predict_batch(model: FlowerClassifier, image_paths: Iterable[str | os.PathLike], bs: int = 32) -> list[dict]:
    """Records (see `iter_predictions`) for many images at once: batched, unreadable files reported."""
    return list(iter_predictions(model, image_paths, bs))


def _top_k(record: dict, k: int) -> str:
    ranked = sorted(record["probabilities"].items(), key=lambda kv: kv[1], reverse=True)[:k]
    return f"{record['image_path']}\t" + "  ".join(f"{c} {p:.3f}" for c, p in ranked)


class _Progress:
    """`done/total` on stderr, only on a terminal; cleared before each stdout line so they do not mix."""

    def __init__(self, total: int):
        self.total, self.done, self.on = total, 0, sys.stderr.isatty()

    def clear(self) -> None:
        if self.on:
            sys.stderr.write("\r\033[K")

    def step(self) -> None:
        self.done += 1
        if self.on:
            width = 30
            filled = width * self.done // self.total
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} images")
            sys.stderr.flush()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flowers_classifier",
                                description="Predict the flower class of image files and folders (searched "
                                            "recursively) with an exported model, in batches.")
    p.add_argument("paths", nargs="+", help="image files and/or folders")
    p.add_argument("--model", default="models/cnn_flowers.pth", help="exported .pth, cnn or clip "
                                                                     "(default: models/cnn_flowers.pth)")
    p.add_argument("--top-k", type=int, default=3, help="classes printed per image (default 3)")
    p.add_argument("--json", type=Path, help="also write one record per image to this JSON file")
    p.add_argument("--bs", type=int, default=32, help="images per forward pass (default 32)")
    args = p.parse_args(argv)
    if not 1 <= args.top_k <= len(CLASSES):
        p.error(f"--top-k must be between 1 and {len(CLASSES)}, not {args.top_k}")
    if args.bs < 1:
        p.error(f"--bs must be at least 1, not {args.bs}")
    return args


def main(argv: list[str] | None = None) -> int:
    """CLI: one line per image (path, top-k classes with confidences), errors on stderr; exit code 0 when
    every image was predicted, 1 when some could not be read, 2 when nothing could run."""
    args = _parse_args(argv)
    quiet_third_party_warnings()
    try:
        model = load_model(args.model)
    except ModelFileError as e:
        print(f"error: {e} (--model)", file=sys.stderr)
        return 2
    paths, records = [], []
    for arg in args.paths:
        found = find_images([arg])
        if not found:  # only a folder comes back empty
            records.append(_error_record(arg, f"{arg}: folder holds no image files "
                                              f"({', '.join(sorted(IMAGE_EXTENSIONS))})"))
            print(f"error: {records[-1]['error']}", file=sys.stderr)
        paths += found
    if not paths:
        print("error: nothing to predict; pass image files or folders holding them.", file=sys.stderr)
        return 2
    progress = _Progress(len(paths))
    for record in iter_predictions(model, paths, args.bs):
        progress.clear()
        if record["error"]:
            print(f"error: {record['error']}", file=sys.stderr)
        else:
            print(_top_k(record, args.top_k), flush=True)
        records.append(record)
        progress.step()
    progress.clear()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    failed = sum(r["error"] is not None for r in records)
    print(f"{len(records) - failed} image(s) predicted, {failed} failed"
          + (f"; records in {args.json}" if args.json else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
