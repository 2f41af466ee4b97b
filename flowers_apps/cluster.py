"""What `flowers-serve` and `flowers-predict --engine ray` share: joining Ray (the cluster at --address /
$RAY_ADDRESS, or a Ray started on this machine for the command's lifetime), naming the model so that every worker
finds it, and the thread a model actor runs torch on. Imports Ray: only those two paths import this module."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch

from flowers_classifier.errors import FlowersError
from flowers_classifier.payload import resolve_model_path


class RayUnavailableError(FlowersError, RuntimeError):
    """Ray could not be started or joined. The message names the address and says how to find the right one."""


def connect(address: str | None) -> bool:
    """Join the Ray cluster at `address` (else $RAY_ADDRESS), else start a local Ray; True when this call started
    one (the caller shuts it down when done). Already connected (a test, a notebook): nothing to do, False."""
    if ray.is_initialized():
        return False
    joining = address or os.environ.get("RAY_ADDRESS")
    if not joining:
        # Ray runs its workers at nice 15 so that its own daemons win the CPU; in a Ray started for this command
        # the workers are the command's work, so they keep its priority (RAY_worker_niceness set: left as it is).
        os.environ.setdefault("RAY_worker_niceness", "0")
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayUnavailableError(f"cannot {'join Ray at ' + joining if joining else 'start a local Ray'} ({e}); "
                                  f"check --address (or RAY_ADDRESS): `ray status` on the head node shows the "
                                  f"cluster, `ray start --head` starts one") from e
    return not joining


def model_location(model: str | os.PathLike) -> str:
    """The model as Ray's workers must name it: an existing file or folder (a bare name looked up in models/, as
    load_model does) made absolute, since workers run in another directory; anything else as given."""
    path = resolve_model_path(model)
    return str(path.absolute()) if path.exists() else str(model)


def model_bytes(location: str) -> int:
    """The size of the model's files (0 when it is not a local file or folder): what loading it holds in memory."""
    path = Path(location)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def torch_thread(threads: int) -> ThreadPoolExecutor:
    """The one thread a model actor makes every torch call on, the model's load included, with `threads` intra-op
    threads. One, because OpenMP gives each thread that calls into it its own team of workers, and once the teams
    together outnumber the CPUs, libgomp stops spin-waiting between parallel regions: on a 2-CPU VM, a ConvNeXt-T
    forward took 52 ms on a Ray actor's second thread after a load on its first, and 40 ms with both on one."""
    return ThreadPoolExecutor(1, thread_name_prefix="flowers-torch", initializer=torch.set_num_threads,
                              initargs=(threads,))
