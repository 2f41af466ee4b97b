"""The one-command GPU check: does training work and how fast is it on a CUDA GPU, measured in one run.

    python -m bench.gpu_check [--data DIR] [--json OUT]      # on a CUDA machine (sized for 6-8 min on an H100)
    python -m bench.gpu_check --estimate-memory              # ViT-L/14 batch sizes per GPU size, computed (CPU)
    python -m bench.gpu_check --cpu-smoke [--json OUT]       # dev: the same stages, tiny, on the CPU (tests)

Random-init weights throughout; photos: --data DIR (<class>/<images>, at most --per-class each) or, by
default, synthetic class-coloured JPEGs (learnable: each class has its own hue). Stages, each a function of
`device` and sizes, each guarded so that one failure is reported and the others still run:

1. peak: the GPU's dense bf16 matmul rate (n^3 matmuls, best of a few bursts): the MFU denominator.
2. cnn: convnextv2_tiny at 224 px through the real train.py path (flowers_dataloaders + flowers_learner with
   pretrained=False, fine_tune_recipe: one frozen epoch, then unfrozen epochs), fp16 and bf16 x channels_last
   on/off. Per config: every training step's loss (finite? first vs last steps), steady-state images/s (per
   epoch, after the first steps: worker start-up and autotuning left out; data loading in, validation out),
   peak GPU memory; then the export (flowers_fastai.api.export_pth, fp32, uncalibrated) served on the CPU by
   flowers_classifier.load_model(device="cpu", calibrated=False) against the GPU learner's own probabilities:
   the learner's network in eval mode, in fp32 with TF32 off (the reference a CPU must reproduce), on the same
   preprocessed valid images, within the CPU parity tests' 1e-4, on probabilities that vary from image to image
   (a constant output, such as a random-init net's uniform 0.2, would match on both sides and prove nothing).
3. plain: bench/plain_loop.py on the same device, model, split, batch, precision and channels_last: the
   ours/plain images/s ratio (ours: its unfrozen epochs, the ones that train the whole network as plain does).
4. clip: open_clip ViT-L-14 (random init, flowers_classifier.factory.create_clip) training steps (AdamW,
   autocast; fp16 with a GradScaler) at the largest batch that fits in 3/4 of GPU memory (a doubling then
   bisection search on real steps, OutOfMemoryError caught, bounded in time; searched in bf16 and reused for
   fp16, same memory), with and without grad checkpointing. MFU = training FLOPs per image (counted with
   FlopCounterMode over one forward + backward at batch 1, checkpointing off: model FLOPs, so a checkpointed
   run, which recomputes the forward, is credited 3x forward, not the 4x it executes) x images/s / measured
   bf16 peak. Also the batch that `memory_estimate` computes for that 3/4, next to the one found.

Without a CUDA GPU the check prints one line and exits 2. --cpu-smoke runs every stage on the CPU with tiny
settings (convnextv2_atto, open_clip ViT-S-32 at 64 px, bf16 autocast; fp16 skipped, memory "n/a") so that
tests prove the script runs. Exit 0 when every stage ran and every check passed (finite losses, falling CNN
loss, parity), else 1; the goals (ours/plain >= 1.0x, ViT-L/14 bf16 MFU >= 40%) are reported, not enforced.
The results go to bench/results/gpu_check-<UTC time>.json (--json OUT elsewhere, --no-save none), written after
every stage; --cpu-smoke and --estimate-memory write only to --json OUT.
"""

from __future__ import annotations

import argparse
import colorsys
import contextlib
import gc
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bench.common import CLASS_NAMES, add_output_args, machine_info, markdown_table, results_path
from bench.report import GOALS

NO_CUDA = ("python -m bench.gpu_check: no CUDA GPU found (torch.cuda.is_available() is False); run it on a GPU machine "
           "(--cpu-smoke runs the stages on the CPU, tiny, as a test; --estimate-memory needs no GPU)")
RATIO_GOAL = GOALS["gpu_train_throughput"].threshold  # ours images/s / the plain loop's
MFU_GOAL = GOALS["gpu_mfu"].threshold                 # ViT-L/14 bf16 training on an H100
PARITY_TOL = 1e-4    # max |p_served - p_learner|: the CPU parity tests' tolerance for the fp32 CNN export
PARITY_MIN_SPREAD = 0.01  # some class's probability must move this much across the parity images (100x the tol)
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}
GIB = 2 ** 30
START = time.monotonic()


@dataclass(frozen=True)
class Sizes:
    """Everything that sets the check's size; `gpu()` fits an H100 in ~8 min, `cpu_smoke()` 2 CPU cores in ~1."""

    cnn_model: str = "convnextv2_tiny"
    cnn_img: int = 224
    photo_px: int = 256          # synthetic photos' side (RandomResizedCrop takes 224 px crops of them)
    per_class: int = 500         # synthetic photos per class; with --data, at most this many per class
    cnn_bs: int = 64
    freeze_epochs: int = 1       # stage 1 (head only), then `epochs` unfrozen: the recipe's fine_tune
    epochs: int = 2
    workers: int = 8             # DataLoader workers, both loops (flowers_dataloaders' CUDA default)
    skip_steps: int = 3          # per epoch, steps not timed (worker start-up, cuDNN autotuning)
    parity_images: int = 16
    clip_model: str = "ViT-L-14"
    clip_img: int | None = None  # None: the model's own (224)
    clip_start_bs: int = 16
    clip_max_bs: int = 8192
    search_budget_s: float = 75.0
    memory_fraction: float = 0.75
    timed_steps: int = 4         # CLIP: at least this many timed steps and at least timed_s seconds
    timed_s: float = 6.0
    matmul_n: int = 8192
    matmul_reps: int = 25

    @classmethod
    def gpu(cls) -> Sizes:
        return cls()

    @classmethod
    def cpu_smoke(cls) -> Sizes:
        return cls(cnn_model="convnextv2_atto", cnn_img=48, photo_px=64, per_class=24, cnn_bs=16, workers=0,
                   skip_steps=1, parity_images=8, clip_model="ViT-S-32", clip_img=64, clip_start_bs=2,
                   clip_max_bs=8, search_budget_s=30.0, timed_steps=2, timed_s=0.0, matmul_n=1024, matmul_reps=3)


def log(msg: str) -> None:
    print(f"[{time.monotonic() - START:6.1f} s] {msg}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak memory the caching allocator handed out since reset_peak; None on the CPU (no such counter)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


# --------------------------------------------------------------------------- 1. peak and arithmetic

def matmul_peak_tflops(device: torch.device, n: int, reps: int, bursts: int = 5) -> float:
    """Dense bf16 matmul TFLOP/s: the best of `bursts` bursts of `reps` (n x n) @ (n x n) products."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):  # warm-up: library heuristics, clocks
        torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(bursts):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n ** 3 / best / 1e12


def mfu(flops_per_image: float, images_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: the FLOP/s the model's own arithmetic needs at this speed / the peak."""
    return flops_per_image * images_per_s / (peak_tflops * 1e12)


def count_training_flops(model: torch.nn.Module, example: torch.Tensor, input_requires_grad: bool = False) -> dict:
    """FLOPs of one forward and one backward (of out.float().sum()) on `example`, counted by torch's
    FlopCounterMode from the ops that run. Attention runs on the math backend while counting, so that it is
    counted as the matmuls it is on any device. A network's input image needs no gradient (its first layer
    then skips the input-gradient matmul); `input_requires_grad` counts a layer inside a network."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    x = example.detach().clone().requires_grad_(input_requires_grad)
    forward, backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH):
        with forward:
            out = model(x)
        with backward:
            out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    fwd, bwd = forward.get_total_flops(), backward.get_total_flops()
    return dict(forward=fwd, backward=bwd, training=fwd + bwd)


# --------------------------------------------------------------------------- data

def synthetic_photos(root: Path, per_class: int, size: int, seed: int = 0) -> Path:
    """<root>/<class>/<n>.jpg: a learnable task. Each class has its own hue (5 hues around the wheel), and
    every photo its own blotchy light/shade pattern and pixel noise, so that no two photos are alike."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    def one_class(i: int) -> None:
        rng = np.random.default_rng([seed, i])
        folder = root / CLASS_NAMES[i]
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array(colorsys.hsv_to_rgb(i / len(CLASS_NAMES), 0.7, 0.8), dtype=np.float32) * 255
        for n in range(per_class):
            blotches = rng.normal(128, 45, size=(max(2, size // 32),) * 2 + (3,))
            blotches = Image.fromarray(np.uint8(np.clip(blotches, 0, 255))).resize((size, size),
                                                                                  Image.Resampling.BILINEAR)
            pixels = base - 128 + np.asarray(blotches, dtype=np.float32)
            pixels += rng.standard_normal((size, size, 3), dtype=np.float32) * 12
            Image.fromarray(np.uint8(np.clip(pixels, 0, 255))).save(folder / f"{n:04d}.jpg", quality=90)

    with ThreadPoolExecutor(len(CLASS_NAMES)) as pool:  # PIL's resize and JPEG encoding release the GIL
        list(pool.map(one_class, range(len(CLASS_NAMES))))
    return root


def prepare_data(data: Path | None, work: Path, sizes: Sizes, seed: int):
    """(photo folder, split table): --data's photos (at most sizes.per_class a class) or synthetic ones;
    flowers_fastai's own audit + stratified split, once for every config."""
    from flowers_fastai.data import prepare_split
    root = data if data is not None else synthetic_photos(work / "photos", sizes.per_class, sizes.photo_px, seed)
    split = prepare_split(root, work / "split", 0.2, seed, sizes.per_class if data is not None else None,
                          min_size=sizes.cnn_img)
    return root, split


# --------------------------------------------------------------------------- 2. the CNN through train.py's path

def loss_summary(losses: Sequence[float]) -> dict:
    """Finite everywhere? Mean of the first and of the last few steps (a fifth of them, 2 to 5)."""
    t = torch.tensor(list(losses), dtype=torch.float64)
    k = max(1, min(5, len(t) // 5)) if len(t) >= 2 else 1
    first, last = (float(t[:k].mean()), float(t[-k:].mean())) if len(t) else (math.nan, math.nan)
    return dict(steps=len(t), finite=bool(len(t) and torch.isfinite(t).all()), loss_first=first, loss_last=last,
                loss_down=bool(last < first))


def steady_rate(epochs: list[dict]) -> float | None:
    timed = [e for e in epochs if e["steady_s"]]
    return sum(e["steady_images"] for e in timed) / sum(e["steady_s"] for e in timed) if timed else None


def step_recorder(device: torch.device, skip: int):
    """A fastai callback: every training step's loss (kept on the device, read once at the end) and per
    training epoch the steady-state time and images after its first `skip` steps."""
    from fastai.callback.core import Callback

    class StepRecorder(Callback):
        order = 100  # after everything that acts on a batch

        def __init__(self):
            self.losses, self.records = [], []

        def before_train(self):
            self.n_steps, self.steady_start, self.steady_images = 0, None, 0
            if skip == 0:
                synchronize(device)
                self.steady_start = time.perf_counter()

        def after_batch(self):
            if not self.training:
                return
            self.losses.append(self.learn.loss.detach().float())
            self.n_steps += 1
            if self.n_steps == skip:
                synchronize(device)
                self.steady_start = time.perf_counter()
            elif self.n_steps > skip:
                self.steady_images += len(self.learn.yb[0])

        def after_train(self):
            synchronize(device)
            steady_s = time.perf_counter() - self.steady_start if self.steady_start and self.steady_images else None
            stage = getattr(getattr(self.learn, "history", None), "stage", "")
            self.records.append(dict(stage=stage, steps=self.n_steps, steady_s=steady_s,
                                    steady_images=self.steady_images))

    return StepRecorder()


def train_ours(device: torch.device, root: Path, split, work: Path, sizes: Sizes, precision: str,
               channels_last: bool, seed: int = 0):
    """One config through the public API train.py uses (random init: the --no-pretrained preset, with a frozen
    stage so that both stages run). Returns (result row, trained learner)."""
    from flowers_fastai.api import fine_tune_recipe, flowers_dataloaders, flowers_learner
    from flowers_fastai.learner import seed_everything
    seed_everything(seed)
    dls = flowers_dataloaders(root, "cnn", model=sizes.cnn_model, img_size=sizes.cnn_img, bs=sizes.cnn_bs,
                              seed=seed, pretrained=False, num_workers=sizes.workers, run_dir=work, split=split)
    learn = flowers_learner(dls, pretrained=False, freeze_epochs=sizes.freeze_epochs, epochs=sizes.epochs,
                            patience=None, precision=precision, channels_last=channels_last, seed=seed)
    recorder = step_recorder(device, sizes.skip_steps)
    learn.add_cb(recorder)
    free_memory(device)
    reset_peak(device)
    with contextlib.redirect_stdout(sys.stderr):  # the per-epoch history lines are progress, not results
        fine_tune_recipe(learn)
    learn.remove_cb(recorder)
    losses = torch.stack(recorder.losses).cpu().tolist() if recorder.losses else []
    by_stage = {s: [e for e in recorder.records if e["stage"] == s] for s in ("frozen", "unfrozen")}
    row = dict(loop="ours", model=sizes.cnn_model, img=sizes.cnn_img, precision=precision,
               channels_last=channels_last, bs=sizes.cnn_bs, images_per_s=steady_rate(by_stage["unfrozen"]),
               frozen_images_per_s=steady_rate(by_stage["frozen"]), peak_gib=peak_gib(device),
               epochs=recorder.records, losses=losses, **loss_summary(losses))
    return row, learn


@contextlib.contextmanager
def strict_fp32():
    """TF32 off: cuDNN runs fp32 convolutions in TF32 by default on Ampere and later, ~1e-3 relative from
    true fp32, more than the parity tolerance; the reference pass must be real fp32, like the CPU's."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def export_parity(learn, device: torch.device, root: Path, split, out: Path, n_images: int,
                  tol: float = PARITY_TOL, min_spread: float = PARITY_MIN_SPREAD) -> dict:
    """Export the learner (export_pth, fp32, no calibration), serve it on the CPU with flowers_classifier, and
    compare its probabilities with the learner's network (eval mode, fp32, no autocast, TF32 off, on `device`)
    on the same preprocessed valid images. Parity holds only if the reference probabilities also vary: some
    class's probability moves by >= `min_spread` across the images; a constant output passes any tolerance."""
    from flowers_classifier import load_model
    from flowers_classifier.preprocess import preprocess_image
    from flowers_fastai.api import export_pth
    path = export_pth(learn, out, half=False, calibrate=False)
    files = [Path(root) / p for p in split[split["is_valid"]]["path"].iloc[:n_images]]
    x = torch.stack([preprocess_image(f, learn.flowers["prep"]) for f in files])
    net = learn.model.eval()
    with torch.no_grad(), strict_fp32():
        reference = net(x.to(device)).float().softmax(-1).cpu()
    served = load_model(path, device="cpu", calibrated=False).probabilities(x)
    diff = float((reference - served).abs().max())
    same_argmax = bool(torch.equal(reference.argmax(1), served.argmax(1)))
    spread = float((reference.amax(0) - reference.amin(0)).max())  # 0 when every image gets the same vector
    return dict(parity_max_abs_diff=diff, parity_tol=tol, parity_images=len(files), parity_argmax_equal=same_argmax,
                parity_prob_spread=spread, parity_min_spread=min_spread,
                parity_ok=diff < tol and same_argmax and spread >= min_spread)


# --------------------------------------------------------------------------- 3. the plain loop, same device

def train_plain_on(device: torch.device, root: Path, split, sizes: Sizes, precision: str, channels_last: bool,
                   seed: int = 0) -> dict:
    """bench/plain_loop.py with the CNN config's model, split, batch, precision and memory format."""
    from bench.plain_loop import PlainConfig, train_plain
    from flowers_fastai.recipes import preset
    cfg = PlainConfig(model=sizes.cnn_model, img_size=sizes.cnn_img, bs=sizes.cnn_bs, epochs=sizes.epochs,
                      lr=preset("cnn", pretrained=False)["lr"], workers=sizes.workers, channels_last=channels_last,
                      seed=seed, device=str(device), precision=precision, skip_steps=sizes.skip_steps)
    free_memory(device)
    reset_peak(device)
    result = train_plain(split, root, tuple(CLASS_NAMES), cfg)
    losses = [v for e in result["history"] for v in e["losses"]]
    return dict(loop="plain", model=sizes.cnn_model, img=sizes.cnn_img, precision=precision,
                channels_last=channels_last, bs=sizes.cnn_bs, images_per_s=steady_rate(result["history"]),
                peak_gib=peak_gib(device), losses=losses, **loss_summary(losses))


# --------------------------------------------------------------------------- 4. CLIP ViT-L/14 training steps

def oom_safe(step: Callable[[int], object], cleanup: Callable[[], None]) -> Callable[[int], bool]:
    """step(bs) -> True, or False when it ran out of GPU memory; cleanup() after every try. The cleanup runs
    outside the `except` block: the exception's traceback holds the failed step's tensors until then."""
    def fits(bs: int) -> bool:
        ok = False
        try:
            step(bs)
            ok = True
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
            if not is_oom(e):
                raise
        cleanup()
        return ok
    return fits


def is_oom(e: BaseException) -> bool:
    """The caching allocator's OutOfMemoryError, or a library's own allocation failure (cuBLAS, cuDNN) worded
    as a RuntimeError."""
    text = str(e).lower()
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def find_max_batch(fits: Callable[[int], bool], start: int, cap: int, budget_s: float, multiple: int = 8,
                   clock: Callable[[], float] = time.monotonic) -> dict:
    """The largest batch in [start, cap] with fits(batch): doubling from `start` to the first failure, then
    bisection between the last fit and that failure down to `multiple`. A try starts only while less than
    `budget_s` has passed (the best so far stands; `stopped` says why the search ended)."""
    began, tries, good, bad, stopped = clock(), [], None, None, "converged"
    bs = start
    while bs <= cap:
        if clock() - began > budget_s:
            stopped = "time"
            break
        ok = fits(bs)
        tries.append((bs, ok))
        if not ok:
            bad = bs
            break
        good, bs = bs, bs * 2
    else:
        stopped = "cap"
    while good is not None and bad is not None and bad - good > multiple:
        if clock() - began > budget_s:
            stopped = "time"
            break
        mid = (good + bad) // 2 // multiple * multiple
        if mid <= good:
            break
        ok = fits(mid)
        tries.append((mid, ok))
        good, bad = (mid, bad) if ok else (good, mid)
    return dict(batch=good, first_failure=bad, tries=tries, stopped=stopped, seconds=clock() - began)


class ClipSteps:
    """Training steps of a classifier on a fixed random batch: AdamW (fp32 master weights) under autocast,
    a GradScaler for fp16. Each step ends with the gradients freed, as a training loop's zero_grad does."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str, image_size: int):
        self.model, self.device, self.image_size = model.train(), device, image_size
        self.dtype = AMP_DTYPES[precision]
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.batch = None

    def step(self, bs: int) -> torch.Tensor:
        if self.batch is None or len(self.batch[0]) != bs:
            self.batch = None  # free the old batch before the new one is allocated
            self.batch = (torch.randn(bs, 3, self.image_size, self.image_size, device=self.device),
                          torch.randint(0, len(CLASS_NAMES), (bs,), device=self.device))
        x, y = self.batch
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = torch.nn.functional.cross_entropy(self.model(x).float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def cleanup(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.batch = None
        free_memory(self.device)


def timed_steps(steps: ClipSteps, bs: int, min_steps: int, min_s: float) -> dict:
    """One warm-up step, then at least `min_steps` steps and `min_s` seconds, synchronised per step."""
    steps.step(bs)
    synchronize(steps.device)
    reset_peak(steps.device)
    losses, start = [], time.perf_counter()
    while len(losses) < min_steps or time.perf_counter() - start < min_s:
        losses.append(float(steps.step(bs)))
        synchronize(steps.device)
    seconds = time.perf_counter() - start
    return dict(bs=bs, timed_steps=len(losses), images_per_s=bs * len(losses) / seconds,
                peak_gib=peak_gib(steps.device), losses=losses, **loss_summary(losses))


def time_with_fallback(steps: ClipSteps, bs: int, sizes: Sizes, multiple: int = 8) -> dict:
    """timed_steps at `bs`, or at 7/8 of it when fragmentation makes the found batch fail (at most 3 times)."""
    for _ in range(3):
        try:
            return timed_steps(steps, bs, sizes.timed_steps, sizes.timed_s)
        except RuntimeError as e:
            if not is_oom(e):
                raise
        steps.cleanup()
        log(f"  out of memory at batch {bs} when timing; retrying at 7/8 of it")
        bs = max(multiple, bs * 7 // 8 // multiple * multiple) if bs > multiple else max(1, bs // 2)
    raise RuntimeError("timing steps ran out of memory three times")


def build_clip(name: str, image_size: int | None, device: torch.device) -> torch.nn.Module:
    """A random-init open_clip image tower + linear head, as train.py --arch clip --no-pretrained builds it."""
    from flowers_classifier import factory
    model = factory.create_clip(name, image_size=image_size)  # random init
    return model.to(device)


def clip_image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    model.visual.set_grad_checkpointing(on)


def clip_search(model: torch.nn.Module, device: torch.device, sizes: Sizes, checkpointing: bool) -> dict:
    """The largest bf16 training batch within sizes.memory_fraction of the GPU (on the CPU: up to the cap)."""
    set_checkpointing(model, checkpointing)
    steps = ClipSteps(model, device, "bf16", clip_image_size(model))
    steps.step(1)  # AdamW's state exists from here on, as in every later step of a real run
    steps.cleanup()
    found = find_max_batch(oom_safe(steps.step, steps.cleanup), sizes.clip_start_bs, sizes.clip_max_bs,
                           sizes.search_budget_s)
    del steps
    free_memory(device)
    return found


def clip_config(model: torch.nn.Module, device: torch.device, sizes: Sizes, precision: str, checkpointing: bool,
                bs: int, flops_per_image: float, peak_tflops: float | None) -> dict:
    """Timed training steps of one (precision, checkpointing) config at batch `bs`, with a fresh optimizer."""
    set_checkpointing(model, checkpointing)
    steps = ClipSteps(model, device, precision, clip_image_size(model))
    row = time_with_fallback(steps, bs, sizes)
    del steps
    free_memory(device)
    row.update(model=sizes.clip_model, img=clip_image_size(model), precision=precision,
               grad_checkpointing=checkpointing, flops_per_image=flops_per_image,
               mfu=mfu(flops_per_image, row["images_per_s"], peak_tflops) if peak_tflops else None)
    return row


# --------------------------------------------------------------------------- memory, computed

def saved_tensor_bytes(model: torch.nn.Module, x: torch.Tensor, blocks: Sequence[torch.nn.Module],
                       amp_dtype: torch.dtype | None = torch.bfloat16) -> dict:
    """One training-mode forward under autocast, counting the bytes autograd keeps for the backward (each
    storage once, parameters left out: they are counted with the weights): in total, outside `blocks`, inside
    each block, and the blocks' inputs (what a checkpointed block keeps). Under non-reentrant checkpointing the
    checkpoint's own hooks take over inside the blocks, so only `outside` is seen there."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, tuple[int, int | None]] = {}
    inputs: dict[int, int] = {}
    where: list[int | None] = [None]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in saved:
            saved[ptr] = (t.untyped_storage().nbytes(), where[0])
        return t  # kept alive by the graph until `out` goes: no pointer is reused while counting

    def enter(i: int):
        def hook(_module, args):
            where[0] = i
            if args and isinstance(args[0], torch.Tensor):
                inputs.setdefault(args[0].untyped_storage().data_ptr(), args[0].untyped_storage().nbytes())
        return hook

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(lambda *_: where.__setitem__(0, None)) for b in blocks]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model.train()(x)
        per_block = [sum(n for n, w in saved.values() if w == i) for i in range(len(blocks))]
        result = dict(total=sum(n for n, _ in saved.values()), outside=sum(n for n, w in saved.values() if w is None),
                      per_block=per_block, block_inputs=sum(inputs.values()))
    finally:
        for h in handles:
            h.remove()
    del out
    return result


def activation_model(model: torch.nn.Module, image_size: int, device: torch.device,
                     amp_dtype: torch.dtype | None = torch.bfloat16) -> dict:
    """Bytes kept for the backward, per image and fixed (the autocast weight copies: batch-independent), from
    forwards at batch 1 and 2, without and with grad checkpointing. With it: what is saved outside the blocks
    (measured with checkpointing on) + the blocks' inputs (kept for the recompute) + one block's activations
    (the largest without checkpointing: alive while that block is recomputed in the backward).
    Under CPU autocast the op lists are close to, not the same as, CUDA's: an estimate, not a measurement."""
    blocks = list(model.visual.transformer.resblocks)
    totals = {False: [], True: []}
    for bs in (1, 2):
        x = torch.randn(bs, 3, image_size, image_size, device=device)
        set_checkpointing(model, False)
        plain = saved_tensor_bytes(model, x, blocks, amp_dtype)
        set_checkpointing(model, True)
        ckpt = saved_tensor_bytes(model, x, blocks, amp_dtype)
        set_checkpointing(model, False)
        totals[False].append(plain["total"])
        totals[True].append(ckpt["outside"] + plain["block_inputs"] + max(plain["per_block"]))
    est = {ckpt: dict(per_image=t[1] - t[0], fixed=2 * t[0] - t[1]) for ckpt, t in totals.items()}
    # autocast caches every weight's low-precision copy until the forward ends, checkpointed or not: the
    # activation peak (the end of the forward) holds them all, so the fixed part is the same in both cases.
    est[True]["fixed"] = max(est[True]["fixed"], est[False]["fixed"])
    return est


def weights_bytes(model: torch.nn.Module) -> dict:
    """fp32 parameters + fp32 gradients + AdamW's two fp32 moments: 16 bytes a trainable parameter."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(params=n, bytes=16 * n)


def batch_for_capacity(capacity_bytes: float, fixed_bytes: float, per_image_bytes: float) -> int:
    return max(0, math.floor((capacity_bytes - fixed_bytes) / per_image_bytes))


def memory_estimate(model: torch.nn.Module, device: torch.device, amp_dtype=torch.bfloat16) -> dict:
    """The inputs of batch_for_capacity for both checkpointing settings: fixed = weights_bytes + the fixed
    saved bytes; per image = saved bytes per image."""
    weights = weights_bytes(model)
    acts = activation_model(model, clip_image_size(model), device, amp_dtype)
    return dict(params=weights["params"], weights_bytes=weights["bytes"],
                **{("ckpt" if ckpt else "no_ckpt"): dict(per_image=a["per_image"], fixed=weights["bytes"] + a["fixed"])
                   for ckpt, a in acts.items()})


def estimate_table(est: dict, capacities_gb: Sequence[int] = (24, 40, 80), usable: float = 0.9) -> list[list]:
    return [[f"{gb} GB", batch_for_capacity(gb * GIB * usable, est["no_ckpt"]["fixed"], est["no_ckpt"]["per_image"]),
             batch_for_capacity(gb * GIB * usable, est["ckpt"]["fixed"], est["ckpt"]["per_image"])]
            for gb in capacities_gb]


def print_estimate(name: str, image_size: int, est: dict) -> None:
    print(f"{name} at {image_size} px, bf16 autocast training with AdamW (fp32 weights, grads, 2 moments): computed, "
          f"not measured. Parameters {est['params'] / 1e6:.1f} M -> {est['weights_bytes'] / GIB:.2f} GiB; "
          f"saved for backward per image {est['no_ckpt']['per_image'] / 2**20:.1f} MiB "
          f"(grad checkpointing: {est['ckpt']['per_image'] / 2**20:.1f} MiB); fixed incl. weights "
          f"{est['no_ckpt']['fixed'] / GIB:.2f} GiB ({est['ckpt']['fixed'] / GIB:.2f} GiB); "
          f"batch = floor((0.9 x capacity in GiB - fixed) / per image)\n")
    print(markdown_table(["GPU memory", "batch", "batch, grad checkpointing"], estimate_table(est)))


# --------------------------------------------------------------------------- the run

class Run:
    """Results, errors and skips of a run; written to --json after every stage (a cut-off run keeps its part)."""

    def __init__(self, json_path: Path | None, meta: dict):
        self.json_path, self.meta = json_path, meta
        self.cnn, self.clip, self.errors, self.skipped = [], [], [], []

    def stage(self, name: str, fn: Callable[[], object], device: torch.device):
        log(f"{name} ...")
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one failing stage must not cost the others (GPU time is scarce)
            traceback.print_exc(file=sys.stderr)
            self.errors.append(f"{name}: {type(e).__name__}: {str(e)[:500]}")
            return None
        finally:
            free_memory(device)
            self.save()

    def skip(self, what: str, why: str) -> None:
        log(f"skipped {what}: {why}")
        self.skipped.append(f"{what}: {why}")

    def save(self) -> None:
        if self.json_path:
            from flowers_classifier.files import write_json
            write_json(self.json_path, self.as_dict())

    def as_dict(self) -> dict:
        return dict(meta=self.meta, cnn=self.cnn, clip=self.clip, ratios=ratios(self.cnn), checks=checks(self),
                    errors=self.errors, skipped=self.skipped)


def ratios(cnn_rows: list[dict]) -> list[dict]:
    """ours / plain images/s for each config both loops measured."""
    plain = {(r["precision"], r["channels_last"]): r for r in cnn_rows if r["loop"] == "plain"}
    out = []
    for r in cnn_rows:
        p = plain.get((r["precision"], r["channels_last"]))
        if r["loop"] == "ours" and p and r["images_per_s"] and p["images_per_s"]:
            out.append(dict(precision=r["precision"], channels_last=r["channels_last"],
                            ours_over_plain=r["images_per_s"] / p["images_per_s"]))
    return out


def checks(run: Run) -> dict:
    ours = [r for r in run.cnn if r["loop"] == "ours"]
    return dict(stages_ran=not run.errors, losses_finite=all(r["finite"] for r in run.cnn + run.clip),
                cnn_loss_down=all(r["loss_down"] for r in ours),
                parity=all(r.get("parity_ok") for r in ours))  # a stage that did not run: stages_ran says so


def machine(device: torch.device, mode: str, sizes: Sizes, data: Path | None, peak: float | None,
            argv: Sequence[str] | None = None) -> dict:
    info = machine_info("gpu_check", argv) | dict(
        mode=mode, cuda=torch.version.cuda, device=str(device),
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        data=str(data) if data else "synthetic", sizes=asdict(sizes), bf16_matmul_tflops=peak)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / GIB,
                    capability=f"{props.major}.{props.minor}")
    return info


def cnn_precision(device: torch.device, wanted: str, run: Run) -> str | None:
    """The precision a CNN config trains in: `wanted`, except on the CPU where fp16 is skipped and bf16 runs
    only if the learner accepts it (flowers_fastai.learner.resolve_precision), else fp32 with the reason."""
    if device.type == "cuda":
        return wanted
    if wanted == "fp16":
        run.skip("cnn fp16 on the CPU", "fp16 mixed precision is a CUDA path (fastai MixedPrecision + GradScaler)")
        return None
    from flowers_fastai.learner import resolve_precision
    try:
        return resolve_precision(wanted)
    except ValueError as e:
        run.skip(f"cnn {wanted} on the CPU", f"the learner refuses it ({e}); the CNN smoke runs in fp32")
        return "fp32"


def run_cnn(device: torch.device, root: Path, split, work: Path, sizes: Sizes, run: Run) -> None:
    precisions = [p for p in (cnn_precision(device, w, run) for w in ("fp16", "bf16")) if p]
    for precision in dict.fromkeys(precisions):  # fp32 once when bf16 fell back
        for channels_last in (True, False):
            name = f"{precision}, channels_last {'on' if channels_last else 'off'}"

            def ours(precision=precision, channels_last=channels_last, name=name):
                row, learn = train_ours(device, root, split, work / "runs" / name.replace(", ", "-").replace(" ", "_"),
                                        sizes, precision, channels_last)
                run.cnn.append(row)
                row.update(export_parity(learn, device, root, split, work / "cnn.pth", sizes.parity_images))
                log(f"  ours {name}: {fmt_rate(row['images_per_s'])} img/s, loss {row['loss_first']:.3f} -> "
                    f"{row['loss_last']:.3f}, parity max |dp| {row['parity_max_abs_diff']:.1e}")

            def plain(precision=precision, channels_last=channels_last, name=name):
                row = train_plain_on(device, root, split, sizes, precision, channels_last)
                run.cnn.append(row)
                log(f"  plain {name}: {fmt_rate(row['images_per_s'])} img/s")

            run.stage(f"cnn ours {name}", ours, device)
            run.stage(f"cnn plain {name}", plain, device)


def run_clip(device: torch.device, sizes: Sizes, peak: float | None, run: Run) -> None:
    model = run.stage(f"clip build {sizes.clip_model}", lambda: build_clip(sizes.clip_model, sizes.clip_img, device),
                      device)
    if model is None:
        return
    size = clip_image_size(model)
    counted = run.stage("clip FLOP count", lambda: count_training_flops(
        model, torch.randn(1, 3, size, size, device=device)), device)
    flops = counted["training"] if counted else math.nan
    run.meta["clip_flops_per_image"] = counted
    precisions = ["bf16", "fp16"] if device.type == "cuda" else ["bf16"]
    if device.type != "cuda":
        run.skip("clip fp16 on the CPU", "fp16 autocast + GradScaler is a CUDA path; the CPU smoke runs bf16")
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(sizes.memory_fraction, device)
    try:
        for ckpt in (False, True):
            found = run.stage(f"clip batch search, grad checkpointing {ckpt}",
                              lambda ckpt=ckpt: clip_search(model, device, sizes, ckpt), device)
            if not found or not found["batch"]:
                continue
            log(f"  largest batch {found['batch']} ({found['stopped']}; tries {found['tries']})")
            for precision in precisions:
                row = run.stage(f"clip {precision}, grad checkpointing {ckpt}", lambda p=precision, c=ckpt, b=found[
                    "batch"]: clip_config(model, device, sizes, p, c, b, flops, peak), device)
                if row:
                    row.update(search=found)
                    run.clip.append(row)
                    log(f"  {precision} ckpt {ckpt}: batch {row['bs']}, {fmt_rate(row['images_per_s'])} img/s, "
                        f"MFU {fmt_pct(row['mfu'])}")
        # The computed estimate next to the batch the search found (on the GPU): checks docs/training.md's table.
        est = run.stage("clip memory estimate (computed)", lambda: memory_estimate(model, device), device)
        run.meta["clip_memory_estimate"] = est
        if est and device.type == "cuda":
            cap = torch.cuda.get_device_properties(device).total_memory * sizes.memory_fraction
            for row in run.clip:
                key = "ckpt" if row["grad_checkpointing"] else "no_ckpt"
                row["estimated_max_bs"] = batch_for_capacity(cap, est[key]["fixed"], est[key]["per_image"])
    finally:
        set_checkpointing(model, False)
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)


# --------------------------------------------------------------------------- report

def fmt_rate(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def fmt_pct(v: float | None) -> str:
    return "–" if v is None or math.isnan(v) else f"{100 * v:.1f}%"


def fmt_gib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def report_rows(run: Run) -> list[list]:
    rows = []
    for r in run.cnn:
        parity = "–"
        if "parity_max_abs_diff" in r:
            parity = f"{r['parity_max_abs_diff']:.1e} {'ok' if r['parity_ok'] else 'FAIL'}"
            if r.get("parity_prob_spread", math.inf) < r.get("parity_min_spread", 0.0):
                parity += f" (constant output: spread {r['parity_prob_spread']:.1e})"
        rows.append([f"cnn {r['loop']}", r["model"], r["img"], r["precision"], "on" if r["channels_last"] else "off",
                     "–", r["bs"], r["steps"], fmt_rate(r["images_per_s"]), fmt_gib(r["peak_gib"]),
                     "yes" if r["finite"] else "NO", f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}", "–", parity])
    for r in run.clip:
        est = r.get("estimated_max_bs")
        ckpt = "on" if r["grad_checkpointing"] else "off"
        rows.append(["clip steps", r["model"], r["img"], r["precision"], "–", ckpt,
                     f"{r['bs']}" + (f" (est. {est})" if est is not None else ""), r["timed_steps"],
                     fmt_rate(r["images_per_s"]), fmt_gib(r["peak_gib"]), "yes" if r["finite"] else "NO",
                     f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}", fmt_pct(r["mfu"]), "–"])
    return rows


HEADER = ["run", "model", "px", "precision", "channels_last", "grad ckpt", "batch", "steps", "img/s", "peak GiB",
          "losses finite", "loss first -> last", "MFU", "parity max |dp|"]


def print_report(run: Run, argv: Sequence[str]) -> None:
    m = run.meta
    print(f"# python -m bench.gpu_check {' '.join(argv)}")
    print(json.dumps({k: m.get(k) for k in ("date", "gpu", "gpu_memory_gib", "capability", "torch", "cuda", "cudnn",
                                            "python", "mode")}))
    peak = m.get("bf16_matmul_tflops")
    print(f"device {m.get('gpu') or m['device']}; bf16 matmul {m['sizes']['matmul_n']}^3 measured "
          f"{'–' if peak is None else f'{peak:.3g}'} TFLOP/s (the MFU denominator); photos: {m['data']}; "
          f"random init throughout")
    flops = m.get("clip_flops_per_image")
    if flops:
        print(f"{m['sizes']['clip_model']} training FLOPs per image, counted (forward + backward, no "
              f"checkpointing): {flops['training'] / 1e9:.1f} GFLOP (forward {flops['forward'] / 1e9:.1f})")
    print("\n" + markdown_table(HEADER, report_rows(run)) + "\n")
    print("- cnn img/s: steady state (the first steps of each epoch not timed), data loading in, validation out; "
          "ours: its unfrozen epochs; MFU on model FLOPs (3x forward; grad checkpointing executes ~4x)")
    for r in ratios(run.cnn):
        v = r["ours_over_plain"]
        print(f"- ours / plain img/s, {r['precision']}, channels_last {'on' if r['channels_last'] else 'off'}: "
              f"{v:.2f}x (goal >= {RATIO_GOAL:.1f}x: {'met' if v >= RATIO_GOAL else 'NOT met'})")
    bf16 = [r["mfu"] for r in run.clip if r["precision"] == "bf16" and r["mfu"] is not None]
    if bf16:
        best = max(bf16)
        print(f"- {m['sizes']['clip_model']} bf16 MFU, best of grad checkpointing off/on: {100 * best:.1f}% "
              f"(goal >= {100 * MFU_GOAL:.0f}% on an H100: {'met' if best >= MFU_GOAL else 'NOT met'})")
    c = checks(run)
    print(f"- checks: stages ran {c['stages_ran']}, losses finite {c['losses_finite']}, cnn loss down "
          f"{c['cnn_loss_down']}, export parity (< {PARITY_TOL:g}, on probabilities spread >= {PARITY_MIN_SPREAD:g}) "
          f"{c['parity']}")
    for s in run.skipped:
        print(f"- skipped {s}")
    for e in run.errors:
        print(f"- ERROR {e}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="<class>/<images> photo folder (default: synthetic photos)")
    p.add_argument("--per-class", type=int, help="photos per class (default 500; with --data: at most)")
    add_output_args(p)
    p.add_argument("--skip", default="", help="comma-separated stages to leave out: cnn, clip")
    p.add_argument("--estimate-memory", action="store_true",
                   help="only compute ViT training batch sizes for 24/40/80 GB GPUs (CPU, no GPU needed)")
    p.add_argument("--clip-model", help="open_clip model for the clip stage / the estimate (default ViT-L-14)")
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)  # dev/tests: tiny, on the CPU
    return p.parse_args(argv)


def estimate_main(args: argparse.Namespace) -> int:
    name = args.clip_model or Sizes.clip_model
    torch.manual_seed(0)
    log(f"building {name} (random init) on the CPU ...")
    model = build_clip(name, None, torch.device("cpu"))
    log("forwards at batch 1 and 2, without and with grad checkpointing ...")
    est = memory_estimate(model, torch.device("cpu"))
    print(f"# python -m bench.gpu_check --estimate-memory {name}; torch {torch.__version__}, CPU bf16 autocast\n")
    print_estimate(name, clip_image_size(model), est)
    if args.json:  # computed, not measured: bench/results/ holds measurements only
        from flowers_classifier.files import write_json
        write_json(args.json, dict(meta=machine_info("gpu_check"), model=name,
                                   image_size=clip_image_size(model), estimate=est, table=estimate_table(est)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.estimate_memory:
        return estimate_main(args)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    sizes = Sizes.cpu_smoke() if args.cpu_smoke else Sizes.gpu()
    sizes = replace(sizes, per_class=args.per_class or sizes.per_class,
                    clip_model=args.clip_model or sizes.clip_model)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    log(f"{'CPU smoke' if args.cpu_smoke else 'GPU check'} on {device}: {sizes}")
    peak = matmul_peak_tflops(device, sizes.matmul_n, sizes.matmul_reps)
    log(f"bf16 matmul peak {peak:.1f} TFLOP/s")
    meta = machine(device, "cpu-smoke" if args.cpu_smoke else "cuda", sizes, args.data, peak, argv)
    # a smoke run is a test of the script, not a measurement: it writes only where --json says
    run = Run(args.json if args.cpu_smoke else results_path("gpu_check", args, meta["date"]), meta)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        if "cnn" not in skip:
            data = run.stage("data", lambda: prepare_data(args.data, work, sizes, seed=0), device)
            if data:
                run_cnn(device, data[0], data[1], work, sizes, run)
        if "clip" not in skip:
            run_clip(device, sizes, peak, run)
    run.meta.update(total_s=time.monotonic() - START, cudnn_benchmark=torch.backends.cudnn.benchmark,
                    cudnn_deterministic=torch.backends.cudnn.deterministic)  # train.py's seeding sets them
    run.save()
    print_report(run, sys.argv[1:] if argv is None else argv)
    return 0 if all(checks(run).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
