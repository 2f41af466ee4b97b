"""Pinning each calling thread's OpenMP workers (flowers_classifier/threads.py): every worker on a CPU of its own,
the caller free (on the CPU no worker holds during a forward), only where torch's team spans all the CPUs; and
load_model's CPU models doing it around their forwards; batches decoded on the CPUs the forward leaves free."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from types import SimpleNamespace

import pytest
import torch

import flowers_classifier as fc

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
gnu_openmp_team = pytest.mark.skipif(
    len(CPUS) < 2 or "OpenMP" not in torch.__config__.parallel_info(),
    reason="pinning applies to a torch built with OpenMP on Linux with 2 or more CPUs")


def _affinities_after(code: str) -> dict:
    """Run `code` in a fresh interpreter (a fresh OpenMP team; nothing pinned in this one) and return what it
    prints as JSON on its last line, plus every thread's CPU set as {"threads": {tid: [cpus]}}."""
    script = textwrap.dedent(code) + textwrap.dedent("""
        import os, json
        out["threads"] = {}
        for t in os.listdir("/proc/self/task"):
            try:
                out["threads"][t] = sorted(os.sched_getaffinity(int(t)))
            except ProcessLookupError:  # a thread that ended meanwhile (the other caller's team)
                pass
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@gnu_openmp_team
def test_each_worker_of_each_callers_team_gets_a_cpu_of_its_own_and_the_callers_stay_free():
    out = _affinities_after(f"""
        import os, threading, torch
        from flowers_classifier.threads import pin_openmp_workers, pinned_team
        torch.set_num_threads({len(CPUS)})
        out = dict(main=threading.get_native_id(), results=[pin_openmp_workers(), pin_openmp_workers()])
        def in_a_thread():
            out["other"] = threading.get_native_id()
            out["results"].append(pin_openmp_workers())
        t = threading.Thread(target=in_a_thread); t.start(); t.join()
        with pinned_team():
            out["caller_during_a_call"] = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set(os.sched_getaffinity(0)) - {{min(os.sched_getaffinity(0))}})
        with pinned_team():  # the caller's CPU was taken from this thread since: it is left as it is
            out["caller_restricted"] = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, set({CPUS}))
    """)
    assert out["results"] == [True, True, True]
    assert out["caller_during_a_call"] == CPUS[:1]  # the CPU no worker holds, during the forward only
    assert out["caller_restricted"] == CPUS[1:]
    threads = out["threads"]
    assert threads[str(out["main"])] == CPUS  # and afterwards every CPU again
    pinned = [cpus[0] for cpus in threads.values() if len(cpus) == 1]
    # main's team: one worker on each CPU but the first (the other thread's team may have exited with it)
    assert sorted(set(pinned)) == CPUS[1:] and len(pinned) >= len(CPUS) - 1, threads


@gnu_openmp_team
def test_nothing_is_pinned_when_the_team_does_not_span_every_cpu():
    out = _affinities_after("""
        import os, torch
        from flowers_classifier.threads import pin_openmp_workers
        torch.set_num_threads(1)
        torch.zeros(1 << 17).add_(0)
        out = dict(results=[pin_openmp_workers(), pin_openmp_workers(len(os.sched_getaffinity(0)) + 1)])
    """)
    assert out["results"] == [False, False]
    assert all(cpus == CPUS for cpus in out["threads"].values()), out["threads"]


def test_load_models_cpu_model_pins_on_its_calls_and_can_be_told_not_to(tiny_cnn_pth, monkeypatch, real_photos):
    calls = []

    @contextlib.contextmanager
    def spy():
        calls.append(1)
        yield

    monkeypatch.setattr("flowers_classifier.model.pinned_team", spy)
    model = fc.load_model(tiny_cnn_pth, device="cpu")
    assert model.pin_threads
    fc.predict(model, real_photos["rose"][0])
    assert calls == [1]
    model.pin_threads = False
    fc.predict(model, real_photos["rose"][0])
    assert calls == [1]


def test_batches_are_decoded_on_the_cpus_the_forward_leaves_free(tiny_cnn_pth, monkeypatch, real_photos):
    from flowers_classifier import inference
    pools, decoders = [], set()

    class SpyPool(inference.ThreadPoolExecutor):
        def __init__(self, max_workers):
            pools.append(max_workers)
            super().__init__(max_workers)

    def spy_load(path, prep):
        decoders.add(threading.get_ident())
        return inference.preprocess_image(path, prep)

    monkeypatch.setattr(inference, "ThreadPoolExecutor", SpyPool)
    monkeypatch.setattr(inference, "available_cpus", lambda: [0, 1])
    model = fc.load_model(tiny_cnn_pth, device="cpu")
    photos = real_photos["rose"] + real_photos["tulip"]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the forward's team holds both CPUs
    results = list(fc.iter_probabilities(model, photos, bs=4, load=spy_load))
    assert len(results) == 10 and all(e is None for _, _, e in results)
    assert pools == [] and decoders == {threading.get_ident()}  # the caller decodes, no pool
    assert len(fc.predict_batch(model, photos, bs=4)) == 10 and pools == []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one CPU free: it decodes beside the caller's
    assert len(fc.predict_batch(model, photos, bs=4)) == 10 and pools == [2]
    fc.predict_batch(model, photos[:1])
    assert pools == [2]  # one file: no pool
    list(fc.iter_probabilities(model, photos, bs=4, workers=4))
    assert pools == [2, 2]  # asked for 4: one per CPU at most
    assert inference.decoding_threads(SimpleNamespace(device=torch.device("cuda"))) == 2  # forward off the CPUs
    monkeypatch.setattr(inference, "available_cpus", lambda: list(range(16)))
    assert inference.decoding_threads(SimpleNamespace(device=torch.device("cuda"))) == inference.ACCELERATOR_DECODERS
    assert inference.decoding_threads(model) == 16  # a team of 1 (the caller) leaves 15 CPUs free, plus its own
