"""Online serving on Ray Serve: replicas of one exported model behind HTTP, concurrent requests batched.

    flowers-serve MODEL [--replicas N] [--max-batch B] [--batch-wait-ms W] [--threads T] [--host H] [--port P]
                        [--address ADDR]                         (the options: flowers_apps/cli.py)
    serve run docs/serve-config.yaml  /  serve deploy docs/serve-config.yaml   (a cluster: `app_builder`)

HTTP contract (docs/serving.md):
    POST /predict   body: the image's bytes, or a multipart form with a `file` field;
                    query: calibrated=true|false (default true), top_k=K (default: every class)
                    -> 200 {"label": ..., "probabilities": {class: p, ...}, "model": ...}
                       (headers X-Batch-Size, X-Replica and Server-Timing: where the time went)
                    -> 400 {"error": why} (empty, not an image, truncated, a decompression bomb, a bad query),
                       413 (a body over MAX_BODY_BYTES); the replica goes on serving
    GET /healthz    -> 200 {"status": "ok", "model": ...}

Each replica loads the model once (`fc.load_model`, any file it serves) and runs concurrent requests through
`@serve.batch`: up to `max_batch` images per forward, the requests that came during the previous forward together
(plus at most `batch_wait_ms` for more), decoded from the request bytes in memory (never a temp file) by the
runtime's batch path, so a bad image fails its own request only. Imports Ray: only the serving entry points
import this module.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

import flowers_classifier as fc
from flowers_classifier.errors import FlowersError
from flowers_classifier.model import calibrated_softmax

from .cluster import model_location, torch_thread

APP_NAME = "flowers"
DEPLOYMENT_NAME = "FlowerClassifier"
MAX_BODY_BYTES = 20 * 2**20  # the demo's upload limit too: a photo, not a RAW file or a video
BATCH_SIZE_HEADER = "X-Batch-Size"  # how many requests shared this answer's forward pass (tuning, tests)
# Where a request's time went inside the replica, as the standard Server-Timing header (ms): `wait` from arrival at
# the batch queue to its batch's start (the batch wait, or the batch ahead), `model` decode + forward of the batch,
# `replica` all of __call__. The client's time less `replica` is the HTTP proxy, the router and the network.
TIMING_HEADER = "Server-Timing"
REPLICA_HEADER = "X-Replica"  # which replica answered (Serve's replica id, as in its logs and `serve status`)
# Defaults chosen from bench/serve.py on a 2-core CPU (docs/serving.md: Where the latency goes).
DEFAULT_MAX_BATCH = 8
DEFAULT_BATCH_WAIT_MS = 0.0
DEFAULT_THREADS = 1
DEFAULT_PORT = 8000
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


class ServeConfigError(FlowersError, ValueError):
    """A serving option (flag or Serve config `args`) out of range or unknown. The message names it."""


class BadRequest(FlowersError, ValueError):  # noqa: N818 - named for the HTTP answer it becomes
    """A request the server refuses: `status` (400, 413) and the reason the answer carries."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class FlowerClassifierServer:
    """One replica: the model, the batch queue and the HTTP routes. Plain class; `build_app` makes it a deployment."""

    def __init__(self, model: str, backend: str = "auto", max_batch: int = DEFAULT_MAX_BATCH,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, threads: int = DEFAULT_THREADS):
        # Every torch call, the load included, runs on this one thread (cluster.torch_thread says why one), off the
        # event loop: health checks and new requests keep flowing during a forward.
        self.worker = torch_thread(threads)
        # calibrated: ?calibrated=false divides the logits by 1 instead of the file's temperature
        self.model = self.worker.submit(fc.load_model, model, backend=backend).result()
        self.name = Path(model).name
        self.replica = serve.get_replica_context().replica_id.unique_id
        # Set while the model is idle (see _answer)
        self.model_idle = asyncio.Event()
        self.model_idle.set()
        self.classify.set_max_batch_size(max_batch)
        self.classify.set_batch_wait_timeout_s(batch_wait_ms / 1e3)

    async def __call__(self, request: Request) -> Response:
        arrived = time.perf_counter()
        path = request.url.path.rstrip("/") or "/"
        if path == "/healthz":
            if request.method not in ("GET", "HEAD"):
                return _error(405, "GET /healthz")
            return JSONResponse({"status": "ok", "model": self.name})
        if path != "/predict":
            return _error(404, f"no route {path}; POST /predict (the image as the body) or GET /healthz")
        if request.method != "POST":
            return _error(405, "POST the image's bytes (or a multipart `file` field) to /predict")
        try:
            calibrated, top_k = _query(request)
            body = await _image_bytes(request)
            answer, batch_size, timing = await self._answer(body, calibrated, top_k)
        except BadRequest as e:
            return _error(e.status, str(e))
        timing += f", replica;dur={1e3 * (time.perf_counter() - arrived):.2f}"
        return JSONResponse(answer, headers={BATCH_SIZE_HEADER: str(batch_size), TIMING_HEADER: timing,
                                             REPLICA_HEADER: self.replica})

    async def predict(self, image: bytes, calibrated: bool = True, top_k: int | None = None) -> dict:
        """The HTTP answer for a caller inside the cluster, through a DeploymentHandle
        (`serve.get_app_handle("flowers").predict.remote(data)`): no HTTP proxy. BadRequest for an image that does
        not decode."""
        return (await self._answer(image, calibrated, top_k or len(self.model.classes)))[0]

    async def _answer(self, body: bytes, calibrated: bool, top_k: int) -> tuple[dict, int, str]:
        """(the answer, its batch's size, the Server-Timing entries so far)."""
        queued = time.perf_counter()
        # While a batch runs, new requests wait here, then enter Serve's batch queue together when it ends: Serve
        # forms a batch as soon as its wait ends, even while the previous one still runs, so with a short wait a
        # busy replica would run batches of 1 or 2 (measured: 1.5 on average under 16 clients) instead of up to
        # --max-batch, and at no cost when the model is idle.
        await self.model_idle.wait()
        probs, batch_size, started, model_s = await self.classify(body)
        if isinstance(probs, str):
            raise BadRequest(400, probs)
        ranked = sorted(zip(self.model.classes, probs[calibrated], strict=True), key=lambda cp: cp[1], reverse=True)
        answer = {"label": ranked[0][0], "probabilities": dict(ranked[:top_k]), "model": self.name}
        return answer, batch_size, f"wait;dur={1e3 * (started - queued):.2f}, model;dur={1e3 * model_s:.2f}"

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_MS / 1e3)
    async def classify(self, bodies: list[bytes]) -> list[tuple[tuple[list, list] | str, int, float, float]]:
        """Per request: its (raw, calibrated) probabilities (or why its image does not decode), the batch's size,
        when the batch started (perf_counter) and its decode + forward seconds. One forward for the whole batch."""
        started = time.perf_counter()
        self.model_idle.clear()
        try:
            results = await asyncio.get_running_loop().run_in_executor(self.worker, self._probabilities, bodies)
        finally:
            self.model_idle.set()
        model_s = time.perf_counter() - started
        return [(probs, len(bodies), started, model_s) for probs in results]

    def _probabilities(self, bodies: list[bytes]) -> list[tuple[list, list] | str]:
        """The runtime's batch path: each body decoded with the same guards as a file, one forward for the good
        ones; softmax(logits) and softmax(logits / T) of each, or the reason it does not decode."""
        out = []
        for _, logits, error in fc.iter_probabilities(self.model, bodies, bs=len(bodies), logits=True):
            if error is not None:
                out.append(error.replace("image bytes", "request body", 1))
            else:
                out.append(tuple(calibrated_softmax(logits, t).tolist() for t in (1.0, self.model.temperature)))
        return out


def _query(request: Request) -> tuple[bool, int]:
    """(calibrated, top_k) from the query string; BadRequest(400) naming the parameter."""
    classes = len(fc.CLASSES)
    calibrated = request.query_params.get("calibrated", "true").lower()
    if calibrated not in TRUE + FALSE:
        raise BadRequest(400, f"calibrated={calibrated!r}: pass true or false")
    top_k = request.query_params.get("top_k", str(classes))
    if not top_k.isdigit() or not 1 <= int(top_k) <= classes:
        raise BadRequest(400, f"top_k={top_k!r}: pass a whole number from 1 to {classes}")
    return calibrated in TRUE, int(top_k)


async def _image_bytes(request: Request) -> bytes:
    """The image: the body, or its multipart `file` field; read at most MAX_BODY_BYTES (413 beyond), all in memory."""
    limit = f"the limit is {MAX_BODY_BYTES // 2**20} MiB; send a smaller image"
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise BadRequest(413, f"request body of {int(declared)} bytes: {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(413, f"request body over {MAX_BODY_BYTES} bytes: {limit}")
        chunks.append(chunk)
    body = b"".join(chunks)
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        body = await _multipart_file(request, body)
    if not body:
        raise BadRequest(400, "empty request body: POST the image's bytes, or a multipart form with a `file` field")
    return body


async def _multipart_file(request: Request, body: bytes) -> bytes:
    """The `file` field of a multipart body already read (parsed by Starlette from memory)."""
    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    # Starlette spools uploads over 1 MiB to a temp file: keep them in memory (the body is bounded above).
    from starlette.formparsers import MultiPartParser
    MultiPartParser.spool_max_size = MAX_BODY_BYTES
    try:
        form = await Request(request.scope, receive).form(max_files=1, max_fields=16)
    except Exception as e:  # noqa: BLE001 - python-multipart's and Starlette's parse errors have no common base
        raise BadRequest(400, f"cannot read the multipart form ({e}); send a `file` field holding the image") from e
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise BadRequest(400, "multipart form without a `file` field holding the image: name the field `file`")
    return await upload.read()


# --------------------------------------------------------------------------- building the application

def build_app(model: str | os.PathLike, *, replicas: int = 1, max_batch: int = DEFAULT_MAX_BATCH,
              batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, threads: int = DEFAULT_THREADS, backend: str = "auto",
              max_replicas_per_node: int | None = None, ray_actor_options: dict | None = None) -> Application:
    """The Serve application (`serve.run(build_app(...))`): `replicas` copies of the model at `model` (a path every
    node can read), each using `threads` CPUs. ServeConfigError for a value out of range."""
    if replicas < 1 or max_batch < 1 or threads < 1:
        raise ServeConfigError(f"replicas ({replicas}), max_batch ({max_batch}) and threads ({threads}) must each "
                               f"be at least 1 (--replicas, --max-batch, --threads)")
    if not 0 <= batch_wait_ms <= 10_000:
        raise ServeConfigError(f"batch_wait_ms ({batch_wait_ms}) must be between 0 and 10000 (--batch-wait-ms)")
    # A replica takes a second batch's worth while one runs, so the next batch is ready when the forward ends;
    # Serve's default (5) would cap every batch at 5 requests.
    options = dict(num_replicas=replicas, max_ongoing_requests=2 * max_batch,
                   ray_actor_options={"num_cpus": threads, **(ray_actor_options or {})})
    if max_replicas_per_node:
        options["max_replicas_per_node"] = max_replicas_per_node
    deployment = serve.deployment(FlowerClassifierServer, name=DEPLOYMENT_NAME)
    return deployment.options(**options).bind(model_location(model), backend=backend, max_batch=max_batch,
                                              batch_wait_ms=batch_wait_ms, threads=threads)


BUILDER_ARGS = ("model", "replicas", "max_batch", "batch_wait_ms", "threads", "backend")


def app_builder(args: dict) -> Application:
    """The Serve config's application builder (`import_path: flowers_apps.serve:app_builder`, `args:` as
    BUILDER_ARGS: model is required). A config's `deployments:` section may still override num_replicas etc."""
    unknown = sorted(set(args) - set(BUILDER_ARGS))
    if unknown or "model" not in args:
        raise ServeConfigError(f"Serve config args: {'unknown ' + ', '.join(unknown) if unknown else 'no model'}; "
                               f"expected {', '.join(BUILDER_ARGS)} (model required)")
    kwargs = {k: v for k, v in args.items() if k != "model"}
    return build_app(args["model"], **kwargs)


# --------------------------------------------------------------------------- running it (flowers-serve)

def start(application: Application, host: str, port: int) -> str:
    """Serve's HTTP proxy on host:port (a Serve already running on the cluster keeps its own) and `application`
    deployed as APP_NAME at /, its replicas started; returns the base URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def stop_on_signal() -> threading.Event:
    """An event that Ctrl-C (SIGINT) or SIGTERM sets. Installed after Ray is joined (ray.init installs its own
    SIGTERM handler, which would end the process without draining) and before the application starts, so that a
    signal during start-up stops it cleanly too."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def wait_for(stop: threading.Event) -> None:
    while not stop.wait(0.5):  # a timed wait: the signal handlers run between waits
        pass


def stop(started_ray: bool) -> None:
    """Delete the application: its replicas stop taking requests and finish those in flight (Serve's graceful
    shutdown), and then, when this process started Ray, Serve and Ray too."""
    serve.delete(APP_NAME)
    if started_ray:
        serve.shutdown()
        ray.shutdown()
