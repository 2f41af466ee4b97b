"""How our CPU forwards use their threads: each OpenMP worker of the calling thread's team pinned to a CPU of
its own, and the calling thread kept on the one CPU left while a forward runs.

Why: torch runs a CPU forward as a series of OpenMP parallel regions, each ending at a barrier where the
calling thread spin-waits for the team's workers. After a pause (a demo between two uploads, an API
between requests) the workers sleep, and a scheduler that packs threads (this project's 2-vCPU VM does) may
wake the worker onto the CPU where the caller is already spinning: the worker then waits for the caller's
spin to end, up to a scheduler tick (4 ms), at the call's barriers. On that machine this made the first call after
a pause of convnextv2_atto at 64 px about 3x slower than ONNX Runtime's (11.7 vs 4.2 ms, `bench/idle_latency.py
--free-threads`); pinned, 3.7 vs 3.2 ms (bench/RESULTS.md section 1b). ONNX Runtime does not pay it: its
caller runs a region's work itself when no worker is awake. A worker pinned alone is not enough: the caller
may then be packed onto the worker's CPU, which the worker can no longer leave; hence the caller's CPU
during the forward (two `sched_setaffinity` calls, a few microseconds; its own CPU set back afterwards).

This is `OMP_PROC_BIND` for our forwards only: other libraries' threads that the caller starts (ONNX
Runtime's pool, a server's) keep every CPU. We pin only when the team spans all the CPUs the calling thread
may use (torch's default), where pinning cannot pile work onto fewer CPUs; and only GNU OpenMP (the runtime
of torch's Linux wheels), through its own entry point, so that the team torch uses is the one pinned.
Elsewhere nothing is done. `FlowerClassifier.pin_threads = False` turns it off.
"""
from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_decided = threading.local()  # per calling thread (each has its own OpenMP team): {team size: caller's CPU or None}
_REGION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # the outlined body GOMP_parallel runs on every team thread


def available_cpus() -> list[int]:
    """The CPUs the calling thread may run on (its affinity mask, the process's unless the thread was given its
    own; all of os.cpu_count() where the OS has no affinity masks)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _gnu_openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch has loaded, or None (another runtime, or not Linux)."""
    try:  # RTLD_NOLOAD: only a libgomp that is already in the process, never a second copy
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    except (OSError, AttributeError):
        return None


def pin_openmp_workers(num_threads: int | None = None) -> bool:
    """Pin worker i (1..n-1) of the calling thread's OpenMP team of n = `num_threads` (default
    torch.get_num_threads()) threads to the i-th CPU this thread may use (CPU 0 is left for the caller).
    Done once per calling thread and team size. False, doing nothing, where the rules above say not to."""
    return _caller_cpu(num_threads or torch.get_num_threads()) is not None


@contextmanager
def pinned_team() -> Iterator[None]:
    """Around one CPU forward: the calling thread's team pinned (`pin_openmp_workers`), and the calling thread
    itself kept on the CPU no worker holds until the forward returns, then given its own CPU set back. (A
    scheduler that packs threads may otherwise put the caller on a worker's CPU, and a pinned worker cannot
    move away: every barrier of the call would wait for a tick.)"""
    cpu = _caller_cpu(torch.get_num_threads())
    own = os.sched_getaffinity(0) if cpu is not None else set()
    if cpu not in own:  # not pinned, or this thread's CPU set changed since: leave it as it is
        yield
        return
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


def _caller_cpu(n: int) -> int | None:
    decided = _decided.__dict__.setdefault("sizes", {})
    if n not in decided:
        decided[n] = _pin(n)
    return decided[n]


def _pin(n: int) -> int | None:
    """Pin the workers of the calling thread's team of n; the CPU left for the caller, or None (not pinned)."""
    if n < 2 or not hasattr(os, "sched_getaffinity") or "OpenMP" not in torch.__config__.parallel_info():
        return None
    cpus = available_cpus()
    gomp = _gnu_openmp()
    if len(cpus) != n or gomp is None:
        return None
    gomp.omp_get_thread_num.restype = ctypes.c_int

    def pin_self(_data) -> None:  # runs on each thread of the team, the caller as thread 0
        i = gomp.omp_get_thread_num()
        if i > 0:
            os.sched_setaffinity(0, {cpus[i]})

    region = _REGION(pin_self)  # kept referenced until the region has ended
    gomp.GOMP_parallel(region, None, ctypes.c_uint(n), ctypes.c_uint(0))
    return cpus[0]
