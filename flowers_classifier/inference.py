"""Loading an exported model and predicting with it: `load_model` (and its cnn/vit/ensemble shorthands),
which picks the backend that serves it (backends.py), `predict`/`predict_proba` for one image and
`iter_probabilities`/`predict_batch` for many. Pure torch + timm/open_clip + PIL: no fastai, no network.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .aot import CpuPackageError, cpu_package_path, load_cpu_package
from .backends import BACKENDS, Backend, BackendError, CpuPackageBackend, EagerBackend, Int8Backend
from .factory import build_from_spec
from .hub import CONFIG_FILE, ONNX_FILE, hub_folder, is_hub_source, read_hub_payload
from .model import FlowerClassifier
from .onnx_model import load_onnx_model
from .payload import (
    DEFAULT_FILES,
    QUANTIZE_KEY,
    ModelFileError,
    load_payload,
    payload_int8,
    payload_temperature,
    resolve_model_path,
)
from .preprocess import (
    IMAGE_SUFFIXES,
    ImageSource,
    InvalidImageError,
    Preprocess,
    is_path,
    preprocess_image,
    tta_views,
)


def _build_with_weights(payload: dict, path: str | os.PathLike = "payload") -> nn.Module:
    """The payload's architecture holding its weights. Built on the meta device and given the payload's
    tensors: no random init to throw away and no second copy of the weights (a faster cold start, half
    the peak memory). Built for real when that cannot work: a builder that fails on meta tensors (open_clip
    calls .to()) or a tensor that the state dict does not cover (it would stay meta). ModelFileError saying
    "weights do not fit" only when the state dict does not match the architecture, "cannot build" when the
    architecture itself cannot be built here."""
    try:
        with torch.device("meta"):
            net = build_from_spec(payload)
    except Exception:  # noqa: BLE001 - only a shortcut: whatever stops it, the real build below says what it is
        net = None
    if net is not None:
        _load_weights(net, payload, path, assign=True)
    if net is None or any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers())):
        try:
            net = build_from_spec(payload)
        except Exception as e:  # noqa: BLE001 - unknown model name, library API change, ...: one user error
            raise ModelFileError(f"{path}: cannot build {payload['model_name']!r} ({payload['family']}) with the "
                                 f"installed timm/open_clip ({type(e).__name__}: {str(e)[:300]}); install the versions "
                                 f"it was exported with, or export it again.") from e
        _load_weights(net, payload, path)
    return net


def _load_weights(net: nn.Module, payload: dict, path: str | os.PathLike, assign: bool = False) -> None:
    try:
        net.load_state_dict(payload["state_dict"], strict=True, assign=assign)
    except (RuntimeError, KeyError, ValueError) as e:  # missing, unexpected or misshapen tensors
        raise ModelFileError(f"{path}: weights do not fit {payload['model_name']} ({e})") from e


def load_model(weights_path: str | os.PathLike, *, backend: str = "auto", device: str | torch.device | None = None,
               calibrated: bool = True, dtype: torch.dtype = torch.float32, family: str | None = None,
               compile: bool = False, threads: int | None = None) -> FlowerClassifier:
    """The exported model at `weights_path` (a `.pth` payload, a `.onnx` graph, or a Hub folder written by
    `export.py --hub DIR`; a bare name is looked up in models/), or "hf-hub:ORG/NAME[@REV]" (that folder on the
    Hugging Face Hub, from huggingface_hub's cache: downloaded only then), served by one backend (backends.py)
    chosen here, once, in eval mode. A Hub folder serves as the .pth it was written from (onnx: its model.onnx).

    `backend="auto"`: a `.onnx` file -> onnx; on CUDA -> eager; on the CPU -> int8 when the file asks for it
    (`export.py --int8`), else the compiled package beside the `.pth` when one fits this torch, CPU and weights
    (one that does not fit: a warning saying why, and eager), else eager. A backend named here that cannot
    serve raises BackendError saying why.

    Args:
        backend: "auto", "eager", "int8" (CPU), "cpu-package" (CPU, `export.py --cpu-package`) or "onnx" (a .onnx file)
        device: where the model runs; default CUDA when available, else the CPU
        calibrated: serve softmax(logits / T) with the file's fitted temperature T; False: the raw softmax
        dtype: the weights' dtype on a GPU (fp16/bf16 allowed); the CPU always serves fp32
        family: "cnn" or "clip" to refuse a file of the other family
        compile: torch.compile the eager or int8 network (first calls at each batch size compile; needs g++)
        threads: ONNX Runtime's intra-op threads (onnx only); default ONNX Runtime's choice
    """
    if backend not in ("auto", *BACKENDS):
        raise BackendError(f"load_model(backend={backend!r}): not a backend; pass one of "
                           f"{', '.join(map(repr, ('auto', *BACKENDS)))}.")
    if is_hub_source(weights_path):  # a Hub folder, or "hf-hub:ORG/NAME[@REV]" (hub.py)
        return _load_hub_model(weights_path, backend=backend, device=device, calibrated=calibrated, dtype=dtype,
                               family=family, compile=compile, threads=threads)
    path = resolve_model_path(weights_path)
    if path.suffix.lower() == ".onnx":
        if backend not in ("auto", "onnx") or compile:
            asked = f"backend={backend!r}" if backend != "auto" else "compile=True"
            raise BackendError(f"{path}: an .onnx graph is served by ONNX Runtime only, not load_model({asked}); "
                               f"load the .pth it was exported from for that.")
        return load_onnx_model(path, family, device, threads=threads, calibrated=calibrated)
    if backend == "onnx":
        raise BackendError(f"{path}: backend='onnx' serves an .onnx graph, not a .pth payload; write one with "
                           f"`python export.py {path} --onnx {path.with_suffix('.onnx')}` and load that file.")
    # The tensors mapped, not read: a CPU package that serves never needs them (ViT-L/14: 1.2 GB not read,
    # not held in memory). The eager network gets them read below, not left mapped to a file that may change.
    payload = load_payload(path, mmap=True)
    _check_family(payload, family, path)
    device = _device(device)
    backend = _choose_backend(backend, payload, path, device, compile)
    package = _fitting_cpu_package(payload, path, required=backend == "cpu-package") if backend in (
        "auto", "cpu-package") else None
    if package is not None:
        temperature = payload_temperature(payload, path) if calibrated else 1.0
        eager = partial(_eager_net_from_file, path, os.stat(path), payload["family"], int(payload["image_size"]))
        served = CpuPackageBackend(package, payload["family"], int(payload["image_size"]), eager=eager)
        return _classifier(served, payload, temperature)
    return model_from_payload(load_payload(path), backend="int8" if backend == "int8" else "eager", device=device,
                              dtype=dtype, calibrated=calibrated, compile=compile, path=path)


def _check_family(payload: dict, family: str | None, path: str | os.PathLike) -> None:
    if family and payload["family"] != family:
        loader = "load_cnn_model" if payload["family"] == "cnn" else "load_vit_model"
        raise ModelFileError(f"{path}: holds a {payload['family']!r} model, not {family!r}; use {loader}().")


def _load_hub_model(source: str | os.PathLike, *, backend: str, device, calibrated: bool, dtype: torch.dtype,
                    family: str | None, compile: bool, threads: int | None) -> FlowerClassifier:
    """`load_model` of a Hub folder or id: its model.onnx through ONNX Runtime for backend="onnx", else its
    payload (config.json + model.safetensors) served as the .pth it was written from is served."""
    if backend == "onnx":
        folder = hub_folder(source, (CONFIG_FILE, ONNX_FILE))
        if not (folder / ONNX_FILE).is_file():
            raise BackendError(f"{source}: no {ONNX_FILE} in {folder}; write the folder with `export.py ... --hub DIR "
                               f"--onnx`, or load it with backend='eager'.")
        return load_model(folder / ONNX_FILE, backend="onnx", device=device, calibrated=calibrated, family=family,
                          compile=compile, threads=threads)
    if backend == "cpu-package":
        raise BackendError(f"{source}: a Hub folder holds no CPU package (one is compiled for one machine's CPU); "
                           f"compile the .pth with `python export.py MODEL.pth --cpu-package`, or load the folder "
                           f"with backend='eager'.")
    folder = hub_folder(source)
    payload = read_hub_payload(folder)
    _check_family(payload, family, folder)
    device = _device(device)
    chosen = _choose_backend(backend, payload, folder, device, compile)
    return model_from_payload(payload, backend="int8" if chosen == "int8" else "eager", device=device, dtype=dtype,
                              calibrated=calibrated, compile=compile, path=folder)


def _device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _choose_backend(backend: str, payload: dict, path: Path, device: torch.device, compile: bool) -> str:
    """`backend` when it can serve `payload` on `device` (BackendError saying why not); for "auto": "int8" when
    the file asks for it on the CPU, "auto" where a fitting CPU package may serve, else "eager"."""
    cpu_only = backend in ("int8", "cpu-package")
    if cpu_only and device.type != "cpu":
        what = "torch's int8 kernels have no GPU version" if backend == "int8" else "a CPU package runs on the CPU"
        raise BackendError(f"{path}: backend={backend!r} runs on the CPU only ({what}), and device is {device}; "
                           f"pass device='cpu', or backend='eager'.")
    if compile and backend == "cpu-package":
        raise BackendError(f"{path}: compile=True compiles the eager network; the CPU package is already compiled. "
                           f"Pass backend='eager' with compile=True, or leave compile out.")
    if backend != "auto":
        return backend
    if payload_int8(payload, path):
        if device.type == "cpu":
            return "int8"
        warnings.warn(f"{path}: asks for int8 ({QUANTIZE_KEY!r} key), a CPU-only path; serving it on {device} "
                      f"unquantised.", stacklevel=3)
    return "auto" if device.type == "cpu" and not compile else "eager"


def _fitting_cpu_package(payload: dict, payload_path: Path, required: bool) -> Callable | None:
    """The compiled forward of the package beside the payload file when there is one that fits (see aot.py);
    None when there is none, or (with a warning saying why) when it does not fit. `required`: BackendError instead."""
    package = cpu_package_path(payload_path)
    rebuild = f"`python export.py {payload_path} --cpu-package`"
    if not package.is_file():
        if required:
            raise BackendError(f"{package}: no CPU package beside {payload_path}; write one with {rebuild}, "
                               f"or load with backend='eager'.")
        return None
    try:
        return load_cpu_package(package, payload, payload_path)
    except (CpuPackageError, ModelFileError) as e:
        if required:
            raise BackendError(f"{e}; write it again with {rebuild}, or load with backend='eager'.") from e
        warnings.warn(f"{e}; serving the eager model instead (slower). Rebuild the package with {rebuild}, "
                      f"or delete it.", stacklevel=4)
        return None


def model_from_payload(payload: dict, *, backend: str = "eager", device: str | torch.device | None = None,
                       dtype: torch.dtype = torch.float32, calibrated: bool = True, compile: bool = False,
                       path: str | os.PathLike = "payload") -> FlowerClassifier:
    """`load_model` for a payload dict already in memory (e.g. one export.py is about to write), served by the
    "eager" or "int8" backend (a package and an ONNX graph are files: load those with `load_model`).

    Args:
        backend: "eager" or "int8" (CPU only)
        device, dtype, calibrated, compile: as for `load_model`
        path: the file the payload was read from (messages; the int8 model's fp32 twin is read from it again)
    """
    device = _device(device)
    if backend not in ("eager", "int8"):
        raise BackendError(f"{path}: model_from_payload serves backend='eager' or 'int8', not {backend!r}; "
                           f"load the file with load_model(backend={backend!r}).")
    _choose_backend(backend, payload, Path(path), device, compile)  # int8 on a GPU: BackendError
    family, size = payload["family"], int(payload["image_size"])
    net = _build_with_weights(payload, path)
    if backend == "int8":  # int8 layers pass no gradient: Grad-CAM differentiates the fp32 network of the same weights
        from_file = Path(path).is_file()  # so that the int8 model never holds the fp32 weights
        fp32 = (partial(_eager_net_from_file, Path(path), os.stat(path), family, size) if from_file
                else partial(_eager_net, payload, family, size, path))
        served = Int8Backend(net, family, size, fp32=fp32, compile=compile)
    else:
        served = EagerBackend(net, family, size, device=device, dtype=dtype, compile=compile)
    return _classifier(served, payload, payload_temperature(payload, path) if calibrated else 1.0)


def _classifier(backend: Backend, payload: dict, temperature: float) -> FlowerClassifier:
    return FlowerClassifier(backend, payload["family"], payload["model_name"], tuple(payload["classes"]),
                            Preprocess.from_dict(payload), temperature)


def _eager_net(payload: dict, family: str, image_size: int, path: str | os.PathLike) -> nn.Module:
    """The payload's fp32 network in the eager backend's CPU form (Grad-CAM's, behind int8 or a package)."""
    return EagerBackend(_build_with_weights(payload, path), family, image_size).net


def _eager_net_from_file(path: Path, loaded: os.stat_result, family: str, image_size: int) -> nn.Module:
    """`_eager_net` of the payload file read again, for a network built after load: refused when the file
    changed since `loaded`, as it would not hold the weights that serve."""
    now = path.stat()
    if (now.st_ino, now.st_size, now.st_mtime_ns) != (loaded.st_ino, loaded.st_size, loaded.st_mtime_ns):
        raise ModelFileError(f"{path}: changed since the model was loaded, so it no longer holds the weights "
                             f"that serve; load the model again (load_model) to serve and explain the new file.")
    return _eager_net(load_payload(path), family, image_size, path)


def load_cnn_model(weights_path: str | os.PathLike = DEFAULT_FILES["cnn"], device=None,
                   dtype: torch.dtype = torch.float32, calibrated: bool = True) -> FlowerClassifier:
    """The exported ConvNeXt V2 classifier (`export.py` output)."""
    return load_model(weights_path, family="cnn", device=device, dtype=dtype, calibrated=calibrated)


def load_vit_model(weights_path: str | os.PathLike = DEFAULT_FILES["clip"], device=None,
                   dtype: torch.dtype = torch.float32, calibrated: bool = True) -> FlowerClassifier:
    """The exported CLIP ViT classifier; fp32 on CPU, fp16/bf16 allowed on GPU via `dtype`."""
    return load_model(weights_path, family="clip", device=device, dtype=dtype, calibrated=calibrated)


def load_ensemble(cnn_path: str | os.PathLike = DEFAULT_FILES["cnn"],
                  vit_path: str | os.PathLike = DEFAULT_FILES["clip"], device=None,
                  calibrated: bool = True) -> list[FlowerClassifier]:
    """The CNN and the ViT together: pass the list to `predict_proba`/`predict` for the mean of both
    probability vectors (each model still sees its own crop size and normalisation, and its own temperature)."""
    return [load_cnn_model(cnn_path, device, calibrated=calibrated), load_vit_model(vit_path, device,
                                                                                   calibrated=calibrated)]


def predict_proba(model: FlowerClassifier | Sequence[FlowerClassifier],
                  image_path: ImageSource, tta: bool = False) -> dict[str, float]:
    """Class -> probability for one image: a file, its encoded bytes or a PIL image (EXIF-rotated, any mode -> RGB,
    validation crop; InvalidImageError when it does not decode).
    A list of models (see `load_ensemble`) gives the unweighted mean of their probability vectors.
    `tta=True`: the mean over the ten views of `tta_views` (as `evaluate.py --tta`) instead of one crop."""
    models = [model] if isinstance(model, FlowerClassifier) else list(model) if isinstance(model, Sequence) else []
    if not models or not all(isinstance(m, FlowerClassifier) for m in models):
        raise TypeError(f"predict_proba: expected a FlowerClassifier or a non-empty list of them, got "
                        f"{type(model).__name__}; load one with load_cnn_model/load_vit_model/load_ensemble.")
    # Averaging probabilities (not logits) keeps each model's calibration and needs no shared scale.
    load = tta_views if tta else (lambda path, prep: preprocess_image(path, prep).unsqueeze(0))
    probs = torch.stack([m.probabilities(load(image_path, m.prep)).mean(0) for m in models])
    return {c: float(p) for c, p in zip(models[0].classes, probs.mean(0), strict=True)}


def predict(model: FlowerClassifier | Sequence[FlowerClassifier], image_path: ImageSource) -> str:
    """The most likely class: always one of daisy, dandelion, rose, sunflower, tulip."""
    probs = predict_proba(model, image_path)
    return max(probs, key=probs.get)


# --------------------------------------------------------------------------- batch prediction + CLI

def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, whatever their suffix (they were asked for), and every image file below each
    folder (recursive, sorted). A path that does not exist is kept: predicting it reports the error."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            found.append(path)
    return found


def _load_or_error(load: Callable, path: Path | ImageSource, prep: Preprocess) -> torch.Tensor | str:
    try:
        return load(path, prep)
    except InvalidImageError as e:
        return str(e)


def available_cpus() -> list[int]:
    """The CPUs the calling thread may run on (its affinity mask, the process's unless the thread was given its
    own; all of os.cpu_count() where the OS has no affinity masks)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


ACCELERATOR_DECODERS = 4  # decoding threads beside a GPU's forward (one per CPU at most; not tuned: no GPU here)


def decoding_threads(model: FlowerClassifier, workers: int | None = None) -> int:
    """How many threads decode a batch's files for `model` (1: the calling thread alone). `workers` given: that
    many, one per CPU at most. By default ACCELERATOR_DECODERS for a model on an accelerator, and for a CPU model
    the CPUs its forward's thread team leaves free plus the caller's: between two forwards the team's workers
    spin-wait on their CPUs (GNU OpenMP's default; ONNX Runtime's pool spins too), and a decoding thread put
    there runs at a fraction of its speed. On a 2-CPU Intel Xeon, a batch of 8 photos through convnextv2_atto at
    64 px took 10.0 ms decoded by the caller and 15.3 ms by two threads (through ONNX Runtime: 12.2 vs 13.2 ms)."""
    cpus = len(available_cpus())
    if workers is not None:
        return max(1, min(workers, cpus))
    if model.device.type != "cpu":
        return min(ACCELERATOR_DECODERS, cpus)
    return max(1, cpus - torch.get_num_threads() + 1)


def iter_probabilities(model: FlowerClassifier, image_paths: Iterable[ImageSource], bs: int = 32,
                       load: Callable[[Path, Preprocess], torch.Tensor] = preprocess_image,
                       workers: int | None = None, logits: bool = False,
                       ) -> Iterator[tuple[Path | ImageSource, torch.Tensor | None, str | None]]:
    """(path, probabilities, error) for every image, in order, `bs` images per forward pass; a file that
    does not decode gives (path, None, message) and the others go on. An image may also be given as its
    encoded bytes or a PIL image (then yielded as given instead of a Path). `load(path, prep)` makes the input
    (default: the served preprocessing); when it returns a stack of views (V, 3, H, W) the probabilities
    are (V, K), one row per view, for test-time augmentation. `logits=True` yields the raw logits instead
    (before the temperature), for calibration and evaluation. `workers`: decoding threads (PIL decodes
    outside the GIL), default `decoding_threads`' choice."""
    forward = model.logits if logits else model.probabilities
    paths = [Path(p) if is_path(p) else p for p in image_paths]
    threads = min(decoding_threads(model, workers), max(1, len(paths)))
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        decode = pool.map if pool else map
        for start in range(0, len(paths), bs):
            chunk = paths[start:start + bs]
            inputs = list(decode(lambda p: _load_or_error(load, p, model.prep), chunk))
            stacks = [x if x.dim() == 4 else x.unsqueeze(0) for x in inputs if isinstance(x, torch.Tensor)]
            probs = iter(forward(torch.cat(stacks)).split([len(s) for s in stacks]) if stacks else [])
            for path, x in zip(chunk, inputs, strict=True):
                if isinstance(x, str):
                    yield path, None, x
                else:
                    p = next(probs)
                    yield path, (p if x.dim() == 4 else p[0]), None


def error_record(path: ImageSource, error: str) -> dict:
    return dict(image_path=_record_path(path), predicted_class=None, confidence=None, probabilities=None, error=error)


def _record_path(image: ImageSource) -> str | None:
    """A record's image_path: the file's name; None for an image given as bytes or a PIL image."""
    return str(image) if is_path(image) else None


def iter_predictions(model: FlowerClassifier, image_paths: Iterable[ImageSource],
                     bs: int = 32) -> Iterator[dict]:
    """One JSON-ready record per image: image_path (None for bytes or a PIL image), predicted_class, confidence,
    probabilities (class -> probability) and error (None, or why the file could not be read, the other fields
    then None)."""
    for path, probs, error in iter_probabilities(model, image_paths, bs):
        if error is not None:
            yield error_record(path, error)
            continue
        best = int(probs.argmax())
        yield dict(image_path=_record_path(path), predicted_class=model.classes[best], confidence=float(probs[best]),
                   probabilities={c: float(p) for c, p in zip(model.classes, probs, strict=True)}, error=None)


def predict_batch(model: FlowerClassifier, image_paths: Iterable[ImageSource], bs: int = 32) -> list[dict]:
    """Records (see `iter_predictions`) for many images at once: batched, unreadable files reported."""
    return list(iter_predictions(model, image_paths, bs))
