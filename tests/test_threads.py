"""How the runtime's CPU forwards use the process's threads: a default load and its predictions leave every
thread of the process free to run on every CPU the process had (nothing pinned: a server's threads share those
CPUs), and batches are decoded on the CPUs the forward leaves free."""

from __future__ import annotations

import os
import threading
from types import SimpleNamespace

import pytest
import torch
from conftest import thread_cpus_after

import flowers_classifier as fc

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


@pytest.mark.skipif(len(CPUS) < 2, reason="a thread's CPU set can only be narrowed on Linux with 2 or more CPUs")
@pytest.mark.parametrize("pth, options", [("tiny_cnn_pth", ""), ("tiny_cnn_pth", "backend='int8'"),
                                          ("tiny_vit_pth", "")])
def test_a_default_load_and_its_predictions_narrow_no_threads_cpus(pth, options, request, real_photos):
    photos = [str(p) for p in real_photos["rose"] + real_photos["tulip"]]
    start, threads = thread_cpus_after(f"""
        import flowers_classifier as fc
        model = fc.load_model({str(request.getfixturevalue(pth))!r}, {options})
        fc.predict(model, {photos[0]!r})
        fc.predict_batch(model, {photos!r}, bs=4)
    """)
    assert len(threads) > 1  # the forward's OpenMP workers are among them
    assert all(cpus == start for cpus in threads.values()), threads


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
