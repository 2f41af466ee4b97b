"""The demo under load: 200 `/predict` calls, 8 in flight, through gradio_client, loopback only.

Bounded in count (200) and in time (each call and the whole run have deadlines); prints p50/p95 latency.
Also runnable by hand against a running app: `python tests/test_demo_load.py http://127.0.0.1:7860/ PHOTO...`
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor, wait
from itertools import cycle, islice
from pathlib import Path

from gradio_client import Client, handle_file

REQUESTS, IN_FLIGHT, CALL_TIMEOUT_S, RUN_TIMEOUT_S = 200, 8, 60, 300


def hammer(url: str, photos: list[Path], requests: int = REQUESTS, in_flight: int = IN_FLIGHT) -> dict:
    """Send `requests` predictions with `in_flight` concurrent callers; latencies in ms and failures."""
    client = Client(url, verbose=False)
    latencies, failures = [], []

    def call(photo: Path) -> None:
        start = time.perf_counter()
        try:
            job = client.submit(handle_file(str(photo)), "CNN", api_name="/predict")
            label, _ = job.result(timeout=CALL_TIMEOUT_S)
            assert len(label["confidences"]) == 5
            latencies.append((time.perf_counter() - start) * 1000)
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            failures.append(f"{photo.name}: {type(e).__name__}: {e}")

    with ThreadPoolExecutor(in_flight) as pool:
        done, not_done = wait([pool.submit(call, p) for p in islice(cycle(photos), requests)],
                              timeout=RUN_TIMEOUT_S)
        for future in not_done:
            future.cancel()
    failures += ["did not finish in time"] * len(not_done)
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else [float("nan")] * 19
    return dict(ok=len(latencies), failures=failures, p50_ms=statistics.median(latencies) if latencies else None,
                p95_ms=q[18])


def test_200_requests_8_in_flight_all_succeed(tiny_cnn_pth, tiny_vit_pth, real_photos, capsys):
    from test_app import serving

    from flowers_apps import demo as app

    photos = [p for ps in real_photos.values() for p in ps]
    demo = app.build_demo(tiny_cnn_pth, tiny_vit_pth, None)
    with serving(demo) as url:
        result = hammer(url, photos)
    with capsys.disabled():
        print(f"\ndemo load: {result['ok']}/{REQUESTS} ok, {IN_FLIGHT} in flight, "
              f"p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms")
    assert result["failures"] == [] and result["ok"] == REQUESTS


if __name__ == "__main__":
    print(hammer(sys.argv[1], [Path(p) for p in sys.argv[2:]]))
