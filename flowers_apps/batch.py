"""Batch prediction on Ray Data: `flowers-predict PATH... --engine ray [--address ADDR] [--replicas N]`, the job
and the records of `python -m flowers_classifier`, as a pipeline that spreads over a cluster's machines.

    read the files with their paths (read_binary_files)  ->  decode + eval crop in CPU tasks (the runtime's
    preprocess_image, from the bytes)  ->  predict in a pool of `replicas` actors, one model each, `bs` images a
    forward  ->  one record per input file, in input order, back in this process (printed, --json, --out)

An undecodable file is a record with its error (the same message as in-process), a file that cannot be read
(missing, a permission) too; the others go on. Every node must see the files at the same paths (a shared file
system on a cluster) and have this project installed. Imports Ray: only `--engine ray` imports this module.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import torch

import flowers_classifier as fc
from flowers_classifier.cli import Predictions
from flowers_classifier.errors import FlowersError
from flowers_classifier.inference import error_record
from flowers_classifier.preprocess import InvalidImageError, Preprocess, load_rgb, preprocess_image

from .cluster import model_bytes, model_location, torch_thread

DEFAULT_REPLICAS = 1
DECODE_BATCH = 16  # images per decoding task call: a task's overhead spread over a few, blocks kept small
# A model actor's memory reservation: the process (Python, torch, Ray: Ray Data measured ~510 MiB with a 13 MB
# model) plus twice the model's files (the weights and the load's peak).
ACTOR_BASE_MEMORY = 512 * 2**20
MODEL_MEMORY_FACTOR = 2


class RayEngineError(FlowersError, RuntimeError):
    """The pipeline failed as a whole (a task or an actor, not one image), or an option is out of range."""


def _decode(batch: dict[str, np.ndarray], prep: Preprocess) -> dict[str, np.ndarray]:
    """CPU task: each file's bytes -> its normalised eval crop (zeros and the error message when it does not
    decode), named by its path so that messages read as in-process."""
    n, size = len(batch["path"]), prep.image_size
    pixels, errors = np.zeros((n, 3, size, size), np.float32), [""] * n
    for i, (data, path) in enumerate(zip(batch["bytes"], batch["path"], strict=True)):
        try:
            pixels[i] = preprocess_image(bytes(data), prep, name=path).numpy()
        except InvalidImageError as e:
            errors[i] = str(e)
    return {"path": batch["path"], "pixels": pixels, "error": np.array(errors, dtype=object)}


class _Predictor:
    """Actor: the model loaded once, then one forward per batch of decoded crops (error rows skip it), every torch
    call on one thread (cluster.torch_thread)."""

    def __init__(self, model: str, backend: str, calibrated: bool, threads: int):
        self.worker = torch_thread(threads)
        self.model = self.worker.submit(fc.load_model, model, backend=backend, calibrated=calibrated).result()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        probs = np.full((len(ok), len(self.model.classes)), np.nan, np.float32)
        if ok.any():
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok]))
            probs[ok] = self.worker.submit(lambda: self.model.probabilities(pixels).numpy()).result()
        return {"path": batch["path"], "probabilities": probs, "error": batch["error"]}


def _record(path: str, probs: np.ndarray, error: str, classes: tuple[str, ...]) -> dict:
    """The runtime's record (fc.iter_predictions) for one row."""
    if error:
        return error_record(path, error)
    best = int(probs.argmax())
    return dict(image_path=path, predicted_class=classes[best], confidence=float(probs[best]),
                probabilities={c: float(p) for c, p in zip(classes, probs, strict=True)}, error=None)


def ray_predictions(model_path: str | os.PathLike, *, backend: str = "auto", calibrated: bool = True,
                    replicas: int = DEFAULT_REPLICAS, threads: int = 1) -> Predictions:
    """What `flowers_classifier.cli.run` calls to predict (model, files, bs): the Ray Data pipeline on the Ray this
    process is connected to (cluster.connect), `replicas` model actors running `threads` torch threads each."""
    if replicas < 1 or threads < 1:
        raise RayEngineError(f"--replicas ({replicas}) and --threads ({threads}) must be at least 1")
    location = model_location(model_path)

    def predictions(model: fc.FlowerClassifier, paths: list[Path], bs: int) -> Iterator[dict]:
        failed, readable = {}, []
        for i, path in enumerate(paths):
            if path.is_file() and os.access(path, os.R_OK):
                readable.append(str(path.absolute()))
                continue
            try:  # a missing or unreadable file: the runtime's own message, without a task
                load_rgb(path)
                readable.append(str(path.absolute()))  # it became readable meanwhile
            except InvalidImageError as e:
                failed[i] = error_record(path, str(e))
        rows = _run(readable, model.prep, location, backend, calibrated, replicas, threads, bs)
        pending: dict[str, list[dict]] = {}  # rows by path: in input order (preserve_order), a dict all the same
        for i, path in enumerate(paths):
            if i in failed:
                yield failed[i]
                continue
            absolute = str(path.absolute())
            while not pending.get(absolute):
                row = next(rows, None)
                if row is None:
                    raise RayEngineError(f"{path}: the Ray Data pipeline returned no row for it")
                pending.setdefault(row["path"], []).append(row)
            row = pending[absolute].pop(0)
            yield _record(str(path), row["probabilities"], row["error"], model.classes)

    return predictions


def _run(files: list[str], prep: Preprocess, location: str, backend: str, calibrated: bool, replicas: int,
         threads: int, bs: int) -> Iterator[dict]:
    """The pipeline's rows ({path, probabilities, error}) for `files` (absolute paths), in their order."""
    if not files:
        return iter(())
    from ray.data import ActorPoolStrategy, DataContext, read_binary_files

    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < replicas + 1:
        raise RayEngineError(f"--replicas {replicas} needs {replicas + 1} CPUs in the Ray cluster (one per model actor "
                             f"and one for reading and decoding), it has {cpus:g}; pass fewer --replicas")
    context = DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False  # the CLI's own progress bar counts the records
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-job INFO lines are not the user's
    ds = read_binary_files(files, include_paths=True)
    ds = ds.map_batches(_decode, fn_kwargs={"prep": prep}, batch_size=DECODE_BATCH, batch_format="numpy")
    # Each actor reserves one CPU but runs `threads` torch threads: reserving them all would leave a small machine
    # no CPU for the reading and decoding tasks, and the job would wait forever; those tasks are short next to a
    # forward. It also reserves its memory (ACTOR_BASE_MEMORY), so that Ray never packs more actors on a node than
    # fit; that reservation also keeps Ray Data from fusing the decoding tasks into the actors.
    memory = ACTOR_BASE_MEMORY + MODEL_MEMORY_FACTOR * model_bytes(location)
    ds = ds.map_batches(_Predictor, fn_constructor_kwargs=dict(model=location, backend=backend, calibrated=calibrated,
                                                               threads=threads),
                        batch_size=bs, batch_format="numpy", compute=ActorPoolStrategy(size=replicas), num_cpus=1,
                        memory=memory)
    return _rows(ds)


def _rows(ds) -> Iterator[dict]:
    try:
        for row in ds.iter_rows():
            yield {"path": row["path"], "probabilities": np.asarray(row["probabilities"]), "error": row["error"]}
    except ray.exceptions.RayError as e:  # a task or actor failed as a whole (not one image: those are rows)
        raise RayEngineError(f"the Ray Data pipeline failed: {str(e)[-2000:]}") from e
