"""Serving benchmark: Ray Serve (flowers-serve) and Ray Data (flowers-predict --engine ray) against the runtime in
this process, on this machine's CPUs, in one run.

    python -m bench.serve [--model tiny@224] [--clients 16] [--requests 320] [--rounds 4] [--replicas 1]
                          [--threads N] [--max-batch 8] [--batch-wait-ms W] [--data-images 960]
                          [--data-replicas 1] [--data-threads N] [--wait-quiet] [--json OUT | --no-save]

The model (NAME@SIZE as in bench.inference: tiny = convnextv2_tiny) is random-init (weights do not change the
speed), served by load_model's defaults (no CPU package: nothing compiled). The photos are FLOWERS128_DIR's (skipped
cleanly when absent), each sent as its JPEG bytes. A local Ray with this machine's CPUs; Serve's proxy on a free port.
Contenders are timed in turns, `--rounds` rounds, so that load drifting on a shared machine slows both alike:

  latency     one client, keep-alive HTTP (flowers_apps.client) against fc.predict on the same bytes, and the
              same call through a DeploymentHandle from this process (Python, no HTTP proxy): p50 each, and
              where the HTTP request's time went (the Server-Timing header: batch wait, decode + forward, the
              replica's whole call; the rest is the HTTP proxy, the router and the network)
  throughput  --clients concurrent clients (threads of this process, one keep-alive connection each) against
              fc.predict_batch at bs --max-batch, images/s; the mean batch the replicas formed
  Ray Data    flowers-predict's --engine ray pipeline (read, decode tasks, --data-replicas model actors of
              --data-threads threads) against fc.predict_batch over the same --data-images files, images/s, the
              job's whole wall time (actors' start included, Ray's own start not)

Goals (bench/report.py GOALS): Serve throughput >= 0.95x, p50 latency <= +10 ms, Ray Data >= 0.8x.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    add_output_args,
    latency_ms,
    require_flowers,
    rotated,
    sample_photos,
    save_results,
    verdict,
    wait_for_quiet,
)
from bench.inference import parse_models
from bench.report import GOALS

CONTENDERS = ("in-process", "serve")  # throughput; latency also times "handle"
LATENCY_CONTENDERS = ("in-process", "handle", "serve")


def make_model(name: str, size: int, out: Path) -> Path:
    """A random-init payload of the timm CNN `name` at `size` px."""
    import torch

    from flowers_classifier import factory
    from flowers_classifier.classes import CLASSES
    from flowers_classifier.payload import make_payload

    torch.manual_seed(0)
    net = factory.create_cnn(name)
    spec = dict(family="cnn", model_name=name, classes=list(CLASSES), **factory.cnn_preprocess(net, size).to_dict())
    torch.save(make_payload(spec, net.state_dict()), out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_timing(header: str) -> dict[str, float]:
    """'wait;dur=0.3, model;dur=40.1, replica;dur=42.0' -> {"wait": 0.3, "model": 40.1, "replica": 42.0}."""
    return {part.split(";")[0].strip(): float(part.split("dur=")[1]) for part in header.split(",")}


class Bench:
    """The contenders, ready: the model in this process and the Serve application with its clients."""

    def __init__(self, args: argparse.Namespace, model_path: Path, bodies: list[bytes]):
        import torch
        from ray import serve

        import flowers_classifier as fc
        from flowers_apps import serve as app
        from flowers_apps.client import ServeClient

        torch.set_num_threads(args.threads)
        self.fc, self.args, self.bodies, self.next = fc, args, bodies, 0
        self.model = fc.load_model(model_path)
        url = app.start(app.build_app(model_path, replicas=args.replicas, max_batch=args.max_batch,
                                      batch_wait_ms=args.batch_wait_ms, threads=args.threads // args.replicas or 1),
                        "127.0.0.1", free_port())
        self.one = ServeClient(url)
        self.handle = serve.get_app_handle(app.APP_NAME)
        self.handle.predict.remote(bodies[0]).result()
        self.many = [ServeClient(url) for _ in range(args.clients)]
        for client in [self.one, *self.many]:  # connections open, replicas warm
            client.predict(bodies[0])

    def take(self, n: int) -> list[bytes]:
        out = [self.bodies[(self.next + i) % len(self.bodies)] for i in range(n)]
        self.next += n
        return out

    def latency(self, contender: str, n: int, parts: list[dict]) -> list[float]:
        times = []
        for body in self.take(n):
            start = time.perf_counter()
            if contender == "serve":
                self.one.predict(body)
            elif contender == "handle":
                self.handle.predict.remote(body).result()
            else:
                self.fc.predict(self.model, body)
            times.append(time.perf_counter() - start)
            if contender == "serve":
                parts.append(server_timing(self.one.last_headers["server-timing"]))
        return times

    def throughput(self, contender: str, n: int, batch_sizes: list[int]) -> float:
        bodies = self.take(n)
        start = time.perf_counter()
        if contender == "in-process":
            self.fc.predict_batch(self.model, bodies, bs=self.args.max_batch)
            return n / (time.perf_counter() - start)
        queue, lock = iter(bodies), threading.Lock()

        def work(client) -> None:
            while True:
                with lock:
                    body = next(queue, None)
                if body is None:
                    return
                client.predict(body)
                batch_sizes.append(int(client.last_headers["x-batch-size"]))

        with ThreadPoolExecutor(len(self.many)) as pool:
            list(pool.map(work, self.many))
        return n / (time.perf_counter() - start)


def measure_serving(bench: Bench, args: argparse.Namespace) -> dict:
    times: dict[str, list[float]] = {c: [] for c in LATENCY_CONTENDERS}
    rates: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    parts: list[dict] = []
    batch_sizes: list[int] = []
    per_turn = max(1, args.latency_runs // args.rounds)
    for r in range(args.rounds):
        for contender in rotated(LATENCY_CONTENDERS, r):
            times[contender] += bench.latency(contender, per_turn, parts)
            time.sleep(0.3)  # thread pools stop spinning before the other contender's turn
        for contender in rotated(CONTENDERS, r):
            rates[contender].append(bench.throughput(contender, args.requests // args.rounds, batch_sizes))
            time.sleep(0.3)
    import numpy as np
    latency = {c: latency_ms(np.array(t)) for c, t in times.items()}
    breakdown = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    # HTTP minus the replica's own time: the proxy, the router and the network; the handle skips the HTTP proxy
    breakdown["outside_replica"] = latency["serve"]["p50_ms"] - breakdown["replica"]
    breakdown["http_proxy"] = latency["serve"]["p50_ms"] - latency["handle"]["p50_ms"]
    return dict(latency=latency, breakdown_ms=breakdown,
                throughput={c: statistics.median(v) for c, v in rates.items()}, throughput_rounds=rates,
                mean_batch=statistics.mean(batch_sizes), max_batch_seen=max(batch_sizes),
                latency_seconds={c: t for c, t in times.items()})


def measure_ray_data(model_path: Path, files: list[Path], args: argparse.Namespace) -> dict:
    """images/s of the Ray Data job and of predict_batch on the same files, alternating, --data-rounds each."""
    import flowers_classifier as fc
    from flowers_apps.batch import ray_predictions

    model = fc.load_model(model_path)
    engine = ray_predictions(model_path, replicas=args.data_replicas, threads=args.data_threads)
    rates: dict[str, list[float]] = {"in-process": [], "ray-data": []}
    for r in range(args.data_rounds):
        for contender in rotated(tuple(rates), r):
            start = time.perf_counter()
            if contender == "ray-data":
                records = list(engine(model, files, args.max_batch))
            else:
                records = fc.predict_batch(model, files, bs=args.max_batch)
            rates[contender].append(len(files) / (time.perf_counter() - start))
            assert len(records) == len(files) and not any(r["error"] for r in records)
            time.sleep(0.5)
    return dict(throughput={c: statistics.median(v) for c, v in rates.items()}, throughput_rounds=rates)


def report(res: dict) -> str:
    lat, tp, parts = res["serving"]["latency"], res["serving"]["throughput"], res["serving"]["breakdown_ms"]
    data = res["ray_data"]["throughput"]
    added = lat["serve"]["p50_ms"] - lat["in-process"]["p50_ms"]
    m = res["meta"]
    return "\n".join([
        f"{m['model']}@{m['image_size']}, {m['replicas']} replica(s) x {m['replica_threads']} thread(s), max batch "
        f"{m['max_batch']}, batch wait {m['batch_wait_ms']:g} ms, {m['clients']} clients; 1-min load at start "
        f"{m['load_start']}, at end {m['load_end']}",
        f"p50 latency: in-process {lat['in-process']['p50_ms']:.1f} ms, Serve {lat['serve']['p50_ms']:.1f} ms "
        f"(through a DeploymentHandle, no HTTP: {lat['handle']['p50_ms']:.1f} ms): "
        f"{added:+.1f} ms (goal <= +{GOALS['serve_latency'].threshold:g} ms: "
        f"{'met' if GOALS['serve_latency'].met(added) else 'NOT met'})",
        "  Serve request, medians (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()),
        f"throughput: in-process predict_batch {tp['in-process']:.1f} img/s, Serve {tp['serve']:.1f} img/s "
        f"(mean batch {res['serving']['mean_batch']:.1f}): "
        f"{verdict(tp['serve'] / tp['in-process'], GOALS['serve_throughput'].threshold, True)}",
        f"Ray Data: in-process {data['in-process']:.1f} img/s, Ray Data {data['ray-data']:.1f} img/s: "
        f"{verdict(data['ray-data'] / data['in-process'], GOALS['ray_data_throughput'].threshold, True)}",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny@224", help="NAME@SIZE of a timm CNN (default tiny@224)")
    s = p.add_argument_group("serving")
    s.add_argument("--clients", type=int, default=16, help="concurrent clients for throughput (default 16)")
    s.add_argument("--requests", type=int, default=320, help="requests per contender for throughput (default 320)")
    s.add_argument("--latency-runs", type=int, default=120, help="single requests per contender (default 120)")
    s.add_argument("--rounds", type=int, default=4, help="turns per contender (default 4)")
    s.add_argument("--replicas", type=int, default=1, help="Serve replicas (default 1)")
    s.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads in-process, and shared by the replicas (default: all cores)")
    s.add_argument("--max-batch", type=int, help="Serve's max batch and predict_batch's bs (default: flowers-serve's)")
    s.add_argument("--batch-wait-ms", type=float, help="Serve's batch wait (default: flowers-serve's)")
    d = p.add_argument_group("Ray Data")
    d.add_argument("--data-images", type=int, default=960, help="files per Ray Data job (default 960)")
    d.add_argument("--data-rounds", type=int, default=2, help="jobs per contender (default 2)")
    d.add_argument("--data-replicas", type=int, default=1, help="model actors (default 1)")
    d.add_argument("--data-threads", type=int, help="torch threads per model actor (default: all cores divided by "
                                                    "--data-replicas, as flowers-predict)")
    p.add_argument("--wait-quiet", action="store_true", help="first wait (<= 15 min) for a 1-min load below 0.7")
    add_output_args(p)
    args = p.parse_args(argv)
    from flowers_apps import serve as app
    args.max_batch = args.max_batch or app.DEFAULT_MAX_BATCH
    args.batch_wait_ms = app.DEFAULT_BATCH_WAIT_MS if args.batch_wait_ms is None else args.batch_wait_ms
    args.data_threads = args.data_threads or max(1, (os.cpu_count() or 1) // args.data_replicas)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    photos = require_flowers("bench.serve")
    load_start = wait_for_quiet() if args.wait_quiet else round(os.getloadavg()[0], 2)
    (name, size), = parse_models(args.model)
    files = sample_photos(photos, max(args.data_images, 200))
    import ray
    from ray import serve

    from flowers_apps.cluster import connect

    with tempfile.TemporaryDirectory() as tmp:
        model_path = make_model(name, size, Path(tmp) / "model.pth")
        connect(None)  # a local Ray, its workers at this process's priority (as flowers-serve starts one)
        try:
            bench = Bench(args, model_path, [f.read_bytes() for f in files[:200]])
            serving = measure_serving(bench, args)
            serve.shutdown()
            ray_data = measure_ray_data(model_path, files[:args.data_images], args)
        finally:
            ray.shutdown()
    meta = dict(model=name, image_size=size, replicas=args.replicas, replica_threads=args.threads // args.replicas
                or 1, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, clients=args.clients,
                requests=args.requests, rounds=args.rounds, data_images=args.data_images,
                data_replicas=args.data_replicas, data_threads=args.data_threads, load_start=load_start,
                load_end=round(os.getloadavg()[0], 2), ray=ray.__version__)
    results = dict(meta=meta, args={k: v for k, v in vars(args).items() if k != "json"}, serving=serving,
                   ray_data=ray_data)
    print(report(results))
    save_results("serve", args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
