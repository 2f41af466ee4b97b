"""Loading an exported model and predicting with it: `load_model` (and its cnn/vit/ensemble shorthands),
the CPU fast paths, `predict`/`predict_proba` for one image and `iter_probabilities`/`predict_batch` for
many. Pure torch + timm/open_clip + PIL: no fastai, no network.
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
import torch.nn.functional as F
from torch import nn

from .aot import CpuPackageError, cpu_package_path, load_cpu_package
from .factory import build_from_spec
from .model import FlowerClassifier, replace_modules
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
from .preprocess import IMAGE_SUFFIXES, InvalidImageError, Preprocess, preprocess_image, tta_views
from .quantize import quantize_int8

CPU_MICRO_BATCH = 2  # images per eager forward pass on the CPU at 224 px; more at smaller sizes (cpu_micro_batch)
# Images per call of a compiled CPU package at 224 px. Its fused kernels make fewer passes over the activations,
# so its chunks can be larger than eager's, but not a whole batch: convnextv2_tiny at 224 px, one process, in
# turn, took 0.93-0.95x the time for a batch of 8 in chunks of 4 and 0.83x for 32, against one call per batch;
# ViT-L/14 0.94-0.98x for a batch of 8 (bench/cpu_kernels.py --package, bench/RESULTS.md sections 1 and 4).
PACKAGE_MICRO_BATCH = 4


def cpu_micro_batch(image_size: int, per_224: int = CPU_MICRO_BATCH) -> int:
    """Images per forward pass on the CPU: as many pixels as `per_224` images of 224 px (eager: 2 at 224, 24 at
    64; the package: 4 at 224, 49 at 64), so that each pass's activations stay cache-sized without splitting
    small inputs for nothing."""
    return max(1, round(per_224 * (224 / image_size) ** 2))


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


def load_model(weights_path: str | os.PathLike, family: str | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
               compile: bool = False, calibrated: bool = True, cpu_package: bool | None = None,
               int8: bool | None = None) -> FlowerClassifier:
    """Build the architecture the payload describes (no download), load its weights, eval mode.
    `family` ("cnn" or "clip") makes a file of the other family an error. Uses CUDA when available.
    On the CPU, Linear layers run as 1x1 convolutions (`_LinearAsConv`), a ConvNeXt runs channels_last and
    batches go through the network in cache-sized chunks (`cpu_micro_batch`). No thread's CPU affinity is
    changed: the process's threads (a server's too) keep every CPU they had.
    `compile=True` adds torch.compile (see `_compile`): faster still on the CPU, mostly at batch sizes
    above 1, but the first call at each new batch-size range compiles (seconds to a minute); for
    long-running servers.
    `calibrated=True` serves softmax(logits / T) with the payload's fitted temperature T (1 for a file
    without one); `calibrated=False` serves the raw softmax, for comparison. The argmax is the same.
    `cpu_package`: on the CPU, serve the compiled `<name>.cpu.pt2` beside the file (`export.py --cpu-package`,
    see `aot.py`). None (default): when there is one that fits this torch, CPU and weights; one that does
    not fit is skipped with a warning saying why. True: it must be used (ModelFileError otherwise). False: eager.
    `int8=True` serves int8 on the CPU (quantize.py: the Linear layers, attention's projections and 1x1
    convolutions as dynamically quantised int8 Linear layers, quantised here at load time); `int8=False`
    serves fp32; None (default) does what the file asks (`export.py --int8` writes {"quantize": "int8"}).
    A `.onnx` file (`export.py --onnx`) is served by ONNX Runtime instead: see `load_onnx_model`."""
    if resolve_model_path(weights_path).suffix.lower() == ".onnx":
        return load_onnx_model(weights_path, family, device, calibrated=calibrated)
    # The tensors mapped, not read: a CPU package that serves never needs them (ViT-L/14: 1.2 GB not read,
    # not held in memory). The eager network gets them read below, not left mapped to a file that may change.
    payload = load_payload(weights_path, mmap=True)
    path = resolve_model_path(weights_path)
    if family and payload["family"] != family:
        loader = "load_cnn_model" if payload["family"] == "cnn" else "load_vit_model"
        raise ModelFileError(f"{path}: holds a {payload['family']!r} model, not {family!r}; use {loader}().")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    serves_fp32_on_cpu = device.type == "cpu" and not compile and not _int8_on(device, payload, path, int8)
    package = None
    if serves_fp32_on_cpu and cpu_package is not False:
        package = _fitting_cpu_package(payload, path, cpu_package)
    if package is None:
        payload = load_payload(path)
    return model_from_payload(payload, device, dtype, compile, calibrated, path, int8, package)


def _fitting_cpu_package(payload: dict, payload_path: Path, required: bool | None) -> Callable | None:
    """The compiled forward of the package beside the payload file when there is one that fits (see aot.py);
    None when there is none, or (with a warning saying why) when it does not fit. `required`: an error instead."""
    package = cpu_package_path(payload_path)
    rebuild = f"`python export.py {payload_path} --cpu-package`"
    if not package.is_file():
        if required:
            raise ModelFileError(f"{package}: no CPU package beside {payload_path}; write one with {rebuild}.")
        return None
    try:
        return load_cpu_package(package, payload, payload_path)
    except (CpuPackageError, ModelFileError) as e:
        if required:
            raise ModelFileError(f"{e}; write it again with {rebuild}.") from e
        warnings.warn(f"{e}; serving the eager model instead (slower). Rebuild the package with {rebuild}, "
                      f"or delete it.", stacklevel=4)
        return None


def model_from_payload(payload: dict, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                       compile: bool = False, calibrated: bool = True, path: str | os.PathLike = "payload",
                       int8: bool | None = None, compiled: Callable | None = None) -> FlowerClassifier:
    """`load_model` for a payload dict already in memory (e.g. one export.py is about to write); never
    looks for a CPU package. `compiled`: the CPU package's forward, which then serves, and the eager network
    is only built when something asks for it (Grad-CAM), which saves its build time and memory at load."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    int8 = _int8_on(device, payload, path, int8)
    if device.type == "cpu":
        dtype = torch.float32  # half precision on CPU is slower and less exact
    if compiled:  # the eager network waits for its first use, reading the file again then: no payload held
        build = partial(_eager_net_from_file, Path(path), os.stat(path), device, dtype, int8)
    else:
        build = partial(_eager_net, payload, device, dtype, int8, path)
    fp32 = None
    if int8:  # int8 layers pass no gradient: Grad-CAM differentiates the fp32 network of the same weights
        from_file = Path(path).is_file()  # so that the int8 model never holds the fp32 weights
        fp32 = (partial(_eager_net_from_file, Path(path), os.stat(path), device, dtype, False) if from_file
                else partial(_eager_net, payload, device, dtype, False, path))
    model = FlowerClassifier(None if compiled else build(), payload["family"], payload["model_name"],
                             tuple(payload["classes"]), Preprocess.from_dict(payload),
                             build_net=build if compiled else None, build_gradient_net=fp32)
    model.temperature = payload_temperature(payload, path) if calibrated else 1.0
    model.int8 = int8 and device.type == "cpu"
    if device.type == "cpu":
        model.channels_last = model.family == "cnn"  # the eager ConvNeXt and the package both take NHWC
        # Activations of a couple of images stay in the CPU's caches; those of 32 do not, and then the
        # elementwise ops between the convolutions (GELU, GRN, LayerNorm) run at memory speed: chunks of 2
        # are ~2x faster per image than one pass of 32 at 224 px (bench/cpu_kernels.py, bench/RESULTS.md).
        # The package's kernels fuse much of that work, so its chunks hold twice the pixels; at 64 px a
        # batch of up to 49 is one call (convnextv2_atto, batch 32: chunks of 8 took 1.10x the time).
        model.micro_batch = cpu_micro_batch(model.prep.image_size, PACKAGE_MICRO_BATCH if compiled else
                                            CPU_MICRO_BATCH)
    model.compiled = compiled
    return _compile(model) if compile else model


def _eager_net(payload: dict, device: torch.device, dtype: torch.dtype, int8: bool,
               path: str | os.PathLike) -> nn.Module:
    """The payload's network in eval mode on `device`, with the CPU's fast paths (int8 when asked; Linear
    layers as 1x1 convolutions; the ConvNeXt channels_last)."""
    net = _build_with_weights(payload, path).to(device, dtype).eval()
    if device.type != "cpu":
        return net
    if int8:
        quantize_int8(net)  # before the swap below: only the classifier head is left a plain nn.Linear
    _linears_as_convs(net)
    # oneDNN's convolutions are fastest on NHWC, and ConvNeXt's MLP permutes to NHWC anyway: no copies.
    return net.to(memory_format=torch.channels_last) if payload["family"] == "cnn" else net


def _eager_net_from_file(path: Path, loaded: os.stat_result, device: torch.device, dtype: torch.dtype,
                        int8: bool) -> nn.Module:
    """`_eager_net` of the payload file read again, for a network built after load (the eager one behind a
    CPU package, Grad-CAM's fp32 one): refused when the file changed since `loaded`, as it would not hold
    the weights that serve."""
    now = path.stat()
    if (now.st_ino, now.st_size, now.st_mtime_ns) != (loaded.st_ino, loaded.st_size, loaded.st_mtime_ns):
        raise ModelFileError(f"{path}: changed since the model was loaded, so it no longer holds the weights "
                             f"that serve; load the model again (load_model) to serve and explain the new file.")
    return _eager_net(load_payload(path), device, dtype, int8, path)


def _int8_on(device: torch.device, payload: dict, path: str | os.PathLike, int8: bool | None) -> bool:
    """Whether to serve int8: `int8` when given, else what the payload asks. int8 is a CPU path (torch's
    dynamically quantised kernels have no CUDA version): asked for explicitly on a GPU it is an error; asked
    for by the file it is a warning and the GPU serves the weights as usual, faster than int8 on a CPU would."""
    asked = payload_int8(payload, path) if int8 is None else int8
    if not asked or device.type == "cpu":
        return asked
    if int8:
        raise ValueError(f"load_model(int8=True): int8 runs on the CPU only, and this model would be served on "
                         f"{device}; pass device='cpu', or int8=False.")
    warnings.warn(f"{path}: asks for int8 ({QUANTIZE_KEY!r} key), a CPU-only path; serving it on {device} "
                  f"unquantised.", stacklevel=3)
    return False


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
    # exact type, not subclasses: attention's NonDynamicallyQuantizableLinear stays
    replace_modules(net, lambda child: _LinearAsConv(child) if type(child) is nn.Linear else None)


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


def load_cnn_model(weights_path: str | os.PathLike = DEFAULT_FILES["cnn"], device=None,
                   dtype: torch.dtype = torch.float32, calibrated: bool = True) -> FlowerClassifier:
    """The exported ConvNeXt V2 classifier (`export.py` output)."""
    return load_model(weights_path, "cnn", device, dtype, calibrated=calibrated)


def load_vit_model(weights_path: str | os.PathLike = DEFAULT_FILES["clip"], device=None,
                   dtype: torch.dtype = torch.float32, calibrated: bool = True) -> FlowerClassifier:
    """The exported CLIP ViT classifier; fp32 on CPU, fp16/bf16 allowed on GPU via `dtype`."""
    return load_model(weights_path, "clip", device, dtype, calibrated=calibrated)


def load_ensemble(cnn_path: str | os.PathLike = DEFAULT_FILES["cnn"],
                  vit_path: str | os.PathLike = DEFAULT_FILES["clip"], device=None,
                  calibrated: bool = True) -> list[FlowerClassifier]:
    """The CNN and the ViT together: pass the list to `predict_proba`/`predict` for the mean of both
    probability vectors (each model still sees its own crop size and normalisation, and its own temperature)."""
    return [load_cnn_model(cnn_path, device, calibrated=calibrated), load_vit_model(vit_path, device,
                                                                                   calibrated=calibrated)]


def predict_proba(model: FlowerClassifier | Sequence[FlowerClassifier],
                  image_path: str | os.PathLike, tta: bool = False) -> dict[str, float]:
    """Class -> probability for one image file (EXIF-rotated, any mode -> RGB, validation crop).
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


def predict(model: FlowerClassifier | Sequence[FlowerClassifier], image_path: str | os.PathLike) -> str:
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


def _load_or_error(load: Callable, path: Path, prep: Preprocess) -> torch.Tensor | str:
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


def iter_probabilities(model: FlowerClassifier, image_paths: Iterable[str | os.PathLike], bs: int = 32,
                       load: Callable[[Path, Preprocess], torch.Tensor] = preprocess_image,
                       workers: int | None = None, logits: bool = False,
                       ) -> Iterator[tuple[Path, torch.Tensor | None, str | None]]:
    """(path, probabilities, error) for every image, in order, `bs` images per forward pass; a file that
    does not decode gives (path, None, message) and the others go on. `load(path, prep)` makes the input
    (default: the served preprocessing); when it returns a stack of views (V, 3, H, W) the probabilities
    are (V, K), one row per view, for test-time augmentation. `logits=True` yields the raw logits instead
    (before the temperature), for calibration and evaluation. `workers`: decoding threads (PIL decodes
    outside the GIL), default `decoding_threads`' choice."""
    forward = model.logits if logits else model.probabilities
    paths = [Path(p) for p in image_paths]
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


def error_record(path: str | os.PathLike, error: str) -> dict:
    return dict(image_path=str(path), predicted_class=None, confidence=None, probabilities=None, error=error)


def iter_predictions(model: FlowerClassifier, image_paths: Iterable[str | os.PathLike],
                     bs: int = 32) -> Iterator[dict]:
    """One JSON-ready record per image: image_path, predicted_class, confidence, probabilities (class ->
    probability) and error (None, or why the file could not be read, the other fields then None)."""
    for path, probs, error in iter_probabilities(model, image_paths, bs):
        if error is not None:
            yield error_record(path, error)
            continue
        best = int(probs.argmax())
        yield dict(image_path=str(path), predicted_class=model.classes[best], confidence=float(probs[best]),
                   probabilities={c: float(p) for c, p in zip(model.classes, probs, strict=True)}, error=None)


def predict_batch(model: FlowerClassifier, image_paths: Iterable[str | os.PathLike], bs: int = 32) -> list[dict]:
    """Records (see `iter_predictions`) for many images at once: batched, unreadable files reported."""
    return list(iter_predictions(model, image_paths, bs))
